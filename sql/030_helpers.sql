-- Private helpers that read tables: consent, template resolution, backoff, worker wake-ups.
-- Called only by notify_api functions, inside the caller's transaction.

create function notify._address_hash(p_channel notify.channel, p_address text)
    returns bytea
    language sql
    stable
    set search_path = pg_catalog, pg_temp
as $$
    -- HMAC-SHA256 (RFC 2104) with the server's key: H((K ^ opad) || H((K ^ ipad) || m)); e-mail addresses lower-cased.
    select pg_catalog.sha256(k.outer_pad || pg_catalog.sha256(k.inner_pad || pg_catalog.convert_to(
               p_channel::text || ':' || case when (notify._channel_rules(p_channel)).address_kind = 'email' then pg_catalog.lower(p_address)
                                            else p_address end, 'UTF8')))
      from notify.address_hash_key k
$$;
comment on function notify._address_hash(notify.channel, text) is
    'The keyed hash (HMAC-SHA256, key in notify.address_hash_key) of a channel address, for the suppression list of erased recipients. Not executable by application roles: with it, a phone number''s hash could be guessed by trying numbers.';

create function notify._consent(p_tenant_id uuid, p_recipient_id uuid, p_channel notify.channel, p_category text)
    returns table (allowed boolean)
    language sql
    stable
    -- inlinable: no SET clause, and a set-returning SQL function is inlined into the caller's FROM (with its
    -- subqueries), so a 10,000-recipient fan-out checks consent in one plan (see docs/architecture.md)
