-- Row-level security: the second line of tenant isolation, behind the tenant argument of every notify_api function.
-- Tenant-scoped functions run as notify_owner, which owns the tables and is subject to the policies (FORCE); they bind
-- the transaction to their tenant first (notify._enter). Cross-tenant functions run as notify_system, whose policy
-- admits every row; nothing else has any privilege on these tables, so any other role sees nothing at all.
-- Not tenant tables (no tenant_id): rate_buckets (per sender), webhook_events and webhook_event_keys (deduplicated
-- before the tenant is known) and login_tenants (per database login, read by notify._enter before any tenant is
-- entered), address_hash_key (the server's one HMAC key, sql/066_api_erasure.sql), and provider_kinds (the provider
-- kinds every tenant shares, sql/020_tables.sql).
-- Partitioned tables (sql/105_retention.sql) carry the policies on the parent, which every function reads and writes
-- through; their partitions have none and no grant to any application role (only the owner names a partition: the
-- partition maintenance, which moves a default partition's rows without the policies hiding them).

alter table notify.tenants enable row level security;
alter table notify.tenants force row level security;
create policy tenant_rows on notify.tenants to notify_owner
    using (id = (select notify._tenant())) with check (id = (select notify._tenant()));
create policy system_rows on notify.tenants to notify_system using (true) with check (true);

do $$
declare
    v_table text;
begin
    foreach v_table in array array['api_clients', 'channel_policies', 'channel_providers', 'whatsapp_windows', 'recipients',
                                   'recipient_addresses', 'recipient_consents', 'templates', 'notification_requests',
                                   'notification_deliveries', 'delivery_attempts', 'delivery_events', 'mock_messages',
                                   'callback_endpoints', 'callback_messages', 'callback_attempts', 'provider_grants',
                                   'whatsapp_users', 'whatsapp_business_limits',
                                   'retention_settings', 'quiet_hours', 'frequency_caps', 'policy_sends', 'provider_health']
    loop
        execute format('alter table notify.%I enable row level security', v_table);
        execute format('alter table notify.%I force row level security', v_table);
        execute format('create policy tenant_rows on notify.%I to notify_owner
                            using (tenant_id = (select notify._tenant())) with check (tenant_id = (select notify._tenant()))', v_table);
        execute format('create policy system_rows on notify.%I to notify_system using (true) with check (true)', v_table);
    end loop;
end
$$;

-- Erasure (sql/066_api_erasure.sql): the suppression list and the erasure records, by tenant like the rest.
alter table notify.address_suppressions enable row level security;
alter table notify.address_suppressions force row level security;
create policy tenant_rows on notify.address_suppressions to notify_owner
    using (tenant_id = (select notify._tenant())) with check (tenant_id = (select notify._tenant()));
create policy system_rows on notify.address_suppressions to notify_system using (true) with check (true);
alter table notify.recipient_erasures enable row level security;
alter table notify.recipient_erasures force row level security;
create policy tenant_rows on notify.recipient_erasures to notify_owner
    using (tenant_id = (select notify._tenant())) with check (tenant_id = (select notify._tenant()));
create policy system_rows on notify.recipient_erasures to notify_system using (true) with check (true);
-- Deadlines for unknown outcomes (sql/086_api_unknown.sql).
alter table notify.unknown_deadlines enable row level security;
alter table notify.unknown_deadlines force row level security;
create policy tenant_rows on notify.unknown_deadlines to notify_owner
    using (tenant_id = (select notify._tenant())) with check (tenant_id = (select notify._tenant()));
create policy system_rows on notify.unknown_deadlines to notify_system using (true) with check (true);

create function notify._settle_owners()
    returns void
    language plpgsql
    set search_path = pg_catalog, pg_temp
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
                 'charge_api_key_v1', 'set_provider_grants_v1', 'whatsapp_limits_v1',
                 'run_retention_v1', 'scrub_expired_v1', 'webhook_keys_v1', 'record_provider_health_v1', 'provider_health_v1']) as cross_tenant
               from pg_proc p where p.pronamespace in ('notify'::regnamespace, 'notify_api'::regnamespace) loop
        execute format('alter function %s owner to %s', r.fn, case when r.cross_tenant then 'notify_system' else 'notify_owner' end);
    end loop;
