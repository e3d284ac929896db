-- Row-level security: the second line of tenant isolation, behind the tenant argument of every notify_api function.
-- Tenant-scoped functions run as notify_owner, which owns the tables and is subject to the policies (FORCE); they bind
-- the transaction to their tenant first (notify._enter). Cross-tenant functions run as notify_system, whose policy
-- admits every row; nothing else has any privilege on these tables, so any other role sees nothing at all.
-- Not tenant tables (no tenant_id): rate_buckets (per sender) and webhook_events (deduplicated before the tenant is known).

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
                                   'callback_endpoints', 'callback_messages', 'callback_attempts', 'provider_grants']
    loop
        execute format('alter table notify.%I enable row level security', v_table);
        execute format('alter table notify.%I force row level security', v_table);
        execute format('create policy tenant_rows on notify.%I to notify_owner
                            using (tenant_id = (select notify._tenant())) with check (tenant_id = (select notify._tenant()))', v_table);
        execute format('create policy system_rows on notify.%I to notify_system using (true) with check (true)', v_table);
    end loop;
end
$$;

create function notify._settle_owners()
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
                 'charge_api_key_v1', 'set_provider_grants_v1']) as cross_tenant
               from pg_proc p where p.pronamespace in ('notify'::regnamespace, 'notify_api'::regnamespace) loop
        execute format('alter function %s owner to %s', r.fn, case when r.cross_tenant then 'notify_system' else 'notify_owner' end);
    end loop;
end
$$;
comment on function notify._settle_owners() is
    'Gives every notify table, type and function to notify_owner, and the cross-tenant notify_api functions to notify_system. Run by the migrating role (a member of both) at the end of every migration that creates objects.';
