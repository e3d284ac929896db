-- 0029: retention (issue #15, "Keep only as long as allowed"): per-tenant and per-channel retention periods
-- (notify.retention_settings, set_retention_v1 / get_retention_v1), the append-only history tables partitioned by day
-- (delivery_events, delivery_attempts, callback_attempts, mock_messages; their keys gain the partition column), and the
-- worker's retention functions (run_retention_v1: partitions ahead and dropped; scrub_expired_v1: content scrubbed in batches).
-- Existing rows are moved: the old tables are locked for the move (writers wait; docs/operations.md, "Retention").

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
-- kept for the longest history period of any tenant, content (the mock outbox) for the longest content period. Each also
-- has a default partition (<table>_default) that takes a row no daily partition covers, so an insert never fails.
create function notify._partitioned_tables()
    returns table (table_name text, column_name text, kind text, fillfactor integer)
    language sql
    immutable
    set search_path = pg_catalog, pg_temp
as $$
    values ('delivery_events', 'occurred_at', 'history', 100), ('delivery_attempts', 'started_at', 'history', 35),
           ('callback_attempts', 'started_at', 'history', 100), ('mock_messages', 'sent_at', 'content', 100)
$$;
comment on function notify._partitioned_tables() is
    'The tables partitioned by day, their partition column, whether their rows are history or content (which retention period drops them), and their partitions'' fillfactor (delivery_attempts: 35, so the outcome''s update is HOT).';

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

create function notify._drop_partitions(p_history_before date, p_content_before date)
    returns text[]
    language plpgsql
    security definer
    set search_path = pg_catalog, pg_temp
    set lock_timeout = '2s'
as $$
declare
    r record;
    v_dropped text[] := '{}';
begin
    -- Only daily partitions named <table>_pYYYYMMDD whose whole day lies before the cutoff; never the default partition.
    for r in select c.relname, t.table_name, to_date(right(c.relname, 8), 'YYYYMMDD') as day
               from notify._partitioned_tables() t
               join pg_inherits i on i.inhparent = ('notify.' || t.table_name)::regclass
               join pg_class c on c.oid = i.inhrelid
              where c.relname ~ ('^' || t.table_name || '_p[0-9]{8}$')
                and to_date(right(c.relname, 8), 'YYYYMMDD') + 1
                    <= case t.kind when 'history' then p_history_before else p_content_before end
              order by 3, 1 loop
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
comment on function notify._drop_partitions(date, date) is
    'Detaches and drops the daily partitions of history tables whose day ends on or before p_history_before, and of content tables before p_content_before. Returns their names.';

create function notify_api.run_retention_v1(p_days_ahead integer default 7)
    returns jsonb
    language plpgsql
    security definer
    set search_path = pg_catalog, pg_temp
as $$
declare
    v_history integer;
    v_content integer;
    v_made integer;
    v_dropped text[];
    v_today date := (now() at time zone 'UTC')::date;
begin
    if p_days_ahead is null or p_days_ahead < 1 or p_days_ahead > 90 then
        perform notify._raise('ND400', 'invalid_value', 'days_ahead must be 1 to 90', 'days_ahead');
    end if;
    -- A partition spans every tenant: it goes when it is older than the longest period of any tenant (and channel).
    select coalesce(max(p.history_days), (select history_days from notify._retention_defaults())),
           coalesce(max(p.content_days), (select content_days from notify._retention_defaults()))
      into v_history, v_content
      from notify._retention_periods() p;
    v_made := notify._ensure_partitions(v_today, v_today + p_days_ahead);
    v_dropped := notify._drop_partitions(v_today - v_history, v_today - v_content);
    return jsonb_build_object('partitions_created', v_made, 'partitions_dropped', to_jsonb(v_dropped),
                              'longest_history_days', v_history, 'longest_content_days', v_content);
end
$$;
comment on function notify_api.run_retention_v1(integer) is
    'Worker (the "retention" task) and operators: creates the daily partitions for today and p_days_ahead days ahead, and drops the partitions older than the longest history period of any tenant (content tables: the longest content period). Scrubbing is scrub_expired_v1''s.';

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
               and d.status not in ('scheduled', 'queued', 'sending')
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
                                  and (x.address is not null or x.variables is not null or x.status in ('scheduled', 'queued', 'sending'))
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
        select m.tenant_id, m.id
          from notify.callback_messages m
          join (select p.tenant_id, min(p.content_days) as days from notify._retention_periods() p group by 1) p
            on p.tenant_id = m.tenant_id
         where m.status in ('delivered', 'failed') and m.created_at < now() - make_interval(days => p.days)
         limit p_limit
           for update of m skip locked
    ), gone as (
        delete from notify.callback_messages m using due where m.tenant_id = due.tenant_id and m.id = due.id returning 1
    )
    select count(*) into v_callbacks from gone;
    -- Raw provider webhooks are not a tenant's until parsed (they carry addresses of any tenant): kept for the shortest
    -- content period of any tenant, oldest first.
    select coalesce(min(p.content_days), (select content_days from notify._retention_defaults())) into v_shortest
      from notify._retention_periods() p;
    with gone as (
        delete from notify.webhook_events w
         where w.id in (select x.id from notify.webhook_events x where x.received_at < now() - make_interval(days => v_shortest)
                         order by x.id limit p_limit)
        returning 1
    )
    select count(*) into v_webhooks from gone;
    return jsonb_build_object('deliveries', v_deliveries, 'requests', v_requests, 'callback_messages', v_callbacks,
                              'mock_messages', v_mock, 'webhook_events', v_webhooks,
                              'more', greatest(v_deliveries, v_callbacks, v_mock, v_webhooks) >= p_limit);
