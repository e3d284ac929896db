-- Triggers on notification_deliveries: the state machine guard and the status history.
-- Fire on every write, whoever makes it; named _NNN_ so alphabetical order is firing order.

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
