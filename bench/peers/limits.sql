-- The plain-SQL limits of bench/run.py scenario 8, in the `peers` database of the bench's server (loaded by
-- bench/limits.py before each measurement): a minimal queue of deliveries with a status history, and a bare table
-- for pgbench's single-row insert.

drop schema if exists limits cascade;
create schema limits;

-- The least a dispatch queue needs: a status, an attempt number to fence the record with, a due time to claim by.
create table limits.deliveries (
  id bigint generated always as identity primary key,
  status text not null default 'queued',
  attempt int not null default 0,
  due_at timestamptz not null default now(),
  provider_message_id text,
  finished_at timestamptz
);
comment on table limits.deliveries is 'The dispatch limit''s queue: claimed by due_at with SKIP LOCKED, recorded with one unnest UPDATE.';
create index deliveries_due on limits.deliveries (due_at) where status = 'queued';

-- One row per status change, written per statement from the transition tables (as notify's history is).
create table limits.delivery_history (
  delivery_id bigint not null,
  status text not null,
  at timestamptz not null default now()
);
comment on table limits.delivery_history is 'Status history of limits.deliveries, one row per change.';

create function limits.tg_deliveries__history() returns trigger
  language plpgsql
  set search_path = pg_catalog, pg_temp
as $$
begin
  insert into limits.delivery_history (delivery_id, status)
  select n.id, n.status from new_rows n join old_rows o on o.id = n.id where n.status is distinct from o.status;
  return null;
end
$$;
comment on function limits.tg_deliveries__history() is 'Appends a history row for each delivery whose status the statement changed.';

create trigger _100_history after update on limits.deliveries
  referencing old table as old_rows new table as new_rows
  for each statement execute function limits.tg_deliveries__history();

-- pgbench's single-row insert: the write limit for ingest (the same shape as the API's one-INSERT route's table).
create table limits.inserts (id bigserial primary key, payload jsonb not null);
comment on table limits.inserts is 'One row per pgbench transaction: the write limit for ingest.';
