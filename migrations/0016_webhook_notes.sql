-- 0016: a verified provider webhook never answers 500: what its adapter could not apply is stored with the event, as
-- outcomes "kept" with a reason (ingest_webhook_v1's new p_notes, defaulted, so existing callers are unchanged).

drop function notify_api.ingest_webhook_v1(text, text, jsonb, notify.status_event[], notify.inbound_message[]);

create function notify_api.ingest_webhook_v1(p_provider text, p_event_key text, p_payload jsonb, p_events notify.status_event[],
                                            p_inbound notify.inbound_message[] default '{}', p_notes text[] default '{}')
    returns jsonb
    language plpgsql
    security definer
    set search_path = pg_catalog, pg_temp
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
    select v_outcomes || coalesce(jsonb_agg(jsonb_build_object(
               'inbound', (p_inbound[i]).message_id, 'outcome', notify._record_inbound(p_provider, p_inbound[i])) order by i), '[]')
      into v_outcomes
      from generate_subscripts(p_inbound, 1) as i;
    -- What the adapter could not apply (a member of the wrong type, an account-level error): kept with its reason.
    select v_outcomes || coalesce(jsonb_agg(jsonb_build_object('outcome', 'kept', 'reason', left(n, 500)) order by o), '[]')
      into v_outcomes
      from unnest(coalesce(p_notes, '{}')) with ordinality as x(n, o);
    update notify.webhook_events set outcomes = v_outcomes where id = v_id;
    return jsonb_build_object('stored', true, 'duplicate', false, 'id', v_id, 'outcomes', v_outcomes);
end
$$;
comment on function notify_api.ingest_webhook_v1(text, text, jsonb, notify.status_event[], notify.inbound_message[], text[]) is
    'Stores a verified provider webhook once per (provider, event key), applies its normalized status events by rank and records its inbound messages; p_notes (what the adapter could not apply, and why) are kept as outcomes "kept" with their reason. A duplicate changes nothing.';

comment on column notify.webhook_events.outcomes is 'Per status event: applied, stale (lower rank or illegal), unmatched (no such delivery) or ambiguous (two deliveries carry its provider message id); per inbound message its outcome; kept (with a reason) for what the adapter could not apply.';

revoke execute on function notify_api.ingest_webhook_v1(text, text, jsonb, notify.status_event[], notify.inbound_message[], text[]) from public;
grant execute on function notify_api.ingest_webhook_v1(text, text, jsonb, notify.status_event[], notify.inbound_message[], text[]) to notify_service;
select notify._settle_owners();
