-- 0007: the per-key API rate bucket is sharded (one shard per 50/s of rate, at most 16), so a busy key's requests
-- do not queue on one row lock until commit.

create or replace function notify_api.authorize_v1(p_key_hash bytea, p_scope text)
    returns table (tenant_id uuid, api_key_id uuid)
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
    -- The bucket is split into one shard per 50 requests/s of rate (at most 16), each with its share of the rate, and
    -- a request draws from a random shard: a shard's row lock is held until commit, so one bucket row would
    -- serialize every request of a busy key. Approximate at the limit (a request may find its shard empty while
    -- another has tokens); exact for rates under 100/s, which have one shard.
    v_shards := greatest(1, least(16, floor(v_rate / 50)::integer));
    if notify_api.take_tokens_v1('api:' || v.id || ':' || floor(random() * v_shards)::integer, v_rate / v_shards, 1) < 1 then
        perform notify._raise('ND429', 'rate_limited', format('more than %s requests per second with this key', v_rate), 'Authorization');
    end if;
    if v.last_used_at is null or v.last_used_at < now() - interval '1 minute' then
        update notify.api_clients c set last_used_at = now() where c.tenant_id = v.tenant_id and c.id = v.id;
    end if;
    tenant_id := v.tenant_id;
    api_key_id := v.id;
    return next;
end
$$;

comment on function notify_api.authorize_v1(bytea, text) is
    'Authenticates a key (no row: 401), checks it has the scope (ND403) and is within its tenant''s rate (ND429, a token bucket per key shared by every API process, sharded by 50/s of rate).';
select notify._settle_owners();
