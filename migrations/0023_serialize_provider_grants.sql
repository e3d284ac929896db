-- 0023: two operator grants at once could both pass set_provider_grants_v1's overlap check (a check-then-insert):
-- grants are serialized by a table lock that conflicts only with itself and other writers.

create or replace function notify_api.set_provider_grants_v1(p_tenant_id uuid, p_env_prefix text, p_file_dir text, p_private_endpoints boolean)
    returns jsonb
    language plpgsql
    security definer
    set search_path = pg_catalog, pg_temp
as $$
declare
    v notify.provider_grants;
begin
    -- Operator only: not granted to notify_service (the API and worker) nor notify_caller (sql/900_grants.sql), so no
    -- API key reaches it. Cross-tenant (owned by notify_system): a namespace may not overlap another tenant's.
    if not exists (select from notify.tenants t where t.id = p_tenant_id) then
        perform notify._raise('ND404', 'not_found', 'no such tenant', 'tenant');
    end if;
    -- The overlap check below reads other tenants' grants before this one is written: two grants at once must not
    -- both pass it, so grants are serialized (a lock on the table that conflicts only with itself and writers).
    lock table notify.provider_grants in share row exclusive mode;
    if exists (select from notify.provider_grants g
                where g.tenant_id <> p_tenant_id and (starts_with(g.env_prefix, p_env_prefix) or starts_with(p_env_prefix, g.env_prefix))) then
        perform notify._raise('ND409', 'secret_namespace_overlaps', 'env_prefix overlaps another tenant''s prefix (one starts with the other)', 'env_prefix');
    end if;
    if exists (select from notify.provider_grants g
                where g.tenant_id <> p_tenant_id and (starts_with(g.file_dir, p_file_dir) or starts_with(p_file_dir, g.file_dir))) then
        perform notify._raise('ND409', 'secret_namespace_overlaps', 'file_dir overlaps another tenant''s directory (one contains the other)', 'file_dir');
    end if;
    insert into notify.provider_grants as g (tenant_id, env_prefix, file_dir, private_endpoints)
    values (p_tenant_id, p_env_prefix, p_file_dir, coalesce(p_private_endpoints, false))
    on conflict (tenant_id) do update
        set env_prefix = excluded.env_prefix, file_dir = excluded.file_dir, private_endpoints = excluded.private_endpoints, updated_at = now()
    returning * into v;
    return jsonb_build_object('env_prefix', v.env_prefix, 'file_dir', v.file_dir, 'private_endpoints', v.private_endpoints, 'updated_at', v.updated_at);
exception
    when check_violation then
        perform notify._raise('ND422', 'invalid_secret_namespace',
            case when sqlerrm like '%file_dir%' then 'file_dir must be an absolute directory ending in /, without . or .. segments'
                 else 'env_prefix must be a variable-name prefix ending in _ (4-64 characters), not DISPATCHER_, DATABASE_ or PG' end,
            case when sqlerrm like '%file_dir%' then 'file_dir' else 'env_prefix' end);
end
$$;
comment on function notify_api.set_provider_grants_v1(uuid, text, text, boolean) is
    'Operator only (`dispatcher tenant secrets`): sets what a tenant''s provider settings may use: the env-variable prefix and the file directory its secret references must lie in (null: none), and whether its endpoints may be private hosts. Replaces the previous grant; references already saved are checked again by the worker at every send.';

select notify._settle_owners();
