-- notify_api: provider webhook ingestion — store once, apply status reports by rank.
-- Called by POST /public/webhooks/{provider} after the signature over the raw body was verified.

create function notify._apply_provider_status(p_provider text, e notify.status_event)
    returns text
    language plpgsql
    set search_path = ''
as $$
declare
    d notify.notification_deliveries;
    v_at timestamptz := coalesce(e.occurred_at, now());
begin
    if e.tenant_id is not null and e.delivery_id is not null then
        select * into d from notify.notification_deliveries x
         where x.tenant_id = e.tenant_id and x.id = e.delivery_id and (x.provider is null or x.provider = p_provider)
           for update;
    end if;
    if d.id is null and e.provider_message_id is not null then
        select * into d from notify.notification_deliveries x
         where x.provider = p_provider and x.provider_message_id = e.provider_message_id
           for update;
    end if;
    if d.id is null then
        return 'unmatched';
    end if;

    if notify._rank(d.channel, e.status) > notify._rank(d.channel, d.status)
       and notify._transition_allowed(d.channel, d.status, e.status) then
        update notify.notification_deliveries x
           set status = e.status,
               reason = case when e.status in ('failed', 'bounced', 'suppressed') then 'provider_reported' else x.reason end,
               provider = coalesce(x.provider, p_provider),
               provider_message_id = coalesce(x.provider_message_id, e.provider_message_id),
               sent_at = case when e.status in ('sent', 'delivered', 'read') then least(x.sent_at, v_at) else x.sent_at end,
               delivered_at = case when e.status in ('delivered', 'read') then least(x.delivered_at, v_at) else x.delivered_at end,
               read_at = case when e.status = 'read' then least(x.read_at, v_at) else x.read_at end,
               last_error_code = case when e.status in ('failed', 'bounced') then coalesce(e.error_code, x.last_error_code) else x.last_error_code end,
               last_error_message = case when e.status in ('failed', 'bounced') then coalesce(left(e.error_message, 1000), x.last_error_message)
                                         else x.last_error_message end
         where x.tenant_id = d.tenant_id and x.id = d.id;
        return 'applied';
    end if;
    -- A late or lower-ranked report changes no status, but still fills the time it happened.
    update notify.notification_deliveries x
       set sent_at = case when e.status in ('sent', 'delivered', 'read') then least(x.sent_at, v_at) else x.sent_at end,
           delivered_at = case when e.status in ('delivered', 'read') and x.status in ('delivered', 'read')
                               then least(x.delivered_at, v_at) else x.delivered_at end
     where x.tenant_id = d.tenant_id and x.id = d.id
       and e.status in ('sent', 'delivered', 'read');
    return 'stale';
end
$$;
comment on function notify._apply_provider_status(text, notify.status_event) is
    'Applies one provider status report to its delivery if it ranks higher and the move is legal (applied); otherwise only fills timestamps (stale). unmatched when no delivery is found.';

create function notify_api.ingest_webhook_v1(p_provider text, p_event_key text, p_payload jsonb, p_events notify.status_event[])
    returns jsonb
    language plpgsql
    security definer
    set search_path = ''
as $$
declare
    v_id bigint;
    v_outcomes jsonb;
begin
    if p_provider is null or p_provider !~ '^[a-z0-9_-]{1,40}$' then
        perform notify._raise('ND400', 'invalid_value', 'provider must be a short lowercase name', 'provider');
    end if;
    if p_event_key is null or length(p_event_key) not between 1 and 500 then
        perform notify._raise('ND400', 'invalid_value', 'event_key must be 1 to 500 characters', 'event_key');
    end if;
    insert into notify.webhook_events (provider, event_key, payload)
    values (p_provider, p_event_key, coalesce(p_payload, 'null'))
    on conflict (provider, event_key) do nothing
    returning id into v_id;
    if v_id is null then
        return jsonb_build_object('stored', false, 'duplicate', true, 'outcomes', '[]'::jsonb);
    end if;

    perform notify._set_source('webhook');
    -- In the order given; ranks make the result the same in any order.
    select coalesce(jsonb_agg(jsonb_strip_nulls(jsonb_build_object(
               'delivery_id', (p_events[i]).delivery_id, 'provider_message_id', (p_events[i]).provider_message_id,
               'status', (p_events[i]).status, 'outcome', notify._apply_provider_status(p_provider, p_events[i])))
               order by i), '[]')
      into v_outcomes
      from generate_subscripts(p_events, 1) as i;
    update notify.webhook_events set outcomes = v_outcomes where id = v_id;
    return jsonb_build_object('stored', true, 'duplicate', false, 'id', v_id, 'outcomes', v_outcomes);
end
$$;
comment on function notify_api.ingest_webhook_v1(text, text, jsonb, notify.status_event[]) is
    'Stores a verified provider webhook once per (provider, event key) and applies its normalized status events by rank. A duplicate changes nothing.';
