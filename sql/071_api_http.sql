-- notify_api: the HTTP API's submission statements, one function each (the request's ids, the submission, the rate token).
-- Called by POST /internal/notifications and /internal/notifications/batch (api/routes/notifications.py) only.
-- Tenant-scoped like the functions they wrap (owned by notify_owner, tenant bound first); notify_owner may take a key's
-- rate token for them (charge_api_key_v1, sql/900_grants.sql).

create function notify_api.submit_notification_http_v1(p_tenant_id uuid, p_body jsonb, p_idempotency_key text, p_request_id text,
                                                       p_traceparent text, p_key_id uuid, p_rate double precision)
    returns table (response jsonb, replayed boolean)
    language plpgsql
    security definer
    set search_path = pg_catalog, pg_temp
as $$
begin
    perform notify._enter(p_tenant_id);
    -- The columns' defaults read these settings (notify.notification_requests.http_request_id and trace_parent, and
    -- the test flag of the request and its deliveries, from the key: notify._enter_key).
    perform pg_catalog.set_config('notify.request_id', coalesce(p_request_id, ''), true),
            pg_catalog.set_config('notify.traceparent', coalesce(p_traceparent, ''), true),
            notify._enter_key(p_tenant_id, p_key_id);
    select s.response, s.replayed into response, replayed
      from notify_api.submit_notification_v1(p_tenant_id, p_body, p_idempotency_key) s;
    -- The guard only checked the key (check_api_key_v1); the token is taken last, so the bucket's row lock is held
    -- only while the submission commits. ND429 here rolls the submission back.
    perform notify_api.charge_api_key_v1(p_key_id, p_rate);
    return next;
end
$$;
comment on function notify_api.submit_notification_http_v1(uuid, jsonb, text, text, text, uuid, double precision) is
    'POST /internal/notifications in one statement: sets notify.request_id, notify.traceparent and notify.test (from the key) for this transaction, calls submit_notification_v1 (its answer says "test": true for a test request), then takes the key''s rate token (charge_api_key_v1), last. Returns the response and whether it is a replay.';

create function notify_api.submit_notifications_http_v1(p_tenant_id uuid, p_body jsonb, p_request_id text, p_traceparent text,
                                                        p_key_id uuid, p_rate double precision)
    returns jsonb
    language plpgsql
    security definer
    set search_path = pg_catalog, pg_temp
as $$
declare
    v_answer jsonb;
    v_test boolean;
begin
    perform notify._enter(p_tenant_id);
    perform pg_catalog.set_config('notify.request_id', coalesce(p_request_id, ''), true),
            pg_catalog.set_config('notify.traceparent', coalesce(p_traceparent, ''), true);
    v_test := notify._enter_key(p_tenant_id, p_key_id);
    v_answer := notify_api.submit_notifications_v1(p_tenant_id, p_body -> 'items');
    if v_test then
        v_answer := v_answer || '{"test": true}';   -- (each item's answer says so itself, as it was stored)
    end if;
    perform notify_api.charge_api_key_v1(p_key_id, p_rate);
    return v_answer;
end
$$;
comment on function notify_api.submit_notifications_http_v1(uuid, jsonb, text, text, uuid, double precision) is
    'POST /internal/notifications/batch in one statement: sets notify.request_id, notify.traceparent and notify.test (from the key) for this transaction, calls submit_notifications_v1 on the body''s items (a test key''s answer and items say "test": true), then takes the key''s rate token (charge_api_key_v1), last.';

create function notify_api.preview_notification_http_v1(p_tenant_id uuid, p_body jsonb, p_key_id uuid)
    returns jsonb
    language plpgsql
    security definer
    set search_path = pg_catalog, pg_temp
as $$
begin
    perform notify._enter(p_tenant_id);
    -- A test key's preview names the mock, as its submission would be sent by it (notify._enter_key sets notify.test,
    -- a setting of this transaction only: nothing is written).
    perform notify._enter_key(p_tenant_id, p_key_id);
    return notify_api.preview_notification_v1(p_tenant_id, p_body);
end
$$;
comment on function notify_api.preview_notification_http_v1(uuid, jsonb, uuid) is
    'POST /internal/notifications/preview in one statement: sets notify.test from the key for this transaction (a test key''s preview answers "test": true and the mock provider), then calls preview_notification_v1. Writes nothing; the route''s rate token is taken by its guard.';