end
$$;
comment on function notify_api.scrub_expired_v1(integer) is
    'Worker (the "retention" task) and operators: one bounded batch (p_limit rows of each kind) of retention scrubbing, per tenant and channel content period: deliveries done with lose address, variables and error texts (and their attempts'' error texts; their request its variables once none holds content), the mock outbox and finished callback messages past the period are deleted, raw webhook events past the shortest content period of any tenant are deleted. Call again (a transaction each) while "more" is true.';

-- The four tables, partitioned: the old ones are locked, renamed out of the way (with their indexes and sequences), the
-- partitioned ones created as sql/ states them, their daily partitions made for every day that has rows (and a week
-- ahead), the rows moved, and the old tables dropped.
lock table notify.delivery_events, notify.delivery_attempts, notify.callback_attempts, notify.mock_messages in access exclusive mode;

alter table notify.delivery_events rename to delivery_events_old;
alter index notify.delivery_events_pkey rename to delivery_events_old_pkey;
alter index notify.delivery_events_delivery rename to delivery_events_old_delivery;
alter sequence notify.delivery_events_id_seq rename to delivery_events_old_id_seq;
alter table notify.delivery_attempts rename to delivery_attempts_old;
alter index notify.delivery_attempts_pkey rename to delivery_attempts_old_pkey;
alter table notify.callback_attempts rename to callback_attempts_old;
alter index notify.callback_attempts_pkey rename to callback_attempts_old_pkey;
alter table notify.mock_messages rename to mock_messages_old;
alter index notify.mock_messages_pkey rename to mock_messages_old_pkey;
alter index notify.mock_messages_delivery rename to mock_messages_old_delivery;
alter sequence notify.mock_messages_id_seq rename to mock_messages_old_id_seq;
-- Postgres names NOT NULL constraints uniquely per schema: the old tables' names would push the new ones' aside.
do $$
declare
    r record;
begin
    for r in select c.conrelid::regclass as rel, c.conname from pg_constraint c
              where c.contype = 'n' and c.conrelid in ('notify.delivery_events_old'::regclass, 'notify.delivery_attempts_old'::regclass,
                                                       'notify.callback_attempts_old'::regclass, 'notify.mock_messages_old'::regclass) loop
        execute format('alter table %s rename constraint %I to %I', r.rel, r.conname, r.conname || '_old');
    end loop;
end
$$;

