-- 0031: the last two append-only tables partitioned by day (issue #15, "Keep only as long as allowed"), as 0029 did the
-- other four. notify.webhook_events (raw provider payloads, personal data) is partitioned by received_at and its
-- deduplication moves to a small unpartitioned table of keys, notify.webhook_event_keys (provider, event_key): a
-- partitioned table's unique keys must include its partition column, which a duplicate delivered on another day would
-- not share. ingest_webhook_v1 claims the key first (a key already there: a duplicate) and stores the payload with its
-- outcomes last. Payloads are "raw" content: dropped by whole days past the shortest content period of any tenant (the
-- period that deleted their rows until now); their keys are deleted past the same period, in bounded batches
-- (scrub_expired_v1, which no longer deletes payloads). notify.callback_messages (the outbox) is partitioned by
-- created_at (which never changes: an update never moves a row); its keys gain created_at and the callback trigger's
-- conflict target with them. It is content: a day goes past the longest content period of any tenant, and only once
-- none of its messages is pending or sending (_partitioned_tables' new column kept_while; _drop_partitions gains the
-- raw cutoff). Existing rows are moved: the two tables are locked for the move (writers wait; docs/operations.md, "Retention").

drop function notify._drop_partitions(date, date);
drop function notify._partitioned_tables();

create or replace function notify._partitioned_tables()
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

create or replace function notify._drop_partitions(p_history_before date, p_content_before date, p_raw_before date)
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
    v_dropped := notify._drop_partitions(v_today - v_history, v_today - v_content, v_today - v_shortest);
    return jsonb_build_object('partitions_created', v_made, 'partitions_dropped', to_jsonb(v_dropped),
                              'longest_history_days', v_history, 'longest_content_days', v_content,
                              'shortest_content_days', v_shortest);
end
$$;
comment on function notify_api.run_retention_v1(integer) is
    'Worker (the "retention" task) and operators: creates the daily partitions for today and p_days_ahead days ahead, and drops the partitions older than the longest history period of any tenant (content tables: the longest content period, callback messages only once none of the day is pending or sending; webhook payloads: the shortest content period). Scrubbing is scrub_expired_v1''s.';

create or replace function notify_api.scrub_expired_v1(p_limit integer default 1000)
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

create or replace function notify_api.ingest_webhook_v1(p_provider text, p_event_key text, p_payload jsonb, p_events notify.status_event[],
                                            p_inbound notify.inbound_message[] default '{}', p_notes text[] default '{}',
                                            p_updates jsonb default '[]')
    returns jsonb
    language plpgsql
    security definer
    set search_path = pg_catalog, pg_temp
as $$
declare
    v_id bigint;
    v_outcomes jsonb;
begin
    if p_provider is null or p_provider !~ '^[a-z0-9_-]{1,40}$' then
        perform notify._raise('ND400', 'invalid_value', 'provider must be a short lowercase name', 'provider');
    end if;
    if p_event_key is null or length(p_event_key) not between 1 and 500 then
        perform notify._raise('ND400', 'invalid_value', 'event_key must be 1 to 500 characters', 'event_key');
    end if;
    -- The key first: a key already claimed (committed, or by a concurrent ingest, which this waits for) is a duplicate.
    insert into notify.webhook_event_keys (provider, event_key)
    values (p_provider, p_event_key)
    on conflict (provider, event_key) do nothing;
    if not found then
        return jsonb_build_object('stored', false, 'duplicate', true, 'outcomes', '[]'::jsonb);
    end if;

    perform notify._set_source('webhook');
    -- In the order given; ranks make the result the same in any order.
    select coalesce(jsonb_agg(jsonb_strip_nulls(jsonb_build_object(
               'delivery_id', (p_events[i]).delivery_id, 'provider_message_id', (p_events[i]).provider_message_id,
               'status', (p_events[i]).status, 'outcome', notify._apply_provider_status(p_provider, p_events[i]),
               'priced', case when notify._record_pricing(p_provider, p_events[i]) then true end))
               order by i), '[]')
      into v_outcomes
      from generate_subscripts(p_events, 1) as i;
    select v_outcomes || coalesce(jsonb_agg(jsonb_build_object(
               'inbound', (p_inbound[i]).message_id, 'outcome', notify._record_inbound(p_provider, p_inbound[i])) order by i), '[]')
      into v_outcomes
      from generate_subscripts(p_inbound, 1) as i;
    -- Account-level changes (WhatsApp: user_id_update, template_category_update, the messaging tier), in order.
    select v_outcomes || coalesce(jsonb_agg(jsonb_build_object('update', u ->> 'kind', 'outcome', notify._apply_whatsapp_update(p_provider, u))
                                            order by o), '[]')
      into v_outcomes
      from jsonb_array_elements(case when jsonb_typeof(p_updates) = 'array' then p_updates else '[]' end) with ordinality as x(u, o);
    -- What the adapter could not apply (a member of the wrong type, an account-level error): kept with its reason.
    select v_outcomes || coalesce(jsonb_agg(jsonb_build_object('outcome', 'kept', 'reason', left(n, 500)) order by o), '[]')
      into v_outcomes
      from unnest(coalesce(p_notes, '{}')) with ordinality as x(n, o);
    -- The payload last, with its outcomes, in one insert (today's partition of notify.webhook_events).
    insert into notify.webhook_events (provider, event_key, payload, outcomes)
    values (p_provider, p_event_key, coalesce(p_payload, 'null'), v_outcomes)
    returning id into v_id;
    return jsonb_build_object('stored', true, 'duplicate', false, 'id', v_id, 'outcomes', v_outcomes);
end
$$;
comment on function notify_api.ingest_webhook_v1(text, text, jsonb, notify.status_event[], notify.inbound_message[], text[], jsonb) is
    'Stores a verified provider webhook once per (provider, event key) (the key claimed in notify.webhook_event_keys first, the payload stored with its outcomes last), applies its normalized status events by rank (keeping the pricing they carry: outcome priced) and records its inbound messages and account-level changes (p_updates, notify._apply_whatsapp_update); p_notes (what the adapter could not apply, and why) are kept as outcomes "kept" with their reason. A duplicate changes nothing.';

create or replace function notify.tg_notification_deliveries__queue_callbacks()
    returns trigger
    language plpgsql
    set search_path = pg_catalog, pg_temp
as $$
declare
    v_count integer;
begin
    -- Statement-level and set-based, like the history trigger: one insert for a whole claim or submission.
    -- A tenant without callbacks costs one index probe (and under row security only its own row is visible).
    if not exists (select from notify.callback_endpoints e where e.enabled) then
        return null;
    end if;
    if tg_op = 'INSERT' then
        insert into notify.callback_messages (tenant_id, notification_id, delivery_id, seq, url, payload)
        select c.tenant_id, c.request_id, c.id, c.seq, coalesce(r.callback_url, e.url), notify._callback_event(c, null, r)
          from new_rows c
          join notify.notification_requests r on r.tenant_id = c.tenant_id and r.id = c.request_id
          join notify.callback_endpoints e on e.tenant_id = c.tenant_id and e.enabled   -- no endpoint: no secret to sign with
         where coalesce(r.callback_url, e.url) is not null
        on conflict (tenant_id, delivery_id, seq, created_at) do nothing;  -- created_at = now(): the partition key (sql/095)
    else
        insert into notify.callback_messages (tenant_id, notification_id, delivery_id, seq, url, payload)
        select c.tenant_id, c.request_id, c.id, c.seq, coalesce(r.callback_url, e.url), notify._callback_event(c, o.status, r)
          from new_rows c
          join old_rows o on o.tenant_id = c.tenant_id and o.id = c.id
          join notify.notification_requests r on r.tenant_id = c.tenant_id and r.id = c.request_id
          join notify.callback_endpoints e on e.tenant_id = c.tenant_id and e.enabled
         where c.status is distinct from o.status and coalesce(r.callback_url, e.url) is not null
        on conflict (tenant_id, delivery_id, seq, created_at) do nothing;  -- created_at = now(): the partition key (sql/095)
    end if;
    get diagnostics v_count = row_count;
    if v_count > 0 then
        perform notify._wake_callbacks();
    end if;
    return null;
end
$$;
comment on function notify.tg_notification_deliveries__queue_callbacks() is
    'Writes one callback message per delivery status change whose request (or tenant) has a callback URL, in the same transaction, and wakes the callbacks task.';

create or replace function notify_api.claim_callbacks_v1(p_limit integer, p_lease_seconds integer default 60)
    returns table (tenant_id uuid, id uuid, attempt integer, url text, payload jsonb, secrets text[], created_at timestamptz)
    language plpgsql
    security definer
    set search_path = pg_catalog, pg_temp
as $$
begin
    if p_limit is null or p_limit < 1 or p_limit > 1000 then
        perform notify._raise('ND400', 'invalid_value', 'limit must be 1 to 1000', 'limit');
    end if;
    return query
    with due as (
        -- In order per delivery: a message waits while an earlier change of the same delivery is still undelivered.
        select m.tenant_id, m.id, m.created_at from notify.callback_messages m
         where m.next_attempt_at <= now()
           and (m.status = 'pending' or (m.status = 'sending' and m.lease_expires_at < now()))
           and not exists (select from notify.callback_messages p
                            where p.tenant_id = m.tenant_id and p.delivery_id = m.delivery_id and p.seq < m.seq
                              and p.status in ('pending', 'sending'))
         order by m.next_attempt_at
         limit p_limit
           for update skip locked
    ), claimed as (
        update notify.callback_messages m
           set status = 'sending', attempts = m.attempts + 1, lease_expires_at = now() + make_interval(secs => p_lease_seconds)
          from due where m.tenant_id = due.tenant_id and m.id = due.id and m.created_at = due.created_at
        returning m.*
    )
    select c.tenant_id, c.id, c.attempts, c.url, c.payload,
           array_remove(array[e.secret, case when e.previous_valid_until > now() then e.previous_secret end], null),
           c.created_at
      from claimed c join notify.callback_endpoints e on e.tenant_id = c.tenant_id;
end
$$;
comment on function notify_api.claim_callbacks_v1(integer, integer) is
    'Claims due callback messages (FOR UPDATE SKIP LOCKED, one lease each), oldest first and in sequence order per delivery, with the secrets to sign them.';

-- The two tables, partitioned: the old ones are locked, renamed out of the way (with their indexes and sequence), the
-- new ones created as sql/ states them, their daily partitions made for every day that has rows (and a week ahead), the
-- rows moved (the webhooks' keys with them), and the old tables dropped.
lock table notify.webhook_events, notify.callback_messages in access exclusive mode;

alter table notify.webhook_events rename to webhook_events_old;
alter index notify.webhook_events_pkey rename to webhook_events_old_pkey;
alter index notify.webhook_events_dedup rename to webhook_events_old_dedup;
alter sequence notify.webhook_events_id_seq rename to webhook_events_old_id_seq;
alter table notify.callback_messages rename to callback_messages_old;
alter index notify.callback_messages_pkey rename to callback_messages_old_pkey;
alter index notify.callback_messages_one_per_change rename to callback_messages_old_one_per_change;
alter index notify.callback_messages_due rename to callback_messages_old_due;
alter index notify.callback_messages_notification rename to callback_messages_old_notification;
-- Postgres names NOT NULL constraints uniquely per schema: the old tables' names would push the new ones' aside.
do $$
declare
    r record;
begin
    for r in select c.conrelid::regclass as rel, c.conname from pg_constraint c
              where c.contype = 'n' and c.conrelid in ('notify.webhook_events_old'::regclass, 'notify.callback_messages_old'::regclass) loop
        execute format('alter table %s rename constraint %I to %I', r.rel, r.conname, r.conname || '_old');
    end loop;
end
$$;

create table notify.webhook_event_keys (
    provider text not null,
    event_key text not null,
    received_at timestamptz not null default now(),
    primary key (provider, event_key)
);
comment on table notify.webhook_event_keys is
    'The deduplication keys of provider webhooks, claimed by ingest_webhook_v1 before it stores a payload (a key already here: a duplicate). Deleted past the raw payloads'' retention in bounded batches (scrub_expired_v1).';
create index webhook_event_keys_received on notify.webhook_event_keys (received_at);

create table notify.webhook_events (
    id bigint generated always as identity,
    provider text not null,
    event_key text not null,
    received_at timestamptz not null default now(),
    payload jsonb not null,
    outcomes jsonb not null default '[]',
    primary key (id, received_at)  -- received_at: the partition column; (provider, event_key) is unique in webhook_event_keys
) partition by range (received_at);
comment on table notify.webhook_events is
    'Every verified provider webhook, stored once per provider event key (notify.webhook_event_keys), with what each of its status events did.';
comment on column notify.webhook_events.outcomes is 'Per status event: applied, stale (lower rank or illegal), unmatched (no such delivery) or ambiguous (two deliveries carry its provider message id); per inbound message its outcome; kept (with a reason) for what the adapter could not apply.';
create table notify.webhook_events_default partition of notify.webhook_events default;
comment on table notify.webhook_events_default is 'Rows of notify.webhook_events outside every daily partition (moved out when their day''s partition is made).';

create table notify.callback_messages (
    tenant_id uuid not null,
    id uuid not null default gen_random_uuid(),
    notification_id uuid not null,
    delivery_id uuid not null,
    seq integer not null,
    url text not null,
    payload jsonb not null,
    status text not null default 'pending',
    attempts integer not null default 0,
    next_attempt_at timestamptz not null default now(),
    lease_expires_at timestamptz,
    created_at timestamptz not null default now(),
    finished_at timestamptz,
    last_error text,
    -- created_at is in the keys because the table is partitioned by it (sql/105_retention.sql); it never changes, so an
    -- update never moves a row. The trigger's conflict target is the second key: a change is queued once, in the
    -- transaction that makes it (created_at = now(), the same for both inserts of one change).
    primary key (tenant_id, id, created_at),
    constraint callback_messages_one_per_change unique (tenant_id, delivery_id, seq, created_at),
    constraint callback_messages_status check (status in ('pending', 'sending', 'delivered', 'failed'))
) partition by range (created_at);
comment on table notify.callback_messages is
    'The callback outbox: one message per delivery status change, committed with the change. Sent in seq order per delivery (a later change waits for the earlier one to be delivered or given up).';
comment on column notify.callback_messages.seq is 'The delivery''s sequence number at this change (1 = created): receivers drop an event older than one they have.';
-- Daily partitions (<table>_pYYYYMMDD, UTC) are made ahead and dropped past retention, never while one holds a message
-- still pending or sending (sql/105_retention.sql); the default partition takes a row no daily partition covers.
create table notify.callback_messages_default partition of notify.callback_messages default;
comment on table notify.callback_messages_default is 'Rows of notify.callback_messages outside every daily partition (moved out when their day''s partition is made).';
create index callback_messages_due on notify.callback_messages (next_attempt_at) where status in ('pending', 'sending');
create index callback_messages_notification on notify.callback_messages (tenant_id, notification_id);

-- Grants as sql/900_grants.sql states them, and the new tables to their owner now: notify._ensure_partitions runs as
-- notify_owner (it makes the daily partitions).
grant select, insert, update, delete on notify.webhook_event_keys, notify.webhook_events, notify.webhook_events_default,
    notify.callback_messages, notify.callback_messages_default to notify_system;
grant usage, select on sequence notify.webhook_events_id_seq to notify_system;
select notify._settle_owners();

select notify._ensure_partitions(
    least((now() at time zone 'UTC')::date,
          (select min((x at time zone 'UTC')::date) from (select min(received_at) from notify.webhook_events_old
                                                          union all select min(created_at) from notify.callback_messages_old) m(x))),
    (now() at time zone 'UTC')::date + 7);

insert into notify.webhook_event_keys (provider, event_key, received_at)
select provider, event_key, received_at from notify.webhook_events_old;
insert into notify.webhook_events overriding system value select * from notify.webhook_events_old;
select setval(pg_get_serial_sequence('notify.webhook_events', 'id'), coalesce(max(id), 0) + 1, false) from notify.webhook_events_old;
insert into notify.callback_messages select * from notify.callback_messages_old;
drop table notify.webhook_events_old, notify.callback_messages_old;

-- Row security (sql/890_row_security.sql) on the partitioned outbox (its partitions have none; the webhook tables are
-- no tenant's).
alter table notify.callback_messages enable row level security;
alter table notify.callback_messages force row level security;
create policy tenant_rows on notify.callback_messages to notify_owner
    using (tenant_id = (select notify._tenant())) with check (tenant_id = (select notify._tenant()));
create policy system_rows on notify.callback_messages to notify_system using (true) with check (true);

revoke execute on function notify._partitioned_tables() from public;
revoke execute on function notify._drop_partitions(date, date, date) from public;
grant execute on function notify._partitioned_tables(), notify._drop_partitions(date, date, date) to notify_system;
select notify._settle_owners();
