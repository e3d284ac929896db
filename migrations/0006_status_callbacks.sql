-- 0006: status callbacks to callers (sql/095_callbacks.sql): endpoints with whsec_ secrets, the outbox written by a
-- trigger with each status change, attempts; callback_url on requests; row security and owners for the new tables.

-- Status callbacks to callers: every delivery status change is posted to the tenant's (or the request's) callback URL
-- as a Standard Webhooks message. The outbox is notify.callback_messages, written by a trigger in the same transaction
-- as the status change; the worker's "callbacks" task claims, signs, posts and records every attempt.

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
    constraint callback_endpoints_url check (url ~ '^https?://[^\s/?#@]+(/[^\s#]*)?$' and length(url) <= 2000),
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
    primary key (tenant_id, id),
    constraint callback_messages_one_per_change unique (tenant_id, delivery_id, seq),
    constraint callback_messages_status check (status in ('pending', 'sending', 'delivered', 'failed'))
);
comment on table notify.callback_messages is
    'The callback outbox: one message per delivery status change, committed with the change. Sent in seq order per delivery (a later change waits for the earlier one to be delivered or given up).';
comment on column notify.callback_messages.seq is 'The delivery''s sequence number at this change (1 = created): receivers drop an event older than one they have.';
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
    primary key (tenant_id, message_id, attempt),
    constraint callback_attempts_outcome check (outcome in ('delivered', 'retry', 'failed', 'refused'))
);
comment on table notify.callback_attempts is
    'Every attempt to post a callback: the receiver''s status code or the error, and what it meant (refused: the URL resolved to a private or loopback address).';

alter table notify.notification_requests add column callback_url text
    constraint notification_requests_callback_url check (callback_url ~ '^https?://[^\s/?#@]+(/[^\s#]*)?$' and length(callback_url) <= 2000);
comment on column notify.notification_requests.callback_url is 'Where this request''s status callbacks go, instead of the tenant''s callback URL.';
create index notification_requests_with_callback on notify.notification_requests (tenant_id, id) where callback_url is not null;

create function notify._wake_callbacks(p_at timestamptz default null)
    returns void
    language plpgsql
    volatile
    set search_path = pg_catalog, public
as $$
declare
    v_bucket timestamptz;
begin
    -- Like notify._wake: one pending wake-up now, and one per second for later retries, coalesced by queueing lock.
    if p_at is null or p_at <= now() then
        insert into public.procrastinate_jobs (queue_name, task_name, lock, queueing_lock, args, scheduled_at)
        values ('callbacks', 'callbacks', null, 'callbacks', '{}', null)
        on conflict (queueing_lock) where status = 'todo' do nothing;
    else
        v_bucket := to_timestamp(ceil(extract(epoch from p_at)));
        insert into public.procrastinate_jobs (queue_name, task_name, lock, queueing_lock, args, scheduled_at)
        values ('callbacks', 'callbacks', null, 'callbacks:' || extract(epoch from v_bucket)::bigint, '{}', v_bucket)
        on conflict (queueing_lock) where status = 'todo' do nothing;
    end if;
end
$$;
comment on function notify._wake_callbacks(timestamptz) is
    'Defers a procrastinate "callbacks" job now, or at the second p_at falls in; commits with the caller''s transaction.';

create function notify._callback_event(c notify.notification_deliveries, p_previous notify.delivery_status, r notify.notification_requests)
    returns jsonb
    language sql
    stable
    set search_path = ''
as $$
    select jsonb_build_object('type', 'delivery.status_changed', 'timestamp', now(), 'data', jsonb_strip_nulls(jsonb_build_object(
        'notification_id', c.request_id, 'delivery_id', c.id, 'sequence', c.seq, 'channel', c.channel,
        'status', c.status, 'previous_status', p_previous, 'reason', coalesce(c.reason, c.last_error_code),
        'attempt', nullif(c.attempt, 0), 'provider', c.provider, 'provider_message_id', c.provider_message_id,
        'metadata', nullif(r.metadata, '{}'::jsonb), 'http_request_id', r.http_request_id)))
