-- Every trigger and its trigger function, grouped by table: the deliveries' state machine guard, status history, callback outbox.
-- Fire on every write, whoever makes it (notify_api functions, maintenance, a trusted SQL client); nothing calls them directly.

-- Names: functions notify.tg_<table>__<task>, triggers _NNN_<task>. Postgres fires the triggers of one table with the same
-- timing, level and event in alphabetical order of their names, so that order is firing order.

-- notify.notification_deliveries
--   before update of status, per row:  _100_check_transition    (refuses an illegal change; sets seq, updated_at, finished_at)
--   after insert, per statement:       _200_record_event_insert, then _300_queue_callbacks_insert
--   after update, per statement:       _200_record_event_update, then _300_queue_callbacks_update
--   after update of status, per row:   _400_revoke_marketing_consent (only rows suppressed with WhatsApp error 131050)
--   after update of status, per row:   _410_revoke_sms_consent (only rows suppressed with Twilio error 21610)
-- _100 comes first because both after triggers copy the seq it sets. The history (_200) and the callback outbox (_300)
-- neither read what the other writes; the history goes first, and the outbox, which also defers the callbacks task,
-- last. A statement-level trigger with transition tables takes one event, hence the _insert/_update pairs.

create function notify.tg_notification_deliveries__check_transition()
    returns trigger
    language plpgsql
    set search_path = pg_catalog, pg_temp
as $$
begin
    if new.status is distinct from old.status then
        if not notify._transition_allowed(new.channel, old.status, new.status) then
            perform notify._raise('ND409', 'illegal_transition',
                format('delivery %s cannot go from %s to %s', new.id, old.status, new.status), 'status');
        end if;
        new.seq := old.seq + 1;
        new.updated_at := now();
        if notify._is_final(new.status) then
            new.finished_at := coalesce(new.finished_at, now());
        end if;
        if new.status <> 'sending' then
            new.lease_expires_at := null;
        end if;
    end if;
    return new;
end
$$;
comment on function notify.tg_notification_deliveries__check_transition() is
    'Refuses illegal status changes (notify._transition_allowed) and keeps seq, updated_at, finished_at and the lease consistent.';

create trigger _100_check_transition
    before update of status on notify.notification_deliveries
    for each row execute function notify.tg_notification_deliveries__check_transition();

create function notify.tg_notification_deliveries__record_event()
    returns trigger
    language plpgsql
    set search_path = pg_catalog, pg_temp
as $$
begin
    if tg_op = 'INSERT' then
        insert into notify.delivery_events (tenant_id, delivery_id, seq, from_status, to_status, source, reason)
        select n.tenant_id, n.id, n.seq, null, n.status, coalesce(nullif(current_setting('notify.source', true), ''), 'submit'), n.reason
          from new_rows n;
    else
        insert into notify.delivery_events (tenant_id, delivery_id, seq, from_status, to_status, source, reason)
        select n.tenant_id, n.id, n.seq, o.status, n.status,
               coalesce(nullif(current_setting('notify.source', true), ''), 'sql'),
               coalesce(n.reason, n.last_error_code)
          from new_rows n
          join old_rows o on o.tenant_id = n.tenant_id and o.id = n.id
         where n.status is distinct from o.status;
    end if;
    return null;
end
$$;
comment on function notify.tg_notification_deliveries__record_event() is
    'Appends one delivery_events row per status change (statement-level, set-based, so a 10,000-row claim is one insert).';

create trigger _200_record_event_insert
    after insert on notify.notification_deliveries
    referencing new table as new_rows
    for each statement execute function notify.tg_notification_deliveries__record_event();

create trigger _200_record_event_update
    after update on notify.notification_deliveries
    referencing old table as old_rows new table as new_rows
    for each statement execute function notify.tg_notification_deliveries__record_event();

-- Status callbacks (sql/095_callbacks.sql): the outbox notify.callback_messages, its endpoints, notify._callback_event and
-- notify._wake_callbacks are defined there, later in load order; a PL/pgSQL body resolves names when it first runs.
create function notify.tg_notification_deliveries__queue_callbacks()
    returns trigger
    language plpgsql
    set search_path = pg_catalog, pg_temp
as $$
declare
    v_count integer;
