-- Status callbacks: the outbox tables, the callback settings functions, and the worker's claim and record of callbacks.
-- Called by /internal/callbacks routes, GET /internal/notifications/{id}/callbacks, SQL clients and the worker's "callbacks" task.

-- Every delivery status change is posted to the tenant's (or the request's) callback URL as a Standard Webhooks
-- message. The outbox is notify.callback_messages, written by trigger _300_queue_callbacks_* (sql/040_triggers.sql) in
-- the same transaction as the status change; a request's own URL is notify.notification_requests.callback_url
-- (sql/020_tables.sql); the worker's "callbacks" task claims, signs, posts and records every attempt.

create table notify.callback_endpoints (
    tenant_id uuid primary key references notify.tenants (id),
    url text,
    secret text not null,
    previous_secret text,
    previous_valid_until timestamptz,
    retry_schedule_ms integer[] not null default '{0,5000,300000,1800000,7200000,18000000,36000000,36000000}',
    enabled boolean not null default true,
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now(),
    constraint callback_endpoints_url check (notify._is_http_url(url)),
    constraint callback_endpoints_secret check (secret ~ '^whsec_[A-Za-z0-9+/]{32,}={0,2}$'),
    constraint callback_endpoints_schedule check (cardinality(retry_schedule_ms) between 1 and 20
                                                  and 0 <= all (retry_schedule_ms) and 86400000 >= all (retry_schedule_ms))
);
comment on table notify.callback_endpoints is
    'A tenant''s status callbacks: the default URL (a request may name its own), the whsec_ signing secret (and the previous one during a rotation), and the retry schedule.';
comment on column notify.callback_endpoints.secret is
    'The Standard Webhooks signing secret. Stored because signing needs it (an HMAC key cannot be hashed); shown only when created or rotated.';
comment on column notify.callback_endpoints.retry_schedule_ms is
    'Delay before each attempt after the first failure, with +-10% jitter. The default (Svix''s) spans 27.6 hours: immediately, 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h.';

create table notify.callback_messages (
    tenant_id uuid not null,
    id uuid not null default gen_random_uuid(),
    notification_id uuid not null,
    delivery_id uuid not null,
    seq integer not null,
    url text not null,
    payload jsonb not null,
    status text not null default 'pending',
    attempts integer not null default 0,
    next_attempt_at timestamptz not null default now(),
    lease_expires_at timestamptz,
    created_at timestamptz not null default now(),
    finished_at timestamptz,
    last_error text,
    -- created_at is in the keys because the table is partitioned by it (sql/105_retention.sql); it never changes, so an
    -- update never moves a row. The trigger's conflict target is the second key: a change is queued once, in the
    -- transaction that makes it (created_at = now(), the same for both inserts of one change).
    primary key (tenant_id, id, created_at),
    constraint callback_messages_one_per_change unique (tenant_id, delivery_id, seq, created_at),
    constraint callback_messages_status check (status in ('pending', 'sending', 'delivered', 'failed'))
) partition by range (created_at);
comment on table notify.callback_messages is
    'The callback outbox: one message per delivery status change, committed with the change. Sent in seq order per delivery (a later change waits for the earlier one to be delivered or given up).';
comment on column notify.callback_messages.seq is 'The delivery''s sequence number at this change (1 = created): receivers drop an event older than one they have.';
-- Daily partitions (<table>_pYYYYMMDD, UTC) are made ahead and dropped past retention, never while one holds a message
-- still pending or sending (sql/105_retention.sql); the default partition takes a row no daily partition covers.
create table notify.callback_messages_default partition of notify.callback_messages default;
comment on table notify.callback_messages_default is 'Rows of notify.callback_messages outside every daily partition (moved out when their day''s partition is made).';
create index callback_messages_due on notify.callback_messages (next_attempt_at) where status in ('pending', 'sending');
create index callback_messages_notification on notify.callback_messages (tenant_id, notification_id);

create table notify.callback_attempts (
    tenant_id uuid not null,
    message_id uuid not null,
    attempt integer not null,
    started_at timestamptz not null,
    finished_at timestamptz not null default now(),
    status_code integer,
    error text,
    outcome text not null,
    primary key (tenant_id, message_id, attempt, started_at),  -- started_at: the partition column (sql/105_retention.sql)
    constraint callback_attempts_outcome check (outcome in ('delivered', 'retry', 'failed', 'refused'))
) partition by range (started_at);
comment on table notify.callback_attempts is
    'Every attempt to post a callback: the receiver''s status code or the error, and what it meant (refused: the URL resolved to a private or loopback address).';
create table notify.callback_attempts_default partition of notify.callback_attempts default;
comment on table notify.callback_attempts_default is 'Rows of notify.callback_attempts outside every daily partition (moved out when their day''s partition is made).';

