-- 0028: find notifications without their id (keyset pages, a fan-out read as a summary and its deliveries page by page),
-- erase a recipient on request (every copy of its personal data, a receipt, a keyed-hash suppression list checked by
-- consent), export what is held about it, and give unknown outcomes an end (issue #15).

create index notification_requests_created on notify.notification_requests (tenant_id, created_at, id)
    where created_at > '-infinity';

create index notification_deliveries_recipient on notify.notification_deliveries (tenant_id, recipient_id, created_at, request_id)
    where created_at > '-infinity';

-- Erasure on request (sql/066_api_erasure.sql).
-- Not a tenant table: one server-side key, readable only by the owning roles (no application role has any table grant).
create table notify.address_hash_key (
    id integer primary key default 1,
    inner_pad bytea not null,
    outer_pad bytea not null,
    created_at timestamptz not null default now(),
    constraint address_hash_key_one check (id = 1),
    constraint address_hash_key_pads check (octet_length(inner_pad) = 64 and octet_length(outer_pad) = 64)
);
comment on table notify.address_hash_key is
    'The HMAC-SHA256 key of notify._address_hash, stored as its two 64-byte pads (key XOR 0x36, key XOR 0x5c). Made once, when the schema is created; never leaves the database.';
insert into notify.address_hash_key (inner_pad, outer_pad)
select decode(string_agg(lpad(to_hex(get_byte(k.k, i) # 54), 2, '0'), '' order by i), 'hex'),
       decode(string_agg(lpad(to_hex(get_byte(k.k, i) # 92), 2, '0'), '' order by i), 'hex')
  from (select sha256(convert_to(gen_random_uuid()::text || gen_random_uuid()::text || gen_random_uuid()::text, 'UTF8'))
               || decode(repeat('00', 32), 'hex') as k) k,
       generate_series(0, 63) i
 group by k.k;

create table notify.address_suppressions (
    tenant_id uuid not null references notify.tenants (id),
    channel notify.channel not null,
    address_hash bytea not null,
    category text not null default '',
    created_at timestamptz not null default now(),
    erasure_id uuid not null,
    -- address_hash leads (see docs/architecture.md, "Indexes that tie with the primary key"); a lookup names all four.
    primary key (address_hash, tenant_id, channel, category)
);
-- Whether a tenant has suppressed addresses on a channel at all (notify._consent asks before hashing an address).
-- Partial on a predicate no key lookup names, so it never ties with the primary key (as notification_requests_created).
create index address_suppressions_tenant on notify.address_suppressions (tenant_id, channel) where created_at > '-infinity';
comment on table notify.address_suppressions is
    'Addresses an erased recipient had opted out of (per channel, and category; '''' = every category), as keyed hashes (notify._address_hash), never in clear: consent (notify._consent) refuses them until a grant recorded later for the recipient now using the address.';

create table notify.recipient_erasures (
    tenant_id uuid not null references notify.tenants (id),
    id uuid not null default gen_random_uuid(),
    recipient_id uuid not null,
    erased_at timestamptz not null default now(),
    erased_by text,
    rows_changed jsonb not null,
    in_flight integer not null default 0,
    primary key (tenant_id, id),
    foreign key (tenant_id, recipient_id) references notify.recipients (tenant_id, id)
);
comment on table notify.recipient_erasures is
    'One erasure of a recipient''s personal data on request: when, by which API key (or login), and how many rows of each table it changed. Content-free.';
comment on column notify.recipient_erasures.in_flight is 'Deliveries being sent at the time (not cancellable): their outcome may still write; erase again after they finish.';

-- Unknown outcomes get an end (sql/086_api_unknown.sql).
create table notify.unknown_deadlines (
    tenant_id uuid not null references notify.tenants (id),
    channel notify.channel not null,
    after_seconds integer not null,
    updated_at timestamptz not null default now(),
    primary key (tenant_id, channel),
    constraint unknown_deadlines_range check (after_seconds between 60 and 31536000)
);
comment on table notify.unknown_deadlines is
    'Per tenant and channel: how long a delivery may stay unknown (no provider report after a crashed or timed-out send) before maintenance makes it final (failed, reason outcome_unknown_deadline). No row: notify._unknown_deadline_default (7 days for WhatsApp and SMS, 1 day for e-mail).';
-- The unresolved unknowns, oldest first: a small hot set however much history there is.
create index notification_deliveries_unknown on notify.notification_deliveries (updated_at) where status = 'unknown';

-- Erasure (sql/066_api_erasure.sql): the suppression list and the erasure records, by tenant like the rest.
alter table notify.address_suppressions enable row level security;
alter table notify.address_suppressions force row level security;
create policy tenant_rows on notify.address_suppressions to notify_owner
    using (tenant_id = (select notify._tenant())) with check (tenant_id = (select notify._tenant()));
create policy system_rows on notify.address_suppressions to notify_system using (true) with check (true);
alter table notify.recipient_erasures enable row level security;
alter table notify.recipient_erasures force row level security;
create policy tenant_rows on notify.recipient_erasures to notify_owner
    using (tenant_id = (select notify._tenant())) with check (tenant_id = (select notify._tenant()));
create policy system_rows on notify.recipient_erasures to notify_system using (true) with check (true);
-- Deadlines for unknown outcomes (sql/086_api_unknown.sql).
alter table notify.unknown_deadlines enable row level security;
alter table notify.unknown_deadlines force row level security;
create policy tenant_rows on notify.unknown_deadlines to notify_owner
    using (tenant_id = (select notify._tenant())) with check (tenant_id = (select notify._tenant()));
create policy system_rows on notify.unknown_deadlines to notify_system using (true) with check (true);

create function notify._address_hash(p_channel notify.channel, p_address text)
    returns bytea
    language sql
    stable
    set search_path = pg_catalog, pg_temp
as $$
    -- HMAC-SHA256 (RFC 2104) with the server's key: H((K ^ opad) || H((K ^ ipad) || m)); e-mail addresses lower-cased.
    select pg_catalog.sha256(k.outer_pad || pg_catalog.sha256(k.inner_pad || pg_catalog.convert_to(
               p_channel::text || ':' || case when p_channel = 'email' then pg_catalog.lower(p_address) else p_address end, 'UTF8')))
      from notify.address_hash_key k
$$;
comment on function notify._address_hash(notify.channel, text) is
    'The keyed hash (HMAC-SHA256, key in notify.address_hash_key) of a channel address, for the suppression list of erased recipients. Not executable by application roles: with it, a phone number''s hash could be guessed by trying numbers.';

create or replace function notify._consent(p_tenant_id uuid, p_recipient_id uuid, p_channel notify.channel, p_category text)
    returns table (allowed boolean)
    language sql
    stable
    -- inlinable: no SET clause, and a set-returning SQL function is inlined into the caller's FROM (with its
    -- subqueries), so a 10,000-recipient fan-out checks consent in one plan (see docs/architecture.md)
as $$
    select coalesce(
        (select c.status = 'granted'
           from notify.recipient_consents c
          where c.tenant_id = p_tenant_id and c.recipient_id = p_recipient_id and c.channel = p_channel
            and (c.category is null or c.category = p_category)
          order by c.id desc
          limit 1),
        coalesce((select p.policy from notify.channel_policies p where p.tenant_id = p_tenant_id and p.channel = p_channel),
                 notify._default_policy(p_channel)) = 'opt_out')
       -- an address an erased recipient had opted out of stays out, until a grant recorded later (sql/066_api_erasure.sql);
       -- the keyed hash is computed only where the tenant has suppressed addresses on the channel at all (a probe of an
       -- index, where hashing every delivery's address at submit and again at claim cost every tenant)
       and (not exists (select from notify.address_suppressions s0
                         where s0.tenant_id = p_tenant_id and s0.channel = p_channel and s0.created_at > '-infinity')
            or not exists (
        select from notify.recipient_addresses a
          join notify.address_suppressions s
            on s.address_hash = notify._address_hash(a.channel, a.address) and s.tenant_id = a.tenant_id
           and s.channel = a.channel and s.category in ('', coalesce(p_category, ''))
         where a.tenant_id = p_tenant_id and a.recipient_id = p_recipient_id and a.channel = p_channel
           and not exists (select from notify.recipient_consents g
                            where g.tenant_id = p_tenant_id and g.recipient_id = p_recipient_id and g.channel = p_channel
                              and (g.category is null or g.category = p_category) and g.status = 'granted'
                              and g.recorded_at > s.created_at)))
$$;
comment on function notify._consent(uuid, uuid, notify.channel, text) is
    'Whether the recipient may be messaged on the channel for the category: the latest applicable ledger entry decides; without one, the tenant''s channel policy; and never to an address on the suppression list (an erased recipient''s opt-out) unless the recipient recorded a grant after it. Use in FROM (cross join lateral) for set-based checks.';

create function notify._cursor_encode(p_at timestamptz, p_id uuid)
    returns text
    language sql
    immutable
    set search_path = pg_catalog, pg_temp
as $$
    -- Opaque to callers: base64url of "<epoch microseconds>.<id>". A cursor is a position, never an authorization
    -- (the tenant comes from the key), so it is not signed.
    select pg_catalog.rtrim(pg_catalog.translate(pg_catalog.encode(pg_catalog.convert_to(
               format('%s.%s', (extract(epoch from p_at) * 1000000)::bigint, p_id), 'UTF8'), 'base64'), E'+/\n', '-_'), '=')
$$;
comment on function notify._cursor_encode(timestamptz, uuid) is 'The opaque keyset cursor of a (created_at, id) position.';

create function notify._cursor_decode(p_cursor text, out at timestamptz, out id uuid)
    language plpgsql
    immutable
    set search_path = pg_catalog, pg_temp
as $$
declare
    v_text text;
    v_b64 text;
begin
    if p_cursor is null then
        at := 'infinity';  -- before every row: (created_at, id) < (infinity, ...) holds for any finite created_at
        id := '00000000-0000-0000-0000-000000000000';
        return;
    end if;
    begin
        v_b64 := pg_catalog.translate(p_cursor, '-_', '+/');
        v_b64 := v_b64 || pg_catalog.repeat('=', (4 - length(v_b64) % 4) % 4);
        v_text := pg_catalog.convert_from(pg_catalog.decode(v_b64, 'base64'), 'UTF8');
        if v_text !~ '^-?[0-9]{1,19}\.[0-9a-f-]{36}$' then
            raise exception 'bad cursor';
        end if;
        at := pg_catalog.to_timestamp(split_part(v_text, '.', 1)::numeric / 1000000);
        id := split_part(v_text, '.', 2)::uuid;
    exception when others then
        perform notify._raise('ND422', 'invalid_cursor', 'cursor is not one this API returned', 'cursor');
    end;
end
$$;
comment on function notify._cursor_decode(text) is 'The (created_at, id) position of a cursor from notify._cursor_encode; null: before everything. ND422 invalid_cursor otherwise.';

create function notify._find_candidates(p_tenant_id uuid, p_recipient_id uuid, p_idempotency_key text, p_from timestamptz,
                                        p_to timestamptz, p_before_at timestamptz, p_before_id uuid, p_budget integer)
    returns setof notify.notification_requests
    language sql
    stable
    -- inlinable (no SET clause): planned with the caller's values, and EXPLAINable as one statement
    -- (tests/catalog/test_lookup_plans.py); created_at > '-infinity' states the predicate of the partial indexes it reads
as $$
    -- By idempotency key: the unique key, at most one row.
    select r.* from notify.notification_requests r
     where p_idempotency_key is not null and r.idempotency_key = p_idempotency_key and r.tenant_id = p_tenant_id
       and r.created_at >= coalesce(p_from, '-infinity') and r.created_at < coalesce(p_to, 'infinity')
       and (r.created_at, r.id) < (p_before_at, p_before_id)
    union all
    -- By recipient (a single intent or a fan-out that includes it): its deliveries, newest first, one row per request.
    select r.* from (select distinct d.created_at, d.request_id
                       from notify.notification_deliveries d
                      where p_idempotency_key is null and p_recipient_id is not null
                        and d.tenant_id = p_tenant_id and d.recipient_id = p_recipient_id and d.created_at > '-infinity'
                        and d.created_at >= coalesce(p_from, '-infinity') and d.created_at < coalesce(p_to, 'infinity')
                        and (d.created_at, d.request_id) < (p_before_at, p_before_id)
                      order by d.created_at desc, d.request_id desc
                      limit p_budget) x
      join notify.notification_requests r on r.tenant_id = p_tenant_id and r.id = x.request_id
    union all
    -- Otherwise: the tenant's requests, newest first.
    (select r.* from notify.notification_requests r
      where p_idempotency_key is null and p_recipient_id is null and r.tenant_id = p_tenant_id and r.created_at > '-infinity'
        and r.created_at >= coalesce(p_from, '-infinity') and r.created_at < coalesce(p_to, 'infinity')
        and (r.created_at, r.id) < (p_before_at, p_before_id)
      order by r.created_at desc, r.id desc
      limit p_budget)
$$;
comment on function notify._find_candidates(uuid, uuid, text, timestamptz, timestamptz, timestamptz, uuid, integer) is
    'At most p_budget requests before a keyset position, newest first, through the index the most selective filter allows: the idempotency key, the recipient''s deliveries (notification_deliveries_recipient), or the tenant''s requests (notification_requests_created).';

create function notify_api.find_notifications_v1(p_tenant_id uuid, p_filters jsonb default '{}', p_cursor text default null,
                                                 p_limit integer default 50)
    returns jsonb
    language plpgsql
    stable
    security definer
    set search_path = pg_catalog, pg_temp
as $$
declare
    f jsonb := coalesce(p_filters, '{}');
    v_budget constant integer := 1000;  -- candidates read per call, however selective the other filters are
    v_recipient uuid;
    v_status notify.delivery_status;
    v_channel notify.channel;
    v_from timestamptz;
    v_to timestamptz;
    v_key text;
    v_value text;
    v_before record;
    v_items jsonb;
    v_count integer;
    v_last_at timestamptz;
    v_last_id uuid;
    v_oldest_at timestamptz;
    v_oldest_id uuid;
    v_next text;
begin
    perform notify._enter(p_tenant_id);
    if jsonb_typeof(f) <> 'object' then
        perform notify._raise('ND422', 'invalid_filter', 'filters must be an object', 'filters');
    end if;
    select k into v_key from jsonb_object_keys(f) k
     where k not in ('recipient', 'status', 'channel', 'category', 'template', 'created_from', 'created_to', 'idempotency_key',
                     'metadata_key', 'metadata_value') limit 1;
    if v_key is not null then
        perform notify._raise('ND422', 'invalid_filter', format('unknown filter %s', v_key), v_key);
    end if;
    select k into v_key from jsonb_each(f) e(k, v) where jsonb_typeof(v) <> 'string' limit 1;
    if v_key is not null then
        perform notify._raise('ND422', 'invalid_filter', format('%s must be a string', v_key), v_key);
    end if;
    if p_limit is null or p_limit not between 1 and 200 then
        perform notify._raise('ND422', 'invalid_filter', 'limit must be between 1 and 200', 'limit');
    end if;
    if f ? 'recipient' then
        select r.id into v_recipient from notify.recipients r where r.tenant_id = p_tenant_id and r.ref = f ->> 'recipient';
        if v_recipient is null then  -- an unknown recipient has no notifications (and another tenant's is unknown here)
            return jsonb_build_object('items', '[]'::jsonb, 'next_cursor', null);
        end if;
    end if;
    if f ? 'status' then
        if not (f ->> 'status') = any (enum_range(null::notify.delivery_status)::text[]) then
            perform notify._raise('ND422', 'invalid_filter', format('status must be one of %s',
                                  array_to_string(enum_range(null::notify.delivery_status)::text[], ', ')), 'status');
        end if;
        v_status := (f ->> 'status')::notify.delivery_status;
    end if;
    if f ? 'channel' then
        if not (f ->> 'channel') = any (enum_range(null::notify.channel)::text[]) then
            perform notify._raise('ND422', 'invalid_filter', 'channel must be whatsapp, email or sms', 'channel');
        end if;
        v_channel := (f ->> 'channel')::notify.channel;
    end if;
    foreach v_key in array array['created_from', 'created_to'] loop
        if f ? v_key then
            begin
                if v_key = 'created_from' then v_from := (f ->> v_key)::timestamptz; else v_to := (f ->> v_key)::timestamptz; end if;
            exception when others then
                perform notify._raise('ND422', 'invalid_filter', format('%s must be an ISO 8601 timestamp', v_key), v_key);
            end;
        end if;
    end loop;
    if (f ? 'metadata_key') <> (f ? 'metadata_value') then
        perform notify._raise('ND422', 'invalid_filter', 'metadata_key and metadata_value go together',
                              case when f ? 'metadata_key' then 'metadata_value' else 'metadata_key' end);
    end if;
    v_key := f ->> 'metadata_key';
    v_value := f ->> 'metadata_value';
    select * into v_before from notify._cursor_decode(p_cursor);

    -- Streamed: a page that fills early stops reading candidates there.
    with candidates as (
        select c.*
          from notify._find_candidates(p_tenant_id, v_recipient, f ->> 'idempotency_key', v_from, v_to,
                                       v_before.at, v_before.id, v_budget) c
    ), matched as (
        select c.* from candidates c
         where (not f ? 'category' or c.category = f ->> 'category')
           and (not f ? 'template' or c.template_key = f ->> 'template')
           and (v_key is null or c.metadata ->> v_key = v_value)
           and (v_status is null and v_channel is null or exists (
                   select from notify.notification_deliveries d
                    where d.request_id = c.id and d.tenant_id = p_tenant_id
                      and (v_recipient is null or d.recipient_id = v_recipient)
                      and (v_channel is null or d.channel = v_channel)
                      and (v_status is null or d.status = v_status)))
         order by c.created_at desc, c.id desc
         limit p_limit + 1
    ), page as (
        select m.*, row_number() over (order by m.created_at desc, m.id desc) as k from matched m
    )
    select coalesce(jsonb_agg(jsonb_strip_nulls(jsonb_build_object(
               'id', p.id, 'created_at', p.created_at, 'idempotency_key', p.idempotency_key,
               'recipient', (select r.ref from notify.recipients r where r.tenant_id = p_tenant_id and r.id = p.recipient_id),
               'recipient_count', case when p.recipient_id is null then p.recipient_count end,
               'template', p.template_key, 'category', p.category, 'channels', to_jsonb(p.channels),
               'metadata', nullif(p.metadata, '{}'::jsonb)))
           -- deliveries of the one recipient (single intents, or the filtered recipient's within a fan-out)
           || case when p.recipient_id is not null or v_recipient is not null then jsonb_build_object('deliveries',
                  (select coalesce(jsonb_agg(jsonb_strip_nulls(jsonb_build_object(
                              'id', d.id, 'channel', d.channel, 'status', d.status, 'reason', d.reason, 'updated_at', d.updated_at))
                              order by array_position(p.channels, d.channel)), '[]')
                     from notify.notification_deliveries d
                    where d.request_id = p.id and d.tenant_id = p_tenant_id
                      and d.recipient_id = coalesce(v_recipient, p.recipient_id))) else '{}' end
               order by p.k) filter (where p.k <= p_limit), '[]'),
           count(*),
           max(p.created_at) filter (where p.k = p_limit),
           (array_agg(p.id) filter (where p.k = p_limit))[1]
      into v_items, v_count, v_last_at, v_last_id
      from page p;

    if v_count > p_limit then  -- a full page and more after it
        v_next := notify._cursor_encode(v_last_at, v_last_id);
    else
        -- The page did not fill: were the candidates exhausted, or the budget spent? In the second case more may match
        -- further back, from the oldest candidate read (a sparse filter reads at most twice the budget per call).
        select c.created_at, c.id into v_oldest_at, v_oldest_id
          from notify._find_candidates(p_tenant_id, v_recipient, f ->> 'idempotency_key', v_from, v_to,
                                       v_before.at, v_before.id, v_budget) c
         order by c.created_at desc, c.id desc offset v_budget - 1 limit 1;
        if v_oldest_id is not null then
            v_next := notify._cursor_encode(v_oldest_at, v_oldest_id);
        end if;
    end if;
    return jsonb_build_object('items', v_items, 'next_cursor', v_next);
end
$$;
comment on function notify_api.find_notifications_v1(uuid, jsonb, text, integer) is
    'A tenant''s notifications, newest first, filtered by {recipient, status, channel, category, template, created_from, created_to, idempotency_key, metadata_key + metadata_value} (status and channel: of a delivery; all as strings). Keyset pages of p_limit (1-200): {items, next_cursor}. Each call reads at most 1,000 candidates, so a page may hold fewer items than the limit while next_cursor is set; the end is next_cursor null. ND422 invalid_filter / invalid_cursor name the field.';

create function notify._notification_head(v notify.notification_requests)
    returns jsonb
    language sql
    stable
    set search_path = pg_catalog, pg_temp
as $$
    select jsonb_strip_nulls(jsonb_build_object(
        'id', v.id, 'created_at', v.created_at, 'idempotency_key', v.idempotency_key,
        'recipient', (select r.ref from notify.recipients r where r.tenant_id = v.tenant_id and r.id = v.recipient_id),
        'recipient_count', case when v.recipient_id is null then v.recipient_count end,
        'template', v.template_key, 'category', v.category, 'channels', to_jsonb(v.channels),
        'send_at', v.send_at, 'expires_at', v.expires_at, 'metadata', v.metadata, 'http_request_id', v.http_request_id,
        'callback_url', v.callback_url, 'test', case when v.test then true end))
$$;
comment on function notify._notification_head(notify.notification_requests) is 'The request part of a notification''s JSON (as get_notification_v1 shows it; "test": true for a test key''s).';

create function notify_api.get_notification_v2(p_tenant_id uuid, p_id uuid)
    returns jsonb
    language plpgsql
    stable
    security definer
    set search_path = pg_catalog, pg_temp
as $$
declare
    v notify.notification_requests;
    v_inline constant integer := 100;  -- deliveries shown inline at most (docs/sql-api.md)
    v_summary jsonb;
    v_total bigint;
    v_open boolean;
    v_deliveries jsonb;
begin
    perform notify._enter(p_tenant_id);
    select * into v from notify.notification_requests r where r.tenant_id = p_tenant_id and r.id = p_id;
    if v.id is null then
        perform notify._raise('ND404', 'not_found', 'no such notification', 'id');
    end if;
    select coalesce(jsonb_agg(jsonb_strip_nulls(jsonb_build_object('channel', s.channel, 'status', s.status, 'reason', s.reason,
                                                                   'count', s.n))
                              order by array_position(v.channels, s.channel), s.status, s.reason), '[]'),
           coalesce(sum(s.n), 0), coalesce(bool_or(s.status in ('scheduled', 'queued', 'sending', 'unknown')), false)
      into v_summary, v_total, v_open
      from (select d.channel, d.status, d.reason, count(*) as n from notify.notification_deliveries d
             where d.request_id = p_id and d.tenant_id = p_tenant_id group by 1, 2, 3) s;
    if v_total <= v_inline then
        select jsonb_agg(notify._delivery_json(d, true) || jsonb_build_object('recipient', r.ref)
                         order by array_position(v.channels, d.channel), d.id)
          into v_deliveries
          from notify.notification_deliveries d
          join notify.recipients r on r.tenant_id = d.tenant_id and r.id = d.recipient_id
         where d.request_id = p_id and d.tenant_id = p_tenant_id;
    end if;
    return notify._notification_head(v)
        || jsonb_build_object('status', case when v_open then 'in_progress' else 'completed' end,
                              'delivery_count', v_total, 'summary', v_summary)
        || case when v_total <= v_inline then jsonb_build_object('deliveries', coalesce(v_deliveries, '[]'))
                else jsonb_build_object('deliveries_omitted', true) end;
end
$$;
comment on function notify_api.get_notification_v2(uuid, uuid) is
    'A notification with a summary of its deliveries by channel, status and reason; up to 100 deliveries also inline with their history (as get_notification_v1, plus each one''s recipient). A larger fan-out answers deliveries_omitted: its deliveries are read page by page with list_deliveries_v1. 404 for another tenant''s id.';

create function notify_api.list_deliveries_v1(p_tenant_id uuid, p_id uuid, p_cursor text default null, p_limit integer default 100)
    returns jsonb
    language plpgsql
    stable
    security definer
    set search_path = pg_catalog, pg_temp
as $$
declare
    v_after_recipient uuid := '00000000-0000-0000-0000-000000000000';
    v_after_channel notify.channel;
    v_text text;
    v_b64 text;
    v_items jsonb;
    v_count integer;
begin
    perform notify._enter(p_tenant_id);
    if not exists (select from notify.notification_requests r where r.tenant_id = p_tenant_id and r.id = p_id) then
        perform notify._raise('ND404', 'not_found', 'no such notification', 'id');
    end if;
    if p_limit is null or p_limit not between 1 and 1000 then
        perform notify._raise('ND422', 'invalid_filter', 'limit must be between 1 and 1000', 'limit');
    end if;
    if p_cursor is not null then
        begin
            v_b64 := translate(p_cursor, '-_', '+/');
            v_b64 := v_b64 || repeat('=', (4 - length(v_b64) % 4) % 4);
            v_text := convert_from(decode(v_b64, 'base64'), 'UTF8');
            v_after_recipient := split_part(v_text, '.', 1)::uuid;
            v_after_channel := split_part(v_text, '.', 2)::notify.channel;
        exception when others then
            perform notify._raise('ND422', 'invalid_cursor', 'cursor is not one this API returned', 'cursor');
        end;
    end if;
    -- Keyset over the unique key (request_id, tenant_id, recipient_id, channel): each page is an index range.
    with page as (
        select x.d, row_number() over (order by (x.d).recipient_id, (x.d).channel) as k
          from (select d from notify.notification_deliveries d
                 where d.request_id = p_id and d.tenant_id = p_tenant_id
                   and (v_after_channel is null and d.recipient_id >= v_after_recipient
                        or (d.recipient_id, d.channel) > (v_after_recipient, v_after_channel))
                 order by d.recipient_id, d.channel
                 limit p_limit + 1) x(d)
    )
    select coalesce(jsonb_agg(notify._delivery_json(p.d, true) || jsonb_build_object('recipient', r.ref) order by p.k)
                        filter (where p.k <= p_limit), '[]'),
           count(*),
           (array_agg(pg_catalog.format('%s.%s', (p.d).recipient_id, (p.d).channel)) filter (where p.k = p_limit))[1]
      into v_items, v_count, v_text
      from page p
      join notify.recipients r on r.tenant_id = p_tenant_id and r.id = (p.d).recipient_id;
    return jsonb_build_object('items', v_items, 'next_cursor',
        case when v_count > p_limit
             then rtrim(translate(encode(convert_to(v_text, 'UTF8'), 'base64'), E'+/\n', '-_'), '=') end);
end
$$;
comment on function notify_api.list_deliveries_v1(uuid, uuid, text, integer) is
    'One page (p_limit 1-1000, default 100) of a notification''s deliveries with their history and recipient, in (recipient, channel) order: {items, next_cursor}; the last page has next_cursor null. ND422 invalid_cursor; 404 for another tenant''s id.';

create function notify_api.get_notification_timeline_v1(p_tenant_id uuid, p_id uuid, p_max_deliveries integer default 20)
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
    -- maintenance, operator, erasure, cancel), each attempt, each status callback attempt. A fan-out: its first
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
    'A notification''s history in time order, for support (`dispatcher notifications show`): every status change with its source (provider reports arrive as source webhook), attempt, provider flag (opened, complained) and status callback attempt, of its first p_max_deliveries deliveries (default 20, at most 1,000). 404 for another tenant''s id.';

create function notify_api.erase_recipient_v1(p_tenant_id uuid, p_ref text, p_erased_by text default null)
    returns jsonb
    language plpgsql
    security definer
    set search_path = pg_catalog, pg_temp
as $$
declare
    v_recipient notify.recipients;
    v_erasure uuid := gen_random_uuid();
    v_addresses text[];          -- every address the recipient had (current, and those its deliveries were sent to)
    v_needles text[];            -- how those appear in provider payloads: as given, lower-cased, phones without '+'
    v_deliveries uuid[];
    v_message_ids text[];
    v_numbers text[];            -- the tenant's WhatsApp business numbers (inbound webhooks name them)
    v_inbound text[];            -- inbound message ids its consent ledger cites (an opt-out keyword's evidence)
    v_counts jsonb := '{}';
    v_n bigint;
    v_in_flight integer;
    v_suppressed jsonb;
begin
    perform notify._enter(p_tenant_id);
    -- Locked for the transaction: a submission to this recipient waits (its deliveries' foreign-key check) until we commit.
    select * into v_recipient from notify.recipients r where r.tenant_id = p_tenant_id and r.ref = p_ref for update;
    if v_recipient.id is null then
        perform notify._raise('ND404', 'not_found', 'no such recipient', 'ref');
    end if;
    select array_agg(distinct x.channel::text || ':' || x.address) into v_addresses
      from (select a.channel, a.address from notify.recipient_addresses a
             where a.tenant_id = p_tenant_id and a.recipient_id = v_recipient.id
            union
            select d.channel, d.address from notify.notification_deliveries d
             where d.tenant_id = p_tenant_id and d.recipient_id = v_recipient.id and d.created_at > '-infinity'
               and d.address is not null) x;
    select array_agg(distinct n) into v_needles
      from unnest(coalesce(v_addresses, '{}')) a,
           lateral (values (split_part(a, ':', 2)), (lower(split_part(a, ':', 2))), (ltrim(split_part(a, ':', 2), '+'))) v(n)
     where length(n) >= 6;
    select coalesce(array_agg(d.id), '{}'), coalesce(array_agg(d.provider_message_id) filter (where d.provider_message_id is not null), '{}')
      into v_deliveries, v_message_ids
      from notify.notification_deliveries d
     where d.tenant_id = p_tenant_id and d.recipient_id = v_recipient.id and d.created_at > '-infinity';
    select coalesce(array_agg(c.evidence ->> 'message_id') filter (where c.evidence ? 'message_id'), '{}') into v_inbound
      from notify.recipient_consents c where c.tenant_id = p_tenant_id and c.recipient_id = v_recipient.id;
    select coalesce(array_agg(cp.settings ->> 'phone_number_id'), '{}') into v_numbers
      from notify.channel_providers cp where cp.tenant_id = p_tenant_id and cp.provider = 'whatsapp_cloud';

    -- 1. What it had opted out of stays opted out, by keyed hash: per channel address, every category (or the whole
    --    channel, category '') whose latest ledger entry is a revoke.
    with states as (
        select a.channel, a.address, k.category,
               (select c.status from notify.recipient_consents c
                 where c.tenant_id = p_tenant_id and c.recipient_id = v_recipient.id and c.channel = a.channel
                   and (c.category is null or c.category = k.category)
                 order by c.id desc limit 1) as status
          from (select split_part(x, ':', 1)::notify.channel as channel, substr(x, strpos(x, ':') + 1) as address
                  from unnest(coalesce(v_addresses, '{}')) x) a
          cross join lateral (select null::text as category
                              union
                              select distinct c.category from notify.recipient_consents c
                               where c.tenant_id = p_tenant_id and c.recipient_id = v_recipient.id and c.channel = a.channel
                                 and c.category is not null) k
    ), ins as (
        insert into notify.address_suppressions (tenant_id, channel, address_hash, category, erasure_id)
        select distinct p_tenant_id, s.channel, notify._address_hash(s.channel, s.address), coalesce(s.category, ''), v_erasure
          from states s where s.status = 'revoked'
        on conflict do nothing
        returning channel, category
    )
    select coalesce(jsonb_agg(distinct jsonb_strip_nulls(jsonb_build_object('channel', channel, 'category', nullif(category, '')))), '[]')
      into v_suppressed from ins;

    -- 2. Pending deliveries are cancelled (recorded in their history, source erasure); one being sent cannot be.
    perform notify._set_source('erasure');
    update notify.notification_deliveries d set status = 'cancelled', reason = 'recipient_erased'
     where d.tenant_id = p_tenant_id and d.id = any (v_deliveries) and d.status in ('scheduled', 'queued');
    get diagnostics v_n = row_count;
    v_counts := v_counts || jsonb_build_object('cancelled_deliveries', v_n);
    select count(*) into v_in_flight from notify.notification_deliveries d
     where d.tenant_id = p_tenant_id and d.id = any (v_deliveries) and d.status = 'sending';

    -- 3. Every copy of its personal data, table by table; content-free history (statuses, times, counts) stays.
    update notify.notification_deliveries d set address = null, variables = null, last_error_message = null
     where d.tenant_id = p_tenant_id and d.id = any (v_deliveries)
       and (d.address is not null or d.variables is not null or d.last_error_message is not null);
    get diagnostics v_n = row_count;
    v_counts := v_counts || jsonb_build_object('notification_deliveries', v_n);

    update notify.delivery_attempts a set error_message = null
     where a.tenant_id = p_tenant_id and a.delivery_id = any (v_deliveries) and a.error_message is not null;
    get diagnostics v_n = row_count;
    v_counts := v_counts || jsonb_build_object('delivery_attempts', v_n);

    update notify.notification_requests r set variables = '{}'
     where r.tenant_id = p_tenant_id and r.recipient_id = v_recipient.id and r.variables <> '{}';
    get diagnostics v_n = row_count;
    v_counts := v_counts || jsonb_build_object('notification_requests', v_n);

    update notify.recipient_consents c set evidence = null
     where c.tenant_id = p_tenant_id and c.recipient_id = v_recipient.id and c.evidence is not null;
    get diagnostics v_n = row_count;
    v_counts := v_counts || jsonb_build_object('recipient_consents', v_n);

    delete from notify.mock_messages m
     where m.tenant_id = p_tenant_id
       and (m.delivery_id = any (v_deliveries) or m.channel::text || ':' || m.address = any (coalesce(v_addresses, '{}')));
    get diagnostics v_n = row_count;
    v_counts := v_counts || jsonb_build_object('mock_messages', v_n);

    -- Callback bodies carry no address, but the request's metadata: gone from this recipient's.
    update notify.callback_messages c set payload = c.payload #- '{data,metadata}'
     where c.tenant_id = p_tenant_id and c.delivery_id = any (v_deliveries) and c.payload #> '{data,metadata}' is not null;
    get diagnostics v_n = row_count;
    v_counts := v_counts || jsonb_build_object('callback_messages', v_n);

    -- WhatsApp windows and the BSUID <-> phone mapping (since 2026 a webhook may name either): by the phone's digits or
    -- by the business-scoped user id itself.
    delete from notify.whatsapp_windows w
     where w.tenant_id = p_tenant_id
       and w.wa_id = any (select ltrim(substr(x, strpos(x, ':') + 1), '+') from unnest(coalesce(v_addresses, '{}')) x);
    get diagnostics v_n = row_count;
    v_counts := v_counts || jsonb_build_object('whatsapp_windows', v_n);
    delete from notify.whatsapp_users u
     where u.tenant_id = p_tenant_id
       and (u.wa_id = any (select ltrim(substr(x, strpos(x, ':') + 1), '+') from unnest(coalesce(v_addresses, '{}')) x)
            or u.user_id = any (select substr(x, strpos(x, ':') + 1) from unnest(coalesce(v_addresses, '{}')) x));
    get diagnostics v_n = row_count;
    v_counts := v_counts || jsonb_build_object('whatsapp_users', v_n);

    -- Provider webhooks are stored before their tenant is known: a payload is this recipient's when it mentions one of
    -- its addresses and names one of its deliveries (or their provider message ids), an inbound message its ledger
    -- cites, or one of the tenant's business numbers. (This reads every stored webhook: they are kept only as long as retention allows.)
    update notify.webhook_events e set payload = jsonb_build_object('erased', true)
     where v_needles is not null
       and exists (select from unnest(v_needles) n where strpos(lower(e.payload::text), lower(n)) > 0)
       and (exists (select from jsonb_array_elements(e.outcomes) o
                     where o ->> 'delivery_id' = any (v_deliveries::text[]) or o ->> 'provider_message_id' = any (v_message_ids)
                        or o ->> 'inbound' = any (v_inbound))
            or exists (select from unnest(v_message_ids || v_numbers) n where strpos(e.payload::text, n) > 0));
    get diagnostics v_n = row_count;
    v_counts := v_counts || jsonb_build_object('webhook_events', v_n);

    delete from notify.recipient_addresses a where a.tenant_id = p_tenant_id and a.recipient_id = v_recipient.id;
    get diagnostics v_n = row_count;
    v_counts := v_counts || jsonb_build_object('recipient_addresses', v_n);

    update notify.recipients r set locale = null, timezone = null, updated_at = now()
     where r.tenant_id = p_tenant_id and r.id = v_recipient.id;

    insert into notify.recipient_erasures (tenant_id, id, recipient_id, erased_by, rows_changed, in_flight)
    values (p_tenant_id, v_erasure, v_recipient.id, p_erased_by, v_counts, v_in_flight);
    return jsonb_build_object('id', v_erasure, 'ref', v_recipient.ref, 'erased_at', now(), 'erased_by', p_erased_by,
                              'rows_changed', v_counts, 'in_flight', v_in_flight, 'suppressed', v_suppressed);
end
$$;
comment on function notify_api.erase_recipient_v1(uuid, text, text) is
    'Erases a recipient''s personal data on request: cancels its pending deliveries, puts what it had opted out of on the suppression list (keyed hashes), removes its addresses and every copy of them and of its content (deliveries'' addresses, variables and errors, its requests'' variables, consent evidence, the mock outbox, webhook payloads that mention it, callback bodies'' metadata, WhatsApp windows), keeps the content-free history and its ref, and records the erasure. Returns the receipt {id, ref, erased_at, erased_by, rows_changed per table, in_flight, suppressed}. 404 for an unknown ref.';

create function notify_api.export_recipient_v1(p_tenant_id uuid, p_ref text)
    returns jsonb
    language plpgsql
    stable
    security definer
    set search_path = pg_catalog, pg_temp
as $$
declare
    v_id uuid;
begin
    perform notify._enter(p_tenant_id);
    v_id := notify._recipient_id(p_tenant_id, p_ref);
    return jsonb_build_object(
        'exported_at', now(),
        'recipient', notify._recipient_json(p_tenant_id, v_id),
        'consents', notify_api.list_consents_v1(p_tenant_id, p_ref),
        'notifications', coalesce((
            select jsonb_agg(notify._notification_head(r) || jsonb_build_object(
                       'variables', r.variables,
                       'deliveries', (select jsonb_agg(notify._delivery_json(d, true) || jsonb_strip_nulls(jsonb_build_object(
                                                 'address', d.address, 'variables', d.variables, 'template_locale', d.template_locale))
                                             order by d.channel)
                                        from notify.notification_deliveries d
                                       where d.tenant_id = p_tenant_id and d.request_id = r.id and d.recipient_id = v_id))
                       order by r.created_at desc, r.id desc)
              from notify.notification_requests r
             where r.tenant_id = p_tenant_id
               and r.id in (select d.request_id from notify.notification_deliveries d
                             where d.tenant_id = p_tenant_id and d.recipient_id = v_id and d.created_at > '-infinity')), '[]'),
        'mock_messages', coalesce((
            select jsonb_agg(jsonb_build_object('delivery_id', m.delivery_id, 'channel', m.channel, 'address', m.address,
                                                'rendered', m.rendered, 'sent_at', m.sent_at) order by m.id)
              from notify.mock_messages m
             where m.tenant_id = p_tenant_id
               and m.delivery_id in (select d.id from notify.notification_deliveries d
                                      where d.tenant_id = p_tenant_id and d.recipient_id = v_id and d.created_at > '-infinity')), '[]'),
        'erasures', coalesce((
            select jsonb_agg(jsonb_build_object('id', e.id, 'erased_at', e.erased_at, 'erased_by', e.erased_by,
                                                'rows_changed', e.rows_changed) order by e.erased_at)
              from notify.recipient_erasures e where e.tenant_id = p_tenant_id and e.recipient_id = v_id), '[]'));
end
$$;
comment on function notify_api.export_recipient_v1(uuid, text) is
    'Everything held about a recipient, for an access request, as one document: the recipient and its addresses, its consent (in force and the ledger with evidence), its notifications with their variables and its deliveries (address, variables, history, attempts), what the mock provider "sent" it, and its past erasures. 404 for an unknown ref.';

create function notify._unknown_deadline_default(p_channel notify.channel)
    returns integer
    language sql
    immutable
    set search_path = pg_catalog, pg_temp
as $$
    -- A provider that accepted a message reports it within minutes, and retries its webhook for days (Meta: up to 7);
    -- past that, no report is coming.
    select case p_channel when 'email' then 86400 else 604800 end
$$;
comment on function notify._unknown_deadline_default(notify.channel) is
    'Seconds a delivery may stay unknown when the tenant set no deadline for the channel: 7 days for WhatsApp and SMS, 1 day for e-mail.';

create function notify._finish_unknown_deliveries()
    returns integer
    language plpgsql
    volatile
    set search_path = pg_catalog, pg_temp
as $$
declare
    v_n integer;
begin
    -- Never a resend: an unknown past its deadline becomes failed, saying why; a late provider report can still move
    -- it (failed -> delivered is a legal, ranked change for WhatsApp and SMS).
    with due as (
        select d.tenant_id, d.id
          from notify.notification_deliveries d
          left join notify.unknown_deadlines u on u.tenant_id = d.tenant_id and u.channel = d.channel
         where d.status = 'unknown'
           and d.updated_at < now() - make_interval(secs => coalesce(u.after_seconds, notify._unknown_deadline_default(d.channel)))
         order by d.updated_at
         limit 10000
           for update of d skip locked
    ), done as (
        update notify.notification_deliveries d
           set status = 'failed', reason = 'outcome_unknown_deadline', last_error_code = 'outcome_unknown_deadline',
               last_error_message = 'no provider report within the channel''s deadline for unknown outcomes; the message may have been delivered'
          from due
         where d.tenant_id = due.tenant_id and d.id = due.id and d.status = 'unknown'
        returning 1
    )
    select count(*) into v_n from done;
    return v_n;
end
$$;
comment on function notify._finish_unknown_deliveries() is
    'Maintenance: every delivery unknown for longer than its tenant''s deadline for the channel (notify.unknown_deadlines, or the default) becomes failed with reason outcome_unknown_deadline, up to 10,000 per run. Never resent. Returns how many.';

create function notify_api.resolve_delivery_v1(p_tenant_id uuid, p_delivery_id uuid, p_body jsonb, p_resolved_by text default null)
    returns jsonb
    language plpgsql
    security definer
    set search_path = pg_catalog, pg_temp
as $$
declare
    v notify.notification_deliveries;
    v_status text;
    v_note text;
begin
    perform notify._enter(p_tenant_id);
    perform notify._check_keys(coalesce(p_body, '{}'), array['status', 'note'], '');
    v_status := notify._text_field(coalesce(p_body, '{}'), 'status', '', true, 16);
    if v_status not in ('sent', 'failed') then
        perform notify._raise('ND400', 'invalid_value', 'status must be sent or failed', 'status');
    end if;
    v_note := notify._text_field(p_body, 'note', '', true, 500);
    select * into v from notify.notification_deliveries d where d.tenant_id = p_tenant_id and d.id = p_delivery_id for update;
    if v.id is null then
        perform notify._raise('ND404', 'not_found', 'no such delivery', 'id');
    end if;
    if v.status <> 'unknown' then
        perform notify._raise('ND409', 'not_unknown', format('delivery is %s: only an unknown outcome is resolved by hand', v.status), 'status');
    end if;
    -- Recorded in the history like any change: source operator (who, in the note's event), reason the note.
    perform notify._set_source(left('operator' || coalesce(':' || p_resolved_by, ''), 200));
    update notify.notification_deliveries d
       set status = v_status::notify.delivery_status, reason = 'resolved: ' || v_note,
           sent_at = case when v_status = 'sent' then coalesce(d.sent_at, now()) else d.sent_at end,
           last_error_code = case when v_status = 'failed' then 'resolved_failed' else d.last_error_code end
     where d.tenant_id = p_tenant_id and d.id = p_delivery_id
    returning * into v;
    return notify._delivery_json(v, true);
end
$$;
comment on function notify_api.resolve_delivery_v1(uuid, uuid, jsonb, text) is
    'Resolves an unknown outcome by hand: {status: sent|failed, note} (what the operator learned, e.g. from the provider''s console). Recorded in the delivery''s history (source operator:<who>, reason "resolved: <note>"). ND409 not_unknown for a delivery in any other status; 404 for another tenant''s.';

create function notify_api.set_unknown_deadline_v1(p_tenant_id uuid, p_channel text, p_after_seconds integer)
    returns jsonb
    language plpgsql
    security definer
    set search_path = pg_catalog, pg_temp
as $$
declare
    v_channel notify.channel;
begin
    perform notify._enter(p_tenant_id);
    v_channel := notify._channel_field(to_jsonb(p_channel), 'channel');
    if p_after_seconds is null then
        delete from notify.unknown_deadlines u where u.tenant_id = p_tenant_id and u.channel = v_channel;
    elsif p_after_seconds not between 60 and 31536000 then
        perform notify._raise('ND422', 'invalid_value', 'after_seconds must be between 60 (a minute) and 31536000 (a year)', 'after_seconds');
    else
        insert into notify.unknown_deadlines as u (tenant_id, channel, after_seconds)
        values (p_tenant_id, v_channel, p_after_seconds)
        on conflict (tenant_id, channel) do update set after_seconds = excluded.after_seconds, updated_at = now();
    end if;
    return jsonb_build_object('channel', v_channel,
        'after_seconds', coalesce((select u.after_seconds from notify.unknown_deadlines u
                                    where u.tenant_id = p_tenant_id and u.channel = v_channel),
                                  notify._unknown_deadline_default(v_channel)),
        'default', not exists (select from notify.unknown_deadlines u where u.tenant_id = p_tenant_id and u.channel = v_channel));
end
$$;
comment on function notify_api.set_unknown_deadline_v1(uuid, text, integer) is
    'Sets how long a delivery on the channel may stay unknown before maintenance makes it final (60 s to a year); null: back to the default (7 days for WhatsApp and SMS, 1 day for e-mail). Returns {channel, after_seconds, default}.';

create or replace function notify_api.run_maintenance_v1()
    returns jsonb
    language plpgsql
    security definer
    set search_path = pg_catalog, pg_temp
as $$
declare
    v_requeued integer;
    v_unknown integer;
    v_exhausted integer;
    v_expired integer;
    v_woken text[];
    v_unknown_final integer;
begin
    perform notify._set_source('maintenance');

    -- Crashed sends (lease past due): e-mail may be sent twice, so it goes back to the queue;
    -- WhatsApp and SMS must not be, so they become unknown until a provider report says what happened.
    -- An expired lease was an attempt: e-mail whose attempts are used up fails instead of being requeued forever.
    with stale as (
        select d.tenant_id, d.id, d.attempt, d.channel, d.attempt >= t.retry_max_attempts as exhausted
          from notify.notification_deliveries d
          join notify.tenants t on t.id = d.tenant_id
         where d.status = 'sending' and d.lease_expires_at < now()
           for update of d skip locked
    ), attempts as (
        update notify.delivery_attempts a set finished_at = now(), outcome = 'lease_expired'
          from stale s
         where a.tenant_id = s.tenant_id and a.delivery_id = s.id and a.attempt = s.attempt and a.finished_at is null
    ), moved as (
        update notify.notification_deliveries d
           set status = case when s.channel <> 'email' then 'unknown' when s.exhausted then 'failed' else 'queued' end::notify.delivery_status,
               reason = case when s.channel <> 'email' then 'lease_expired' when s.exhausted then 'retries_exhausted' else d.reason end,
               last_error_code = case when s.channel = 'email' then 'lease_expired' else d.last_error_code end,
               last_error_message = case when s.channel = 'email' then format('attempt %s: the worker''s lease expired before it recorded an outcome', s.attempt)
                                         else d.last_error_message end,
               due_at = case when s.channel = 'email' and not s.exhausted then now() else d.due_at end
          from stale s
         where d.tenant_id = s.tenant_id and d.id = s.id
        returning d.status
    )
    select count(*) filter (where status = 'queued'), count(*) filter (where status = 'unknown'),
           count(*) filter (where status = 'failed')
      into v_requeued, v_unknown, v_exhausted from moved;

    -- Deadlines: anything still waiting past its expires_at is never sent.
    with gone as (
        update notify.notification_deliveries d set status = 'expired', reason = 'expired_before_send'
         where d.status in ('queued', 'scheduled') and d.expires_at <= now()
        returning 1
    )
    select count(*) into v_expired from gone;

    -- Unknown outcomes past their channel's deadline become final (failed, never resent; sql/086_api_unknown.sql).
    v_unknown_final := notify._finish_unknown_deliveries();

    -- Safety net: a wake-up for every channel with due work (coalesced, so cheap when one is pending).
    select array_agg(c::text) into v_woken
      from unnest(enum_range(null::notify.channel)) c
     where exists (select from notify.notification_deliveries d
                    where d.channel = c and d.status in ('queued', 'scheduled') and d.due_at <= now());
    perform notify._wake(c::notify.channel) from unnest(v_woken) c;

    return jsonb_build_object('requeued', v_requeued, 'unknown', v_unknown, 'exhausted', v_exhausted, 'expired', v_expired,
                              'unknown_finalized', v_unknown_final, 'woken', coalesce(to_jsonb(v_woken), '[]'));
end
$$;
comment on function notify_api.run_maintenance_v1() is
    'Periodic upkeep: expired leases, each counted as an attempt (email -> queued, or failed/retries_exhausted when the tenant''s retry_max_attempts are used up; whatsapp/sms -> unknown), deliveries past expires_at -> expired, unknown outcomes past their channel''s deadline -> failed (outcome_unknown_deadline; notify._finish_unknown_deliveries), a wake-up for every channel with due work.';

revoke execute on all functions in schema notify from public;
revoke execute on all functions in schema notify_api from public;
grant select, insert, update, delete on notify.address_hash_key, notify.address_suppressions, notify.recipient_erasures,
    notify.unknown_deadlines to notify_system;
grant execute on all functions in schema notify to notify_system;
grant execute on function notify_api.find_notifications_v1(uuid, jsonb, text, integer) to notify_service;
grant execute on function notify_api.get_notification_v2(uuid, uuid) to notify_service;
grant execute on function notify_api.list_deliveries_v1(uuid, uuid, text, integer) to notify_service;
grant execute on function notify_api.get_notification_timeline_v1(uuid, uuid, integer) to notify_service;
grant execute on function notify_api.erase_recipient_v1(uuid, text, text) to notify_service;
grant execute on function notify_api.export_recipient_v1(uuid, text) to notify_service;
grant execute on function notify_api.resolve_delivery_v1(uuid, uuid, jsonb, text) to notify_service;
grant execute on function notify_api.set_unknown_deadline_v1(uuid, text, integer) to notify_service;
grant execute on function notify_api.get_notification_v2(uuid, uuid) to notify_caller;
grant execute on function notify_api.list_deliveries_v1(uuid, uuid, text, integer) to notify_caller;
grant execute on function notify_api.find_notifications_v1(uuid, jsonb, text, integer) to notify_caller;
grant execute on function notify_api.get_notification_timeline_v1(uuid, uuid, integer) to notify_caller;
grant execute on function notify_api.erase_recipient_v1(uuid, text, text) to notify_caller;
grant execute on function notify_api.export_recipient_v1(uuid, text) to notify_caller;
grant execute on function notify_api.resolve_delivery_v1(uuid, uuid, jsonb, text) to notify_caller;
select notify._settle_owners();