$$;
comment on function notify._callback_event(notify.notification_deliveries, notify.delivery_status, notify.notification_requests) is
    'The Standard Webhooks payload of one delivery status change: ids, sequence, channel, status and reason, the request''s metadata. No address, no content.';

create function notify.tg_notification_deliveries__queue_callbacks()
    returns trigger
    language plpgsql
    set search_path = ''
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
        on conflict (tenant_id, delivery_id, seq) do nothing;
    else
        insert into notify.callback_messages (tenant_id, notification_id, delivery_id, seq, url, payload)
        select c.tenant_id, c.request_id, c.id, c.seq, coalesce(r.callback_url, e.url), notify._callback_event(c, o.status, r)
          from new_rows c
          join old_rows o on o.tenant_id = c.tenant_id and o.id = c.id
          join notify.notification_requests r on r.tenant_id = c.tenant_id and r.id = c.request_id
          join notify.callback_endpoints e on e.tenant_id = c.tenant_id and e.enabled
         where c.status is distinct from o.status and coalesce(r.callback_url, e.url) is not null
        on conflict (tenant_id, delivery_id, seq) do nothing;
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

create function notify._callback_json(e notify.callback_endpoints, p_secret text)
    returns jsonb
    language sql
    stable
    set search_path = ''
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
    set search_path = ''
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
    if v_url is not null and v_url !~ '^https?://[^\s/?#@]+(/[^\s#]*)?$' then
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
    set search_path = ''
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
    set search_path = ''
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
    set search_path = ''
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
    set search_path = ''
as $$
begin
    if p_limit is null or p_limit < 1 or p_limit > 1000 then
        perform notify._raise('ND400', 'invalid_value', 'limit must be 1 to 1000', 'limit');
    end if;
    return query
    with due as (
        -- In order per delivery: a message waits while an earlier change of the same delivery is still undelivered.
        select m.tenant_id, m.id from notify.callback_messages m
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
          from due where m.tenant_id = due.tenant_id and m.id = due.id
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
    set search_path = ''
as $$
declare
    v_next timestamptz;
begin
    -- p_results: [{tenant_id, id, attempt, started_at, status_code?, error?, outcome: delivered|retry|failed|refused}]
    create temporary table if not exists _callback_results (
        tenant_id uuid, id uuid, attempt integer, started_at timestamptz, status_code integer, error text, outcome text
    ) on commit drop;
    truncate _callback_results;
    insert into _callback_results
    select * from jsonb_to_recordset(p_results) as x(tenant_id uuid, id uuid, attempt integer, started_at timestamptz,
                                                     status_code integer, error text, outcome text);
    insert into notify.callback_attempts (tenant_id, message_id, attempt, started_at, status_code, error, outcome)
    select r.tenant_id, r.id, r.attempt, r.started_at, r.status_code, left(r.error, 500), r.outcome
      from _callback_results r
      join notify.callback_messages m on m.tenant_id = r.tenant_id and m.id = r.id and m.attempts = r.attempt
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
          from _callback_results r, notify.callback_endpoints e
         where m.tenant_id = r.tenant_id and m.id = r.id and m.attempts = r.attempt and m.status = 'sending'
           and e.tenant_id = m.tenant_id
        returning m.status, m.next_attempt_at
    )
    select min(u.next_attempt_at) filter (where u.status = 'pending') into v_next from updated u;
    -- The next retry, and the next message of a delivery whose earlier one just finished.
    perform notify._wake_callbacks();
    if v_next is not null and v_next > now() then
        perform notify._wake_callbacks(v_next);
    end if;
    return (select count(*) from _callback_results);
end
$$;
comment on function notify_api.record_callback_attempts_v1(jsonb) is
    'Records callback attempts: delivered (2xx), retried per the tenant''s schedule (failed once it is used up), or failed at once (410 Gone, or a refused URL). A stale attempt (lease taken over) changes nothing.';