create function notify._wake_callbacks(p_at timestamptz default null)
    returns void
    language sql
    volatile
    set search_path = pg_catalog, pg_temp
as $$
    select notify._wake_task('callbacks', 'callbacks', '{}', p_at)
$$;
comment on function notify._wake_callbacks(timestamptz) is
    'Defers a procrastinate "callbacks" job now, or at the second p_at falls in; commits with the caller''s transaction.';

create function notify._callback_event(c notify.notification_deliveries, p_previous notify.delivery_status, r notify.notification_requests)
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

create function notify._callback_json(e notify.callback_endpoints, p_secret text)
    returns jsonb
    language sql
    stable
    set search_path = pg_catalog, pg_temp
as $$
    select jsonb_strip_nulls(jsonb_build_object(
        'url', e.url, 'enabled', e.enabled, 'retry_schedule_ms', to_jsonb(e.retry_schedule_ms),
        'secret', p_secret, 'previous_secret_valid_until', case when e.previous_valid_until > now() then e.previous_valid_until end,
        'created_at', e.created_at, 'updated_at', e.updated_at))
$$;
comment on function notify._callback_json(notify.callback_endpoints, text) is 'The public JSON form of a tenant''s callback settings; the secret only when given.';

create function notify_api.set_callbacks_v1(p_tenant_id uuid, p_body jsonb, p_new_secret text)
    returns jsonb
    language plpgsql
    security definer
    set search_path = pg_catalog, pg_temp
as $$
declare
    v notify.callback_endpoints;
    v_url text;
    v_schedule integer[];
    v_created boolean;
