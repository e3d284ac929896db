-- 0038: three leftovers of issue #15 ("Keep only as long as allowed").
-- 1. Rows a default partition took for a past day (the worker was down when that day began, so it had no partition)
--    were never moved or dropped: run_retention_v1 now makes the partitions of up to 31 such days a run
--    (notify._default_partition_days), which moves their rows there, to go with their day.
-- 2. record_callback_attempts_v1 found each message by (tenant_id, id), one index probe per daily partition of the
--    outbox: the worker now passes the message's created_at back (claim_callbacks_v1 returns it), so each is found in
--    its day's partition alone; a record without it (an older worker) looks it up first.

create function notify._default_partition_days(p_before date)
    returns table (day date)
    language plpgsql
    stable
    set search_path = pg_catalog, pg_temp
as $$
declare
    t record;
begin
    for t in select * from notify._partitioned_tables() loop
        return query execute format('select distinct (%I at time zone ''UTC'')::date from notify.%I where %I < %L',
                                    t.column_name, t.table_name || '_default', t.column_name,
                                    p_before::timestamp at time zone 'UTC');
    end loop;
end
$$;
comment on function notify._default_partition_days(date) is
    'The UTC days before p_before that some default partition holds rows for (rows written while their day had no partition): run_retention_v1 makes their partitions, which moves the rows there.';

create or replace function notify_api.run_retention_v1(p_days_ahead integer default 7)
    returns jsonb
    language plpgsql
    security definer
    set search_path = pg_catalog, pg_temp
as $$
declare
    v_history integer;
    v_content integer;
    v_shortest integer;
    v_made integer;
    v_dropped text[];
    v_today date := (now() at time zone 'UTC')::date;
    v_day date;
begin
    if p_days_ahead is null or p_days_ahead < 1 or p_days_ahead > 90 then
        perform notify._raise('ND400', 'invalid_value', 'days_ahead must be 1 to 90', 'days_ahead');
    end if;
    -- A partition spans every tenant: it goes when it is older than the longest period of any tenant (and channel).
    -- Raw webhook payloads are no tenant's (they carry addresses of any tenant): they go after the shortest.
    select coalesce(max(p.history_days), (select history_days from notify._retention_defaults())),
           coalesce(max(p.content_days), (select content_days from notify._retention_defaults())),
           coalesce(min(p.content_days), (select content_days from notify._retention_defaults()))
      into v_history, v_content, v_shortest
      from notify._retention_periods() p;
    v_made := notify._ensure_partitions(v_today, v_today + p_days_ahead);
    -- Rows a default partition took for a past day (the worker was down when that day began, so it had no partition):
    -- their day's partition is made now and they move into it, so that they go with their day like every other row
    -- (at once, below, when the day is already past its period). Only days some default partition holds rows for, and
    -- at most 31 a run (a scan of the default partitions, which hold nothing in normal operation).
    for v_day in select d.day from notify._default_partition_days(v_today) d order by 1 limit 31 loop
        v_made := v_made + notify._ensure_partitions(v_day, v_day);
    end loop;
    v_dropped := notify._drop_partitions(v_today - v_history, v_today - v_content, v_today - v_shortest);
    return jsonb_build_object('partitions_created', v_made, 'partitions_dropped', to_jsonb(v_dropped),
                              'longest_history_days', v_history, 'longest_content_days', v_content,
                              'shortest_content_days', v_shortest);
end
$$;
comment on function notify_api.run_retention_v1(integer) is
    'Worker (the "retention" task) and operators: creates the daily partitions for today and p_days_ahead days ahead (and for up to 31 past days a default partition holds rows for, moving them there), and drops the partitions older than the longest history period of any tenant (content tables: the longest content period, callback messages only once none of the day is pending or sending; webhook payloads: the shortest content period). Scrubbing is scrub_expired_v1''s.';

create or replace function notify_api.record_callback_attempts_v1(p_results jsonb)
    returns integer
    language plpgsql
    security definer
    set search_path = pg_catalog, pg_temp
as $$
declare
    v_next timestamptz;
    v_count integer;
