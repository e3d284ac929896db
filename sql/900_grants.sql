-- Privileges: nobody but the owner reaches notify tables; roles get EXECUTE on named notify_api functions.
-- Loaded last; a new function is granted here in the same change that adds it.

-- Grouped by role, in this order: PUBLIC, notify_service, notify_caller, the owning roles, then procrastinate's objects.
-- A role's grants are appended to each object's privileges in the order they run, so this order is also the order of
-- the entries in every ACL (tests/catalog/test_migrations.py compares them with the migrations'). A migration that creates a
-- function revokes it from PUBLIC, grants it to the roles this file grants it to, and ends with notify._settle_owners().

-- PUBLIC: nothing on our schemas or functions (a new function is executable by PUBLIC until revoked).
revoke all on schema notify from public;
revoke all on schema notify_api from public;
revoke execute on all functions in schema notify from public;
revoke execute on all functions in schema notify_api from public;

-- notify_service (the API and the worker): every notify_api function but the operator's, and the types in notify.
grant usage on schema notify_api to notify_service;
grant usage on schema notify to notify_service;  -- composite and enum types in function signatures
grant execute on all functions in schema notify_api to notify_service;
-- but not the operator's: what secrets and endpoints a tenant may use is never a tenant admin's (or the API process's) call.
revoke execute on function notify_api.set_provider_grants_v1(uuid, text, text, boolean) from notify_service;

-- notify_caller (trusted direct-SQL callers): the caller-facing functions only (no keys, no worker, no webhooks).
grant usage on schema notify_api to notify_caller;
grant usage on schema notify to notify_caller;
grant execute on function notify_api.get_tenant_v1(text) to notify_caller;
grant execute on function notify_api.submit_notification_v1(uuid, jsonb, text) to notify_caller;
grant execute on function notify_api.submit_notifications_v1(uuid, jsonb) to notify_caller;
grant execute on function notify_api.preview_notification_v1(uuid, jsonb) to notify_caller;
grant execute on function notify_api.get_notification_v1(uuid, uuid) to notify_caller;
grant execute on function notify_api.get_notification_v2(uuid, uuid) to notify_caller;
grant execute on function notify_api.list_deliveries_v1(uuid, uuid, text, integer) to notify_caller;
grant execute on function notify_api.find_notifications_v1(uuid, jsonb, text, integer) to notify_caller;
grant execute on function notify_api.get_notification_timeline_v1(uuid, uuid, integer) to notify_caller;
grant execute on function notify_api.cancel_notification_v1(uuid, uuid) to notify_caller;
grant execute on function notify_api.list_callbacks_v1(uuid, uuid) to notify_caller;
grant execute on function notify_api.upsert_recipient_v1(uuid, text, jsonb) to notify_caller;
grant execute on function notify_api.get_recipient_v1(uuid, text) to notify_caller;
grant execute on function notify_api.record_consent_v1(uuid, text, jsonb, text) to notify_caller;
grant execute on function notify_api.list_consents_v1(uuid, text) to notify_caller;
grant execute on function notify_api.erase_recipient_v1(uuid, text, text) to notify_caller;
grant execute on function notify_api.export_recipient_v1(uuid, text) to notify_caller;
grant execute on function notify_api.resolve_delivery_v1(uuid, uuid, jsonb, text) to notify_caller;
grant execute on function notify_api.list_templates_v1(uuid, text) to notify_caller;

-- The owning roles (sql/890_row_security.sql): notify_owner owns the tables (notify._settle_owners, below) and the
-- tenant-scoped functions; notify_system reads and writes every row through its own policy and owns the cross-tenant
-- functions.
grant usage on schema notify, notify_api to notify_owner, notify_system;
-- notify_owner's partition maintenance (notify._ensure_partitions, sql/105_retention.sql) creates tables in notify.
grant create on schema notify to notify_owner;
grant select, insert, update, delete on all tables in schema notify to notify_system;
grant usage, select on all sequences in schema notify to notify_system;
grant execute on all functions in schema notify to notify_system;
-- The HTTP API's submission functions (sql/071_api_http.sql) run as notify_owner and take the key's rate token last.
grant execute on function notify_api.charge_api_key_v1(uuid, double precision) to notify_owner;

-- procrastinate's tables, sequences and functions (schema public): the worker running as notify_service, and the owning
-- roles, whose functions defer wake-up jobs (notify._wake_task).
grant select, insert, update, delete on all tables in schema public to notify_service;
grant usage, select on all sequences in schema public to notify_service;
grant execute on all functions in schema public to notify_service;
grant select, insert, update, delete on all tables in schema public to notify_owner, notify_system;
grant usage, select on all sequences in schema public to notify_owner, notify_system;
grant execute on all functions in schema public to notify_owner, notify_system;

-- Only the owning roles may create temporary objects, procrastinate's functions get a pinned search_path, and every
-- notify object goes to its owner (sql/890_row_security.sql; docs/security.md, "Database roles and temporary objects").
select notify._restrict_public();
select notify._pin_procrastinate_search_paths();
select notify._settle_owners();

