-- Privileges: nobody but the owner reaches notify tables; roles get EXECUTE on named notify_api functions.
-- Loaded last; a new function is granted here in the same change that adds it.

revoke all on schema notify from public;
revoke all on schema notify_api from public;
revoke execute on all functions in schema notify from public;
revoke execute on all functions in schema notify_api from public;

grant usage on schema notify_api to notify_service, notify_caller;

-- The API and the worker: every notify_api function.
grant execute on all functions in schema notify_api to notify_service;
-- but not the operator's: what secrets and endpoints a tenant may use is never a tenant admin's (or the API process's) call.
revoke execute on function notify_api.set_provider_grants_v1(uuid, text, text, boolean) from notify_service;
grant usage on schema notify to notify_service;  -- composite and enum types in function signatures
grant usage on schema notify to notify_caller;

-- Trusted direct-SQL callers: the caller-facing functions only (no keys, no worker, no webhooks).
grant execute on function notify_api.submit_notification_v1(uuid, jsonb, text) to notify_caller;
grant execute on function notify_api.get_notification_v1(uuid, uuid) to notify_caller;
grant execute on function notify_api.cancel_notification_v1(uuid, uuid) to notify_caller;
grant execute on function notify_api.upsert_recipient_v1(uuid, text, jsonb) to notify_caller;
grant execute on function notify_api.get_recipient_v1(uuid, text) to notify_caller;
grant execute on function notify_api.record_consent_v1(uuid, text, jsonb, text) to notify_caller;
grant execute on function notify_api.list_consents_v1(uuid, text) to notify_caller;
grant execute on function notify_api.list_templates_v1(uuid, text) to notify_caller;
grant execute on function notify_api.get_tenant_v1(text) to notify_caller;

-- procrastinate's own tables and functions, for the worker running as notify_service.
grant select, insert, update, delete on all tables in schema public to notify_service;
grant usage, select on all sequences in schema public to notify_service;
grant execute on all functions in schema public to notify_service;
grant execute on function notify_api.submit_notifications_v1(uuid, jsonb) to notify_caller;

-- The owning roles (sql/890_row_security.sql): notify_owner owns the tables; notify_system reads and writes every row
-- through its own policy; both run procrastinate's wake-ups.
-- (The revokes repeat the top of this file, so a migration ending with this block leaves no new function open.)
revoke execute on all functions in schema notify from public;
revoke execute on all functions in schema notify_api from public;
grant usage on schema notify, notify_api to notify_owner, notify_system;
grant select, insert, update, delete on all tables in schema notify to notify_system;
grant usage, select on all sequences in schema notify to notify_system;
grant execute on all functions in schema notify to notify_system;
grant select, insert, update, delete on all tables in schema public to notify_owner, notify_system;
grant usage, select on all sequences in schema public to notify_owner, notify_system;
grant execute on all functions in schema public to notify_owner, notify_system;
grant execute on function notify_api.list_callbacks_v1(uuid, uuid) to notify_caller;

-- Only the owning roles may create temporary objects, and procrastinate's functions get a pinned search_path
-- (sql/890_row_security.sql; docs/security.md, "Database roles and temporary objects").
select notify._restrict_public();
select notify._pin_procrastinate_search_paths();
select notify._settle_owners();

-- The HTTP API's submission statements (sql/071_api_http.sql): the API's only, not a direct SQL caller's. They run as
-- notify_owner and take the key's rate token last, so notify_owner may call charge_api_key_v1.
grant execute on function notify_api.submit_notification_http_v1(uuid, jsonb, text, text, text, uuid, double precision) to notify_service;
grant execute on function notify_api.submit_notifications_http_v1(uuid, jsonb, text, text, uuid, double precision) to notify_service;
grant execute on function notify_api.charge_api_key_v1(uuid, double precision) to notify_owner;