create table notify.delivery_attempts (
    tenant_id uuid not null,
    delivery_id uuid not null,
    attempt integer not null,
    started_at timestamptz not null default now(),
    finished_at timestamptz,
    outcome text,
    provider text,
    provider_message_id text,
    error_code text,
    error_message text,
    -- started_at is in the key because the table is partitioned by it (a partitioned table's keys include its
    -- partition column); (tenant_id, delivery_id, attempt) still leads, so lookups by attempt use it.
    primary key (tenant_id, delivery_id, attempt, started_at),
    -- No foreign key to notification_deliveries: rows are written only by claim_deliveries_v1 for the rows it
    -- claims, and a per-row RI check costs more than the rest of the insert (docs/architecture.md).
    constraint delivery_attempts_outcome check (outcome in ('sent', 'retry', 'failed', 'unknown', 'suppressed', 'bounced', 'lease_expired'))
) partition by range (started_at);
comment on table notify.delivery_attempts is 'One row per claim of a delivery; outcome null while the provider call is in flight.';
-- Daily partitions (<table>_pYYYYMMDD, UTC) are made ahead and dropped past retention (sql/105_retention.sql); the
-- default partition takes a row no daily partition covers, so an insert never fails.
create table notify.delivery_attempts_default partition of notify.delivery_attempts default with (fillfactor = 35);
comment on table notify.delivery_attempts_default is 'Rows of notify.delivery_attempts outside every daily partition (moved out when their day''s partition is made).';

create table notify.delivery_events (
    tenant_id uuid not null,
    id bigint generated always as identity,
    delivery_id uuid not null,
    seq integer not null,
    from_status notify.delivery_status,
    to_status notify.delivery_status not null,
    source text not null,
    reason text,
    occurred_at timestamptz not null default now(),
    primary key (tenant_id, id, occurred_at)  -- occurred_at: the partition column (as in delivery_attempts)
    -- No foreign key to notification_deliveries: rows are written only by the deliveries' own trigger
    -- (_200_record_event_*), and a per-row RI check would double the cost of every status change.
) partition by range (occurred_at);
comment on table notify.delivery_events is 'Status history of each delivery, appended by trigger on every status change.';
comment on column notify.delivery_events.source is 'Who changed it: submit, claim, worker, webhook, cancel, maintenance (transaction setting notify.source).';
create table notify.delivery_events_default partition of notify.delivery_events default;
comment on table notify.delivery_events_default is 'Rows of notify.delivery_events outside every daily partition (moved out when their day''s partition is made).';
create index delivery_events_delivery on notify.delivery_events (tenant_id, delivery_id, seq);

create table notify.mock_messages (
    tenant_id uuid not null,
    id bigint generated always as identity,
    delivery_id uuid not null,
    attempt integer not null,
    channel notify.channel not null,
    address text not null,
    provider_message_id text not null,
    rendered jsonb not null,
    sent_at timestamptz not null default now(),
    primary key (tenant_id, id, sent_at)  -- sent_at: the partition column (as in delivery_attempts)
) partition by range (sent_at);
comment on table notify.mock_messages is
    'What the built-in mock provider would have sent, so a developer can look. One row per provider call.';
create table notify.mock_messages_default partition of notify.mock_messages default;
comment on table notify.mock_messages_default is 'Rows of notify.mock_messages outside every daily partition (moved out when their day''s partition is made).';
create index mock_messages_delivery on notify.mock_messages (tenant_id, delivery_id);

create table notify.callback_attempts (
    tenant_id uuid not null,
    message_id uuid not null,
    attempt integer not null,
    started_at timestamptz not null,
    finished_at timestamptz not null default now(),
    status_code integer,
    error text,
    outcome text not null,
    primary key (tenant_id, message_id, attempt, started_at),  -- started_at: the partition column (sql/105_retention.sql)
    constraint callback_attempts_outcome check (outcome in ('delivered', 'retry', 'failed', 'refused'))
) partition by range (started_at);
comment on table notify.callback_attempts is
    'Every attempt to post a callback: the receiver''s status code or the error, and what it meant (refused: the URL resolved to a private or loopback address).';
create table notify.callback_attempts_default partition of notify.callback_attempts default;
comment on table notify.callback_attempts_default is 'Rows of notify.callback_attempts outside every daily partition (moved out when their day''s partition is made).';

select notify._ensure_partitions(
    least((now() at time zone 'UTC')::date,
          (select min((x at time zone 'UTC')::date) from (select min(occurred_at) from notify.delivery_events_old
                                                          union all select min(started_at) from notify.delivery_attempts_old
                                                          union all select min(started_at) from notify.callback_attempts_old
                                                          union all select min(sent_at) from notify.mock_messages_old) m(x))),
    (now() at time zone 'UTC')::date + 7);

