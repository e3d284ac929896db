-- notify_api: tenants, API keys and channel policies.
-- Called by the `dispatcher` CLI, the HTTP auth middleware (authenticate_api_key_v1) and operators over SQL.

create function notify_api.create_tenant_v1(p_slug text, p_name text default null, p_default_locale text default 'en')
    returns jsonb
    language plpgsql
    security definer
    set search_path = pg_catalog, pg_temp
as $$
declare
    v notify.tenants;
begin
    if p_slug is null or p_slug !~ '^[a-z0-9][a-z0-9_-]{0,62}$' then
        perform notify._raise('ND422', 'invalid_slug', 'slug must be 1-63 lowercase letters, digits, - or _', 'slug');
    end if;
    insert into notify.tenants (slug, name, default_locale)
    values (p_slug, coalesce(p_name, p_slug), coalesce(p_default_locale, 'en'))
    on conflict (slug) do nothing
    returning * into v;
    if v.id is null then
        perform notify._raise('ND409', 'tenant_exists', format('tenant %s already exists', p_slug), 'slug');
    end if;
    return jsonb_build_object('id', v.id, 'slug', v.slug, 'name', v.name, 'default_locale', v.default_locale, 'created_at', v.created_at);
end
$$;
comment on function notify_api.create_tenant_v1(text, text, text) is 'Creates a tenant. 409 if the slug is taken.';

create function notify_api.get_tenant_v1(p_slug text)
    returns jsonb
    language sql
    stable
    security definer
    set search_path = pg_catalog, pg_temp
as $$
    select jsonb_build_object('id', t.id, 'slug', t.slug, 'name', t.name, 'default_locale', t.default_locale,
                              'retry_max_attempts', t.retry_max_attempts, 'retry_base_ms', t.retry_base_ms,
                              'retry_max_ms', t.retry_max_ms, 'created_at', t.created_at)
      from notify.tenants t
     where t.slug = p_slug
       -- a login bound to tenants (notify.login_tenants) sees only those; one without a binding, any
       and coalesce((select t.id = any (l.tenant_ids) from notify.login_tenants l where l.login = session_user::text), true)
$$;
comment on function notify_api.get_tenant_v1(text) is
    'A tenant by slug, or null (also for a tenant the session''s login is not bound to, when it is bound to some).';

create function notify_api.set_retry_policy_v1(p_tenant_id uuid, p_max_attempts integer, p_base_ms integer, p_max_ms integer)
    returns void
    language plpgsql
    security definer
    set search_path = pg_catalog, pg_temp
as $$
begin
    perform notify._enter(p_tenant_id);
    update notify.tenants
       set retry_max_attempts = p_max_attempts, retry_base_ms = p_base_ms, retry_max_ms = p_max_ms
     where id = p_tenant_id;
    if not found then
        perform notify._raise('ND404', 'not_found', 'no such tenant', 'tenant_id');
    end if;
exception
    when check_violation then
        perform notify._raise('ND422', 'invalid_retry_policy', 'max_attempts must be 1-100, base_ms > 0 and max_ms >= base_ms', 'retry');
end
$$;
comment on function notify_api.set_retry_policy_v1(uuid, integer, integer, integer) is 'Sets how often and how fast transient failures are retried for a tenant.';

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

create function notify_api.revoke_api_key_v1(p_tenant_id uuid, p_key_id uuid)
    returns jsonb
    language plpgsql
    security definer
    set search_path = pg_catalog, pg_temp
as $$
declare
    v notify.api_clients;
begin
    perform notify._enter(p_tenant_id);
    update notify.api_clients set revoked_at = coalesce(revoked_at, now())
     where tenant_id = p_tenant_id and id = p_key_id
    returning * into v;
    if v.id is null then
        perform notify._raise('ND404', 'not_found', 'no such API key', 'key_id');
    end if;
    return jsonb_build_object('id', v.id, 'revoked_at', v.revoked_at);
