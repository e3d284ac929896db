-- 0047: idempotency scopes per mode, and one lock order for a submission's recipients (issue #16 review).
-- A test key's submissions and the live ones shared a tenant's idempotency keys: a test submission with the key of a
-- live request replayed the live answer (or was refused as another body), and a live submission after a test one with
-- the same key replayed the TEST request, so the live notification was never sent. The request's test flag is now part
-- of the key's unique constraint, and every claim and lookup of a key (the single and fan-out submission, the batch's
-- set-based path, the replay) reads the caller's scope from the transaction setting notify.test (as the column's
-- default does): test and live are two key spaces, like a payment provider's test and live modes.

alter table notify.notification_requests
    drop constraint notification_requests_idempotency_key,
    add constraint notification_requests_idempotency_key unique (idempotency_key, tenant_id, test);

create or replace function notify._replay(p_tenant_id uuid, p_idempotency_key text, p_fingerprint bytea)
    returns jsonb
    language plpgsql
    stable
    set search_path = pg_catalog, pg_temp
as $$
declare
    v notify.notification_requests;
begin
    -- Called after the key's insert lost the race: the winner has committed, so its row is visible.
    -- In the caller's scope (test or live, the transaction setting notify.test): the other one never answers.
    select * into v from notify.notification_requests r
     where r.tenant_id = p_tenant_id and r.idempotency_key = p_idempotency_key
       and r.test = coalesce(nullif(pg_catalog.current_setting('notify.test', true), '')::boolean, false);
    if v.fingerprint <> p_fingerprint then
        perform notify._raise('ND422', 'idempotency_key_reused', 'this Idempotency-Key was used with a different request body',
                              'Idempotency-Key');
    end if;
    return v.response;
end
$$;
comment on function notify._replay(uuid, text, bytea) is
    'The stored response for a repeated Idempotency-Key with the same body fingerprint, in the caller''s scope (a test key''s requests or the live ones, by the transaction setting notify.test); ND422 for another body.';


create or replace function notify._claim_submission(p_tenant_id uuid, s notify.submission, p_recipient_id uuid, p_recipient_count integer,
                                         p_request_id uuid, p_response jsonb, out request_id uuid, out replay jsonb)
    language plpgsql
    volatile
    set search_path = pg_catalog, pg_temp
