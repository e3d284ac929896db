-- 0042: status callbacks of a routed request carry each delivery's route step (data.step), so a receiver sees how the
-- route went (issue #14); nothing changes for a request that named channels.

create or replace function notify._callback_event(c notify.notification_deliveries, p_previous notify.delivery_status, r notify.notification_requests)
    returns jsonb
    language sql
    stable
    set search_path = pg_catalog, pg_temp
as $$
    select jsonb_build_object('type', 'delivery.status_changed', 'timestamp', now(), 'data', jsonb_strip_nulls(jsonb_build_object(
        'notification_id', c.request_id, 'delivery_id', c.id, 'sequence', c.seq, 'channel', c.channel,
        'status', c.status, 'previous_status', p_previous, 'reason', coalesce(c.reason, c.last_error_code),
        'attempt', nullif(c.attempt, 0), 'provider', c.provider, 'provider_message_id', c.provider_message_id,
        'metadata', nullif(r.metadata, '{}'::jsonb), 'http_request_id', r.http_request_id, 'test', case when c.test then true end,
        'step', c.route_step)))
$$;
comment on function notify._callback_event(notify.notification_deliveries, notify.delivery_status, notify.notification_requests) is
    'The Standard Webhooks payload of one delivery status change: ids, sequence, channel, status and reason, the request''s metadata, "test": true for a test delivery, the route step (step) of a routed request. No address, no content.';