end
$$;
comment on function notify_api.revoke_api_key_v1(uuid, uuid) is 'Revokes a key at once; later requests with it get 401.';

create function notify_api.list_api_keys_v1(p_tenant_id uuid)
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

create function notify_api.authenticate_api_key_v1(p_key_hash bytea)
    returns table (tenant_id uuid, api_key_id uuid)
    language plpgsql
    security definer
    set search_path = pg_catalog, pg_temp
as $$
declare
    v notify.api_clients;
begin
    select * into v from notify.api_clients c
     where c.key_hash = p_key_hash and c.revoked_at is null and (c.expires_at is null or c.expires_at > now());
    if v.id is null then
        return;
    end if;
    if v.last_used_at is null or v.last_used_at < now() - interval '1 minute' then
        update notify.api_clients c set last_used_at = now()
         where c.tenant_id = v.tenant_id and c.id = v.id;
    end if;
    tenant_id := v.tenant_id;
    api_key_id := v.id;
    return next;
end
$$;
comment on function notify_api.authenticate_api_key_v1(bytea) is
    'The tenant and key id of an unrevoked, unexpired key with this SHA-256, or no row. Exact match on a 256-bit digest: nothing to time.';

create function notify_api.check_api_key_v1(p_key_hash bytea, p_scope text)
    returns table (tenant_id uuid, api_key_id uuid, rate_per_second double precision)
    language plpgsql
    security definer
    set search_path = pg_catalog, pg_temp
as $$
declare
    v notify.api_clients;
    v_rate double precision;
    v_shards integer;
