-- 0027: test keys (issue #17): a key may be a test key; what it submits is marked test (request and deliveries) and
-- the claim hands test deliveries to the mock provider whatever the tenant configured.

alter table notify.api_clients add column test boolean not null default false;
comment on column notify.api_clients.test is
    'A test key: everything it submits goes through the whole path but is sent by the mock provider only, whatever provider the tenant configured (notify.notification_deliveries.test).';
alter table notify.notification_requests
    add column test boolean not null default coalesce(nullif(current_setting('notify.test', true), '')::boolean, false);
comment on column notify.notification_requests.test is
    'Submitted with a test key (transaction setting notify.test, set from the key by notify._enter_key): its deliveries are test deliveries.';
alter table notify.notification_deliveries
    add column test boolean not null default coalesce(nullif(current_setting('notify.test', true), '')::boolean, false);
comment on column notify.notification_deliveries.test is
    'A test delivery (submitted with a test key): the claim hands it to the mock provider whatever the tenant configured, so it never reaches a real provider.';

drop function notify_api.create_api_key_v1(uuid, text, text, bytea, text[]);
create function notify_api.create_api_key_v1(p_tenant_id uuid, p_name text, p_prefix text, p_key_hash bytea,
                                             p_scopes text[] default '{submit,read,admin}', p_test boolean default false)
    returns jsonb
    language plpgsql
    security definer
    set search_path = pg_catalog, pg_temp
as $$
declare
    v notify.api_clients;
begin
    perform notify._enter(p_tenant_id);
    if p_scopes is null or cardinality(p_scopes) = 0 or not p_scopes <@ array['submit', 'read', 'admin'] then
        perform notify._raise('ND422', 'invalid_scopes', 'scopes must be a non-empty subset of submit, read, admin', 'scopes');
    end if;
    if not exists (select from notify.tenants where id = p_tenant_id) then
        perform notify._raise('ND404', 'not_found', 'no such tenant', 'tenant_id');
    end if;
    if octet_length(p_key_hash) is distinct from 32 then
        perform notify._raise('ND422', 'invalid_key_hash', 'key_hash must be a SHA-256 digest (32 bytes)', 'key_hash');
    end if;
    insert into notify.api_clients (tenant_id, name, prefix, key_hash, scopes, test)
    values (p_tenant_id, coalesce(p_name, 'default'), p_prefix, p_key_hash, p_scopes, coalesce(p_test, false))
    returning * into v;
    return jsonb_build_object('id', v.id, 'tenant_id', v.tenant_id, 'name', v.name, 'prefix', v.prefix,
                              'scopes', to_jsonb(v.scopes), 'test', v.test, 'created_at', v.created_at);
end
$$;
comment on function notify_api.create_api_key_v1(uuid, text, text, bytea, text[], boolean) is
    'Registers an API key by its SHA-256. The caller generates the key and shows it once; the database never sees it. p_test: a test key (everything it submits is sent by the mock provider only, README "Test keys").';

create or replace function notify_api.list_api_keys_v1(p_tenant_id uuid)
    returns jsonb
    language sql
    stable
    security definer
    set search_path = pg_catalog, pg_temp
as $$
    select notify._enter(p_tenant_id);
    select coalesce(jsonb_agg(jsonb_build_object('id', c.id, 'name', c.name, 'prefix', c.prefix, 'scopes', to_jsonb(c.scopes),
                                                 'test', c.test, 'created_at', c.created_at, 'last_used_at', c.last_used_at,
                                                 'expires_at', c.expires_at, 'revoked_at', c.revoked_at) order by c.created_at), '[]')
      from notify.api_clients c where c.tenant_id = p_tenant_id
$$;
comment on function notify_api.list_api_keys_v1(uuid) is 'A tenant''s keys (prefix only, never a hash), each saying whether it is a test key.';

create or replace function notify_api.rotate_api_key_v1(p_tenant_id uuid, p_key_id uuid, p_prefix text, p_key_hash bytea, p_overlap_seconds integer default 86400)
    returns jsonb
    language plpgsql
    security definer
    set search_path = pg_catalog, pg_temp
as $$
declare
    v notify.api_clients;
    v_new jsonb;
begin
    perform notify._enter(p_tenant_id);
    select * into v from notify.api_clients c
     where c.tenant_id = p_tenant_id and c.id = p_key_id and c.revoked_at is null and (c.expires_at is null or c.expires_at > now())
       for update;
    if v.id is null then
        perform notify._raise('ND404', 'not_found', 'no such active API key', 'key_id');
    end if;
    if p_overlap_seconds is null or p_overlap_seconds < 0 then
        perform notify._raise('ND422', 'invalid_value', 'overlap must be zero or more seconds', 'overlap_seconds');
    end if;
    v_new := notify_api.create_api_key_v1(p_tenant_id, v.name, p_prefix, p_key_hash, v.scopes, v.test);
    update notify.api_clients c set expires_at = now() + make_interval(secs => p_overlap_seconds)
     where c.tenant_id = p_tenant_id and c.id = p_key_id;
    return v_new || jsonb_build_object('replaces', p_key_id, 'old_key_expires_at', now() + make_interval(secs => p_overlap_seconds));
end
$$;
comment on function notify_api.rotate_api_key_v1(uuid, uuid, text, bytea, integer) is
    'Replaces a key with a new one of the same name, scopes and test flag; the old one keeps working for the overlap window, then stops.';

create function notify._enter_key(p_tenant_id uuid, p_key_id uuid)
    returns boolean
    language plpgsql
    volatile
    set search_path = pg_catalog, pg_temp
as $$
declare
    v_test boolean;
begin
    -- Decided from the key's row, never from anything the caller sends: the column defaults of requests and
    -- deliveries read this setting (notify.notification_deliveries.test), for this transaction only.
    select c.test into v_test from notify.api_clients c where c.tenant_id = p_tenant_id and c.id = p_key_id;
    v_test := coalesce(v_test, false);
    perform pg_catalog.set_config('notify.test', v_test::text, true);
    return v_test;
end
$$;
comment on function notify._enter_key(uuid, uuid) is
    'Sets the transaction setting notify.test from the API key (true for a test key, else false) and returns it: what a submission with that key writes is then marked test (the column defaults of notify.notification_requests and notification_deliveries read it).';

create function notify._test_answer(p_tenant_id uuid, p_answer jsonb)
    returns jsonb
    language sql
    stable
    set search_path = pg_catalog, pg_temp
as $$
    select case when exists (select from notify.notification_requests r
                              where r.tenant_id = p_tenant_id and r.id = (p_answer ->> 'id')::uuid and r.test)
                then p_answer || '{"test": true}'::jsonb else p_answer end
$$;
comment on function notify._test_answer(uuid, jsonb) is
    'A submission''s answer with "test": true added when its request is a test one (also when it is replayed, whatever key replays it).';

create or replace function notify_api.submit_notification_http_v1(p_tenant_id uuid, p_body jsonb, p_idempotency_key text, p_request_id text,
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
    response := notify._test_answer(p_tenant_id, response);  -- its own statement: it must see the request just written
    -- The guard only checked the key (check_api_key_v1); the token is taken last, so the bucket's row lock is held
    -- only while the submission commits. ND429 here rolls the submission back.
    perform notify_api.charge_api_key_v1(p_key_id, p_rate);
    return next;
end
$$;
comment on function notify_api.submit_notification_http_v1(uuid, jsonb, text, text, text, uuid, double precision) is
    'POST /internal/notifications in one statement: sets notify.request_id, notify.traceparent and notify.test (from the key) for this transaction, calls submit_notification_v1 (its answer says "test": true for a test request), then takes the key''s rate token (charge_api_key_v1), last. Returns the response and whether it is a replay.';

create or replace function notify_api.submit_notifications_http_v1(p_tenant_id uuid, p_body jsonb, p_request_id text, p_traceparent text,
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
        v_answer := v_answer || jsonb_build_object('test', true, 'items', (
            select coalesce(jsonb_agg(case when i ? 'body' then jsonb_set(i, '{body}', notify._test_answer(p_tenant_id, i -> 'body'))
                                           else i end order by n), '[]')
              from jsonb_array_elements(v_answer -> 'items') with ordinality x(i, n)));
    end if;
    perform notify_api.charge_api_key_v1(p_key_id, p_rate);
    return v_answer;
end
$$;
comment on function notify_api.submit_notifications_http_v1(uuid, jsonb, text, text, uuid, double precision) is
    'POST /internal/notifications/batch in one statement: sets notify.request_id, notify.traceparent and notify.test (from the key) for this transaction, calls submit_notifications_v1 on the body''s items (a test key''s answer and items say "test": true), then takes the key''s rate token (charge_api_key_v1), last.';

create or replace function notify._delivery_json(d notify.notification_deliveries, p_detail boolean)
    returns jsonb
    language sql
    stable
    set search_path = pg_catalog, pg_temp
as $$
    select jsonb_strip_nulls(jsonb_build_object(
        'id', d.id, 'channel', d.channel, 'status', d.status, 'reason', d.reason, 'attempts', d.attempt,
        'test', case when d.test then true end, 'provider', d.provider, 'provider_message_id', d.provider_message_id,
        'error', case when d.last_error_code is not null or d.last_error_message is not null
                      then jsonb_build_object('code', d.last_error_code, 'message', d.last_error_message) end,
        'due_at', d.due_at, 'expires_at', d.expires_at, 'created_at', d.created_at, 'updated_at', d.updated_at,
        'sent_at', d.sent_at, 'delivered_at', d.delivered_at, 'read_at', d.read_at, 'opened_at', d.opened_at,
        'finished_at', d.finished_at))
    || case when p_detail then jsonb_build_object(
        'events', coalesce((select jsonb_agg(jsonb_strip_nulls(jsonb_build_object(
                        'seq', e.seq, 'from', e.from_status, 'to', e.to_status, 'source', e.source, 'reason', e.reason,
                        'at', e.occurred_at)) order by e.seq, e.id)
                    from notify.delivery_events e where e.tenant_id = d.tenant_id and e.delivery_id = d.id), '[]'),
        'attempt_history', coalesce((select jsonb_agg(jsonb_strip_nulls(jsonb_build_object(
                        'attempt', a.attempt, 'started_at', a.started_at, 'finished_at', a.finished_at, 'outcome', a.outcome,
                        'provider', a.provider, 'provider_message_id', a.provider_message_id,
                        'error_code', a.error_code, 'error_message', a.error_message)) order by a.attempt)
                    from notify.delivery_attempts a where a.tenant_id = d.tenant_id and a.delivery_id = d.id), '[]'))
       else '{}' end
$$;
comment on function notify._delivery_json(notify.notification_deliveries, boolean) is
    'The public JSON form of a delivery (timestamps include opened_at, the first e-mail open or click reported; "test": true for a test delivery), with its history when p_detail.';

create or replace function notify_api.get_notification_v1(p_tenant_id uuid, p_id uuid)
    returns jsonb
    language plpgsql
    stable
    security definer
    set search_path = pg_catalog, pg_temp
as $$
declare
    v notify.notification_requests;
    v_deliveries jsonb;
    v_open boolean;
begin
    perform notify._enter(p_tenant_id);
    select * into v from notify.notification_requests r where r.tenant_id = p_tenant_id and r.id = p_id;
    if v.id is null then
        perform notify._raise('ND404', 'not_found', 'no such notification', 'id');
    end if;
    select jsonb_agg(notify._delivery_json(d, true) order by array_position(v.channels, d.channel), d.id),
           bool_or(d.status in ('scheduled', 'queued', 'sending', 'unknown'))
      into v_deliveries, v_open
      from notify.notification_deliveries d where d.tenant_id = p_tenant_id and d.request_id = p_id;
    return jsonb_strip_nulls(jsonb_build_object(
        'id', v.id, 'status', case when v_open then 'in_progress' else 'completed' end,
        'created_at', v.created_at, 'idempotency_key', v.idempotency_key,
        'recipient', (select r.ref from notify.recipients r where r.tenant_id = v.tenant_id and r.id = v.recipient_id),
        'recipient_count', case when v.recipient_id is null then v.recipient_count end,
        'template', v.template_key, 'category', v.category, 'channels', to_jsonb(v.channels),
        'send_at', v.send_at, 'expires_at', v.expires_at, 'metadata', v.metadata, 'http_request_id', v.http_request_id,
        'callback_url', v.callback_url, 'test', case when v.test then true end))
        || jsonb_build_object('deliveries', coalesce(v_deliveries, '[]'));
end
$$;
comment on function notify_api.get_notification_v1(uuid, uuid) is
    'A notification with every delivery''s status, attempts, provider message id, timestamps and event history ("test": true for a test key''s). 404 for another tenant''s id.';

create or replace function notify_api.claim_deliveries_v1(p_channel notify.channel, p_limit integer, p_lease_seconds integer default 60)
    returns setof notify.claimed_delivery
    language plpgsql
    security definer
    set search_path = pg_catalog, pg_temp
as $$
begin
    if p_limit is null or p_limit < 1 or p_limit > 10000 then
        perform notify._raise('ND400', 'invalid_value', 'limit must be 1 to 10000', 'limit');
    end if;
    perform notify._set_source('claim');
    return query
    with due as (
        select d.tenant_id, d.id
          from notify.notification_deliveries d
         where d.channel = p_channel and d.status in ('queued', 'scheduled') and d.due_at <= now()
         order by d.due_at
         limit p_limit
           for update skip locked
    ), decided as (
        -- Expiry and consent are checked again here: a revoke or a deadline between submit and send wins.
        -- Free-form WhatsApp text outside the 24-hour customer-service window is refused, not sent to fail.
        select d.tenant_id, d.id,
               case when d.expires_at is not null and d.expires_at <= now() then 'expired'
                    when not consent.allowed then 'suppressed'
                    when cp.provider = 'whatsapp_cloud' and t.content ? 'text' and not exists (
                             select from notify.whatsapp_windows w
                              where w.tenant_id = d.tenant_id and w.phone_number_id = cp.settings ->> 'phone_number_id'
                                and w.wa_id = ltrim(d.address, '+') and w.last_inbound_at > now() - interval '24 hours')
                         then 'failed'
                    else 'sending' end as next_status
          from due
          join notify.notification_deliveries d on d.tenant_id = due.tenant_id and d.id = due.id
          join notify.notification_requests r on r.tenant_id = d.tenant_id and r.id = d.request_id
         cross join lateral notify._consent(d.tenant_id, d.recipient_id, d.channel, r.category) consent
          left join notify.channel_providers cp on cp.tenant_id = d.tenant_id and cp.channel = d.channel
          left join notify.templates t on t.tenant_id = d.tenant_id and t.key = r.template_key
                                      and t.channel = d.channel and t.locale = d.template_locale
    ), updated as (
        update notify.notification_deliveries d
           set status = x.next_status::notify.delivery_status,
               attempt = d.attempt + (x.next_status = 'sending')::integer,
               lease_expires_at = case when x.next_status = 'sending' then now() + make_interval(secs => p_lease_seconds) end,
               reason = case x.next_status when 'expired' then 'expired_before_send' when 'suppressed' then 'no_consent'
                                           when 'failed' then 'outside_customer_service_window' else d.reason end
          from decided x
         where d.tenant_id = x.tenant_id and d.id = x.id
        returning d.*
    ), attempts as (
        insert into notify.delivery_attempts (tenant_id, delivery_id, attempt)
        select u.tenant_id, u.id, u.attempt from updated u where u.status = 'sending'
    )
    select u.tenant_id, u.id, u.attempt, u.channel, u.address, r.template_key, u.template_locale, t.content,
           r.variables || coalesce(u.variables, '{}'), r.category, u.request_id,
           -- A test delivery (README "Test keys") goes to the mock, whatever the tenant configured: never a real provider.
           case when u.test or r.test then 'mock' else coalesce(cp.provider, 'mock') end,
           case when u.test or r.test then '{"test": true}'::jsonb
                when cp.provider is not null
                then jsonb_build_object('settings', cp.settings, 'secrets', cp.secrets, 'updated_at', cp.updated_at,
                                        'grants', (select jsonb_build_object('env_prefix', g.env_prefix, 'file_dir', g.file_dir,
                                                                             'private_endpoints', g.private_endpoints)
                                                     from notify.provider_grants g where g.tenant_id = u.tenant_id)) end,
           r.http_request_id, r.trace_parent
      from updated u
      join notify.notification_requests r on r.tenant_id = u.tenant_id and r.id = u.request_id
      left join notify.templates t on t.tenant_id = u.tenant_id and t.key = r.template_key
                                  and t.channel = u.channel and t.locale = u.template_locale
      left join notify.channel_providers cp on cp.tenant_id = u.tenant_id and cp.channel = u.channel
     where u.status = 'sending';
end
$$;
comment on function notify_api.claim_deliveries_v1(notify.channel, integer, integer) is
    'Claims up to p_limit due deliveries of a channel (FOR UPDATE SKIP LOCKED): expired ones become expired, revoked ones suppressed, WhatsApp text outside the 24-hour window failed, the rest sending with attempt+1 and a lease. Returns what the worker needs to send them, with the tenant''s provider and its operator grant (checked again at send time); for a test delivery always the mock provider, with config {"test": true}.';

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
        'metadata', nullif(r.metadata, '{}'::jsonb), 'http_request_id', r.http_request_id, 'test', case when c.test then true end)))
$$;
comment on function notify._callback_event(notify.notification_deliveries, notify.delivery_status, notify.notification_requests) is
    'The Standard Webhooks payload of one delivery status change: ids, sequence, channel, status and reason, the request''s metadata, "test": true for a test delivery. No address, no content.';

revoke execute on function notify_api.create_api_key_v1(uuid, text, text, bytea, text[], boolean) from public;
revoke execute on function notify._enter_key(uuid, uuid) from public;
revoke execute on function notify._test_answer(uuid, jsonb) from public;
grant execute on function notify_api.create_api_key_v1(uuid, text, text, bytea, text[], boolean) to notify_service;
grant execute on function notify._enter_key(uuid, uuid) to notify_system;
grant execute on function notify._test_answer(uuid, jsonb) to notify_system;
select notify._settle_owners();