as $$
    select coalesce(
        (select c.status = 'granted'
           from notify.recipient_consents c
          where c.tenant_id = p_tenant_id and c.recipient_id = p_recipient_id and c.channel = p_channel
            and (c.category is null or c.category = p_category)
          order by c.id desc
          limit 1),
        coalesce((select p.policy from notify.channel_policies p where p.tenant_id = p_tenant_id and p.channel = p_channel),
                 notify._default_policy(p_channel)) = 'opt_out')
       -- an address an erased recipient had opted out of stays out, until a grant recorded later (sql/066_api_erasure.sql);
       -- the keyed hash is computed only where the tenant has suppressed addresses on the channel at all (a probe of an
       -- index, where hashing every delivery's address at submit and again at claim cost every tenant)
       and (not exists (select from notify.address_suppressions s0
                         where s0.tenant_id = p_tenant_id and s0.channel = p_channel and s0.created_at > '-infinity')
            or not exists (
        select from notify.recipient_addresses a
          join notify.address_suppressions s
            on s.address_hash = notify._address_hash(a.channel, a.address) and s.tenant_id = a.tenant_id
           and s.channel = a.channel and s.category in ('', coalesce(p_category, ''))
         where a.tenant_id = p_tenant_id and a.recipient_id = p_recipient_id and a.channel = p_channel
           and not exists (select from notify.recipient_consents g
                            where g.tenant_id = p_tenant_id and g.recipient_id = p_recipient_id and g.channel = p_channel
                              and (g.category is null or g.category = p_category) and g.status = 'granted'
                              and g.recorded_at > s.created_at)))
$$;
comment on function notify._consent(uuid, uuid, notify.channel, text) is
    'Whether the recipient may be messaged on the channel for the category: the latest applicable ledger entry decides; without one, the tenant''s channel policy; and never to an address on the suppression list (an erased recipient''s opt-out) unless the recipient recorded a grant after it. Use in FROM (cross join lateral) for set-based checks.';

create function notify._consent_allows(p_tenant_id uuid, p_recipient_id uuid, p_channel notify.channel, p_category text)
    returns boolean
    language sql
    stable
    set search_path = pg_catalog, pg_temp
as $$
    select allowed from notify._consent(p_tenant_id, p_recipient_id, p_channel, p_category)
$$;
comment on function notify._consent_allows(uuid, uuid, notify.channel, text) is
    'notify._consent as a scalar, for single checks.';

create function notify._resolve_template(p_tenant_id uuid, p_key text, p_channel notify.channel, p_locale text)
    returns notify.templates
    language sql
    stable
    set search_path = pg_catalog, pg_temp
as $$
    select t.*
      from notify.templates t
      join notify.tenants n on n.id = t.tenant_id
     where t.tenant_id = p_tenant_id and t.key = p_key and t.channel = p_channel
       and t.locale in (p_locale, split_part(p_locale, '-', 1), n.default_locale)
     order by case t.locale when p_locale then 0 when split_part(p_locale, '-', 1) then 1 else 2 end
     limit 1
$$;
comment on function notify._resolve_template(uuid, text, notify.channel, text) is
    'The template for a key, channel and locale, falling back es-ES -> es -> the tenant''s default locale. Null when none exists.';

create function notify._backoff(p_tenant_id uuid, p_attempt integer, p_retry_after double precision default null)
    returns interval
    language sql
    volatile
    set search_path = pg_catalog, pg_temp
as $$
    select greatest(
        make_interval(secs => coalesce(p_retry_after, 0)),
        make_interval(secs => least(t.retry_max_ms, t.retry_base_ms * power(2, greatest(p_attempt - 1, 0))) / 1000.0
                               * (0.5 + random() / 2)))
      from notify.tenants t where t.id = p_tenant_id
$$;
comment on function notify._backoff(uuid, integer, double precision) is
    'Delay before retry after attempt n: exponential with jitter (factor 0.5-1), capped by the tenant''s maximum, never less than a provider''s Retry-After.';

create function notify._wake_task(p_task text, p_lock text, p_args jsonb, p_at timestamptz default null)
    returns void
    language plpgsql
    volatile
    -- procrastinate's trigger functions name their tables unqualified, so they need public on the path; pg_temp comes
    -- last, so a temporary table of the caller's cannot stand in for one of them (docs/architecture.md).
    set search_path = pg_catalog, public, pg_temp
as $$
declare
    v_bucket timestamptz;
begin
    -- One pending wake-up per lock (and per second for future work), however many changes ask for it.
    -- ON CONFLICT on procrastinate's queueing-lock index instead of procrastinate_defer_jobs_v1 inside an
    -- exception block: same row, same NOTIFY trigger, but no subtransaction per submission.
    if p_at is null or p_at <= now() then
        insert into public.procrastinate_jobs (queue_name, task_name, lock, queueing_lock, args, scheduled_at)
        values (p_task, p_task, null, p_lock, p_args, null)
        on conflict (queueing_lock) where status = 'todo' do nothing;
    else
        v_bucket := to_timestamp(ceil(extract(epoch from p_at)));
        insert into public.procrastinate_jobs (queue_name, task_name, lock, queueing_lock, args, scheduled_at)
        values (p_task, p_task, null, p_lock || ':' || extract(epoch from v_bucket)::bigint, p_args, v_bucket)
        on conflict (queueing_lock) where status = 'todo' do nothing;
    end if;
end
$$;
comment on function notify._wake_task(text, text, jsonb, timestamptz) is
    'Defers a procrastinate job of task (and queue) p_task, coalesced by queueing lock p_lock: now, or at the second p_at falls in (lock p_lock:<epoch>). Commits (and NOTIFYs) with the caller''s transaction.';

create function notify._wake(p_channel notify.channel, p_at timestamptz default null)
    returns void
    language sql
    volatile
    set search_path = pg_catalog, pg_temp
as $$
    select notify._wake_task('dispatch', 'dispatch:' || p_channel, jsonb_build_object('channel', p_channel), p_at)
$$;
comment on function notify._wake(notify.channel, timestamptz) is
    'Defers a procrastinate "dispatch" job for the channel, coalesced by queueing lock: now, or at the second p_at falls in. Commits (and NOTIFYs) with the caller''s transaction.';

create function notify._set_source(p_source text)
    returns void
    language plpgsql
    volatile
    set search_path = pg_catalog, pg_temp
as $$
begin
    perform set_config('notify.source', p_source, true);
end
$$;
comment on function notify._set_source(text) is 'Names who changes statuses in this transaction; the history trigger records it.';

create function notify._replay(p_tenant_id uuid, p_idempotency_key text, p_fingerprint bytea)
    returns jsonb
    language plpgsql
    stable
    set search_path = pg_catalog, pg_temp
as $$
declare
    v notify.notification_requests;
begin
    -- Called after the key's insert lost the race: the winner has committed, so its row is visible.
    -- In the caller's scope (test or live, the transaction setting notify.test): the other one never answers.
    select * into v from notify.notification_requests r
     where r.tenant_id = p_tenant_id and r.idempotency_key = p_idempotency_key
       and r.test = coalesce(nullif(pg_catalog.current_setting('notify.test', true), '')::boolean, false);
    if v.fingerprint <> p_fingerprint then
        perform notify._raise('ND422', 'idempotency_key_reused', 'this Idempotency-Key was used with a different request body',
                              'Idempotency-Key');
    end if;
    return v.response;
end
$$;
comment on function notify._replay(uuid, text, bytea) is
    'The stored response for a repeated Idempotency-Key with the same body fingerprint, in the caller''s scope (a test key''s requests or the live ones, by the transaction setting notify.test); ND422 for another body.';

create function notify._recipient_id(p_tenant_id uuid, p_ref text)
    returns uuid
    language plpgsql
    stable
    set search_path = pg_catalog, pg_temp
as $$
declare
    v_id uuid;
begin
    select id into v_id from notify.recipients where tenant_id = p_tenant_id and ref = p_ref;
    if v_id is null then
        perform notify._raise('ND404', 'not_found', 'no such recipient', 'ref');
    end if;
    return v_id;
end
$$;
comment on function notify._recipient_id(uuid, text) is 'A recipient''s id by ref; ND404 if the tenant has none.';

create function notify._tenant()
    returns uuid
    language sql
    stable
as $$
    select nullif(pg_catalog.current_setting('notify.tenant_id', true), '')::uuid
$$;
comment on function notify._tenant() is
    'The tenant this transaction belongs to (setting notify.tenant_id), or null: what every row security policy compares with. Inlined, so no SET clause.';

create function notify._enter(p_tenant_id uuid)
    returns void
    language plpgsql
    volatile
    set search_path = pg_catalog, pg_temp
as $$
declare
    v_current uuid := notify._tenant();
    v_allowed boolean;
begin
    if p_tenant_id is null then
        perform notify._raise('ND404', 'not_found', 'no such tenant', 'tenant_id');
    end if;
    -- A login bound to tenants enters only those; one without a binding (null) any. session_user is the login that
    -- connected; current_user here is the function's owner.
    select p_tenant_id = any (l.tenant_ids) into v_allowed from notify.login_tenants l where l.login = session_user::text;
    if not v_allowed then
        perform notify._raise('ND403', 'tenant_not_allowed', 'this database login is not bound to the tenant', 'tenant_id');
    end if;
    if v_current is null then
        perform set_config('notify.tenant_id', p_tenant_id::text, true);
    elsif v_current <> p_tenant_id then
        -- A transaction belongs to one tenant: the one a caller set, or the first a function entered.
        perform notify._raise('ND404', 'not_found', 'no such tenant in this transaction', 'tenant_id');
    end if;
end
$$;
comment on function notify._enter(uuid) is
    'Binds this transaction to a tenant (transaction-local notify.tenant_id) so row security shows only its rows; ND403 if the session''s login is bound to other tenants only (notify.login_tenants), ND404 if the transaction is already bound to another tenant. First statement of every tenant-scoped notify_api function.';