begin
    select * into v from notify.api_clients c
     where c.key_hash = p_key_hash and c.revoked_at is null and (c.expires_at is null or c.expires_at > now());
    if v.id is null then
        return;   -- 401
    end if;
    if not p_scope = any (v.scopes) then
        perform notify._raise('ND403', 'insufficient_scope', format('this API key lacks the %s scope', p_scope), 'Authorization');
    end if;
    select t.api_rate_per_second into v_rate from notify.tenants t where t.id = v.tenant_id;
    -- A key over its rate is refused here, before any work, by a read without locks: every shard of its bucket is
    -- empty. (The token itself is taken by charge_api_key_v1, at the end of the request's statement.)
    v_shards := greatest(1, least(16, floor(v_rate / 50)::integer));
    if (select count(*) = v_shards
                and bool_and(b.tokens + extract(epoch from clock_timestamp() - b.updated_at) * v_rate / v_shards < 1)
          from notify.rate_buckets b where b.key >= 'api:' || v.id || ':' and b.key < 'api:' || v.id || ';') then
        perform notify._raise('ND429', 'rate_limited', format('more than %s requests per second with this key', v_rate), 'Authorization');
    end if;
    if v.last_used_at is null or v.last_used_at < now() - interval '1 minute' then
        update notify.api_clients c set last_used_at = now() where c.tenant_id = v.tenant_id and c.id = v.id;
    end if;
    tenant_id := v.tenant_id;
    api_key_id := v.id;
    rate_per_second := v_rate;
    return next;
end
$$;
comment on function notify_api.check_api_key_v1(bytea, text) is
    'Authenticates a key (no row: 401) and checks its scope (ND403); refuses it (ND429) if its whole bucket is empty, without taking a token or a lock. Pair it with charge_api_key_v1.';

create function notify_api.charge_api_key_v1(p_api_key_id uuid, p_rate_per_second double precision)
    returns boolean
    language plpgsql
    security definer
    set search_path = pg_catalog, pg_temp
as $$
declare
    v_shards integer := greatest(1, least(16, floor(p_rate_per_second / 50)::integer));
begin
    -- The bucket is split into one shard per 50 requests/s of rate (at most 16), each with its share of the rate, and
    -- a request draws from a random shard: a shard's row lock is held until commit, so one bucket row would
    -- serialize every request of a busy key. Approximate at the limit (a request may find its shard empty while
    -- another has tokens); exact for rates under 100/s, which have one shard. Called last in a statement, the lock
    -- is held only while the transaction commits.
    if notify_api.take_tokens_v1('api:' || p_api_key_id || ':' || floor(random() * v_shards)::integer,
                                 p_rate_per_second / v_shards, 1) < 1 then
        perform notify._raise('ND429', 'rate_limited', format('more than %s requests per second with this key', p_rate_per_second),
                              'Authorization');
    end if;
    return true;
end
$$;
comment on function notify_api.charge_api_key_v1(uuid, double precision) is
    'Takes one token from the key''s (sharded) bucket, or raises ND429, which rolls back the statement it ends. The API calls it in the select list of the submission statement, after the work, to hold the bucket''s row lock briefly.';

create function notify_api.authorize_v1(p_key_hash bytea, p_scope text)
    returns table (tenant_id uuid, api_key_id uuid)
    language sql
    security definer
    set search_path = pg_catalog, pg_temp
as $$
    select k.tenant_id, k.api_key_id
      from notify_api.check_api_key_v1(p_key_hash, p_scope) k
     where notify_api.charge_api_key_v1(k.api_key_id, k.rate_per_second)
$$;
comment on function notify_api.authorize_v1(bytea, text) is
    'check_api_key_v1 and charge_api_key_v1 at once: no row (401), ND403 without the scope, ND429 over the tenant''s per-key rate (a token bucket shared by every API process, sharded by 50/s of rate).';

create function notify_api.rotate_api_key_v1(p_tenant_id uuid, p_key_id uuid, p_prefix text, p_key_hash bytea, p_overlap_seconds integer default 86400)
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

create function notify_api.set_api_rate_v1(p_tenant_id uuid, p_rate_per_second double precision)
    returns void
    language plpgsql
    security definer
    set search_path = pg_catalog, pg_temp
as $$
begin
    perform notify._enter(p_tenant_id);
    if p_rate_per_second is null or p_rate_per_second <= 0 then
        perform notify._raise('ND422', 'invalid_value', 'rate must be a positive number of requests per second', 'rate_per_second');
    end if;
    update notify.tenants set api_rate_per_second = p_rate_per_second where id = p_tenant_id;
end
$$;
comment on function notify_api.set_api_rate_v1(uuid, double precision) is 'Sets how many requests per second each of a tenant''s keys may make.';

create function notify_api.set_channel_policy_v1(p_tenant_id uuid, p_channel notify.channel, p_policy notify.consent_policy)
    returns jsonb
    language sql
    security definer
    set search_path = pg_catalog, pg_temp
as $$
    select notify._enter(p_tenant_id);
    insert into notify.channel_policies (tenant_id, channel, policy) values (p_tenant_id, p_channel, p_policy)
    on conflict (tenant_id, channel) do update set policy = excluded.policy, updated_at = now()
    returning jsonb_build_object('channel', channel, 'policy', policy, 'updated_at', updated_at)
$$;
comment on function notify_api.set_channel_policy_v1(uuid, notify.channel, notify.consent_policy) is
    'Sets whether a channel is opt_in or opt_out for a tenant.';

create function notify_api.list_channel_policies_v1(p_tenant_id uuid)
    returns jsonb
    language sql
    stable
    security definer
    set search_path = pg_catalog, pg_temp
as $$
    select notify._enter(p_tenant_id);
    select jsonb_agg(jsonb_build_object('channel', c, 'policy', coalesce(p.policy, notify._default_policy(c)),
                                        'default', p.policy is null) order by c)
      from unnest(enum_range(null::notify.channel)) c
      left join notify.channel_policies p on p.tenant_id = p_tenant_id and p.channel = c
$$;
comment on function notify_api.list_channel_policies_v1(uuid) is 'The consent policy in force for each channel.';

-- Logins bound to tenants: for the operator (`dispatcher login bind|unbind|list`), run as the migrating role. Security
-- invoker on purpose: only a role with privileges on notify.login_tenants (its owner notify_owner, notify_system, their
-- members, superusers) can run them, whatever EXECUTE grants say; application roles have no table privileges.

create function notify.bind_login_v1(p_login text, p_tenant_slug text)
    returns jsonb
    language plpgsql
    volatile
    set search_path = pg_catalog, pg_temp
as $$
declare
    v_tenant_id uuid;
    v notify.login_tenants;
begin
    if not exists (select from pg_catalog.pg_roles r where r.rolname = p_login) then
        perform notify._raise('ND404', 'not_found', 'no such database login', 'login');
    end if;
    select t.id into v_tenant_id from notify.tenants t where t.slug = p_tenant_slug;
    if v_tenant_id is null then
        perform notify._raise('ND404', 'not_found', 'no such tenant', 'tenant');
    end if;
    insert into notify.login_tenants as l (login, tenant_ids) values (p_login, array[v_tenant_id])
    on conflict (login) do update
        set tenant_ids = l.tenant_ids || excluded.tenant_ids, updated_at = now()
        where not excluded.tenant_ids <@ l.tenant_ids;
    select * into v from notify.login_tenants l where l.login = p_login;
    return notify._login_json(v);
end
$$;
comment on function notify.bind_login_v1(text, text) is
    'Binds a database login to one more tenant (by slug): from then on it enters only its bound tenants. Idempotent. ND404 for an unknown login or tenant. Operator only (security invoker).';

create function notify.unbind_login_v1(p_login text, p_tenant_slug text)
    returns jsonb
    language plpgsql
    volatile
    set search_path = pg_catalog, pg_temp
as $$
declare
    v_tenant_id uuid;
    v notify.login_tenants;
begin
    select t.id into v_tenant_id from notify.tenants t where t.slug = p_tenant_slug;
    select * into v from notify.login_tenants l where l.login = p_login and v_tenant_id = any (l.tenant_ids) for update;
    if v.login is null then
        perform notify._raise('ND404', 'not_found', 'this login is not bound to this tenant', 'tenant');
    end if;
    if cardinality(v.tenant_ids) = 1 then
        -- The last binding gone, the login enters any tenant again (as before it was ever bound).
        delete from notify.login_tenants l where l.login = p_login;
        return jsonb_build_object('login', p_login, 'tenants', '[]'::jsonb);
    end if;
    update notify.login_tenants l set tenant_ids = array_remove(l.tenant_ids, v_tenant_id), updated_at = now()
     where l.login = p_login
    returning * into v;
    return notify._login_json(v);
end
$$;
comment on function notify.unbind_login_v1(text, text) is
    'Removes one tenant from a login''s binding; with the last one removed the login is unbound (enters any tenant). ND404 if it was not bound to it. Operator only (security invoker).';

create function notify._login_json(v notify.login_tenants)
    returns jsonb
    language sql
    stable
    set search_path = pg_catalog, pg_temp
as $$
    select case when v.login is not null and cardinality(v.tenant_ids) > 0 then jsonb_build_object(
        'login', v.login,
        'tenants', (select coalesce(jsonb_agg(jsonb_build_object('id', b.id, 'slug', t.slug) order by t.slug, b.id), '[]')
                      from unnest(v.tenant_ids) b(id) left join notify.tenants t on t.id = b.id),
        'updated_at', v.updated_at) end
$$;
comment on function notify._login_json(notify.login_tenants) is 'A login binding as JSON: the login and its tenants (id, slug); null when it has none.';

create function notify.list_login_bindings_v1(p_login text default null)
    returns jsonb
    language sql
    stable
    set search_path = pg_catalog, pg_temp
as $$
    select coalesce(jsonb_agg(notify._login_json(l) order by l.login), '[]')
      from notify.login_tenants l where p_login is null or l.login = p_login
$$;
comment on function notify.list_login_bindings_v1(text) is
    'Every login binding (or one login''s): the logins that enter only the tenants listed. Operator only (security invoker).';
