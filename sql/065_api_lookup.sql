-- notify_api: finding notifications without their id, a fan-out read as a summary, and its deliveries page by page.
-- Called by GET /internal/notifications, GET /internal/notifications/{id}(/deliveries), `dispatcher notifications` and trusted SQL clients.

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
               'metadata', nullif(p.metadata, '{}'::jsonb), 'route', p.route))
           -- deliveries of the one recipient (single intents, or the filtered recipient's within a fan-out)
           || case when p.recipient_id is not null or v_recipient is not null then jsonb_build_object('deliveries',
                  (select coalesce(jsonb_agg(jsonb_strip_nulls(jsonb_build_object(
                              'id', d.id, 'channel', d.channel, 'step', d.route_step, 'status', d.status, 'reason', d.reason,
                              'updated_at', d.updated_at))
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
        'callback_url', v.callback_url, 'test', case when v.test then true end, 'route', v.route, 'priority', v.priority))
$$;
comment on function notify._notification_head(notify.notification_requests) is 'The request part of a notification''s JSON (as get_notification_v1 shows it; "test": true for a test key''s; its route, when it has one, and priority).';

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
           coalesce(sum(s.n), 0), coalesce(bool_or(s.status in ('scheduled', 'queued', 'sending', 'unknown', 'held', 'waiting')), false)
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