begin
    -- Statement-level and set-based, like the history trigger: one insert for a whole claim or submission.
    -- A tenant without callbacks costs one index probe (and under row security only its own row is visible).
    if not exists (select from notify.callback_endpoints e where e.enabled) then
        return null;
    end if;
    if tg_op = 'INSERT' then
        insert into notify.callback_messages (tenant_id, notification_id, delivery_id, seq, url, payload)
        select c.tenant_id, c.request_id, c.id, c.seq, coalesce(r.callback_url, e.url), notify._callback_event(c, null, r)
          from new_rows c
          join notify.notification_requests r on r.tenant_id = c.tenant_id and r.id = c.request_id
          join notify.callback_endpoints e on e.tenant_id = c.tenant_id and e.enabled   -- no endpoint: no secret to sign with
         where coalesce(r.callback_url, e.url) is not null
        on conflict (tenant_id, delivery_id, seq, created_at) do nothing;  -- created_at = now(): the partition key (sql/095)
    else
        insert into notify.callback_messages (tenant_id, notification_id, delivery_id, seq, url, payload)
        select c.tenant_id, c.request_id, c.id, c.seq, coalesce(r.callback_url, e.url), notify._callback_event(c, o.status, r)
          from new_rows c
          join old_rows o on o.tenant_id = c.tenant_id and o.id = c.id
          join notify.notification_requests r on r.tenant_id = c.tenant_id and r.id = c.request_id
          join notify.callback_endpoints e on e.tenant_id = c.tenant_id and e.enabled
         where c.status is distinct from o.status and coalesce(r.callback_url, e.url) is not null
        on conflict (tenant_id, delivery_id, seq, created_at) do nothing;  -- created_at = now(): the partition key (sql/095)
    end if;
    get diagnostics v_count = row_count;
    if v_count > 0 then
        perform notify._wake_callbacks();
    end if;
    return null;
end
$$;
comment on function notify.tg_notification_deliveries__queue_callbacks() is
    'Writes one callback message per delivery status change whose request (or tenant) has a callback URL, in the same transaction, and wakes the callbacks task.';

create trigger _300_queue_callbacks_insert
    after insert on notify.notification_deliveries
    referencing new table as new_rows
    for each statement execute function notify.tg_notification_deliveries__queue_callbacks();
create trigger _300_queue_callbacks_update
    after update on notify.notification_deliveries
    referencing old table as old_rows new table as new_rows
    for each statement execute function notify.tg_notification_deliveries__queue_callbacks();

-- WhatsApp 131050 (whatsapp-2026.md §4): the user stopped this business's marketing messages. Whether the send was refused
-- with it or a status report carried it, the delivery is suppressed and marketing consent is revoked, with the evidence.
create function notify.tg_notification_deliveries__revoke_marketing_consent()
    returns trigger
    language plpgsql
    set search_path = pg_catalog, pg_temp
as $$
begin
    if notify._consent_allows(new.tenant_id, new.recipient_id, new.channel, 'marketing') then
        insert into notify.recipient_consents (tenant_id, recipient_id, channel, category, status, source, evidence, recorded_by)
        values (new.tenant_id, new.recipient_id, new.channel, 'marketing', 'revoked', 'provider_opt_out',
                jsonb_strip_nulls(jsonb_build_object('delivery_id', new.id, 'provider', new.provider, 'provider_message_id', new.provider_message_id,
                                                     'error_code', new.last_error_code, 'error_message', new.last_error_message,
                                                     'reported_at', now())), 'dispatcher');
    end if;
    return null;
end
$$;
comment on function notify.tg_notification_deliveries__revoke_marketing_consent() is
    'A WhatsApp delivery suppressed with error 131050 (the user stopped marketing messages) revokes the recipient''s marketing consent, with the delivery and the error as evidence.';

create trigger _400_revoke_marketing_consent
    after update of status on notify.notification_deliveries
    for each row
    when (new.status = 'suppressed' and old.status is distinct from new.status and new.channel = 'whatsapp'
          and new.last_error_code = 'whatsapp_131050')
    execute function notify.tg_notification_deliveries__revoke_marketing_consent();

-- Twilio 21610: the recipient replied STOP to the sending number, and Twilio refuses to message it until it replies START.
-- Whether the send was refused with it or a status report carried it, the delivery is suppressed and the recipient's SMS
-- consent (every category) is revoked, with the evidence; an inbound START restores it (notify._record_sms_inbound).
create function notify.tg_notification_deliveries__revoke_sms_consent()
    returns trigger
    language plpgsql
    set search_path = pg_catalog, pg_temp
as $$
begin
    if notify._consent_allows(new.tenant_id, new.recipient_id, new.channel, null) then
        insert into notify.recipient_consents (tenant_id, recipient_id, channel, category, status, source, evidence, recorded_by)
        values (new.tenant_id, new.recipient_id, new.channel, null, 'revoked', 'provider_opt_out',
                jsonb_strip_nulls(jsonb_build_object('delivery_id', new.id, 'provider', new.provider, 'provider_message_id', new.provider_message_id,
                                                     'error_code', new.last_error_code, 'error_message', new.last_error_message,
                                                     'reported_at', now())), 'dispatcher');
    end if;
    return null;
end
$$;
comment on function notify.tg_notification_deliveries__revoke_sms_consent() is
    'An SMS delivery suppressed with Twilio error 21610 (the recipient replied STOP) revokes the recipient''s SMS consent, with the delivery and the error as evidence.';

create trigger _410_revoke_sms_consent
    after update of status on notify.notification_deliveries
    for each row
    when (new.status = 'suppressed' and old.status is distinct from new.status and new.channel = 'sms'
          and new.last_error_code = 'twilio_21610')
    execute function notify.tg_notification_deliveries__revoke_sms_consent();