as $$
begin
    -- A concurrent twin waits here for our commit, then replays it.
    insert into notify.notification_requests
        (tenant_id, id, idempotency_key, fingerprint, recipient_id, recipient_count, template_key, variables, category, channels,
         send_at, expires_at, metadata, callback_url, response, route, priority)
    -- Nothing will be sent when every delivery is suppressed (the answer says so): the variables are not kept at all.
    values (p_tenant_id, coalesce(p_request_id, gen_random_uuid()), s.idempotency_key, s.fingerprint, p_recipient_id,
            p_recipient_count, s.template,
            case when p_response ->> 'status' = 'suppressed' then '{}'::jsonb else s.variables end, s.category, s.channels, s.send_at, s.expires_at, s.metadata,
            s.callback_url, p_response, s.route, coalesce(s.priority, 'normal'))
    -- The key's scope is the tenant's test or live mode (test, from the same setting as the column's default).
    on conflict (tenant_id, idempotency_key, test) do nothing
    returning id into request_id;
    if request_id is null then
        replay := notify._replay(p_tenant_id, s.idempotency_key, s.fingerprint);
    end if;
end
$$;
comment on function notify._claim_submission(uuid, notify.submission, uuid, integer, uuid, jsonb) is
    'Claims the submission''s idempotency key with its request row (recipient_id for one recipient, null for a fan-out of p_recipient_count; the id and the response when the caller knows them already, so the row is written once): the new request''s id, or, when the key was taken, the stored response to replay (ND422 idempotency_key_reused for another body). A key is taken per scope: a test key''s submissions (notify.test) and live ones never share one.';


create or replace function notify_api.submit_notification_v1(p_tenant_id uuid, p_request jsonb, p_idempotency_key text default null)
    returns table (response jsonb, replayed boolean)
    language plpgsql
    security definer
    set search_path = pg_catalog, pg_temp
    -- Its per-channel read would be planned anew on every call (its parameters make a custom plan look cheaper).
    set plan_cache_mode = force_generic_plan
as $$
declare
    s notify.submission;
    v_recipient notify.recipients;
    v_claim record;
    v_locale text;
    v_now timestamptz := now();
    v_request_id uuid;
    v_response jsonb;
    v_channels notify.channel[];
    v_template_locales text[];
    v_missing text[];
    v_addresses text[];
    v_ids uuid[];
    v_statuses notify.delivery_status[];
    v_reasons text[];
    v_deliveries jsonb;
    v_open notify.channel[];
begin
    perform notify._enter(p_tenant_id);
    -- 1. The body, read and checked once; every error names its field, nothing is written yet.
    s := notify._parse_submission(p_tenant_id, p_request, p_idempotency_key);
    -- A key already used: its stored answer (ND422 for another body) before anything is written, so a replay never
    -- writes the recipients of the original body over what changed since. (A concurrent twin that gets past this
    -- still meets the key's unique index in _claim_submission, and replays there.)
    if s.idempotency_key is not null
       and exists (select from notify.notification_requests r
                    where r.tenant_id = p_tenant_id and r.idempotency_key = s.idempotency_key
                      -- in this submission's scope: a test key's keys and the live ones are apart (notify._enter_key)
                      and r.test = coalesce(nullif(pg_catalog.current_setting('notify.test', true), '')::boolean, false)) then
        response := notify._replay(p_tenant_id, s.idempotency_key, s.fingerprint);
        replayed := true;
        return next;
        return;
    end if;
    if s.recipient is null then
        return query select * from notify._submit_fanout(p_tenant_id, s);
        return;
    end if;

    -- 2. The recipient and its addresses.
    v_recipient := notify._upsert_recipient(p_tenant_id, notify._text_field(s.recipient, 'ref', 'recipient', true, 200),
                                            s.recipient, 'recipient');

    -- 3. Per channel, in the caller's order and in one read: the template (resolved once; the delivery keeps its
    --    locale), the variables it lacks, the consent in force (checked again at claim), the address, and so the
    --    delivery's status. Nothing is written before every channel has passed.
    --    A route's steps alike, each with its own template and consent: the first step not suppressed is due (queued or
    --    scheduled, its reason naming the step before it when that one was suppressed), the later ones wait.
    --    The ids are sorted into step order, so whoever locks a request's deliveries by id (cancel) locks them in the
    --    route's order, as the route's trigger does (sql/040_triggers.sql).
    select coalesce(v_recipient.locale, n.default_locale) into v_locale from notify.tenants n where n.id = p_tenant_id;
    v_ids := array(select notify._uuidv7() from unnest(s.channels) order by 1);
    select array_agg(x.channel order by x.ord), array_agg(x.template_locale order by x.ord),
           array_agg(x.missing order by x.ord), array_agg(x.address order by x.ord), array_agg(x.id order by x.ord),
           array_agg(x.status order by x.ord), array_agg(x.reason order by x.ord),
           jsonb_agg(jsonb_strip_nulls(jsonb_build_object('id', x.id, 'channel', x.channel, 'status', x.status, 'reason', x.reason,
                                                          'step', case when s.route is not null then x.ord end))
                     order by x.ord),
           array_agg(x.channel order by x.channel) filter (where x.status in ('queued', 'scheduled'))
      into v_channels, v_template_locales, v_missing, v_addresses, v_ids, v_statuses, v_reasons, v_deliveries, v_open
      from (select y.channel, y.ord, y.template_locale, y.address, y.id, y.missing,
                   case when y.reason is not null then 'suppressed'
                        when s.route is not null and y.ord > y.active then 'waiting'
                        when s.send_at > v_now then 'scheduled'
                        else 'queued' end::notify.delivery_status as status,
                   coalesce(y.reason, case when s.route is not null and y.ord = y.active and y.ord > 1
                                           then format('step_%s_suppressed', y.ord - 1) end) as reason
              from (select u.channel, u.ord, t.locale as template_locale, a.address, v_ids[u.ord] as id,
                           (select string_agg(r, ', ') from unnest(t.required_variables) r where not s.variables ? r) as missing,
                           case when a.address is null then 'no_address' when not c.allowed then 'no_consent' end as reason,
                           min(u.ord) filter (where a.address is not null and c.allowed) over () as active
                      from unnest(s.channels) with ordinality as u(channel, ord)
                     cross join lateral notify._resolve_template(p_tenant_id, s.template, u.channel, v_locale) t
                     cross join lateral notify._consent(p_tenant_id, v_recipient.id, u.channel, s.category) c
                      left join notify.recipient_addresses a
                             on a.tenant_id = p_tenant_id and a.recipient_id = v_recipient.id and a.channel = u.channel
                    offset 0) y) x;
    for i in 1 .. cardinality(v_channels) loop
        if v_template_locales[i] is null then
            perform notify._raise('ND422', 'template_not_found',
                format('template %s has no %s content for locale %s or its fallbacks', s.template, v_channels[i], v_locale), 'template');
        end if;
        if v_missing[i] is not null then
            perform notify._raise('ND422', 'missing_variables',
                format('template %s (%s) needs variables: %s', s.template, v_channels[i], v_missing[i]),
                'variables.' || split_part(v_missing[i], ', ', 1));
        end if;
    end loop;

    -- 4. Claim the idempotency key with the request row and its answer (written once), or replay the request that
    --    holds the key.
    v_request_id := gen_random_uuid();
    v_response := jsonb_build_object(
        'id', v_request_id, 'created_at', v_now,
        'status', case when 'suppressed' = all (v_statuses) then 'suppressed' else 'accepted' end,
        'deliveries', v_deliveries)
        -- a test key's submission says so (notify._enter_key set notify.test), and so does every replay of it
        || case when pg_catalog.current_setting('notify.test', true) = 'true' then '{"test": true}'::jsonb else '{}' end;
    v_claim := notify._claim_submission(p_tenant_id, s, v_recipient.id, 1, v_request_id, v_response);
    if v_claim.request_id is null then
        response := v_claim.replay;
        replayed := true;
        return next;
        return;
    end if;

    -- 5. One delivery per channel (per route step), suppressed ones with their reason; a waiting step is due at
    --    'infinity' until the route's trigger sets its time (sql/040_triggers.sql).
    perform notify._set_source('submit');
    insert into notify.notification_deliveries
        (tenant_id, id, request_id, recipient_id, channel, address, template_locale, status, reason, due_at, expires_at,
         route_step, route_until, route_within, priority)
    select p_tenant_id, d.id, v_request_id, v_recipient.id, d.channel, d.address, d.template_locale, d.status, d.reason,
           case when d.status = 'waiting' then 'infinity' else greatest(coalesce(s.send_at, v_now), v_now) end, s.expires_at,
           case when s.route is not null then d.ord end, (s.route -> (d.ord::integer - 1) ->> 'until')::notify.delivery_status,
           notify._duration_field(s.route -> (d.ord::integer - 1) -> 'within', 'route'), s.priority
      from unnest(v_ids, v_channels, v_addresses, v_template_locales, v_statuses, v_reasons)
           with ordinality as d(id, channel, address, template_locale, status, reason, ord);

    -- 6. Wake the worker, with the caller's commit: now, or when the scheduled work falls due.
    perform notify._wake_submission(s, v_open);

    response := v_response;
    replayed := false;
    return next;
