-- pgbench script of graphile-worker's enqueue (bench/run.py scenario 8): one add_job of a no-op job per transaction.
select graphile_worker.add_job('noop', '{}'::json);
