-- notify_api: an end for unknown outcomes — an operator resolves one by hand, or its channel's deadline makes it final.
-- Called by POST /internal/deliveries/{id}/resolve, `dispatcher deliveries resolve`, the periodic maintenance
-- (notify_api.run_maintenance_v1) and trusted SQL clients.

create function notify._unknown_deadline_default(p_channel notify.channel)
    returns integer
    language sql
    immutable
    set search_path = pg_catalog, pg_temp
as $$
    -- A provider that accepted a message reports it within minutes, and retries its webhook for days (Meta: up to 7);
    -- past that, no report is coming.
    select (notify._channel_rules(p_channel)).unknown_deadline_seconds
$$;
comment on function notify._unknown_deadline_default(notify.channel) is
    'Seconds a delivery may stay unknown when the tenant set no deadline for the channel (notify._channel_rules): 7 days for WhatsApp and SMS, 1 day for e-mail.';

create function notify._finish_unknown_deliveries()
    returns integer
    language plpgsql
    volatile
    set search_path = pg_catalog, pg_temp
as $$
declare
    v_n integer;
begin
    -- Never a resend: an unknown past its deadline becomes failed, saying why; a late provider report can still move
    -- it (failed -> delivered is a legal, ranked change for WhatsApp and SMS).
    with due as (
        select d.tenant_id, d.id
          from notify.notification_deliveries d
          left join notify.unknown_deadlines u on u.tenant_id = d.tenant_id and u.channel = d.channel
         where d.status = 'unknown'
           and d.updated_at < now() - make_interval(secs => coalesce(u.after_seconds, notify._unknown_deadline_default(d.channel)))
         order by d.updated_at
         limit 10000
           for update of d skip locked
    ), done as (
        update notify.notification_deliveries d
           set status = 'failed', reason = 'outcome_unknown_deadline', last_error_code = 'outcome_unknown_deadline',
               last_error_message = 'no provider report within the channel''s deadline for unknown outcomes; the message may have been delivered'
          from due
         where d.tenant_id = due.tenant_id and d.id = due.id and d.status = 'unknown'
        returning 1
    )
    select count(*) into v_n from done;
    return v_n;
end
$$;
comment on function notify._finish_unknown_deliveries() is
    'Maintenance: every delivery unknown for longer than its tenant''s deadline for the channel (notify.unknown_deadlines, or the default) becomes failed with reason outcome_unknown_deadline, up to 10,000 per run. Never resent. Returns how many.';

create function notify_api.resolve_delivery_v1(p_tenant_id uuid, p_delivery_id uuid, p_body jsonb, p_resolved_by text default null)
    returns jsonb
    language plpgsql
    security definer
    set search_path = pg_catalog, pg_temp
as $$
declare
    v notify.notification_deliveries;
    v_status text;
    v_note text;
begin
    perform notify._enter(p_tenant_id);
    perform notify._check_keys(coalesce(p_body, '{}'), array['status', 'note'], '');
    v_status := notify._text_field(coalesce(p_body, '{}'), 'status', '', true, 16);
    if v_status not in ('sent', 'failed') then
        perform notify._raise('ND400', 'invalid_value', 'status must be sent or failed', 'status');
    end if;
    v_note := notify._text_field(p_body, 'note', '', true, 500);
    select * into v from notify.notification_deliveries d where d.tenant_id = p_tenant_id and d.id = p_delivery_id for update;
    if v.id is null then
        perform notify._raise('ND404', 'not_found', 'no such delivery', 'id');
    end if;
    if v.status <> 'unknown' then
        perform notify._raise('ND409', 'not_unknown', format('delivery is %s: only an unknown outcome is resolved by hand', v.status), 'status');
    end if;
    -- Recorded in the history like any change: source operator (who, in the note's event), reason the note.
    perform notify._set_source(left('operator' || coalesce(':' || p_resolved_by, ''), 200));
    update notify.notification_deliveries d
       set status = v_status::notify.delivery_status, reason = 'resolved: ' || v_note,
           sent_at = case when v_status = 'sent' then coalesce(d.sent_at, now()) else d.sent_at end,
           last_error_code = case when v_status = 'failed' then 'resolved_failed' else d.last_error_code end
     where d.tenant_id = p_tenant_id and d.id = p_delivery_id
    returning * into v;
    return notify._delivery_json(v, true);
end
$$;
comment on function notify_api.resolve_delivery_v1(uuid, uuid, jsonb, text) is
    'Resolves an unknown outcome by hand: {status: sent|failed, note} (what the operator learned, e.g. from the provider''s console). Recorded in the delivery''s history (source operator:<who>, reason "resolved: <note>"). ND409 not_unknown for a delivery in any other status; 404 for another tenant''s.';

create function notify_api.set_unknown_deadline_v1(p_tenant_id uuid, p_channel text, p_after_seconds integer)
    returns jsonb
    language plpgsql
    security definer
    set search_path = pg_catalog, pg_temp
as $$
declare
    v_channel notify.channel;
begin
    perform notify._enter(p_tenant_id);
    v_channel := notify._channel_field(to_jsonb(p_channel), 'channel');
    if p_after_seconds is null then
        delete from notify.unknown_deadlines u where u.tenant_id = p_tenant_id and u.channel = v_channel;
    elsif p_after_seconds not between 60 and 31536000 then
        perform notify._raise('ND422', 'invalid_value', 'after_seconds must be between 60 (a minute) and 31536000 (a year)', 'after_seconds');
    else
        insert into notify.unknown_deadlines as u (tenant_id, channel, after_seconds)
        values (p_tenant_id, v_channel, p_after_seconds)
        on conflict (tenant_id, channel) do update set after_seconds = excluded.after_seconds, updated_at = now();
    end if;
    return jsonb_build_object('channel', v_channel,
        'after_seconds', coalesce((select u.after_seconds from notify.unknown_deadlines u
                                    where u.tenant_id = p_tenant_id and u.channel = v_channel),
                                  notify._unknown_deadline_default(v_channel)),
        'default', not exists (select from notify.unknown_deadlines u where u.tenant_id = p_tenant_id and u.channel = v_channel));
end
$$;
comment on function notify_api.set_unknown_deadline_v1(uuid, text, integer) is
    'Sets how long a delivery on the channel may stay unknown before maintenance makes it final (60 s to a year); null: back to the default (7 days for WhatsApp and SMS, 1 day for e-mail). Returns {channel, after_seconds, default}.';
