-- Every trigger and its trigger function, grouped by table: the deliveries' state machine guard, status history, callback outbox.
-- Fire on every write, whoever makes it (notify_api functions, maintenance, a trusted SQL client); nothing calls them directly.

-- Names: functions notify.tg_<table>__<task>, triggers _NNN_<task>. Postgres fires the triggers of one table with the same
-- timing, level and event in alphabetical order of their names, so that order is firing order.

-- notify.notification_deliveries
--   before update of status, per row:  _100_check_transition    (refuses an illegal change; sets seq, updated_at, finished_at)
--   after insert, per statement:       _200_record_event_insert, then _300_queue_callbacks_insert
--   after update, per statement:       _200_record_event_update, then _300_queue_callbacks_update
--   after update, per statement:       _350_advance_route (fallback routes: moves a route's other steps)
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

-- Fallback routes (issue #14): a request submitted with a route has one delivery per step (route_step 1, 2, ...) per
-- recipient; the later ones wait (status waiting, due_at 'infinity'). This trigger moves the other steps when one
-- step's status changes, whoever changed it (claim, worker, webhook, maintenance, a trusted SQL client):
--   1. Goal reached. A step reaches route_until (rank-wise: delivered counts for sent, read for delivered and sent; an
--      unknown outcome does not) for the first time: every later step still pending (waiting, queued, scheduled, held)
--      ends not_needed, reason step_<n>_<status> (step_1_delivered). A later step already claimed (attempt > 0: being
--      sent, sent, or a retry) is left as it is, and the step that reached its goal says so: reason and a history note
--      step_<m>_already_claimed (both went out; the later one was claimed first).
--   2. Cannot succeed. A step ends suppressed, failed, bounced, expired or cancelled by the system (not by the caller,
--      whose cancel covers every step, nor by an erasure) before reaching its goal: the next step not final, if it is
--      waiting (and not past its expires_at), is due at once: queued, due_at now, reason step_<n>_<status>, worker woken.
--   3. Claimed. A step first goes to sending (claimed: committed before the provider is called, so a crash, a hang or a
--      retry does not stop the clock) and has a within: the next step not final, if it is still waiting untimed, is
--      due at now + within (it stays waiting; the claim takes due waiting rows and re-checks consent), reason
--      step_<n>_not_<until>_in_time; rule 1 makes it not_needed if the goal comes first. A later step claimed ends the
--      earlier steps still pending (a retry waiting for its backoff) cancelled, reason superseded_by_step_<m>: the route
--      has moved on. An earlier step claimed again (its retry) while a later one was claimed says so as in rule 1.
-- Locks: a route's steps are locked in step order (their ids are too, so cancel, which locks by id, agrees). The one
-- backwards lock (rule 3, an earlier step ended when a later one is claimed) skips a locked row instead of waiting, so
-- it cannot close a cycle. A claim holds the row it claims (FOR UPDATE SKIP LOCKED): rule 1 waits for it and then sees
-- it sending; a claim that comes while rule 1 holds the later step skips it and then finds it not_needed.
create function notify.tg_notification_deliveries__advance_route()
    returns trigger
    language plpgsql
    set search_path = pg_catalog, pg_temp
as $$
declare
    v_pending constant notify.delivery_status[] := array['waiting', 'queued', 'scheduled', 'held']::notify.delivery_status[];
    v_woken integer;
    v_source text;
begin
    -- Most statements move no route step: one look at their rows, then nothing.
    if not exists (select from new_rows n where n.route_step is not null) then
        return null;
    end if;
    -- What this trigger changes is recorded with source route (in the history and callbacks), then the source is
    -- given back to the statement's own writer.
    v_source := current_setting('notify.source', true);
    perform notify._set_source('route');

    -- 1. Goal reached: the later pending steps are not needed (locked in step order; a claim in progress is waited for).
    with reached as (
        select n.tenant_id, n.request_id, n.recipient_id, n.route_step, n.status
          from new_rows n join old_rows o on o.tenant_id = n.tenant_id and o.id = n.id
         where n.route_step is not null and n.status is distinct from o.status
           and notify._route_level(n.status) >= notify._route_level(n.route_until)
           and notify._route_level(o.status) < notify._route_level(n.route_until)
    ), later as (
        select d.tenant_id, d.id, format('step_%s_%s', r.route_step, r.status) as reason
          from reached r
          join notify.notification_deliveries d
            on d.request_id = r.request_id and d.tenant_id = r.tenant_id and d.recipient_id = r.recipient_id
           and d.route_step > r.route_step
         where d.status = any (v_pending)
         order by d.route_step
           for update of d
    )
    update notify.notification_deliveries d set status = 'not_needed', reason = l.reason
      from later l
     where d.tenant_id = l.tenant_id and d.id = l.id and d.status = any (v_pending);

    -- 1b. ... and if a later step had been claimed already (or, rule 3, an earlier step is claimed again after a later
    --     one), the step that reached its goal or was claimed says so (read after the locks above: what they waited for
    --     has committed).
    with noted as (
        select n.tenant_id, n.id, n.seq, n.status, min(d.route_step) as step
          from new_rows n join old_rows o on o.tenant_id = n.tenant_id and o.id = n.id
          join notify.notification_deliveries d
            on d.request_id = n.request_id and d.tenant_id = n.tenant_id and d.recipient_id = n.recipient_id
           and d.route_step > n.route_step and d.attempt > 0
         where n.route_step is not null and n.status is distinct from o.status
           and ((notify._route_level(n.status) >= notify._route_level(n.route_until)
                 and notify._route_level(o.status) < notify._route_level(n.route_until))
                or (n.status = 'sending' and o.status = any (v_pending) and n.attempt > 1))
         group by n.tenant_id, n.id, n.seq, n.status
    ), events as (
        insert into notify.delivery_events (tenant_id, delivery_id, seq, from_status, to_status, source, reason)
        select x.tenant_id, x.id, x.seq, x.status, x.status, 'route', format('step_%s_already_claimed', x.step) from noted x
    )
    update notify.notification_deliveries d set reason = format('step_%s_already_claimed', x.step)
      from noted x
     where d.tenant_id = x.tenant_id and d.id = x.id;

    -- 2. Cannot succeed: the next step not final, if waiting, is due now.
    with lost as (
        select n.tenant_id, n.request_id, n.recipient_id, n.route_step, n.status
          from new_rows n join old_rows o on o.tenant_id = n.tenant_id and o.id = n.id
         where n.route_step is not null and n.status is distinct from o.status
           and (n.status in ('suppressed', 'failed', 'bounced', 'expired')
                or (n.status = 'cancelled' and n.reason is distinct from 'cancelled_by_caller'
                    and n.reason is distinct from 'recipient_erased'))
           and notify._route_level(o.status) < notify._route_level(n.route_until)
    ), next_step as (
        select distinct on (l.tenant_id, l.request_id, l.recipient_id, l.route_step)
               d.tenant_id, d.id, d.status, d.expires_at, d.route_step, format('step_%s_%s', l.route_step, l.status) as reason
          from lost l
          join notify.notification_deliveries d
            on d.request_id = l.request_id and d.tenant_id = l.tenant_id and d.recipient_id = l.recipient_id
           and d.route_step > l.route_step
         where not notify._is_final(d.status)
         order by l.tenant_id, l.request_id, l.recipient_id, l.route_step, d.route_step
    ), due as (
        select d.tenant_id, d.id, x.reason
          from next_step x
          join notify.notification_deliveries d on d.tenant_id = x.tenant_id and d.id = x.id
         where x.status = 'waiting' and (x.expires_at is null or x.expires_at > now())
         order by x.route_step
           for update of d
    ), moved as (
        update notify.notification_deliveries d set status = 'queued', due_at = now(), reason = x.reason
          from due x
         where d.tenant_id = x.tenant_id and d.id = x.id and d.status = 'waiting'
        returning d.channel
    )
    select count(*) into v_woken
      from (select notify._wake(m.channel) from (select distinct channel from moved order by 1) m) w;

    -- 3. Claimed: the next step's timer starts; earlier pending steps (a retry) end, skipping a locked one.
    with claimed as (
        select n.tenant_id, n.request_id, n.recipient_id, n.route_step, n.route_until, n.route_within
          from new_rows n join old_rows o on o.tenant_id = n.tenant_id and o.id = n.id
         where n.route_step is not null and n.status = 'sending' and o.status = any (v_pending)
    ), next_step as (
        select distinct on (c.tenant_id, c.request_id, c.recipient_id, c.route_step)
               d.tenant_id, d.id, d.status, d.due_at, d.route_step, c.route_within,
               format('step_%s_not_%s_in_time', c.route_step, c.route_until) as reason
          from claimed c
          join notify.notification_deliveries d
            on d.request_id = c.request_id and d.tenant_id = c.tenant_id and d.recipient_id = c.recipient_id
           and d.route_step > c.route_step
         where not notify._is_final(d.status) and c.route_within is not null
         order by c.tenant_id, c.request_id, c.recipient_id, c.route_step, d.route_step
    ), timed as (
        select d.tenant_id, d.id, x.route_within, x.reason
          from next_step x
          join notify.notification_deliveries d on d.tenant_id = x.tenant_id and d.id = x.id
         where x.status = 'waiting' and x.due_at = 'infinity'
         order by x.route_step
           for update of d
    ), set_timer as (
        update notify.notification_deliveries d set due_at = now() + x.route_within, reason = x.reason
          from timed x
         where d.tenant_id = x.tenant_id and d.id = x.id and d.status = 'waiting' and d.due_at = 'infinity'
        returning d.channel, d.due_at
    )
    select count(*) into v_woken
      from (select notify._wake(t.channel, t.due_at) from (select * from set_timer order by channel) t) w;

    with claimed as (
        select n.tenant_id, n.request_id, n.recipient_id, n.route_step
          from new_rows n join old_rows o on o.tenant_id = n.tenant_id and o.id = n.id
         where n.route_step > 1 and n.status = 'sending' and o.status = any (v_pending)
    ), earlier as (
        select d.tenant_id, d.id, format('superseded_by_step_%s', c.route_step) as reason
          from claimed c
          join notify.notification_deliveries d
            on d.request_id = c.request_id and d.tenant_id = c.tenant_id and d.recipient_id = c.recipient_id
           and d.route_step < c.route_step
         where d.status = any (v_pending)
         order by d.route_step
           for update of d skip locked
    )
    update notify.notification_deliveries d set status = 'cancelled', reason = e.reason
      from earlier e
     where d.tenant_id = e.tenant_id and d.id = e.id and d.status = any (v_pending);
    perform set_config('notify.source', coalesce(v_source, ''), true);
    return null;
end
$$;
comment on function notify.tg_notification_deliveries__advance_route() is
    'Fallback routes: when a route step''s status changes, a goal reached makes the later pending steps not_needed (or notes that a later one was claimed already), a step that cannot succeed makes the next waiting step due now, a first claim starts the next step''s within timer and ends earlier pending steps as superseded. Statement-level and set-based; locks a route''s steps in step order.';

create trigger _350_advance_route
    after update on notify.notification_deliveries
    referencing old table as old_rows new table as new_rows
    for each statement execute function notify.tg_notification_deliveries__advance_route();

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
