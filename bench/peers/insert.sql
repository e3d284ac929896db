-- pgbench script of the write limit for ingest (bench/run.py scenario 8): one single-row INSERT of scenario 1's body
-- (its recipient varied as bench/post.lua does) per transaction.
\set n random(0, 999)
insert into limits.inserts (payload) values (format(
  '{"recipient":{"ref":"member-%1$s","addresses":{"email":"member%1$s@example.com"}},"channels":["email"],"template":"event_reminder","variables":{"name":"Ana","event":"Long run"}}',
  :n::int)::jsonb);