end
$$;
comment on function notify_api.submit_notification_v1(uuid, jsonb, text) is
    'Accepts a notification intent (the POST /internal/notifications body) in one transaction: idempotency, recipient upsert, template and variable checks, consent, one delivery per channel or route step (per recipient for a fan-out; a route''s later steps waiting), worker wake-up. Returns the response and whether it is a replay.';


create or replace function notify._submit_batch_usual(p_tenant_id uuid, p_items jsonb)
    returns table (idx integer, result jsonb)
    language plpgsql
    set search_path = pg_catalog, pg_temp
as $$
declare
    v_now timestamptz := now();
    v_channel_names text[] := enum_range(null::notify.channel)::text[];
    v_claimed integer;
begin
    -- 1. The items this path takes: a usual body (notify._is_usual_submission) with a well-formed key not used before,
    --    valid addresses and locale, no time zone, distinct channels, and neither its key nor its recipient shared with
    --    another item of the batch (those keep the item-by-item order). Every other item, and every item that would
    --    fail, is left to the item-by-item path of submit_notifications_v1, so each error is the one that path gives.
    --    Temporary tables as in notify._submit_fanout: always new, dropped before returning.
    create temporary table pg_temp._batch (
        i integer primary key, key text, body jsonb, ref text, addresses jsonb, locale text, channels notify.channel[],
        template text, variables jsonb, category text, metadata jsonb, recipient_id uuid, effective_locale text,
        request_id uuid, response jsonb, priority notify.priority
    ) on commit drop;
    -- The known recipients locked first as their deliveries' foreign-key check would (KEY SHARE), so what is read of
    -- them below is what an erasure in progress (FOR UPDATE) leaves, not what it is removing.
    perform from notify.recipients rec
     where rec.tenant_id = p_tenant_id
       and rec.ref = any (array(select e.item -> 'notification' -> 'recipient' ->> 'ref' from jsonb_array_elements(p_items) e(item)))
     order by rec.ref
       for key share;
    with items as (
        -- The key and the ref as columns of their own: under row security a join on an expression over the item (->>,
        -- not leakproof) cannot become an index condition, and each item scanned the tenant's every request.
        select e.i - 1 as i, e.item, e.item -> 'notification' as body, e.item -> 'notification' -> 'recipient' as r,
               e.item ->> 'idempotency_key' as key, e.item -> 'notification' -> 'recipient' ->> 'ref' as ref
          from jsonb_array_elements(p_items) with ordinality e(item, i)
    ), shared as (
        -- keys and recipient refs that more than one item names (a fan-out item's recipients included)
        select 'key' as kind, item ->> 'idempotency_key' as v from items
         where jsonb_typeof(item) = 'object' and jsonb_typeof(item -> 'idempotency_key') = 'string'
         group by 2 having count(*) > 1
        union all
        select 'ref', v from (
            select r ->> 'ref' as v from items where jsonb_typeof(r) = 'object'
            union all
            select x ->> 'ref' from items, jsonb_array_elements(case when jsonb_typeof(body -> 'recipients') = 'array'
                                                                     then body -> 'recipients' else '[]' end) x
        ) refs where v is not null group by v having count(*) > 1
    )
    insert into pg_temp._batch (i, key, body, ref, addresses, locale, channels, template, variables, category, metadata,
                                recipient_id, effective_locale, request_id, priority)
    select it.i, it.item ->> 'idempotency_key', it.body, it.r ->> 'ref', nullif(it.r -> 'addresses', 'null'),
           it.r ->> 'locale', string_to_array(translate((it.body -> 'channels')::text, '[]" ', ''), ',')::notify.channel[],
           it.body ->> 'template', coalesce(nullif(it.body -> 'variables', 'null'), '{}'), it.body ->> 'category',
           coalesce(nullif(it.body -> 'metadata', 'null'), '{}'), rec.id,
           coalesce(it.r ->> 'locale', rec.locale, n.default_locale), gen_random_uuid(),
           coalesce((it.body ->> 'priority')::notify.priority, 'normal')
      from items it
      join notify.tenants n on n.id = p_tenant_id
      left join notify.recipients rec on rec.tenant_id = p_tenant_id and rec.ref = it.ref
     where jsonb_typeof(it.item) = 'object'
       and not exists (select from jsonb_object_keys(it.item) k where k not in ('idempotency_key', 'notification'))
       and (jsonb_typeof(it.item -> 'idempotency_key') is null or jsonb_typeof(it.item -> 'idempotency_key') = 'null'
            or (jsonb_typeof(it.item -> 'idempotency_key') = 'string' and it.item ->> 'idempotency_key' ~ '^[\x21-\x7e]+$'
                and length(it.item ->> 'idempotency_key') <= 255))
       and notify._is_usual_submission(it.body)
       and jsonb_typeof(it.r -> 'ref') = 'string' and length(it.r ->> 'ref') between 1 and 200
       and (jsonb_typeof(it.r -> 'locale') is null or jsonb_typeof(it.r -> 'locale') = 'null'
            or (jsonb_typeof(it.r -> 'locale') = 'string' and length(it.r ->> 'locale') <= 35
                and it.r ->> 'locale' ~ '^[A-Za-z]{2,3}(-[A-Za-z0-9]{2,8})*$'))
       and (jsonb_typeof(it.r -> 'timezone') is null or jsonb_typeof(it.r -> 'timezone') = 'null')
       and (jsonb_typeof(it.r -> 'addresses') is null or jsonb_typeof(it.r -> 'addresses') = 'null'
            or (jsonb_typeof(it.r -> 'addresses') = 'object'
                and not exists (select from jsonb_each(it.r -> 'addresses') a
                                 where a.key <> all (v_channel_names)
                                    or (jsonb_typeof(a.value) <> 'null'
                                        and (jsonb_typeof(a.value) <> 'string'
                                             or not notify._address_valid(a.key::notify.channel, a.value #>> '{}'))))))
       and jsonb_array_length(it.body -> 'channels')
           = (select count(distinct c) from jsonb_array_elements_text(it.body -> 'channels') c)
       and not exists (select from shared sh where sh.kind = 'key' and sh.v = it.key)
       and not exists (select from shared sh where sh.kind = 'ref' and sh.v = it.ref)
       and not exists (select from notify.notification_requests q
                        where q.tenant_id = p_tenant_id and q.idempotency_key = it.key
                          and q.test = coalesce(nullif(pg_catalog.current_setting('notify.test', true), '')::boolean, false));

    -- 2. Templates per template, channel and locale (resolved once each); an item lacking one, or a variable one needs,
    --    goes item by item (and fails there, naming the field).
    create temporary table pg_temp._batch_templates (
        template text, channel notify.channel, locale text, template_locale text, required_variables text[]
    ) on commit drop;
    insert into pg_temp._batch_templates
    select x.template, x.channel, x.locale, t.locale, t.required_variables
      from (select distinct b.template, c.channel, b.effective_locale as locale
              from pg_temp._batch b cross join unnest(b.channels) c(channel)) x
     cross join lateral notify._resolve_template(p_tenant_id, x.template, x.channel, x.locale) t;
    delete from pg_temp._batch b
     where exists (select from unnest(b.channels) c(channel)
                     join pg_temp._batch_templates t on t.template = b.template and t.channel = c.channel and t.locale = b.effective_locale
                    where t.template_locale is null or exists (select from unnest(t.required_variables) v where not b.variables ? v));

    -- 3. Recipients and addresses, set-based. A known recipient is only read (no row lock), as notify._upsert_recipient does.
    insert into notify.recipients (tenant_id, ref, locale)
    select p_tenant_id, b.ref, b.locale from pg_temp._batch b where b.recipient_id is null order by b.i
    on conflict (tenant_id, ref) do nothing;
    update notify.recipients r set locale = b.locale, updated_at = now()
      from pg_temp._batch b
     where b.recipient_id is not null and r.tenant_id = p_tenant_id and r.id = b.recipient_id
       and b.locale is not null and b.locale is distinct from r.locale;
    update pg_temp._batch b set recipient_id = r.id
      from notify.recipients r
     where b.recipient_id is null and r.tenant_id = p_tenant_id and r.ref = b.ref;
    insert into notify.recipient_addresses as a (tenant_id, recipient_id, channel, address)
    select p_tenant_id, b.recipient_id, kv.key::notify.channel, kv.value #>> '{}'
      from pg_temp._batch b cross join lateral jsonb_each(coalesce(b.addresses, '{}')) kv
     where jsonb_typeof(kv.value) = 'string'
       and not exists (select from notify.recipient_addresses x
                        where x.tenant_id = p_tenant_id and x.recipient_id = b.recipient_id
                          and x.channel = kv.key::notify.channel and x.address = kv.value #>> '{}')
    on conflict (tenant_id, recipient_id, channel) do update
        set address = excluded.address, updated_at = now()
        where a.address is distinct from excluded.address;
    delete from notify.recipient_addresses a
     using pg_temp._batch b, lateral jsonb_each(coalesce(b.addresses, '{}')) kv
     where jsonb_typeof(kv.value) = 'null'
       and a.tenant_id = p_tenant_id and a.recipient_id = b.recipient_id and a.channel = kv.key::notify.channel;

    -- 4. Each item's deliveries (consent and address decide, as for one recipient) and so its answer, before its request
    --    row is written once, with that answer.
    create temporary table pg_temp._batch_deliveries (
        i integer, ord integer, id uuid, channel notify.channel, address text, template_locale text,
        status notify.delivery_status, reason text
    ) on commit drop;
    insert into pg_temp._batch_deliveries
    select b.i, c.ord, notify._uuidv7(), c.channel, a.address, t.template_locale,
           case when a.address is null or not consent.allowed then 'suppressed' else 'queued' end::notify.delivery_status,
           case when a.address is null then 'no_address' when not consent.allowed then 'no_consent' end
      from pg_temp._batch b
     cross join unnest(b.channels) with ordinality c(channel, ord)
      join pg_temp._batch_templates t on t.template = b.template and t.channel = c.channel and t.locale = b.effective_locale
      left join notify.recipient_addresses a on a.tenant_id = p_tenant_id and a.recipient_id = b.recipient_id and a.channel = c.channel
     cross join lateral notify._consent(p_tenant_id, b.recipient_id, c.channel, b.category) consent;
    update pg_temp._batch b
       set response = jsonb_build_object(
               'id', b.request_id, 'created_at', v_now,
               'status', case when d.all_suppressed then 'suppressed' else 'accepted' end,
               'deliveries', d.deliveries)
           || case when pg_catalog.current_setting('notify.test', true) = 'true' then '{"test": true}'::jsonb else '{}' end
      from (select i, bool_and(status = 'suppressed') as all_suppressed,
                   jsonb_agg(jsonb_strip_nulls(jsonb_build_object('id', id, 'channel', channel, 'status', status, 'reason', reason))
                             order by ord) as deliveries
              from pg_temp._batch_deliveries group by i) d
     where d.i = b.i;

    -- 5. Claim the keys. One a concurrent twin took meanwhile (it waited for the twin's commit) leaves its item to the
    --    item-by-item path, which replays it.
    insert into notify.notification_requests
        (tenant_id, id, idempotency_key, fingerprint, recipient_id, recipient_count, template_key, variables, category,
         channels, metadata, response, priority)
    select p_tenant_id, b.request_id, b.key, sha256(convert_to(b.body::text, 'UTF8')), b.recipient_id, 1, b.template,
           case when b.response ->> 'status' = 'suppressed' then '{}'::jsonb else b.variables end, b.category, b.channels, b.metadata, b.response, b.priority
      from pg_temp._batch b order by b.i
    on conflict (tenant_id, idempotency_key, test) do nothing;
    get diagnostics v_claimed = row_count;
    if v_claimed < (select count(*) from pg_temp._batch) then
        delete from pg_temp._batch b
         where not exists (select from notify.notification_requests q where q.tenant_id = p_tenant_id and q.id = b.request_id);
    end if;

    -- 6. The deliveries, the worker's wake-up (due now: the usual body has no send_at), the answers.
    perform notify._set_source('submit');
    insert into notify.notification_deliveries
        (tenant_id, id, request_id, recipient_id, channel, address, template_locale, status, reason, due_at, priority)
    select p_tenant_id, d.id, b.request_id, b.recipient_id, d.channel, d.address, d.template_locale, d.status, d.reason, v_now,
           b.priority
      from pg_temp._batch_deliveries d join pg_temp._batch b on b.i = d.i
     order by d.i, d.ord;
    perform notify._wake(x.channel)
       from (select distinct d.channel from pg_temp._batch_deliveries d join pg_temp._batch b on b.i = d.i
              where d.status = 'queued') x
      order by x.channel;
    return query
        select b.i, jsonb_build_object('index', b.i, 'outcome', 'accepted', 'status', 202, 'body', b.response)
          from pg_temp._batch b order by b.i;
    drop table pg_temp._batch, pg_temp._batch_templates, pg_temp._batch_deliveries;
end
$$;
comment on function notify._submit_batch_usual(uuid, jsonb) is
    'The set-based half of submit_notifications_v1: the items with a usual body that will succeed (notify._is_usual_submission, valid recipient, templates and variables present, key and recipient not shared with another item) are taken together, a statement per step instead of per item; their answers, by item index. Leaves every other item, and every item that would fail, to the item-by-item path.';