begin
    -- p_results: [{tenant_id, id, attempt, started_at, created_at?, status_code?, error?, outcome: delivered|retry|failed|refused}]
    -- created_at: the message's, as claim_callbacks_v1 returned it. The outbox is partitioned by it, so with it each
    -- message is found in its own day's partition; without it (an older worker), it is looked up first.
    -- Always a new table (a planted pg_temp._callback_results makes this fail instead of running its triggers as
    -- notify_system), dropped before returning so the worker may record twice in one transaction.
    create temporary table pg_temp._callback_results (
        tenant_id uuid, id uuid, attempt integer, started_at timestamptz, status_code integer, error text, outcome text,
        created_at timestamptz
    ) on commit drop;
    insert into pg_temp._callback_results
    select * from jsonb_to_recordset(p_results) as x(tenant_id uuid, id uuid, attempt integer, started_at timestamptz,
                                                     status_code integer, error text, outcome text, created_at timestamptz);
    update pg_temp._callback_results r set created_at = m.created_at
      from notify.callback_messages m
     where r.created_at is null and m.tenant_id = r.tenant_id and m.id = r.id;
    insert into notify.callback_attempts (tenant_id, message_id, attempt, started_at, status_code, error, outcome)
    select r.tenant_id, r.id, r.attempt, r.started_at, r.status_code, left(r.error, 500), r.outcome
      from pg_temp._callback_results r
      join notify.callback_messages m on m.tenant_id = r.tenant_id and m.id = r.id and m.created_at = r.created_at
                                     and m.attempts = r.attempt
    on conflict do nothing;
    with updated as (
        update notify.callback_messages m
           set status = case when r.outcome = 'delivered' then 'delivered'
                             when r.outcome in ('failed', 'refused') or m.attempts > cardinality(e.retry_schedule_ms) then 'failed'
                             else 'pending' end,
               next_attempt_at = case when r.outcome = 'retry' and m.attempts <= cardinality(e.retry_schedule_ms)
                                      then now() + make_interval(secs => e.retry_schedule_ms[m.attempts] / 1000.0 * (0.9 + random() * 0.2))
                                      else m.next_attempt_at end,
               lease_expires_at = null,
               finished_at = case when r.outcome <> 'retry' or m.attempts > cardinality(e.retry_schedule_ms) then now() end,
               last_error = case when r.outcome = 'delivered' then null
                                 else coalesce(r.error, 'HTTP ' || r.status_code) end
          from pg_temp._callback_results r, notify.callback_endpoints e
         where m.tenant_id = r.tenant_id and m.id = r.id and m.created_at = r.created_at and m.attempts = r.attempt
           and m.status = 'sending' and e.tenant_id = m.tenant_id
        returning m.status, m.next_attempt_at
    )
    select min(u.next_attempt_at) filter (where u.status = 'pending') into v_next from updated u;
    -- The next retry, and the next message of a delivery whose earlier one just finished.
    perform notify._wake_callbacks();
    if v_next is not null and v_next > now() then
        perform notify._wake_callbacks(v_next);
    end if;
    select count(*) into v_count from pg_temp._callback_results;
    drop table pg_temp._callback_results;
    return v_count;
end
$$;
comment on function notify_api.record_callback_attempts_v1(jsonb) is
    'Records callback attempts: delivered (2xx), retried per the tenant''s schedule (failed once it is used up), or failed at once (410 Gone, or a refused URL). A stale attempt (lease taken over) changes nothing.';