begin
    perform notify._enter(p_tenant_id);
    if p_body is null or jsonb_typeof(p_body) <> 'object' then
        perform notify._raise('ND400', 'invalid_type', 'body must be a JSON object', '');
    end if;
    perform notify._check_keys(p_body, array['url', 'retry_schedule_ms', 'enabled'], '');
    v_url := notify._text_field(p_body, 'url', '', false, 2000);
    if v_url is not null and not notify._is_http_url(v_url) then
        perform notify._raise('ND400', 'invalid_format', 'url must be an http(s) URL without credentials or fragment', 'url');
    end if;
    if p_body ? 'retry_schedule_ms' and jsonb_typeof(p_body -> 'retry_schedule_ms') <> 'null' then
        if jsonb_typeof(p_body -> 'retry_schedule_ms') <> 'array'
           or exists (select from jsonb_array_elements(p_body -> 'retry_schedule_ms') x where jsonb_typeof(x) <> 'number') then
            perform notify._raise('ND400', 'invalid_type', 'retry_schedule_ms must be a list of milliseconds', 'retry_schedule_ms');
        end if;
        v_schedule := array(select (x #>> '{}')::numeric::integer from jsonb_array_elements(p_body -> 'retry_schedule_ms') x);
    end if;
    if p_body ? 'enabled' and jsonb_typeof(p_body -> 'enabled') not in ('boolean', 'null') then
        perform notify._raise('ND400', 'invalid_type', 'enabled must be true or false', 'enabled');
    end if;
    v_created := not exists (select from notify.callback_endpoints x where x.tenant_id = p_tenant_id);
    insert into notify.callback_endpoints as e (tenant_id, url, secret, retry_schedule_ms, enabled)
    values (p_tenant_id, v_url, p_new_secret,
            coalesce(v_schedule, '{0,5000,300000,1800000,7200000,18000000,36000000,36000000}'),
            coalesce((p_body ->> 'enabled')::boolean, true))
    on conflict (tenant_id) do update
        set url = case when p_body ? 'url' then v_url else e.url end,
            retry_schedule_ms = coalesce(v_schedule, e.retry_schedule_ms),
            enabled = coalesce((p_body ->> 'enabled')::boolean, e.enabled),
            updated_at = now()
    returning * into v;
    return notify._callback_json(v, case when v_created then v.secret end);
exception
    when check_violation then
        perform notify._raise('ND422', 'invalid_callbacks',
            case when sqlerrm like '%secret%' then 'the signing secret must be a whsec_ secret'
                 else 'retry_schedule_ms must hold 1 to 20 delays of 0 to 86,400,000 ms' end,
            case when sqlerrm like '%secret%' then 'secret' else 'retry_schedule_ms' end);
end
$$;
comment on function notify_api.set_callbacks_v1(uuid, jsonb, text) is
    'Creates or updates a tenant''s callbacks {url?, retry_schedule_ms?, enabled?}. p_new_secret (whsec_…) is used only when creating; the answer shows the secret only then.';

create function notify_api.get_callbacks_v1(p_tenant_id uuid)
    returns jsonb
    language plpgsql
    stable
    security definer
    set search_path = pg_catalog, pg_temp
as $$
declare
    v notify.callback_endpoints;
begin
    perform notify._enter(p_tenant_id);
    select * into v from notify.callback_endpoints where tenant_id = p_tenant_id;
    if v.tenant_id is null then
        perform notify._raise('ND404', 'not_found', 'callbacks are not configured', 'callbacks');
    end if;
    return notify._callback_json(v, null);
end
$$;
comment on function notify_api.get_callbacks_v1(uuid) is 'A tenant''s callback settings, without the secret; 404 if none.';

create function notify_api.rotate_callback_secret_v1(p_tenant_id uuid, p_new_secret text, p_overlap_seconds integer default 86400)
    returns jsonb
    language plpgsql
    security definer
    set search_path = pg_catalog, pg_temp
as $$
declare
    v notify.callback_endpoints;
begin
    perform notify._enter(p_tenant_id);
    if p_overlap_seconds is null or p_overlap_seconds not between 0 and 604800 then
        perform notify._raise('ND422', 'invalid_value', 'overlap must be 0 to 604800 seconds', 'overlap_seconds');
    end if;
    update notify.callback_endpoints
       set previous_secret = secret, previous_valid_until = now() + make_interval(secs => p_overlap_seconds),
           secret = p_new_secret, updated_at = now()
     where tenant_id = p_tenant_id
    returning * into v;
    if v.tenant_id is null then
        perform notify._raise('ND404', 'not_found', 'callbacks are not configured', 'callbacks');
    end if;
    return notify._callback_json(v, v.secret);
exception
    when check_violation then
        perform notify._raise('ND422', 'invalid_secret', 'the signing secret must be a whsec_ secret', 'secret');
end
$$;
comment on function notify_api.rotate_callback_secret_v1(uuid, text, integer) is
    'Replaces the signing secret; messages are signed with both secrets until the overlap ends, so receivers can switch without a gap.';

create function notify_api.list_callbacks_v1(p_tenant_id uuid, p_notification_id uuid)
    returns jsonb
    language plpgsql
    stable
    security definer
    set search_path = pg_catalog, pg_temp
as $$
begin
    perform notify._enter(p_tenant_id);
    if not exists (select from notify.notification_requests r where r.tenant_id = p_tenant_id and r.id = p_notification_id) then
        perform notify._raise('ND404', 'not_found', 'no such notification', 'id');
    end if;
    return coalesce((
        select jsonb_agg(jsonb_strip_nulls(jsonb_build_object(
                   'id', m.id, 'delivery_id', m.delivery_id, 'sequence', m.seq, 'status', m.status, 'url', m.url,
                   'event', m.payload, 'attempts', m.attempts, 'next_attempt_at', case when m.status = 'pending' then m.next_attempt_at end,
                   'created_at', m.created_at, 'finished_at', m.finished_at, 'last_error', m.last_error,
                   'attempt_history', (select coalesce(jsonb_agg(jsonb_strip_nulls(jsonb_build_object(
                                          'attempt', a.attempt, 'started_at', a.started_at, 'finished_at', a.finished_at,
                                          'status_code', a.status_code, 'error', a.error, 'outcome', a.outcome)) order by a.attempt), '[]')
                                         from notify.callback_attempts a where a.tenant_id = m.tenant_id and a.message_id = m.id)))
                   order by m.delivery_id, m.seq)
          from notify.callback_messages m where m.tenant_id = p_tenant_id and m.notification_id = p_notification_id), '[]');
end
$$;
comment on function notify_api.list_callbacks_v1(uuid, uuid) is
    'Every callback message of a notification, with every attempt to post it: what the caller''s receiver was sent and answered.';

create function notify_api.claim_callbacks_v1(p_limit integer, p_lease_seconds integer default 60)
    returns table (tenant_id uuid, id uuid, attempt integer, url text, payload jsonb, secrets text[], created_at timestamptz)
    language plpgsql
    security definer
    set search_path = pg_catalog, pg_temp
as $$
begin
    if p_limit is null or p_limit < 1 or p_limit > 1000 then
        perform notify._raise('ND400', 'invalid_value', 'limit must be 1 to 1000', 'limit');
    end if;
    return query
    with due as (
        -- In order per delivery: a message waits while an earlier change of the same delivery is still undelivered.
        select m.tenant_id, m.id, m.created_at from notify.callback_messages m
         where m.next_attempt_at <= now()
           and (m.status = 'pending' or (m.status = 'sending' and m.lease_expires_at < now()))
           and not exists (select from notify.callback_messages p
                            where p.tenant_id = m.tenant_id and p.delivery_id = m.delivery_id and p.seq < m.seq
                              and p.status in ('pending', 'sending'))
         order by m.next_attempt_at
         limit p_limit
           for update skip locked
    ), claimed as (
        update notify.callback_messages m
           set status = 'sending', attempts = m.attempts + 1, lease_expires_at = now() + make_interval(secs => p_lease_seconds)
          from due where m.tenant_id = due.tenant_id and m.id = due.id and m.created_at = due.created_at
        returning m.*
    )
    select c.tenant_id, c.id, c.attempts, c.url, c.payload,
           array_remove(array[e.secret, case when e.previous_valid_until > now() then e.previous_secret end], null),
           c.created_at
      from claimed c join notify.callback_endpoints e on e.tenant_id = c.tenant_id;
end
$$;
comment on function notify_api.claim_callbacks_v1(integer, integer) is
    'Claims due callback messages (FOR UPDATE SKIP LOCKED, one lease each), oldest first and in sequence order per delivery, with the secrets to sign them.';

create function notify_api.record_callback_attempts_v1(p_results jsonb)
    returns integer
    language plpgsql
    security definer
    set search_path = pg_catalog, pg_temp
as $$
declare
    v_next timestamptz;
    v_count integer;
begin
    -- p_results: [{tenant_id, id, attempt, started_at, created_at?, status_code?, error?, outcome: delivered|retry|failed|refused}]
    -- created_at: the message's, as claim_callbacks_v1 returned it. The outbox is partitioned by it, so with it each
    -- message is found in its own day's partition; without it (an older worker), it is looked up first.
    -- Always a new table (a planted pg_temp._callback_results makes this fail instead of running its triggers as
    -- notify_system), dropped before returning so the worker may record twice in one transaction.
    create temporary table pg_temp._callback_results (
        tenant_id uuid, id uuid, attempt integer, started_at timestamptz, status_code integer, error text, outcome text,
        created_at timestamptz
    ) on commit drop;
    insert into pg_temp._callback_results
    select * from jsonb_to_recordset(p_results) as x(tenant_id uuid, id uuid, attempt integer, started_at timestamptz,
                                                     status_code integer, error text, outcome text, created_at timestamptz);
    update pg_temp._callback_results r set created_at = m.created_at
      from notify.callback_messages m
     where r.created_at is null and m.tenant_id = r.tenant_id and m.id = r.id;
    insert into notify.callback_attempts (tenant_id, message_id, attempt, started_at, status_code, error, outcome)
    select r.tenant_id, r.id, r.attempt, r.started_at, r.status_code, left(r.error, 500), r.outcome
      from pg_temp._callback_results r
      join notify.callback_messages m on m.tenant_id = r.tenant_id and m.id = r.id and m.created_at = r.created_at
                                     and m.attempts = r.attempt
    on conflict do nothing;
    with updated as (
        update notify.callback_messages m
           set status = case when r.outcome = 'delivered' then 'delivered'
                             when r.outcome in ('failed', 'refused') or m.attempts > cardinality(e.retry_schedule_ms) then 'failed'
                             else 'pending' end,
               next_attempt_at = case when r.outcome = 'retry' and m.attempts <= cardinality(e.retry_schedule_ms)
                                      then now() + make_interval(secs => e.retry_schedule_ms[m.attempts] / 1000.0 * (0.9 + random() * 0.2))
                                      else m.next_attempt_at end,
               lease_expires_at = null,
               finished_at = case when r.outcome <> 'retry' or m.attempts > cardinality(e.retry_schedule_ms) then now() end,
               last_error = case when r.outcome = 'delivered' then null
                                 else coalesce(r.error, 'HTTP ' || r.status_code) end
          from pg_temp._callback_results r, notify.callback_endpoints e
         where m.tenant_id = r.tenant_id and m.id = r.id and m.created_at = r.created_at and m.attempts = r.attempt
           and m.status = 'sending' and e.tenant_id = m.tenant_id
        returning m.status, m.next_attempt_at
    )
    select min(u.next_attempt_at) filter (where u.status = 'pending') into v_next from updated u;
    -- The next retry, and the next message of a delivery whose earlier one just finished.
    perform notify._wake_callbacks();
    if v_next is not null and v_next > now() then
        perform notify._wake_callbacks(v_next);
    end if;
    select count(*) into v_count from pg_temp._callback_results;
    drop table pg_temp._callback_results;
    return v_count;
end
$$;
comment on function notify_api.record_callback_attempts_v1(jsonb) is
    'Records callback attempts: delivered (2xx), retried per the tenant''s schedule (failed once it is used up), or failed at once (410 Gone, or a refused URL). A stale attempt (lease taken over) changes nothing.';