create or replace function notify_api.submit_notification_v1(p_tenant_id uuid, p_request jsonb, p_idempotency_key text default null)
    returns table (response jsonb, replayed boolean)
    language plpgsql
    security definer
    set search_path = ''
as $$
declare
    v_fingerprint bytea;
    v_recipient notify.recipients;
    v_channels notify.channel[];
    v_template text;
    v_variables jsonb;
    v_category text;
    v_send_at timestamptz;
    v_expires_at timestamptz;
    v_metadata jsonb;
    v_request_id uuid;
    v_channel notify.channel;
    v_tpl notify.templates;
    v_missing text;
    v_locale text;
    v_now timestamptz := now();
    v_response jsonb;
    v_callback_url text;
begin
    perform notify._enter(p_tenant_id);
    -- 1. Validate the shape; every error names its field, nothing is written yet.
    if p_request is null or jsonb_typeof(p_request) <> 'object' then
        perform notify._raise('ND400', 'invalid_type', 'body must be a JSON object', '');
    end if;
    perform notify._check_keys(p_request,
        array['recipient', 'recipients', 'channels', 'template', 'variables', 'category', 'send_at', 'expires_at', 'metadata',
              'callback_url'], '');
    if (p_request ? 'recipient') = (p_request ? 'recipients') then
        perform notify._raise('ND400', 'missing_field', 'give either recipient (one) or recipients (a fan-out), not both', 'recipient');
    end if;
    if p_request ? 'recipient' then
        if jsonb_typeof(p_request -> 'recipient') is distinct from 'object' then
            perform notify._raise('ND400', 'missing_field', 'recipient is required and must be an object', 'recipient');
        end if;
        perform notify._check_keys(p_request -> 'recipient', array['ref', 'addresses', 'locale', 'timezone'], 'recipient');
    end if;
    if jsonb_typeof(p_request -> 'channels') is distinct from 'array' or jsonb_array_length(p_request -> 'channels') = 0 then
        perform notify._raise('ND400', 'missing_field', 'channels must be a non-empty list', 'channels');
    end if;
    select array_agg(notify._channel_field(c, 'channels[' || (i - 1) || ']') order by i)
      into v_channels
      from jsonb_array_elements(p_request -> 'channels') with ordinality as e(c, i);
    if cardinality(v_channels) <> (select count(distinct c) from unnest(v_channels) c) then
        perform notify._raise('ND400', 'duplicate_channel', 'channels must not repeat a channel', 'channels');
    end if;
    v_template := notify._text_field(p_request, 'template', '', true, 100);
    v_variables := coalesce(p_request -> 'variables', '{}');
    if jsonb_typeof(v_variables) = 'null' then v_variables := '{}'; end if;
    if jsonb_typeof(v_variables) <> 'object' then
        perform notify._raise('ND400', 'invalid_type', 'variables must be an object', 'variables');
    end if;
    v_category := notify._text_field(p_request, 'category', '', false, 100);
    v_send_at := notify._time_field(p_request, 'send_at', '');
    v_expires_at := notify._time_field(p_request, 'expires_at', '');
    if v_expires_at is not null and v_expires_at <= v_now then
        perform notify._raise('ND422', 'invalid_expiry', 'expires_at must be in the future', 'expires_at');
    end if;
    if v_expires_at is not null and v_send_at is not null and v_expires_at <= v_send_at then
        perform notify._raise('ND422', 'invalid_expiry', 'expires_at must be after send_at', 'expires_at');
    end if;
    v_metadata := coalesce(p_request -> 'metadata', '{}');
    if jsonb_typeof(v_metadata) = 'null' then v_metadata := '{}'; end if;
    if jsonb_typeof(v_metadata) <> 'object' then
        perform notify._raise('ND400', 'invalid_type', 'metadata must be an object', 'metadata');
    end if;
    if p_idempotency_key is not null and p_idempotency_key !~ '^[\x21-\x7e]{1,255}$' then
        perform notify._raise('ND400', 'invalid_idempotency_key', 'Idempotency-Key must be 1-255 printable ASCII characters', 'Idempotency-Key');
    end if;
    v_callback_url := notify._text_field(p_request, 'callback_url', '', false, 2000);
    if v_callback_url is not null then
        if v_callback_url !~ '^https?://[^\s/?#@]+(/[^\s#]*)?$' then
            perform notify._raise('ND400', 'invalid_format', 'callback_url must be an http(s) URL without credentials or fragment', 'callback_url');
        end if;
        if not exists (select from notify.callback_endpoints e where e.tenant_id = p_tenant_id and e.enabled) then
            perform notify._raise('ND422', 'callbacks_not_configured',
                'set up callbacks first (PUT /internal/callbacks): that gives the secret callbacks are signed with', 'callback_url');
        end if;
    end if;
    if p_request ? 'recipients' then
        return query select * from notify._submit_fanout(p_tenant_id, p_request, p_idempotency_key, v_channels, v_template,
                                                          v_variables, v_category, v_send_at, v_expires_at, v_metadata);
        return;
    end if;

    -- 2. The recipient and its addresses.
    v_recipient := notify._upsert_recipient(p_tenant_id, notify._text_field(p_request -> 'recipient', 'ref', 'recipient', true, 200),
                                            p_request -> 'recipient', 'recipient');

    -- 3. Claim the idempotency key. A concurrent twin waits here for our commit, then replays it.
    v_fingerprint := sha256(convert_to(p_request::text, 'UTF8'));
    insert into notify.notification_requests
        (tenant_id, idempotency_key, fingerprint, recipient_id, template_key, variables, category, channels,
         send_at, expires_at, metadata, callback_url)
    values (p_tenant_id, p_idempotency_key, v_fingerprint, v_recipient.id, v_template, v_variables, v_category, v_channels,
            v_send_at, v_expires_at, v_metadata, v_callback_url)
    on conflict (tenant_id, idempotency_key) do nothing
    returning id into v_request_id;
    if v_request_id is null then
        response := notify._replay(p_tenant_id, p_idempotency_key, v_fingerprint);
        replayed := true;
        return next;
        return;
    end if;

    -- 4. Templates and variables, checked now rather than at send time.
    v_locale := coalesce(v_recipient.locale, (select default_locale from notify.tenants where id = p_tenant_id));
    foreach v_channel in array v_channels loop
        v_tpl := notify._resolve_template(p_tenant_id, v_template, v_channel, v_locale);
        if v_tpl.key is null then
            perform notify._raise('ND422', 'template_not_found',
                format('template %s has no %s content for locale %s or its fallbacks', v_template, v_channel, v_locale), 'template');
        end if;
        select string_agg(r, ', ') into v_missing
          from unnest(v_tpl.required_variables) r where not v_variables ? r;
        if v_missing is not null then
            perform notify._raise('ND422', 'missing_variables',
                format('template %s (%s) needs variables: %s', v_template, v_channel, v_missing),
                'variables.' || split_part(v_missing, ', ', 1));
        end if;
    end loop;

    -- 5. One delivery per channel, suppressed ones with their reason; consent checked now and again at claim.
    perform notify._set_source('submit');
    with inserted as (
        insert into notify.notification_deliveries
            (tenant_id, request_id, recipient_id, channel, address, template_locale, status, reason, due_at, expires_at)
        select p_tenant_id, v_request_id, v_recipient.id, c.channel, a.address,
               (notify._resolve_template(p_tenant_id, v_template, c.channel, v_locale)).locale,
               case when a.address is null or not notify._consent_allows(p_tenant_id, v_recipient.id, c.channel, v_category)
                        then 'suppressed'
                    when v_send_at > v_now then 'scheduled'
                    else 'queued' end::notify.delivery_status,
               case when a.address is null then 'no_address'
                    when not notify._consent_allows(p_tenant_id, v_recipient.id, c.channel, v_category) then 'no_consent' end,
               greatest(coalesce(v_send_at, v_now), v_now), v_expires_at
          from unnest(v_channels) with ordinality as c(channel, ord)
          left join notify.recipient_addresses a
                 on a.tenant_id = p_tenant_id and a.recipient_id = v_recipient.id and a.channel = c.channel
         order by c.ord
        returning *
    )
    select jsonb_build_object(
               'id', v_request_id, 'created_at', v_now,
               'status', case when bool_and(i.status = 'suppressed') then 'suppressed' else 'accepted' end,
               'deliveries', jsonb_agg(jsonb_strip_nulls(jsonb_build_object(
                    'id', i.id, 'channel', i.channel, 'status', i.status, 'reason', i.reason))
                    order by array_position(v_channels, i.channel)))
      into v_response
      from inserted i;

    update notify.notification_requests r set response = v_response
     where r.tenant_id = p_tenant_id and r.id = v_request_id;

    -- 6. Wake the worker, with the caller's commit: now, or when the scheduled work falls due.
    perform notify._wake(d.channel, d.due_at)
       from (select distinct channel, due_at from notify.notification_deliveries
              where tenant_id = p_tenant_id and request_id = v_request_id and status in ('queued', 'scheduled')) d;

    response := v_response;
    replayed := false;
    return next;
