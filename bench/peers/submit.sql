-- pgbench script of the direct SQL submission (bench/run.py scenario 9): what a trusted service does inside its own
-- transaction, logged in as a member of notify_caller: one submit_notification_v1 of scenario 1's body (its recipient
-- varied as bench/post.lua does) with a fresh idempotency key per transaction. pgbench -D tenant=<uuid>.
\set n random(0, 999)
select replayed from notify_api.submit_notification_v1(
  :tenant::uuid,
  format(
    '{"recipient":{"ref":"member-%1$s","addresses":{"email":"member%1$s@example.com"}},"channels":["email"],"template":"event_reminder","variables":{"name":"Ana","event":"Long run"}}',
    :n::int)::jsonb,
  'sql-' || gen_random_uuid());
