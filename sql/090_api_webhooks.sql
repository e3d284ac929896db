-- notify_api: provider webhook ingestion — store once, apply status reports by rank.
-- Called by POST /public/webhooks/{provider} after the signature over the raw body was verified.

create function notify._provider_family(p_webhook_provider text)
    returns text[]
    language sql
    immutable
    -- inlinable: no SET clause (see docs/architecture.md, "Hot helpers are inlined")
as $$
    -- E-mail service providers report on messages we handed to them over SMTP.
    select case when p_webhook_provider in ('sendgrid', 'mailgun') then array[p_webhook_provider, 'smtp']
                else array[p_webhook_provider] end
$$;
comment on function notify._provider_family(text) is 'The sending providers whose messages a webhook provider reports on.';

create function notify._apply_provider_status(p_provider text, e notify.status_event)
    returns text
    language plpgsql
    set search_path = pg_catalog, pg_temp
as $$
declare
    d notify.notification_deliveries;
    v_at timestamptz := coalesce(e.occurred_at, now());
    v_matches integer;
begin
    if e.tenant_id is not null and e.delivery_id is not null then
        select * into d from notify.notification_deliveries x
         where x.tenant_id = e.tenant_id and x.id = e.delivery_id and (x.provider is null or x.provider = any (notify._provider_family(p_provider)))
           for update;
    end if;
    if d.id is null and e.provider_message_id is not null then
        -- Two deliveries may carry the id (an ESP reporting on its own and on SMTP-relayed mail, or ids a provider
        -- reused): the report cannot be attributed, so it changes nothing rather than pick one.
        select count(*) into v_matches from notify.notification_deliveries x
         where x.provider = any (notify._provider_family(p_provider)) and x.provider_message_id = e.provider_message_id;
        if v_matches > 1 then
            return 'ambiguous';
        end if;
        select * into d from notify.notification_deliveries x
         where x.provider = any (notify._provider_family(p_provider)) and x.provider_message_id = e.provider_message_id
           for update;
    end if;
    if d.id is null then
        return 'unmatched';
    end if;

    if e.status is null then
        -- An engagement flag: never a status of its own, but it proves delivery, and a complaint is an opt-out.
        if e.flag is null or e.flag not in ('opened', 'clicked', 'complained', 'unsubscribed') then
            return 'ignored';
        end if;
        update notify.notification_deliveries x
           set opened_at = case when e.flag in ('opened', 'clicked') then least(x.opened_at, v_at) else x.opened_at end,
               complained_at = case when e.flag = 'complained' then least(x.complained_at, v_at) else x.complained_at end,
               status = case when notify._rank(x.channel, 'delivered') > notify._rank(x.channel, x.status)
                              and notify._transition_allowed(x.channel, x.status, 'delivered') then 'delivered' else x.status end,
               delivered_at = case when x.status in ('sending', 'sent', 'unknown') then least(x.delivered_at, v_at) else x.delivered_at end
         where x.tenant_id = d.tenant_id and x.id = d.id;
        if e.flag in ('complained', 'unsubscribed') and notify._consent_allows(d.tenant_id, d.recipient_id, d.channel, null) then
            insert into notify.recipient_consents (tenant_id, recipient_id, channel, status, source, evidence, recorded_by)
            values (d.tenant_id, d.recipient_id, d.channel, 'revoked', case e.flag when 'complained' then 'complaint' else 'provider_unsubscribe' end,
                    jsonb_build_object('delivery_id', d.id, 'provider', p_provider, 'reported_at', v_at), 'dispatcher');
        end if;
        return 'flagged';
    end if;

    if notify._rank(d.channel, e.status) > notify._rank(d.channel, d.status)
       and notify._transition_allowed(d.channel, d.status, e.status) then
        update notify.notification_deliveries x
           set status = e.status,
               reason = case when e.status in ('failed', 'bounced', 'suppressed') then 'provider_reported' else x.reason end,
               provider = coalesce(x.provider, p_provider),
               -- The report's id is taken only if no other delivery has it (the unique index would fail the webhook).
               provider_message_id = case
                   when x.provider_message_id is null and e.provider_message_id is not null
                        and not exists (select from notify.notification_deliveries y
                                         where y.provider = coalesce(x.provider, p_provider) and y.provider_message_id = e.provider_message_id
                                           and not (y.tenant_id = x.tenant_id and y.id = x.id))
                   then e.provider_message_id else x.provider_message_id end,
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
    'Applies one provider status report to its delivery if it ranks higher and the move is legal (applied); otherwise only fills timestamps (stale). A provider message id that two deliveries carry matches neither (ambiguous), and a report never gives its delivery an id another delivery has. Flags (opened, clicked, complained, unsubscribed) set their time, imply delivered, and a complaint or unsubscribe revokes consent (flagged). unmatched when no delivery is found.';

create function notify._record_inbound(p_provider text, m notify.inbound_message)
    returns text
    language plpgsql
    set search_path = pg_catalog, pg_temp
as $$
declare
    v_tenant record;
    v_outcome text := 'unmatched';
    v_address text := '+' || ltrim(m.sender, '+');
    v_revoked integer;
begin
    for v_tenant in
        select cp.tenant_id, cp.settings from notify.channel_providers cp
         where cp.provider = p_provider and cp.channel = 'whatsapp' and cp.settings ->> 'phone_number_id' = m.phone_number_id
    loop
        insert into notify.whatsapp_windows as w (tenant_id, phone_number_id, wa_id, last_inbound_at)
        values (v_tenant.tenant_id, m.phone_number_id, ltrim(m.sender, '+'), coalesce(m.received_at, now()))
        on conflict (tenant_id, phone_number_id, wa_id) do update
            set last_inbound_at = greatest(w.last_inbound_at, excluded.last_inbound_at);
        v_outcome := 'window_opened';
        if upper(btrim(coalesce(m.text, ''))) in (select upper(k) from jsonb_array_elements_text(coalesce(v_tenant.settings -> 'opt_out_keywords', '[]')) k) then
            insert into notify.recipient_consents (tenant_id, recipient_id, channel, status, source, evidence, recorded_by)
            select a.tenant_id, a.recipient_id, 'whatsapp', 'revoked', 'inbound_keyword',
                   jsonb_build_object('message_id', m.message_id, 'text', m.text, 'received_at', m.received_at,
                                      'phone_number_id', m.phone_number_id), 'dispatcher'
              from notify.recipient_addresses a
             where a.tenant_id = v_tenant.tenant_id and a.channel = 'whatsapp' and a.address = v_address
               and notify._consent_allows(a.tenant_id, a.recipient_id, 'whatsapp', null);
            get diagnostics v_revoked = row_count;
            v_outcome := case when v_revoked > 0 or v_outcome = 'opted_out' then 'opted_out' else 'opt_out_unknown_sender' end;
        end if;
    end loop;
    return v_outcome;
end
$$;
comment on function notify._record_inbound(text, notify.inbound_message) is
    'Records an inbound WhatsApp message for every tenant using that business number: opens the 24-hour window, and an opt-out keyword (settings.opt_out_keywords) revokes the sender''s WhatsApp consent with the message as evidence.';

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