insert into notify.delivery_events overriding system value select * from notify.delivery_events_old;
insert into notify.delivery_attempts select * from notify.delivery_attempts_old;
insert into notify.callback_attempts select * from notify.callback_attempts_old;
insert into notify.mock_messages overriding system value select * from notify.mock_messages_old;
select setval(pg_get_serial_sequence('notify.delivery_events', 'id'), coalesce(max(id), 0) + 1, false) from notify.delivery_events_old;
select setval(pg_get_serial_sequence('notify.mock_messages', 'id'), coalesce(max(id), 0) + 1, false) from notify.mock_messages_old;
drop table notify.delivery_events_old, notify.delivery_attempts_old, notify.callback_attempts_old, notify.mock_messages_old;

-- Retention (sql/105_retention.sql): deliveries done with that still hold personal data, by tenant, channel and age.
-- Partial, so a claim (to sending) adds no entry, and a scrubbed row leaves it.
create index notification_deliveries_content_held on notify.notification_deliveries (tenant_id, channel, created_at)
    where status not in ('scheduled', 'queued', 'sending') and (address is not null or variables is not null or last_error_message is not null);

-- The worker's record of attempts looks only at the last day's partitions (sql/080_api_worker.sql).
create or replace function notify_api.record_attempts_v1(p_results notify.attempt_result[])
    returns table (delivery_id uuid, status notify.delivery_status, applied boolean)
    language plpgsql
    security definer
    set search_path = pg_catalog, pg_temp
as $$
declare
    -- Rows whose provider message id another delivery already has (in the table, or earlier in this batch): each
    -- keeps its own outcome with the id left null, so one provider's reused ids cannot fail the whole batch's record.
    v_duplicates uuid[];
    v_constraint text;
    v_ids uuid[];
    v_statuses notify.delivery_status[];
    v_applied boolean[];
