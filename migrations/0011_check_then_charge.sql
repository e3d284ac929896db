-- 0011: the API key is checked first (check_api_key_v1) and charged last (charge_api_key_v1), so the rate bucket's
-- row lock is held only while a submission commits; authorize_v1 does both at once for the other routes.

create function notify_api.check_api_key_v1(p_key_hash bytea, p_scope text)
    returns table (tenant_id uuid, api_key_id uuid, rate_per_second double precision)
    language plpgsql
    security definer
    set search_path = ''
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
    set search_path = ''
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

create or replace function notify_api.authorize_v1(p_key_hash bytea, p_scope text)
    returns table (tenant_id uuid, api_key_id uuid)
    language sql
    security definer
    set search_path = ''
as $$
    select k.tenant_id, k.api_key_id
      from notify_api.check_api_key_v1(p_key_hash, p_scope) k
     where notify_api.charge_api_key_v1(k.api_key_id, k.rate_per_second)
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
                 'record_mock_messages_v1', 'claim_callbacks_v1', 'record_callback_attempts_v1', 'check_api_key_v1',
                 'charge_api_key_v1']) as cross_tenant
               from pg_proc p where p.pronamespace in ('notify'::regnamespace, 'notify_api'::regnamespace) loop
        execute format('alter function %s owner to %s', r.fn, case when r.cross_tenant then 'notify_system' else 'notify_owner' end);
    end loop;
end
$$;

comment on function notify_api.authorize_v1(bytea, text) is
    'check_api_key_v1 and charge_api_key_v1 at once: no row (401), ND403 without the scope, ND429 over the tenant''s per-key rate (a token bucket shared by every API process, sharded by 50/s of rate).';
revoke execute on all functions in schema notify_api from public;
grant execute on all functions in schema notify_api to notify_service;
select notify._settle_owners();
