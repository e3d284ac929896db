-- Run once by the postgres image when its data volume is new (docker-compose.yml mounts it).
-- The API and the worker log in as dispatcher_app, a member of notify_service: not the owner of anything, not a
-- superuser, not BYPASSRLS. The migrations (run as the superuser `dispatcher`) create the rest of the roles.
create role notify_service nologin;
create role dispatcher_app login password 'dispatcher_app' in role notify_service;
