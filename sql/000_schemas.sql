-- Schemas and roles of notification-dispatcher.
-- Loaded first by every build (sql/ and migrations); nothing else depends on order before it.

-- Roles are cluster-wide, so they are created only when missing (several databases share a cluster).
do $$
begin
    if not exists (select from pg_roles where rolname = 'notify_service') then
        create role notify_service nologin;
    end if;
    if not exists (select from pg_roles where rolname = 'notify_caller') then
        create role notify_caller nologin;
    end if;
    -- Owners, never logged in as: notify_owner owns the tables and the tenant-scoped functions and is subject to
    -- row security (FORCE); notify_system owns the named cross-tenant functions (worker, webhooks, key lookup).
    if not exists (select from pg_roles where rolname = 'notify_owner') then
        create role notify_owner nologin nosuperuser nobypassrls;
    end if;
    if not exists (select from pg_roles where rolname = 'notify_system') then
        create role notify_system nologin nosuperuser nobypassrls;
    end if;
    -- The cross-tenant functions skip row security altogether where the migrating role may grant BYPASSRLS (a
    -- superuser; on managed Postgres often not): their system_rows policy admits every row anyway, and the policy
    -- machinery costs the worker's claims and records about a fifth of their time (docs/architecture.md).
    begin
        alter role notify_system bypassrls;
    exception
        when insufficient_privilege then null;
    end;
    -- ALTER ... OWNER TO needs membership; a superuser has it, a CREATEROLE migrator grants it to itself.
    if not (select rolsuper from pg_roles where rolname = current_user) then
        execute format('grant notify_owner, notify_system to %I', current_user);
    end if;
end
$$;

create schema notify;
comment on schema notify is
    'Private: tables, types, triggers and helper functions of notification-dispatcher. No role but the owner touches it directly.';

create schema notify_api;
comment on schema notify_api is
    'Public: the versioned functions that the HTTP layer, the worker and trusted SQL clients call.';
