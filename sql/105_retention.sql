-- Retention (issue #15): per-tenant (and per-channel) periods for personal data and for history, the daily partitions of
-- the append-only tables, and the scrub of expired content. Called by /internal/retention, `dispatcher retention` and the worker's "retention" task.

-- Two periods per tenant, each overridable per channel:
--   content_days  personal data and content: addresses, variables, rendered messages (the mock outbox), provider error
--                 texts, callback messages; scrubbed by notify_api.scrub_expired_v1 in small batches, set-based.
--   history_days  the content-free history (delivery_events, delivery_attempts, callback_attempts): kept at least this
--                 long; removed by dropping whole daily partitions once they are older than the longest history period
--                 of any tenant (a partition holds every tenant's rows of one day).
-- Defaults (no row, or a field left out): notify._retention_defaults().

create table notify.retention_settings (
    tenant_id uuid primary key references notify.tenants (id),
    content_days integer not null,
    history_days integer not null,
    channels jsonb not null default '{}',
    updated_at timestamptz not null default now(),
    constraint retention_settings_days check (content_days between 1 and 3650 and history_days between content_days and 3650),
    constraint retention_settings_channels check (jsonb_typeof(channels) = 'object')
);
comment on table notify.retention_settings is
    'A tenant''s retention periods (days): content_days for personal data and content, history_days for the content-free history. No row: the defaults (notify._retention_defaults).';
comment on column notify.retention_settings.channels is
    'Per-channel overrides, {"whatsapp": {"content_days": 7, "history_days": 90}}; a missing field takes the tenant''s value. Checked by set_retention_v1.';

create function notify._retention_defaults()
    returns table (content_days integer, history_days integer)
    language sql
    immutable
    set search_path = pg_catalog, pg_temp
as $$
    select 30, 90
$$;
comment on function notify._retention_defaults() is
    'The default retention periods: 30 days of personal data and content, 90 days of content-free history (docs/operations.md, "Retention").';

create function notify._retention_periods()
    returns table (tenant_id uuid, channel notify.channel, content_days integer, history_days integer)
    language sql
    stable
    set search_path = pg_catalog, pg_temp
as $$
    select t.id, c,
           coalesce((s.channels -> c::text ->> 'content_days')::integer, s.content_days, d.content_days),
           coalesce((s.channels -> c::text ->> 'history_days')::integer, s.history_days, d.history_days)
      from notify.tenants t
     cross join unnest(enum_range(null::notify.channel)) c
     cross join notify._retention_defaults() d
      left join notify.retention_settings s on s.tenant_id = t.id
$$;
comment on function notify._retention_periods() is
    'The retention periods in force for every tenant and channel the caller can see (row security: one tenant, or all for notify_system).';

create function notify._retention_json(p_tenant_id uuid)
    returns jsonb
    language sql
    stable
    set search_path = pg_catalog, pg_temp
as $$
    select jsonb_build_object(
        'content_days', coalesce(s.content_days, d.content_days),
        'history_days', coalesce(s.history_days, d.history_days),
        'channels', (select jsonb_object_agg(p.channel, jsonb_build_object(
                                 'content_days', p.content_days, 'history_days', p.history_days,
                                 'override', coalesce(s.channels ? p.channel::text, false)))
                       from notify._retention_periods() p where p.tenant_id = p_tenant_id),
        'defaults', jsonb_build_object('content_days', d.content_days, 'history_days', d.history_days),
        'default', s.tenant_id is null,
        'updated_at', s.updated_at)
      from notify._retention_defaults() d
      left join notify.retention_settings s on s.tenant_id = p_tenant_id
$$;
comment on function notify._retention_json(uuid) is
    'The public JSON form of a tenant''s retention: its periods, the period in force per channel (override: set for that channel), the defaults.';

create function notify._retention_days(p_value jsonb, p_field text)
    returns integer
    language plpgsql
    immutable
    set search_path = pg_catalog, pg_temp
as $$
begin
    if p_value is null or jsonb_typeof(p_value) = 'null' then
        return null;
    end if;
    if jsonb_typeof(p_value) <> 'number' or p_value::numeric <> trunc(p_value::numeric) then
        perform notify._raise('ND400', 'invalid_type', format('%s must be a whole number of days', p_field), p_field);
    end if;
    if p_value::numeric not between 1 and 3650 then
        perform notify._raise('ND422', 'invalid_retention', format('%s must be 1 to 3650 days', p_field), p_field);
    end if;
    return p_value::integer;
end
$$;
comment on function notify._retention_days(jsonb, text) is 'Reads a retention period (a whole number of days, 1 to 3650) or null, naming the field in its error.';

create function notify_api.set_retention_v1(p_tenant_id uuid, p_body jsonb)
    returns jsonb
    language plpgsql
    security definer
    set search_path = pg_catalog, pg_temp
as $$
declare
    v_content integer;
    v_history integer;
    v_key text;
    v_value jsonb;
    v_channel_content integer;
    v_channel_history integer;
    v_channels jsonb := '{}';
begin
    perform notify._enter(p_tenant_id);
    if p_body is null or jsonb_typeof(p_body) <> 'object' then
        perform notify._raise('ND400', 'invalid_type', 'body must be an object', '');
    end if;
    perform notify._check_keys(p_body, array['content_days', 'history_days', 'channels'], '');
    v_content := coalesce(notify._retention_days(p_body -> 'content_days', 'content_days'), (select content_days from notify._retention_defaults()));
    v_history := coalesce(notify._retention_days(p_body -> 'history_days', 'history_days'), (select history_days from notify._retention_defaults()));
    if v_history < v_content then
        perform notify._raise('ND422', 'invalid_retention', 'history_days must be at least content_days', 'history_days');
    end if;
    if p_body ? 'channels' and jsonb_typeof(p_body -> 'channels') <> 'null' then
        perform notify._check_keys(p_body -> 'channels', enum_range(null::notify.channel)::text[], 'channels');
        for v_key, v_value in select * from jsonb_each(p_body -> 'channels') loop
            perform notify._check_keys(v_value, array['content_days', 'history_days'], 'channels.' || v_key);
            if jsonb_typeof(v_value) <> 'object' or v_value = '{}' then
                perform notify._raise('ND400', 'invalid_type', format('channels.%s must be an object with content_days or history_days', v_key),
                                      'channels.' || v_key);
            end if;
            v_channel_content := notify._retention_days(v_value -> 'content_days', format('channels.%s.content_days', v_key));
            v_channel_history := notify._retention_days(v_value -> 'history_days', format('channels.%s.history_days', v_key));
            if coalesce(v_channel_history, v_history) < coalesce(v_channel_content, v_content) then
                perform notify._raise('ND422', 'invalid_retention', format('channels.%s.history_days must be at least its content_days', v_key),
                                      format('channels.%s.history_days', v_key));
            end if;
            v_channels := v_channels || jsonb_build_object(v_key, jsonb_strip_nulls(jsonb_build_object(
                              'content_days', v_channel_content, 'history_days', v_channel_history)));
        end loop;
    end if;
    insert into notify.retention_settings as s (tenant_id, content_days, history_days, channels)
    values (p_tenant_id, v_content, v_history, v_channels)
    on conflict (tenant_id) do update
       set content_days = excluded.content_days, history_days = excluded.history_days, channels = excluded.channels, updated_at = now();
    return notify._retention_json(p_tenant_id);
end
$$;
comment on function notify_api.set_retention_v1(uuid, jsonb) is
    'Sets a tenant''s retention, {content_days?, history_days?, channels?: {email: {content_days?, history_days?}}}: replaces the previous settings (a field left out takes the default; a channel''s, the tenant''s). Days 1 to 3650, history at least content; errors name the field.';

create function notify_api.get_retention_v1(p_tenant_id uuid)
    returns jsonb
    language plpgsql
    stable
    security definer
    set search_path = pg_catalog, pg_temp
as $$
begin
    perform notify._enter(p_tenant_id);
    return notify._retention_json(p_tenant_id);
end
$$;
comment on function notify_api.get_retention_v1(uuid) is 'A tenant''s retention periods, the period in force per channel and the defaults.';

-- Daily partitions. The partitioned tables (by range on their timestamp, UTC days) and what their rows are: history is
-- kept for the longest history period of any tenant, content (the mock outbox, callback messages) for the longest
-- content period, raw content (provider webhooks' payloads, no tenant's until parsed) for the shortest content period
-- of any tenant. A partition with a row matching kept_while is not dropped (callback messages still to be sent: a
-- later run drops it once they are delivered or given up). Each table also has a default partition (<table>_default)
-- that takes a row no daily partition covers, so an insert never fails.
create function notify._partitioned_tables()
    returns table (table_name text, column_name text, kind text, fillfactor integer, kept_while text)
    language sql
    immutable
    set search_path = pg_catalog, pg_temp
as $$
    values ('delivery_events', 'occurred_at', 'history', 100, null), ('delivery_attempts', 'started_at', 'history', 35, null),
           ('callback_attempts', 'started_at', 'history', 100, null), ('mock_messages', 'sent_at', 'content', 100, null),
           ('callback_messages', 'created_at', 'content', 100, 'status in (''pending'', ''sending'')'),
           ('webhook_events', 'received_at', 'raw', 100, null)
$$;
comment on function notify._partitioned_tables() is
    'The tables partitioned by day, their partition column, what their rows are (which retention period drops them: history, the longest history period; content, the longest content period; raw, the shortest content period), their partitions'' fillfactor (delivery_attempts: 35, so the outcome''s update is HOT), and the rows that keep a partition from being dropped (kept_while, a condition).';

create function notify._ensure_partitions(p_from date, p_to date)
    returns integer
    language plpgsql
    security definer
    set search_path = pg_catalog, pg_temp
    set lock_timeout = '2s'
as $$
declare
    t record;
    v_day date;
    v_name text;
    v_from timestamptz;
    v_to timestamptz;
    v_made integer := 0;
begin
    -- A day is a UTC day. A partition is created as a table of its own and attached (which locks the parent only in SHARE
    -- UPDATE EXCLUSIVE mode, so inserts and reads go on); rows the default partition took for that day move into it first.
    for t in select * from notify._partitioned_tables() loop
        for v_day in select d::date from generate_series(p_from, p_to, interval '1 day') d loop
            v_name := t.table_name || '_p' || to_char(v_day, 'YYYYMMDD');
            continue when to_regclass('notify.' || v_name) is not null;
            v_from := v_day::timestamp at time zone 'UTC';
            v_to := (v_day + 1)::timestamp at time zone 'UTC';
            begin
                execute format('create table notify.%I (like notify.%I including defaults including constraints) with (fillfactor = %s)',
                               v_name, t.table_name, t.fillfactor);
                -- Writers of the default partition wait from here to the attach (which would find a row one of them
                -- committed after the move, and fail); reads go on. A writer holding it past lock_timeout: the next run.
                execute format('lock table notify.%I in exclusive mode', t.table_name || '_default');
                execute format('with moved as (delete from notify.%I where %I >= %L and %I < %L returning *) insert into notify.%I select * from moved',
                               t.table_name || '_default', t.column_name, v_from, t.column_name, v_to, v_name);
                execute format('alter table notify.%I attach partition notify.%I for values from (%L) to (%L)',
                               t.table_name, v_name, v_from, v_to);
                execute format('comment on table notify.%I is %L', v_name,
                               format('Partition of notify.%s for %s (UTC), made by notify._ensure_partitions.', t.table_name, v_day));
                v_made := v_made + 1;
            exception
                when lock_not_available then
                    null;  -- busy (a long reader of the default partition): the next run makes it, rows wait in the default
            end;
        end loop;
    end loop;
    return v_made;
end
$$;
comment on function notify._ensure_partitions(date, date) is
    'Creates the missing daily partitions from p_from to p_to (UTC days) of every partitioned table, moving rows the default partition holds for those days. Returns how many it made. Run by run_retention_v1 (days ahead) and by the migration that partitioned the tables.';

create function notify._drop_partitions(p_history_before date, p_content_before date, p_raw_before date)
    returns text[]
    language plpgsql
    security definer
    set search_path = pg_catalog, pg_temp
    set lock_timeout = '2s'
as $$
declare
    r record;
    v_kept boolean;
    v_dropped text[] := '{}';
begin
    -- Only daily partitions named <table>_pYYYYMMDD whose whole day lies before the cutoff; never the default partition.
    for r in select c.relname, t.table_name, t.kept_while, to_date(right(c.relname, 8), 'YYYYMMDD') as day
               from notify._partitioned_tables() t
               join pg_inherits i on i.inhparent = ('notify.' || t.table_name)::regclass
               join pg_class c on c.oid = i.inhrelid
              where c.relname ~ ('^' || t.table_name || '_p[0-9]{8}$')
                and to_date(right(c.relname, 8), 'YYYYMMDD') + 1
                    <= case t.kind when 'history' then p_history_before when 'raw' then p_raw_before else p_content_before end
              order by 4, 1 loop
        -- A partition still holding rows that must stay (callback messages pending or sending: an old day gets no new
        -- rows, and a finished message never goes back) waits for a later run.
        if r.kept_while is not null then
            execute format('select exists (select from notify.%I where %s)', r.relname, r.kept_while) into v_kept;
            continue when v_kept;
        end if;
        -- DETACH (not CONCURRENTLY: this runs in a transaction) takes the parent's ACCESS EXCLUSIVE lock for a catalog
        -- change only; lock_timeout keeps it from queueing behind a long reader and stalling every writer behind it.
        begin
            execute format('alter table notify.%I detach partition notify.%I', r.table_name, r.relname);
            execute format('drop table notify.%I', r.relname);
            v_dropped := v_dropped || r.relname;
        exception
            when lock_not_available then
                null;  -- busy: the next run drops it
        end;
    end loop;
    return v_dropped;
end
$$;
comment on function notify._drop_partitions(date, date, date) is
    'Detaches and drops the daily partitions of history tables whose day ends on or before p_history_before, of content tables before p_content_before and of raw content (webhook payloads) before p_raw_before, but not one holding a row its table''s kept_while names (notify._partitioned_tables). Returns their names.';

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

create function notify_api.run_retention_v1(p_days_ahead integer default 7)
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

create function notify_api.scrub_expired_v1(p_limit integer default 1000)
    returns jsonb
    language plpgsql
    security definer
    set search_path = pg_catalog, pg_temp
as $$
declare
    r record;
    v_deliveries integer := 0;
    v_requests integer := 0;
    v_callbacks integer := 0;
    v_mock integer := 0;
    v_webhooks integer := 0;
    v_n integer;
    v_m integer;
    v_shortest integer;
begin
    if p_limit is null or p_limit < 1 or p_limit > 10000 then
        perform notify._raise('ND400', 'invalid_value', 'limit must be 1 to 10000', 'limit');
    end if;
    -- At most p_limit rows of each kind per call, locked with SKIP LOCKED (a row the worker or a webhook holds waits for
    -- the next call): the caller commits after each call and calls again while any count reached p_limit.
    for r in select p.tenant_id, p.channel, now() - make_interval(days => p.content_days) as cutoff
               from notify._retention_periods() p order by 1, 2 loop
        exit when v_deliveries >= p_limit and v_mock >= p_limit;
        -- Deliveries done with (no longer waiting or sending) and submitted before the cutoff lose their address,
        -- variables and provider error text; their attempts' error texts go too, and their request's variables once
        -- none of its deliveries holds content any more. Status, timestamps, counts and ids stay.
        with batch as (
            select d.tenant_id, d.id, d.request_id
              from notify.notification_deliveries d
             where d.tenant_id = r.tenant_id and d.channel = r.channel and d.created_at < r.cutoff
               and d.status not in ('scheduled', 'queued', 'sending', 'held', 'waiting')
               and (d.address is not null or d.variables is not null or d.last_error_message is not null)
             order by d.created_at
             limit greatest(p_limit - v_deliveries, 0)
               for update skip locked
        ), scrubbed as (
            update notify.notification_deliveries d
               set address = null, variables = null, last_error_message = null
              from batch b
             where d.tenant_id = b.tenant_id and d.id = b.id
            returning d.tenant_id, d.id, d.request_id
        ), attempts as (
            update notify.delivery_attempts a set error_message = null
              from scrubbed s
             where a.tenant_id = s.tenant_id and a.delivery_id = s.id and a.error_message is not null
        ), requests as (
            update notify.notification_requests q set variables = '{}'
              from (select distinct s.tenant_id, s.request_id from scrubbed s) s
             where q.tenant_id = s.tenant_id and q.id = s.request_id and q.variables <> '{}'
               and not exists (select from notify.notification_deliveries x
                                where x.request_id = q.id and x.tenant_id = q.tenant_id
                                  and (x.address is not null or x.variables is not null or x.status in ('scheduled', 'queued', 'sending', 'held', 'waiting'))
                                  and x.id not in (select s2.id from scrubbed s2))
            returning 1
        )
        select (select count(*) from scrubbed), (select count(*) from requests) into v_n, v_m;
        v_deliveries := v_deliveries + v_n;
        v_requests := v_requests + v_m;
        -- The mock outbox (rendered messages and addresses): rows of a tenant whose content period ends before the
        -- longest one (when the whole day's partition is dropped).
        with gone as (
            delete from notify.mock_messages m
             where (m.tenant_id, m.id, m.sent_at) in (
                       select x.tenant_id, x.id, x.sent_at from notify.mock_messages x
                        where x.tenant_id = r.tenant_id and x.channel = r.channel and x.sent_at < r.cutoff
                        limit greatest(p_limit - v_mock, 0))
            returning 1
        )
        select count(*) into v_n from gone;
        v_mock := v_mock + v_n;
    end loop;
    -- Callback messages (the outbox; its attempts stay, as history): finished ones past the tenant's shortest content
    -- period are deleted, in one batch across tenants.
    with due as (
        select m.tenant_id, m.id, m.created_at
          from notify.callback_messages m
          join (select p.tenant_id, min(p.content_days) as days from notify._retention_periods() p group by 1) p
            on p.tenant_id = m.tenant_id
         where m.status in ('delivered', 'failed') and m.created_at < now() - make_interval(days => p.days)
         limit p_limit
           for update of m skip locked
    ), gone as (
        delete from notify.callback_messages m using due
         where m.tenant_id = due.tenant_id and m.id = due.id and m.created_at = due.created_at returning 1
    )
    select count(*) into v_callbacks from gone;
    -- Raw provider webhooks are not a tenant's until parsed (they carry addresses of any tenant): kept for the shortest
    -- content period of any tenant. Their payloads go by whole days (run_retention_v1); their deduplication keys (a
    -- duplicate is refused while its key is kept) here, oldest first.
    select coalesce(min(p.content_days), (select content_days from notify._retention_defaults())) into v_shortest
      from notify._retention_periods() p;
    with gone as (
        delete from notify.webhook_event_keys k
         where (k.provider, k.event_key) in (
                   select x.provider, x.event_key from notify.webhook_event_keys x
                    where x.received_at < now() - make_interval(days => v_shortest)
                    order by x.received_at limit p_limit
                      for update skip locked)
        returning 1
    )
    select count(*) into v_webhooks from gone;
    return jsonb_build_object('deliveries', v_deliveries, 'requests', v_requests, 'callback_messages', v_callbacks,
                              'mock_messages', v_mock, 'webhook_event_keys', v_webhooks,
                              'more', greatest(v_deliveries, v_callbacks, v_mock, v_webhooks) >= p_limit);
end
$$;
comment on function notify_api.scrub_expired_v1(integer) is
    'Worker (the "retention" task) and operators: one bounded batch (p_limit rows of each kind) of retention scrubbing, per tenant and channel content period: deliveries done with lose address, variables and error texts (and their attempts'' error texts; their request its variables once none holds content), the mock outbox and finished callback messages past the period are deleted, webhook deduplication keys past the shortest content period of any tenant are deleted (their payloads go by whole days, run_retention_v1). Call again (a transaction each) while "more" is true.';