end
$$;

create or replace function notify_api.get_notification_v1(p_tenant_id uuid, p_id uuid)
    returns jsonb
    language plpgsql
    stable
    security definer
    set search_path = ''
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
        'callback_url', v.callback_url))
        || jsonb_build_object('deliveries', coalesce(v_deliveries, '[]'));
end
$$;

create or replace function notify._submit_fanout(
    p_tenant_id uuid, p_request jsonb, p_idempotency_key text, p_channels notify.channel[], p_template text,
    p_variables jsonb, p_category text, p_send_at timestamptz, p_expires_at timestamptz, p_metadata jsonb)
    returns table (response jsonb, replayed boolean)
    language plpgsql
    set search_path = ''
as $$
declare
    v_items jsonb := p_request -> 'recipients';
    v_count integer;
    v_bad record;
    v_request_id uuid;
    v_default_locale text;
    v_now timestamptz := now();
    v_response jsonb;
    v_channel_names text[] := enum_range(null::notify.channel)::text[];
begin
    if jsonb_typeof(v_items) is distinct from 'array' or jsonb_array_length(v_items) not between 1 and 10000 then
        perform notify._raise('ND400', 'invalid_length', 'recipients must be a list of 1 to 10000 recipients', 'recipients');
    end if;
    v_count := jsonb_array_length(v_items);

    -- 1. Every recipient checked set-based; the first offender is named.
    select i - 1 as idx, r, k into v_bad
      from jsonb_array_elements(v_items) with ordinality e(r, i)
      left join lateral (select k from jsonb_object_keys(case when jsonb_typeof(r) = 'object' then r else '{}' end) k
                          where k not in ('ref', 'addresses', 'locale', 'timezone', 'variables') limit 1) x on true
     where jsonb_typeof(r) <> 'object' or x.k is not null
        or jsonb_typeof(r -> 'ref') is distinct from 'string' or length(r ->> 'ref') not between 1 and 200
        or (r ? 'addresses' and jsonb_typeof(r -> 'addresses') not in ('object', 'null'))
        or (r ? 'variables' and jsonb_typeof(r -> 'variables') not in ('object', 'null'))
        or (jsonb_typeof(r -> 'locale') = 'string' and r ->> 'locale' !~ '^[A-Za-z]{2,3}(-[A-Za-z0-9]{2,8})*$')
        or (r ? 'locale' and jsonb_typeof(r -> 'locale') not in ('string', 'null'))
        or (r ? 'timezone' and jsonb_typeof(r -> 'timezone') not in ('string', 'null'))
     order by i limit 1;
    if found then
        perform notify._raise('ND400', case when v_bad.k is not null then 'unknown_field' else 'invalid_value' end,
            format('recipients[%s] is not a valid recipient (ref 1-200 characters; addresses, locale, timezone, variables)', v_bad.idx)
            || coalesce(': unknown field ' || v_bad.k, ''),
            format('recipients[%s]', v_bad.idx) || coalesce('.' || v_bad.k, ''));
    end if;
    select i - 1 as idx, a.key into v_bad
      from jsonb_array_elements(v_items) with ordinality e(r, i)
     cross join lateral jsonb_each(case when jsonb_typeof(r -> 'addresses') = 'object' then r -> 'addresses' else '{}' end) a
     where a.key <> all (v_channel_names)
        or (jsonb_typeof(a.value) <> 'null'
            and (jsonb_typeof(a.value) <> 'string' or not notify._address_valid(a.key::notify.channel, a.value #>> '{}')))
     order by i limit 1;
    if found then
        perform notify._raise('ND400', 'invalid_address', format('recipients[%s].addresses.%s is not a valid %s address', v_bad.idx, v_bad.key, v_bad.key),
                              format('recipients[%s].addresses.%s', v_bad.idx, v_bad.key));
    end if;
    select i - 1 as idx into v_bad
      from jsonb_array_elements(v_items) with ordinality e(r, i)
     where jsonb_typeof(r -> 'timezone') = 'string'
       and not exists (select from pg_catalog.pg_timezone_names z where z.name = r ->> 'timezone')
     order by i limit 1;
    if found then
        perform notify._raise('ND400', 'invalid_timezone', format('recipients[%s].timezone is not an IANA time zone', v_bad.idx),
                              format('recipients[%s].timezone', v_bad.idx));
    end if;
    select min(i) - 1 as idx, r ->> 'ref' as ref into v_bad
      from jsonb_array_elements(v_items) with ordinality e(r, i)
     group by r ->> 'ref' having count(*) > 1 order by min(i) limit 1;
    if found then
        perform notify._raise('ND400', 'duplicate_recipient', format('recipient %s appears more than once', v_bad.ref), 'recipients');
    end if;

    -- 2. Claim the idempotency key before the heavy work: a replay of a 10,000-recipient intent is one lookup.
    insert into notify.notification_requests
        (tenant_id, idempotency_key, fingerprint, recipient_id, recipient_count, template_key, variables, category, channels,
         send_at, expires_at, metadata, callback_url)
    values (p_tenant_id, p_idempotency_key, sha256(convert_to(p_request::text, 'UTF8')), null, v_count, p_template, p_variables,
            p_category, p_channels, p_send_at, p_expires_at, p_metadata, p_request ->> 'callback_url')
    on conflict (tenant_id, idempotency_key) do nothing
    returning id into v_request_id;
    if v_request_id is null then
        response := notify._replay(p_tenant_id, p_idempotency_key, sha256(convert_to(p_request::text, 'UTF8')));
        replayed := true;
        return next;
        return;
    end if;

    -- 3. Recipients and their addresses, set-based. The input goes into an analyzed temporary table first, so
    --    the planner knows it has v_count rows (a function scan is estimated at 100) and joins accordingly.
    create temporary table if not exists _fanout_input (
        i integer, ref text, addresses jsonb, locale text, timezone text, variables jsonb, recipient_id uuid, effective_locale text
    ) on commit drop;
    truncate _fanout_input;
    insert into _fanout_input (i, ref, addresses, locale, timezone, variables)
    select i, r ->> 'ref', case when jsonb_typeof(r -> 'addresses') = 'object' then r -> 'addresses' end, r ->> 'locale',
           r ->> 'timezone', case when jsonb_typeof(r -> 'variables') = 'object' then r -> 'variables' end
      from jsonb_array_elements(v_items) with ordinality e(r, i);
    analyze _fanout_input;

    insert into notify.recipients as x (tenant_id, ref, locale, timezone)
    select p_tenant_id, f.ref, f.locale, f.timezone from _fanout_input f
    on conflict (tenant_id, ref) do update
        set locale = coalesce(excluded.locale, x.locale), timezone = coalesce(excluded.timezone, x.timezone),
            updated_at = now()
        where (excluded.locale is not null and excluded.locale is distinct from x.locale)
           or (excluded.timezone is not null and excluded.timezone is distinct from x.timezone);
    v_default_locale := (select default_locale from notify.tenants where id = p_tenant_id);
    update _fanout_input f set recipient_id = rec.id, effective_locale = coalesce(rec.locale, v_default_locale)
      from notify.recipients rec
     where rec.tenant_id = p_tenant_id and rec.ref = f.ref;
    analyze _fanout_input;

    insert into notify.recipient_addresses as a (tenant_id, recipient_id, channel, address)
    select p_tenant_id, f.recipient_id, kv.key::notify.channel, kv.value #>> '{}'
      from _fanout_input f cross join lateral jsonb_each(coalesce(f.addresses, '{}')) kv
     where jsonb_typeof(kv.value) = 'string'
    on conflict (tenant_id, recipient_id, channel) do update
        set address = excluded.address, updated_at = now()
        where a.address is distinct from excluded.address;
    delete from notify.recipient_addresses a
     using _fanout_input f, lateral jsonb_each(coalesce(f.addresses, '{}')) kv
     where jsonb_typeof(kv.value) = 'null'
       and a.tenant_id = p_tenant_id and a.recipient_id = f.recipient_id and a.channel = kv.key::notify.channel;

    -- 4. Templates per channel and distinct locale (resolved once each), and the variables every recipient needs.
    create temporary table if not exists _fanout_templates (
        channel notify.channel, locale text, template_locale text, required_variables text[]) on commit drop;
    truncate _fanout_templates;
    insert into _fanout_templates
    select c.channel, l.locale, t.locale, t.required_variables
      from unnest(p_channels) c(channel)
     cross join (select distinct f.effective_locale as locale from _fanout_input f) l
     cross join lateral notify._resolve_template(p_tenant_id, p_template, c.channel, l.locale) t;
    select channel, locale into v_bad from _fanout_templates where template_locale is null limit 1;
    if found then
        perform notify._raise('ND422', 'template_not_found',
            format('template %s has no %s content for locale %s or its fallbacks', p_template, v_bad.channel, v_bad.locale), 'template');
    end if;
    select f.i - 1 as idx, need.v into v_bad
      from _fanout_input f
      join _fanout_templates t on t.locale = f.effective_locale
     cross join lateral unnest(t.required_variables) need(v)
     where not (p_variables || coalesce(f.variables, '{}')) ? need.v
     order by f.i limit 1;
    if found then
        perform notify._raise('ND422', 'missing_variables', format('template %s needs variable %s for recipients[%s]', p_template, v_bad.v, v_bad.idx),
                              format('recipients[%s].variables.%s', v_bad.idx, v_bad.v));
    end if;

    -- 5. One delivery per recipient and channel, consent checked set-based.
    perform notify._set_source('submit');
    with rows as materialized (
        select f.recipient_id, c.channel, a.address, t.template_locale, f.variables, consent.allowed, f.i, c.ord
          from _fanout_input f
         cross join unnest(p_channels) with ordinality c(channel, ord)
          join _fanout_templates t on t.channel = c.channel and t.locale = f.effective_locale
          left join notify.recipient_addresses a on a.tenant_id = p_tenant_id and a.recipient_id = f.recipient_id and a.channel = c.channel
         cross join lateral notify._consent(p_tenant_id, f.recipient_id, c.channel, p_category) consent
    ), inserted as (
        insert into notify.notification_deliveries
            (tenant_id, request_id, recipient_id, channel, address, template_locale, variables, status, reason, due_at, expires_at)
        select p_tenant_id, v_request_id, recipient_id, channel, address, template_locale, variables,
               case when address is null or not allowed then 'suppressed'
                    when p_send_at > v_now then 'scheduled' else 'queued' end::notify.delivery_status,
               case when address is null then 'no_address' when not allowed then 'no_consent' end,
               greatest(coalesce(p_send_at, v_now), v_now), p_expires_at
          from rows order by i, ord
        returning channel, status, reason
    ), counted as (
        select channel, status, reason, count(*) as n from inserted group by channel, status, reason
    )
    select jsonb_build_object(
               'id', v_request_id, 'created_at', v_now, 'recipient_count', v_count,
               'status', case when bool_and(status = 'suppressed') then 'suppressed' else 'accepted' end,
               'summary', jsonb_agg(jsonb_strip_nulls(jsonb_build_object('channel', channel, 'status', status, 'reason', reason, 'count', n))
                                    order by channel, status, reason))
      into v_response
      from counted;

    update notify.notification_requests r set response = v_response
     where r.tenant_id = p_tenant_id and r.id = v_request_id;
    perform notify._wake(c, case when p_send_at > v_now then p_send_at end)
       from unnest(p_channels) c
      where exists (select from jsonb_array_elements(v_response -> 'summary') s
                     where s ->> 'channel' = c::text and s ->> 'status' in ('queued', 'scheduled'));
    response := v_response;
    replayed := false;
    return next;
end
$$;

create or replace function notify._settle_owners()
    returns void
    language plpgsql
    set search_path = ''
as $$
declare
    r record;
begin
    for r in select c.oid::regclass as rel from pg_class c where c.relnamespace = 'notify'::regnamespace and c.relkind in ('r', 'p') loop
        execute format('alter table %s owner to notify_owner', r.rel);
    end loop;
    for r in select t.oid::regtype as typ from pg_type t left join pg_class c on c.oid = t.typrelid
              where t.typnamespace = 'notify'::regnamespace and (t.typtype = 'e' or c.relkind = 'c') loop
        execute format('alter type %s owner to notify_owner', r.typ);
    end loop;
    for r in select p.oid::regprocedure as fn, p.pronamespace = 'notify_api'::regnamespace and p.proname = any (array[
                 'create_tenant_v1', 'get_tenant_v1', 'authenticate_api_key_v1', 'authorize_v1', 'take_tokens_v1',
                 'claim_deliveries_v1', 'record_attempts_v1', 'run_maintenance_v1', 'queue_health_v1', 'ingest_webhook_v1',
                 'record_mock_messages_v1', 'claim_callbacks_v1', 'record_callback_attempts_v1']) as cross_tenant
               from pg_proc p where p.pronamespace in ('notify'::regnamespace, 'notify_api'::regnamespace) loop
        execute format('alter function %s owner to %s', r.fn, case when r.cross_tenant then 'notify_system' else 'notify_owner' end);
    end loop;
end
$$;

do $$
declare
    v_table text;
begin
    foreach v_table in array array['callback_endpoints', 'callback_messages', 'callback_attempts']
    loop
        execute format('alter table notify.%I enable row level security', v_table);
        execute format('alter table notify.%I force row level security', v_table);
        execute format('create policy tenant_rows on notify.%I to notify_owner
                            using (tenant_id = (select notify._tenant())) with check (tenant_id = (select notify._tenant()))', v_table);
        execute format('create policy system_rows on notify.%I to notify_system using (true) with check (true)', v_table);
    end loop;
end
$$;

revoke execute on all functions in schema notify from public;
revoke execute on all functions in schema notify_api from public;
grant execute on all functions in schema notify_api to notify_service;
grant select, insert, update, delete on all tables in schema notify to notify_system;
grant usage, select on all sequences in schema notify to notify_system;
grant execute on all functions in schema notify to notify_system;
grant execute on function notify_api.list_callbacks_v1(uuid, uuid) to notify_caller;
select notify._settle_owners();
