-- pgbench script of the plain-SQL dispatch limit (bench/run.py scenario 8): one transaction of the script = a claim of
-- up to `batch` due deliveries (SKIP LOCKED, committed) and the record of all of them as sent in one unnest UPDATE
-- (committed), with nothing done per row outside Postgres. gset carries the claimed ids and attempts to the record.
with due as (
  select id from limits.deliveries
   where status = 'queued' and due_at <= now()
   order by due_at
   limit :batch
   for update skip locked
), claimed as (
  update limits.deliveries d set status = 'sending', attempt = d.attempt + 1
    from due where d.id = due.id
  returning d.id, d.attempt
)
select array_agg(id) as ids, array_agg(attempt) as attempts from claimed
\gset
update limits.deliveries d
   set status = 'sent', provider_message_id = 'limit-' || r.id, finished_at = now()
  from unnest(:ids::bigint[], :attempts::int[]) as r(id, attempt)
 where d.id = r.id and d.status = 'sending' and d.attempt = r.attempt;