begin
    if exists (select from unnest(p_results) r where r.outcome not in ('sent', 'retry', 'failed', 'unknown', 'suppressed', 'bounced')) then
        perform notify._raise('ND400', 'invalid_value', 'outcome must be sent, retry, failed, unknown, suppressed or bounced', 'outcome');
    end if;
    perform notify._set_source('worker');

    -- Duplicates within the batch are found by sorting it. Duplicates of ids already in the table are rare, and the
    -- unique index finds them anyway while it stores the new ids: the batch is written first without probing the
    -- index once per row, and only when the index refuses an id is it written again (this block is rolled back)
    -- with those rows found and left out.
    select coalesce(array_agg(q.delivery_id), '{}') into v_duplicates
      from (select r.delivery_id,
                   row_number() over (partition by r.provider, r.provider_message_id order by r.tenant_id, r.delivery_id) as n
              from unnest(p_results) r
             where r.provider_message_id is not null) q
     where q.n > 1;

    for v_try in 1 .. 2 loop
        begin
            -- The attempt rows first (fenced the same way), so the history is complete even when a webhook overtook us.
            update notify.delivery_attempts a
               set finished_at = now(), outcome = r.outcome, provider = r.provider, provider_message_id = r.provider_message_id,
                   error_code = case when r.delivery_id = any (v_duplicates) then 'duplicate_provider_message_id' else r.error_code end,
                   error_message = case when r.delivery_id = any (v_duplicates) then 'the provider returned a message id another delivery already has'
                                        else left(r.error_message, 1000) end
              from unnest(p_results) r
             where a.tenant_id = r.tenant_id and a.delivery_id = r.delivery_id and a.attempt = r.attempt and a.finished_at is null
               -- Only the last day's partitions (sql/105_retention.sql): an attempt still open after a day had its lease
               -- expire and was closed by maintenance; without the bound each row probes every daily partition's index.
               and a.started_at > now() - interval '1 day';

            with input as (
                select r.*, t.retry_max_attempts, r.delivery_id = any (v_duplicates) as duplicate
                  from unnest(p_results) r
                  join notify.tenants t on t.id = r.tenant_id
            ), changed as (
                update notify.notification_deliveries d
                   set status = case
                           when i.outcome = 'sent' and d.status in ('sending', 'unknown') then 'sent'
                           when i.outcome = 'retry' and d.status = 'sending' and d.attempt >= i.retry_max_attempts then 'failed'
                           when i.outcome = 'retry' and d.status = 'sending' then 'queued'
                           when i.outcome = 'failed' and d.status in ('sending', 'unknown') then 'failed'
                           when i.outcome = 'unknown' and d.status = 'sending' then 'unknown'
                           when i.outcome = 'suppressed' and d.status = 'sending' then 'suppressed'
                           when i.outcome = 'bounced' and d.status in ('sending', 'unknown') then 'bounced'
                           else d.status end::notify.delivery_status,
                       reason = case
                           when i.outcome = 'retry' and d.status = 'sending' and d.attempt >= i.retry_max_attempts then 'retries_exhausted'
                           when i.outcome = 'failed' and d.status in ('sending', 'unknown') and i.error_code = 'render_failed' then 'render_failed'
                           when i.outcome = 'failed' and d.status in ('sending', 'unknown') then 'provider_rejected'
                           when i.outcome = 'unknown' and d.status = 'sending' then 'outcome_unknown'
                           when i.outcome = 'suppressed' and d.status = 'sending' then 'provider_opt_out'
                           when i.outcome = 'bounced' and d.status in ('sending', 'unknown') then 'rejected_by_recipient_server'
                           else d.reason end,
                       due_at = case when i.outcome = 'retry' and d.status = 'sending' and d.attempt < i.retry_max_attempts
                                     then now() + notify._backoff(i.tenant_id, d.attempt, i.retry_after_seconds)
                                     else d.due_at end,
                       provider = coalesce(i.provider, d.provider),
                       provider_message_id = coalesce(d.provider_message_id, case when not i.duplicate then i.provider_message_id end),
                       sent_at = case when i.outcome = 'sent' then coalesce(d.sent_at, now()) else d.sent_at end,
                       last_error_code = case when i.duplicate then 'duplicate_provider_message_id'
                                              when i.outcome = 'sent' then d.last_error_code else coalesce(i.error_code, d.last_error_code) end,
                       last_error_message = case when i.duplicate then 'the provider returned a message id another delivery already has'
                                                 when i.outcome = 'sent' then d.last_error_message
                                                 else coalesce(left(i.error_message, 1000), d.last_error_message) end
                  from input i
                 where d.tenant_id = i.tenant_id and d.id = i.delivery_id and d.attempt = i.attempt
                returning d.id, d.channel, d.status, d.due_at
            ), woken as (
                select notify._wake(c.channel, min(c.due_at)) from changed c where c.status = 'queued' group by c.channel
            )
            select array_agg(i.delivery_id), array_agg(c.status), array_agg(c.id is not null)
              into v_ids, v_statuses, v_applied
              from input i
              left join changed c on c.id = i.delivery_id
             cross join (select count(*) from woken) w;
            exit;
        exception when unique_violation then
            get stacked diagnostics v_constraint = constraint_name;
            if v_constraint is distinct from 'notification_deliveries_provider_message' or v_try = 2 then
                raise;
            end if;
            -- An id the table already has (or one a concurrent batch committed meanwhile): find those rows.
            select coalesce(array_agg(q.delivery_id), '{}') into v_duplicates
              from (select r.tenant_id, r.delivery_id, r.provider, r.provider_message_id,
                           row_number() over (partition by r.provider, r.provider_message_id order by r.tenant_id, r.delivery_id) as n
                      from unnest(p_results) r
                     where r.provider_message_id is not null) q
             where q.n > 1
                or exists (select from notify.notification_deliveries x
                            where x.provider = q.provider and x.provider_message_id = q.provider_message_id
                              and not (x.tenant_id = q.tenant_id and x.id = q.delivery_id));
        end;
    end loop;

    return query select * from unnest(v_ids, v_statuses, v_applied);
end
$$;
comment on function notify_api.record_attempts_v1(notify.attempt_result[]) is
    'Writes a batch of provider outcomes, each fenced by its attempt number (a stale worker changes nothing): sent, retry (backoff with jitter, or failed when attempts are used up), failed (reason render_failed for a template that could not be rendered, else provider_rejected), unknown, suppressed, bounced. A provider message id another delivery already has (in the table or earlier in the batch) is not stored: that row keeps its outcome with error code duplicate_provider_message_id. Wakes the worker for retries.';


-- Row security (sql/890_row_security.sql) on the new table and the partitioned ones (their partitions have none).
do $$
declare
    v_table text;