-- 3. (#15, "Find") The timeline of `dispatcher notifications show` gains the provider reports themselves (kind webhook:
--    the provider, the status it reported, what ingest did with it; never the raw payload), found through a GIN index
--    on the outcomes each stored webhook keeps (they name our delivery id or the provider's message id).
create index webhook_events_outcomes on notify.webhook_events using gin (outcomes jsonb_path_ops);

create or replace function notify_api.get_notification_timeline_v1(p_tenant_id uuid, p_id uuid, p_max_deliveries integer default 20)
    returns jsonb
    language plpgsql
    stable
    security definer
    set search_path = pg_catalog, pg_temp
as $$
declare
    v notify.notification_requests;
begin
    perform notify._enter(p_tenant_id);
    select * into v from notify.notification_requests r where r.tenant_id = p_tenant_id and r.id = p_id;
    if v.id is null then
        perform notify._raise('ND404', 'not_found', 'no such notification', 'id');
    end if;
    -- What support reads, in time order: each status change (its source says who: submit, claim, worker, webhook,
    -- maintenance, operator, erasure, cancel), each attempt, each provider report (webhook), each status callback attempt. A fan-out: its first
    -- p_max_deliveries deliveries (in the deliveries sub-resource's order).
    return jsonb_build_object(
        'notification', notify._notification_head(v),
        'timeline', coalesce((
            with ds as (
                select d.* from notify.notification_deliveries d
                 where d.request_id = p_id and d.tenant_id = p_tenant_id
                 order by d.recipient_id, d.channel
                 limit greatest(1, least(coalesce(p_max_deliveries, 20), 1000))
            ), entries as (
                select e.occurred_at as at, ds.id as delivery_id, ds.channel, ds.recipient_id, 'status' as kind,
                       jsonb_strip_nulls(jsonb_build_object('from', e.from_status, 'to', e.to_status, 'source', e.source,
                                                            'reason', e.reason)) as detail, e.seq as ord
                  from ds join notify.delivery_events e on e.tenant_id = p_tenant_id and e.delivery_id = ds.id
                union all
                select a.started_at, ds.id, ds.channel, ds.recipient_id, 'attempt',
                       jsonb_strip_nulls(jsonb_build_object('attempt', a.attempt, 'outcome', a.outcome, 'provider', a.provider,
                                                            'provider_message_id', a.provider_message_id,
                                                            'error_code', a.error_code, 'finished_at', a.finished_at)), 0
                  from ds join notify.delivery_attempts a on a.tenant_id = p_tenant_id and a.delivery_id = ds.id
                union all
                select t.at, ds.id, ds.channel, ds.recipient_id, 'provider_flag', jsonb_build_object('flag', t.flag), 0
                  from ds cross join lateral (values (ds.opened_at, 'opened'), (ds.complained_at, 'complained')) t(at, flag)
                 where t.at is not null
                union all
                -- Each provider report on the delivery, as the webhook's stored outcomes name it (by our delivery id, or by
                -- the provider's message id from a provider that reports on the delivery's: as ingest matched it), never
                -- the raw payload (one webhook may carry other tenants' events). webhook_events has no tenant: the
                -- deliveries (this tenant's, row security) choose the entries; a GIN index finds the webhooks.
                select w.received_at, ds.id, ds.channel, ds.recipient_id, 'webhook',
                       jsonb_strip_nulls(jsonb_build_object('provider', w.provider, 'status', o ->> 'status',
                                                            'outcome', o ->> 'outcome', 'webhook_id', w.id)), 0
                  from ds
                  join notify.webhook_events w
                    on w.received_at >= ds.created_at
                   and (w.outcomes @> jsonb_build_array(jsonb_build_object('delivery_id', ds.id))
                        or (ds.provider_message_id is not null
                            and w.outcomes @> jsonb_build_array(jsonb_build_object('provider_message_id', ds.provider_message_id))))
                 cross join lateral jsonb_array_elements(w.outcomes) o
                 where (ds.provider is null or ds.provider = any (notify._provider_family(w.provider)))
                   and (o ->> 'delivery_id' = ds.id::text
                        or (o ->> 'delivery_id' is null and o ->> 'provider_message_id' = ds.provider_message_id))
                union all
                select coalesce(ca.finished_at, m.created_at), ds.id, ds.channel, ds.recipient_id, 'callback',
                       jsonb_strip_nulls(jsonb_build_object('seq', m.seq, 'message_status', m.status, 'attempt', ca.attempt,
                                                            'outcome', ca.outcome, 'status_code', ca.status_code,
                                                            'error', ca.error)), m.seq
                  from ds join notify.callback_messages m on m.tenant_id = p_tenant_id and m.delivery_id = ds.id
                  left join notify.callback_attempts ca on ca.tenant_id = p_tenant_id and ca.message_id = m.id
            )
            select jsonb_agg(jsonb_build_object('at', x.at, 'delivery_id', x.delivery_id, 'channel', x.channel,
                                                'recipient', r.ref, 'kind', x.kind) || x.detail
                             order by x.at, x.delivery_id, x.kind desc, x.ord)
              from entries x join notify.recipients r on r.tenant_id = p_tenant_id and r.id = x.recipient_id), '[]'));
end
$$;
comment on function notify_api.get_notification_timeline_v1(uuid, uuid, integer) is
    'A notification''s history in time order, for support (`dispatcher notifications show`): every status change with its source (provider reports arrive as source webhook), attempt, provider report (kind webhook: the provider, the status it reported and what ingest did with it, never the raw payload), provider flag (opened, complained) and status callback attempt, of its first p_max_deliveries deliveries (default 20, at most 1,000). 404 for another tenant''s id.';


revoke execute on function notify._default_partition_days(date) from public;
grant execute on function notify._default_partition_days(date) to notify_system;
select notify._settle_owners();