end
$$;
comment on function notify._settle_owners() is
    'Gives every notify table, type and function to notify_owner, and the cross-tenant notify_api functions to notify_system. Run by the migrating role (a member of both) at the end of every migration that creates objects.';

-- Nothing but the owning roles may create temporary objects: Postgres resolves relation and type names in the
-- session's temporary schema (before pg_catalog, unless a path lists pg_temp), so a login's temporary table or domain
-- could run its code inside a definer function (docs/security.md, "Database roles and temporary objects").
create function notify._restrict_public()
    returns void
    language plpgsql
    volatile
    set search_path = pg_catalog, pg_temp
as $$
declare
    v_db text := current_database();
begin
    -- A database's privileges are not copied by CREATE DATABASE ... TEMPLATE nor restored by pg_restore into an
    -- existing database, so `dispatcher migrate` runs this on every run, not only in its migration.
    if exists (select from pg_database d, aclexplode(coalesce(d.datacl, acldefault('d', d.datdba))) a
                where d.datname = v_db and a.grantee = 0 and a.privilege_type = 'TEMPORARY') then
        execute format('revoke temporary on database %I from public', v_db);
    end if;
    if not (has_database_privilege('notify_owner', v_db, 'TEMPORARY') and has_database_privilege('notify_system', v_db, 'TEMPORARY')) then
        execute format('grant temporary on database %I to notify_owner, notify_system', v_db);
    end if;
    -- Postgres 15 and later create schema public without CREATE for PUBLIC; a database upgraded from older ones kept it.
    if exists (select from pg_namespace n, aclexplode(coalesce(n.nspacl, acldefault('n', n.nspowner))) a
                where n.nspname = 'public' and a.grantee = 0 and a.privilege_type = 'CREATE') then
        revoke create on schema public from public;
    end if;
    -- A role without the grant option only gets a warning from REVOKE and GRANT: check what they did.
    if exists (select from pg_database d, aclexplode(coalesce(d.datacl, acldefault('d', d.datdba))) a
                where d.datname = v_db and a.grantee = 0 and a.privilege_type = 'TEMPORARY')
       or has_schema_privilege('public', 'public', 'CREATE')
       or not (has_database_privilege('notify_owner', v_db, 'TEMPORARY') and has_database_privilege('notify_system', v_db, 'TEMPORARY')) then
        raise exception 'could not take TEMPORARY on database % (and CREATE on schema public) from PUBLIC, or grant TEMPORARY to notify_owner and notify_system', v_db
            using hint = 'Run dispatcher migrate as the database''s owner (or a superuser); see docs/security.md.';
    end if;
end
$$;
comment on function notify._restrict_public() is
    'Takes TEMPORARY on the current database and CREATE on schema public from PUBLIC and grants TEMPORARY to notify_owner and notify_system (their functions use temporary tables); raises if the running role could not. Idempotent; run by the sql/ build, migration 0013 and every dispatcher migrate.';

-- procrastinate's functions name their tables unqualified; its trigger functions run inside our definer functions.
create function notify._pin_procrastinate_search_paths()
    returns void
    language plpgsql
    volatile
    set search_path = pg_catalog, pg_temp
as $$
declare
    r record;
begin
    for r in select p.oid::regprocedure as fn from pg_proc p
              where p.pronamespace = 'public'::regnamespace and p.proname like 'procrastinate%'
                and not exists (select from unnest(coalesce(p.proconfig, '{}')) c where c like 'search_path=%') loop
        execute format('alter function %s set search_path = pg_catalog, public, pg_temp', r.fn);
    end loop;
end
$$;
comment on function notify._pin_procrastinate_search_paths() is
    'Pins search_path = pg_catalog, public, pg_temp on every procrastinate function in public that has none. Run by the sql/ build, migration 0013, and any later migration that upgrades procrastinate''s schema.';