begin
    foreach v_table in array array['delivery_attempts', 'delivery_events', 'mock_messages', 'callback_attempts', 'retention_settings']
    loop
        execute format('alter table notify.%I enable row level security', v_table);
        execute format('alter table notify.%I force row level security', v_table);
        execute format('create policy tenant_rows on notify.%I to notify_owner
                            using (tenant_id = (select notify._tenant())) with check (tenant_id = (select notify._tenant()))', v_table);
        execute format('create policy system_rows on notify.%I to notify_system using (true) with check (true)', v_table);
    end loop;
end
$$;

create or replace function notify._settle_owners()
    returns void
    language plpgsql
    set search_path = pg_catalog, pg_temp
as $$
declare
    r record;
begin
    for r in select c.oid::regclass as rel from pg_class c where c.relnamespace = 'notify'::regnamespace and c.relkind in ('r', 'p') loop
        execute format('alter table %s owner to notify_owner', r.rel);
    end loop;
    for r in select t.oid::regtype as typ from pg_type t left join pg_class c on c.oid = t.typrelid
              where t.typnamespace = 'notify'::regnamespace and (t.typtype = 'e' or c.relkind = 'c') loop
        execute format('alter type %s owner to notify_owner', r.typ);
    end loop;
    for r in select p.oid::regprocedure as fn, p.pronamespace = 'notify_api'::regnamespace and p.proname = any (array[
                 'create_tenant_v1', 'get_tenant_v1', 'authenticate_api_key_v1', 'authorize_v1', 'take_tokens_v1',
                 'claim_deliveries_v1', 'record_attempts_v1', 'run_maintenance_v1', 'queue_health_v1', 'ingest_webhook_v1',
                 'record_mock_messages_v1', 'claim_callbacks_v1', 'record_callback_attempts_v1', 'check_api_key_v1',
                 'charge_api_key_v1', 'set_provider_grants_v1', 'whatsapp_limits_v1',
                 'run_retention_v1', 'scrub_expired_v1']) as cross_tenant
               from pg_proc p where p.pronamespace in ('notify'::regnamespace, 'notify_api'::regnamespace) loop
        execute format('alter function %s owner to %s', r.fn, case when r.cross_tenant then 'notify_system' else 'notify_owner' end);
    end loop;
end
$$;
comment on function notify._settle_owners() is
    'Gives every notify table, type and function to notify_owner, and the cross-tenant notify_api functions to notify_system. Run by the migrating role (a member of both) at the end of every migration that creates objects.';


revoke execute on function notify._retention_defaults() from public;
revoke execute on function notify._retention_periods() from public;
revoke execute on function notify._retention_json(uuid) from public;
revoke execute on function notify._retention_days(jsonb, text) from public;
revoke execute on function notify._partitioned_tables() from public;
revoke execute on function notify._ensure_partitions(date, date) from public;
revoke execute on function notify._drop_partitions(date, date) from public;
revoke execute on function notify_api.set_retention_v1(uuid, jsonb) from public;
revoke execute on function notify_api.get_retention_v1(uuid) from public;
revoke execute on function notify_api.run_retention_v1(integer) from public;
revoke execute on function notify_api.scrub_expired_v1(integer) from public;
grant execute on function notify_api.set_retention_v1(uuid, jsonb) to notify_service;
grant execute on function notify_api.get_retention_v1(uuid) to notify_service;
grant execute on function notify_api.run_retention_v1(integer) to notify_service;
grant execute on function notify_api.scrub_expired_v1(integer) to notify_service;
grant create on schema notify to notify_owner;
grant select, insert, update, delete on notify.retention_settings, notify.delivery_events, notify.delivery_events_default,
    notify.delivery_attempts, notify.delivery_attempts_default, notify.callback_attempts, notify.callback_attempts_default,
    notify.mock_messages, notify.mock_messages_default to notify_system;
grant usage, select on sequence notify.delivery_events_id_seq, notify.mock_messages_id_seq to notify_system;
grant execute on function notify._retention_defaults(), notify._retention_periods(), notify._retention_json(uuid),
    notify._retention_days(jsonb, text), notify._partitioned_tables(), notify._ensure_partitions(date, date),
    notify._drop_partitions(date, date) to notify_system;
select notify._settle_owners();
