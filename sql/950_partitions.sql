-- The first daily partitions of the partitioned tables (sql/105_retention.sql): today and the next seven UTC days.
-- Loaded after the grants, like the worker's later ones (made by notify_api.run_retention_v1), so they get none.

select notify._ensure_partitions((now() at time zone 'UTC')::date, (now() at time zone 'UTC')::date + 7);
