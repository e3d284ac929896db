-- 0047: idempotency scopes per mode, and one lock order for a submission's recipients (issue #16 review).
-- A test key's submissions and the live ones shared a tenant's idempotency keys: a test submission with the key of a
-- live request replayed the live answer (or was refused as another body), and a live submission after a test one with
-- the same key replayed the TEST request, so the live notification was never sent. The request's test flag is now part
-- of the key's unique constraint, and every claim and lookup of a key (the single and fan-out submission, the batch's
-- set-based path, the replay) reads the caller's scope from the transaction setting notify.test (as the column's
-- default does): test and live are two key spaces, like a payment provider's test and live modes.
-- And concurrent batches or fan-outs naming the same new recipients in other orders could deadlock (one aborted with
-- deadlock_detected: a lost submission). Every multi-recipient path now takes its recipient rows, known recipients'
-- locale changes, address rows and (the batch) idempotency keys in ref (key) order; a batch's item-by-item items run in
-- their recipients' ref order (items sharing a key or a ref keep their order among themselves), and its worker wake-ups
-- (a lock each until commit) come after its last item (notify._wake_submission notes them in the setting notify.wakes).

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
    --    Every row is taken in ref order (new recipients, then the known ones whose locale changes, then addresses),
    --    whatever the items' order, as the fan-out takes them: concurrent batches naming the same recipients in other
    --    orders only wait for each other, never deadlock. (The answers keep the items' order.)
    insert into notify.recipients (tenant_id, ref, locale)
    select p_tenant_id, b.ref, b.locale from pg_temp._batch b where b.recipient_id is null order by b.ref
    on conflict (tenant_id, ref) do nothing;
    update notify.recipients r set locale = c.locale, updated_at = now()
      from (select r0.id, b.locale
              from pg_temp._batch b join notify.recipients r0 on r0.tenant_id = p_tenant_id and r0.id = b.recipient_id
             where b.locale is not null and b.locale is distinct from r0.locale
             order by r0.ref
               for no key update of r0) c
     where r.tenant_id = p_tenant_id and r.id = c.id;
    update pg_temp._batch b set recipient_id = r.id
      from notify.recipients r
     where b.recipient_id is null and r.tenant_id = p_tenant_id and r.ref = b.ref;
    insert into notify.recipient_addresses as a (tenant_id, recipient_id, channel, address)
    select p_tenant_id, b.recipient_id, kv.key::notify.channel, kv.value #>> '{}'
      from pg_temp._batch b cross join lateral jsonb_each(coalesce(b.addresses, '{}')) with ordinality kv(key, value, n)
     where jsonb_typeof(kv.value) = 'string'
       and not exists (select from notify.recipient_addresses x
                        where x.tenant_id = p_tenant_id and x.recipient_id = b.recipient_id
                          and x.channel = kv.key::notify.channel and x.address = kv.value #>> '{}')
     order by b.ref, kv.n
    on conflict (tenant_id, recipient_id, channel) do update
        set address = excluded.address, updated_at = now()
        where a.address is distinct from excluded.address;
    with gone as (
        select a0.recipient_id, a0.channel
          from pg_temp._batch b cross join lateral jsonb_each(coalesce(b.addresses, '{}')) with ordinality kv(key, value, n)
          join notify.recipient_addresses a0
            on a0.tenant_id = p_tenant_id and a0.recipient_id = b.recipient_id and a0.channel = kv.key::notify.channel
         where jsonb_typeof(kv.value) = 'null'
         order by b.ref, kv.n
           for update of a0
    )
    delete from notify.recipient_addresses a
     using gone g
     where a.tenant_id = p_tenant_id and a.recipient_id = g.recipient_id and a.channel = g.channel;

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

    -- 5. Claim the keys, in key order (as the recipients, so that two batches with the same keys cannot deadlock
    --    either). One a concurrent twin took meanwhile (it waited for the twin's commit) leaves its item to the
    --    item-by-item path, which replays it.
    insert into notify.notification_requests
        (tenant_id, id, idempotency_key, fingerprint, recipient_id, recipient_count, template_key, variables, category,
         channels, metadata, response, priority)
    select p_tenant_id, b.request_id, b.key, sha256(convert_to(b.body::text, 'UTF8')), b.recipient_id, 1, b.template,
           case when b.response ->> 'status' = 'suppressed' then '{}'::jsonb else b.variables end, b.category, b.channels, b.metadata, b.response, b.priority
      from pg_temp._batch b order by b.key, b.i
    on conflict (tenant_id, idempotency_key, test) do nothing;
    get diagnostics v_claimed = row_count;
    if v_claimed < (select count(*) from pg_temp._batch) then
        delete from pg_temp._batch b
         where not exists (select from notify.notification_requests q where q.tenant_id = p_tenant_id and q.id = b.request_id);
    end if;

    -- 6. The deliveries, the worker's wake-up (due now: the usual body has no send_at; deferred to the batch's end by
    --    submit_notifications_v1, notify._wake_submission), the answers.
    perform notify._set_source('submit');
    insert into notify.notification_deliveries
        (tenant_id, id, request_id, recipient_id, channel, address, template_locale, status, reason, due_at, priority)
    select p_tenant_id, d.id, b.request_id, b.recipient_id, d.channel, d.address, d.template_locale, d.status, d.reason, v_now,
           b.priority
      from pg_temp._batch_deliveries d join pg_temp._batch b on b.i = d.i
     order by d.i, d.ord;
    perform notify._wake_submission(null, array(
        select distinct d.channel from pg_temp._batch_deliveries d join pg_temp._batch b on b.i = d.i where d.status = 'queued'));
    return query
        select b.i, jsonb_build_object('index', b.i, 'outcome', 'accepted', 'status', 202, 'body', b.response)
          from pg_temp._batch b order by b.i;
    drop table pg_temp._batch, pg_temp._batch_templates, pg_temp._batch_deliveries;
end
$$;
comment on function notify._submit_batch_usual(uuid, jsonb) is
    'The set-based half of submit_notifications_v1: the items with a usual body that will succeed (notify._is_usual_submission, valid recipient, templates and variables present, key and recipient not shared with another item) are taken together, a statement per step instead of per item; their answers, by item index. Leaves every other item, and every item that would fail, to the item-by-item path.';


create or replace function notify._wake_submission(s notify.submission, p_channels notify.channel[])
    returns void
    language plpgsql
    volatile
    set search_path = pg_catalog, pg_temp
as $$
declare
    v_deferred text := pg_catalog.current_setting('notify.wakes', true);
begin
    -- Inside a batch (submit_notifications_v1 sets notify.wakes to '+'), only noted: a wake-up's insert waits for a
    -- concurrent one of the same lock until that one commits, so taken between two items it would be a lock held
    -- while the next item's recipient is taken, and two batches could deadlock. The batch wakes them after its items.
    if v_deferred like '+%' then
        perform pg_catalog.set_config('notify.wakes', v_deferred || string_agg(c || '@' || coalesce(extract(epoch from s.send_at)::text, '') || ';', ''), true)
           from unnest(p_channels) c
          where c is not null
         having count(*) > 0;
        return;
    end if;
    -- With the caller's commit: now, or when the scheduled work falls due. In channel order, whatever order the
    -- caller gave: a wake-up's insert waits for a concurrent one of the same lock, so every submission takes them alike.
    perform notify._wake(c, case when s.send_at > now() then s.send_at end) from unnest(p_channels) c order by c;
end
$$;
comment on function notify._wake_submission(notify.submission, notify.channel[]) is
    'Wakes the worker for the channels a submission queued or scheduled deliveries on: now, or at send_at if it is in the future. Inside a batch (the transaction setting notify.wakes starts with +) it only appends them to that setting; submit_notifications_v1 wakes them after its last item.';


create or replace function notify._submit_fanout(p_tenant_id uuid, s notify.submission)
    returns table (response jsonb, replayed boolean)
    language plpgsql
    set search_path = pg_catalog, pg_temp
as $$
declare
    v_items jsonb := s.recipients;
    v_count integer;
    v_bad record;
    v_claim record;
    v_default_locale text;
    v_now timestamptz := now();
    v_response jsonb;
    v_channel_names text[] := enum_range(null::notify.channel)::text[];
    -- a route's steps: their goal and time limit, read once (not once per recipient)
    v_untils notify.delivery_status[] := array(select (e ->> 'until')::notify.delivery_status
                                                 from jsonb_array_elements(s.route) with ordinality x(e, i) order by i);
    v_withins interval[] := array(select notify._duration_field(e -> 'within', 'route')
                                    from jsonb_array_elements(s.route) with ordinality x(e, i) order by i);
begin
    if jsonb_typeof(v_items) is distinct from 'array' or jsonb_array_length(v_items) not between 1 and 10000 then
        perform notify._raise('ND400', 'invalid_length', 'recipients must be a list of 1 to 10000 recipients', 'recipients');
    end if;
    v_count := jsonb_array_length(v_items);

    -- 1. Every recipient checked set-based; the first offender is named.
    select i - 1 as idx, r, k into v_bad
      from jsonb_array_elements(v_items) with ordinality e(r, i)
      left join lateral (select k from jsonb_object_keys(case when jsonb_typeof(r) = 'object' then r else '{}' end) k
                          where k not in ('ref', 'addresses', 'locale', 'timezone', 'variables') limit 1) x on true
     where jsonb_typeof(r) <> 'object' or x.k is not null
        or jsonb_typeof(r -> 'ref') is distinct from 'string' or length(r ->> 'ref') not between 1 and 200
        or (r ? 'addresses' and jsonb_typeof(r -> 'addresses') not in ('object', 'null'))
        or (r ? 'variables' and jsonb_typeof(r -> 'variables') not in ('object', 'null'))
        or (jsonb_typeof(r -> 'locale') = 'string' and r ->> 'locale' !~ '^[A-Za-z]{2,3}(-[A-Za-z0-9]{2,8})*$')
        or (r ? 'locale' and jsonb_typeof(r -> 'locale') not in ('string', 'null'))
        or (r ? 'timezone' and jsonb_typeof(r -> 'timezone') not in ('string', 'null'))
     order by i limit 1;
    if found then
        perform notify._raise('ND400', case when v_bad.k is not null then 'unknown_field' else 'invalid_value' end,
            format('recipients[%s] is not a valid recipient (ref 1-200 characters; addresses, locale, timezone, variables)', v_bad.idx)
            || coalesce(': unknown field ' || v_bad.k, ''),
            format('recipients[%s]', v_bad.idx) || coalesce('.' || v_bad.k, ''));
    end if;
    select i - 1 as idx, a.key into v_bad
      from jsonb_array_elements(v_items) with ordinality e(r, i)
     cross join lateral jsonb_each(case when jsonb_typeof(r -> 'addresses') = 'object' then r -> 'addresses' else '{}' end) a
     where a.key <> all (v_channel_names)
        or (jsonb_typeof(a.value) <> 'null'
            and (jsonb_typeof(a.value) <> 'string' or not notify._address_valid(a.key::notify.channel, a.value #>> '{}')))
     order by i limit 1;
    if found then
        perform notify._raise('ND400', 'invalid_address', format('recipients[%s].addresses.%s is not a valid %s address', v_bad.idx, v_bad.key, v_bad.key),
                              format('recipients[%s].addresses.%s', v_bad.idx, v_bad.key));
    end if;
    select i - 1 as idx into v_bad
      from jsonb_array_elements(v_items) with ordinality e(r, i)
     where jsonb_typeof(r -> 'timezone') = 'string'
       and not exists (select from pg_catalog.pg_timezone_names z where z.name = r ->> 'timezone')
     order by i limit 1;
    if found then
        perform notify._raise('ND400', 'invalid_timezone', format('recipients[%s].timezone is not an IANA time zone', v_bad.idx),
                              format('recipients[%s].timezone', v_bad.idx));
    end if;
    select min(i) - 1 as idx, r ->> 'ref' as ref into v_bad
      from jsonb_array_elements(v_items) with ordinality e(r, i)
     group by r ->> 'ref' having count(*) > 1 order by min(i) limit 1;
    if found then
        perform notify._raise('ND400', 'duplicate_recipient', format('recipient %s appears more than once', v_bad.ref), 'recipients');
    end if;

    -- 2. Claim the idempotency key before the heavy work: a replay of a 10,000-recipient intent is one lookup.
    v_claim := notify._claim_submission(p_tenant_id, s, null, v_count, null, null);
    if v_claim.request_id is null then
        response := v_claim.replay;
        replayed := true;
        return next;
        return;
    end if;

    -- 3. Recipients and their addresses, set-based. The input goes into an analyzed temporary table first, so
    --    the planner knows it has v_count rows (a function scan is estimated at 100) and joins accordingly.
    --    Our temporary tables are always new: a table of that name the caller planted in pg_temp (its triggers would
    --    run as this function's owner) makes the create fail. They are dropped before returning, because a batch
    --    fans out many times in one transaction; an error rolls their creation back with everything else.
    create temporary table pg_temp._fanout_input (
        i integer, ref text, addresses jsonb, locale text, timezone text, variables jsonb, recipient_id uuid, effective_locale text
    ) on commit drop;
    insert into pg_temp._fanout_input (i, ref, addresses, locale, timezone, variables)
    select i, r ->> 'ref', case when jsonb_typeof(r -> 'addresses') = 'object' then r -> 'addresses' end, r ->> 'locale',
           r ->> 'timezone', case when jsonb_typeof(r -> 'variables') = 'object' then r -> 'variables' end
      from jsonb_array_elements(v_items) with ordinality e(r, i);
    analyze pg_temp._fanout_input;

    --    Every recipient row (and then every address row) is taken in ref order, whatever the order of the list: two
    --    submissions naming the same recipients in other orders can then only wait for each other, never deadlock
    --    (the batch, below, takes them alike).
    insert into notify.recipients as x (tenant_id, ref, locale, timezone)
    select p_tenant_id, f.ref, f.locale, f.timezone from pg_temp._fanout_input f order by f.ref
    on conflict (tenant_id, ref) do update
        set locale = coalesce(excluded.locale, x.locale), timezone = coalesce(excluded.timezone, x.timezone),
            updated_at = now()
        where (excluded.locale is not null and excluded.locale is distinct from x.locale)
           or (excluded.timezone is not null and excluded.timezone is distinct from x.timezone);
    v_default_locale := (select default_locale from notify.tenants where id = p_tenant_id);
    update pg_temp._fanout_input f set recipient_id = rec.id, effective_locale = coalesce(rec.locale, v_default_locale)
      from notify.recipients rec
     where rec.tenant_id = p_tenant_id and rec.ref = f.ref;
    analyze pg_temp._fanout_input;

    -- (A recipient's addresses in the order jsonb_each gives them, as notify._upsert_recipient takes them.)
    insert into notify.recipient_addresses as a (tenant_id, recipient_id, channel, address)
    select p_tenant_id, f.recipient_id, kv.key::notify.channel, kv.value #>> '{}'
      from pg_temp._fanout_input f cross join lateral jsonb_each(coalesce(f.addresses, '{}')) with ordinality kv(key, value, n)
     where jsonb_typeof(kv.value) = 'string'
     order by f.ref, kv.n
    on conflict (tenant_id, recipient_id, channel) do update
        set address = excluded.address, updated_at = now()
        where a.address is distinct from excluded.address;
    with gone as (
        select a0.recipient_id, a0.channel
          from pg_temp._fanout_input f cross join lateral jsonb_each(coalesce(f.addresses, '{}')) with ordinality kv(key, value, n)
          join notify.recipient_addresses a0
            on a0.tenant_id = p_tenant_id and a0.recipient_id = f.recipient_id and a0.channel = kv.key::notify.channel
         where jsonb_typeof(kv.value) = 'null'
         order by f.ref, kv.n
           for update of a0
    )
    delete from notify.recipient_addresses a
     using gone g
     where a.tenant_id = p_tenant_id and a.recipient_id = g.recipient_id and a.channel = g.channel;

    -- 4. Templates per channel and distinct locale (resolved once each), and the variables every recipient needs.
    create temporary table pg_temp._fanout_templates (
        channel notify.channel, locale text, template_locale text, required_variables text[]) on commit drop;
    insert into pg_temp._fanout_templates
    select c.channel, l.locale, t.locale, t.required_variables
      from unnest(s.channels) c(channel)
     cross join (select distinct f.effective_locale as locale from pg_temp._fanout_input f) l
     cross join lateral notify._resolve_template(p_tenant_id, s.template, c.channel, l.locale) t;
    select channel, locale into v_bad from pg_temp._fanout_templates where template_locale is null limit 1;
    if found then
        perform notify._raise('ND422', 'template_not_found',
            format('template %s has no %s content for locale %s or its fallbacks', s.template, v_bad.channel, v_bad.locale), 'template');
    end if;
    select f.i - 1 as idx, need.v into v_bad
      from pg_temp._fanout_input f
      join pg_temp._fanout_templates t on t.locale = f.effective_locale
     cross join lateral unnest(t.required_variables) need(v)
     where not (s.variables || coalesce(f.variables, '{}')) ? need.v
     order by f.i limit 1;
    if found then
        perform notify._raise('ND422', 'missing_variables', format('template %s needs variable %s for recipients[%s]', s.template, v_bad.v, v_bad.idx),
                              format('recipients[%s].variables.%s', v_bad.idx, v_bad.v));
    end if;

    -- 5. One delivery per recipient and channel, consent checked set-based. With a route, one route per recipient, as
    --    for one recipient (submit_notification_v1): the first step not suppressed is due, the later ones wait, and
    --    each recipient's ids are in step order.
    perform notify._set_source('submit');
    with rows as materialized (
        select f.recipient_id, c.channel, a.address, t.template_locale, f.variables, consent.allowed, f.i, c.ord,
               min(c.ord) filter (where a.address is not null and consent.allowed) over (partition by f.i) as active,
               f.ids[c.ord] as id
          from (select f0.*, array(select notify._uuidv7() from unnest(s.channels) where f0.i is not null order by 1) as ids
                  from pg_temp._fanout_input f0 offset 0) f
         cross join unnest(s.channels) with ordinality c(channel, ord)
          join pg_temp._fanout_templates t on t.channel = c.channel and t.locale = f.effective_locale
          left join notify.recipient_addresses a on a.tenant_id = p_tenant_id and a.recipient_id = f.recipient_id and a.channel = c.channel
         cross join lateral notify._consent(p_tenant_id, f.recipient_id, c.channel, s.category) consent
    ), decided as (
        select r.*,
               case when r.address is null or not r.allowed then 'suppressed'
                    when s.route is not null and r.ord > r.active then 'waiting'
                    when s.send_at > v_now then 'scheduled' else 'queued' end::notify.delivery_status as status,
               case when r.address is null then 'no_address' when not r.allowed then 'no_consent'
                    when s.route is not null and r.ord = r.active and r.ord > 1 then format('step_%s_suppressed', r.ord - 1) end as reason
          from rows r
    ), inserted as (
        insert into notify.notification_deliveries
            (tenant_id, id, request_id, recipient_id, channel, address, template_locale, variables, status, reason, due_at, expires_at,
             route_step, route_until, route_within, priority)
        -- A suppressed delivery is never sent: its per-recipient variables are not kept.
        select p_tenant_id, id, v_claim.request_id, recipient_id, channel, address, template_locale,
               case when status <> 'suppressed' then variables end, status, reason,
               case when status = 'waiting' then 'infinity' else greatest(coalesce(s.send_at, v_now), v_now) end, s.expires_at,
               case when s.route is not null then ord end, v_untils[ord], v_withins[ord], s.priority
          from decided order by i, ord
        returning channel, status, reason
    ), counted as (
        select channel, status, reason, count(*) as n from inserted group by channel, status, reason
    )
    select jsonb_build_object(
               'id', v_claim.request_id, 'created_at', v_now, 'recipient_count', v_count,
               'status', case when bool_and(status = 'suppressed') then 'suppressed' else 'accepted' end,
               'summary', jsonb_agg(jsonb_strip_nulls(jsonb_build_object('channel', channel, 'status', status, 'reason', reason, 'count', n))
                                    order by channel, status, reason))
           || case when pg_catalog.current_setting('notify.test', true) = 'true' then '{"test": true}'::jsonb else '{}' end
      into v_response
      from counted;

    -- Every delivery suppressed: nothing will be sent, so the request keeps no variables (as a single intent's).
    update notify.notification_requests r
       set response = v_response, variables = case when v_response ->> 'status' = 'suppressed' then '{}' else r.variables end
     where r.tenant_id = p_tenant_id and r.id = v_claim.request_id;
    perform notify._wake_submission(s, array(
        select c from unnest(s.channels) c
         where exists (select from jsonb_array_elements(v_response -> 'summary') x
                        where x ->> 'channel' = c::text and x ->> 'status' in ('queued', 'scheduled'))));
    drop table pg_temp._fanout_input, pg_temp._fanout_templates;
    response := v_response;
    replayed := false;
    return next;
end
$$;
comment on function notify._submit_fanout(uuid, notify.submission) is
    'The fan-out half of submit_notification_v1, given the body it read (notify._parse_submission): up to 10,000 recipients, each with optional per-recipient variables; the same idempotency claim, template resolution and wake-up as one recipient, but recipients, addresses, template checks, consent and deliveries are set-based statements, not per-row round trips. The response summarizes deliveries by channel, status and reason.';


create or replace function notify_api.submit_notifications_v1(p_tenant_id uuid, p_items jsonb)
    returns jsonb
    language plpgsql
    security definer
    set search_path = pg_catalog, pg_temp
as $$
declare
    v_item jsonb;
    v_index integer;
    v_key text;
    v_row record;
    v_results jsonb[];
    v_state text;
    v_message text;
    v_type text;
    v_field text;
    v_changed integer;
    v_wakes text;
begin
    perform notify._enter(p_tenant_id);
    if jsonb_typeof(p_items) is distinct from 'array' or jsonb_array_length(p_items) not between 1 and 1000 then
        perform notify._raise('ND400', 'invalid_length', 'items must be a list of 1 to 1000 intents', 'items');
    end if;
    -- The usual items together (notify._submit_batch_usual), then every other one alone; the worker woken after all of
    -- them (notify._wake_submission notes the channels meanwhile), so no wake-up's lock is held between two items.
    perform pg_catalog.set_config('notify.wakes', '+', true);
    v_results := array_fill(null::jsonb, array[jsonb_array_length(p_items)]);
    for v_row in select * from notify._submit_batch_usual(p_tenant_id, p_items) loop
        v_results[v_row.idx + 1] := v_row.result;
    end loop;
    -- The other items in the order of their recipients' refs (a fan-out item: its first ref), as every multi-recipient
    -- path takes its recipients, so two batches can only wait for each other, never deadlock. Items that share a key or
    -- a ref with another stay in the items' order among themselves: each such group is ordered by its first ref
    -- (propagated until no group changes); items that share neither are independent, their order is not visible.
    if array_position(v_results, null) is not null then
        create temporary table pg_temp._batch_order (i integer primary key, key text, refs text[], label text) on commit drop;
        insert into pg_temp._batch_order (i, key, refs)
        select e.i, case when jsonb_typeof(e.value -> 'idempotency_key') = 'string' then e.value ->> 'idempotency_key' end,
               array(select distinct x.ref
                       from (select e.value -> 'notification' -> 'recipient' ->> 'ref' as ref
                             union all
                             select r ->> 'ref'
                               from jsonb_array_elements(case when jsonb_typeof(e.value -> 'notification' -> 'recipients') = 'array'
                                                              then e.value -> 'notification' -> 'recipients' else '[]' end) r) x
                      where x.ref is not null order by 1)
          from jsonb_array_elements(p_items) with ordinality e(value, i)
         where v_results[e.i] is null;
        update pg_temp._batch_order set label = refs[1];
        loop
            update pg_temp._batch_order o set label = g.label
              from (select key, min(label) as label from pg_temp._batch_order where key is not null group by key) g
             where o.key = g.key and g.label is not null and (o.label is null or o.label > g.label);
            get diagnostics v_changed = row_count;
            update pg_temp._batch_order o set label = g.label
              from (select ref, min(label) as label from pg_temp._batch_order, unnest(refs) ref group by ref) g
             where g.ref = any (o.refs) and g.label is not null and (o.label is null or o.label > g.label);
            exit when v_changed = 0 and not found;
        end loop;
        for v_item, v_index in select e.value, e.i - 1 from jsonb_array_elements(p_items) with ordinality e(value, i)
                                 left join pg_temp._batch_order o on o.i = e.i
                                where v_results[e.i] is null
                                order by o.label, e.i loop
            begin
                -- Each item is its own subtransaction: a bad one is rolled back alone and reported; the others stay.
                if jsonb_typeof(v_item) <> 'object' or jsonb_typeof(v_item -> 'notification') <> 'object' then
                    perform notify._raise('ND400', 'invalid_type', 'each item is {"idempotency_key"?, "notification": {...}}', 'notification');
                end if;
                perform notify._check_keys(v_item, array['idempotency_key', 'notification'], '');
                v_key := notify._text_field(v_item, 'idempotency_key', '', false, 255);
                select * into v_row from notify_api.submit_notification_v1(p_tenant_id, v_item -> 'notification', v_key);
                v_results[v_index + 1] := jsonb_build_object(
                    'index', v_index, 'outcome', case when v_row.replayed then 'replayed' else 'accepted' end,
                    'status', case when v_row.replayed then 200 else 202 end, 'body', v_row.response);
            exception
                when sqlstate 'ND400' or sqlstate 'ND404' or sqlstate 'ND409' or sqlstate 'ND422' then
                    get stacked diagnostics v_state = returned_sqlstate, v_message = message_text,
                                            v_type = constraint_name, v_field = column_name;
                    v_results[v_index + 1] := jsonb_build_object(
                        'index', v_index, 'outcome', 'error', 'status', substr(v_state, 3)::integer,
                        'error', jsonb_strip_nulls(jsonb_build_object('type', v_type, 'detail', v_message, 'field', nullif(v_field, ''))));
            end;
        end loop;
        drop table pg_temp._batch_order;
    end if;
    -- The wake-ups noted meanwhile, each once, in channel order (as every submission takes them).
    v_wakes := ltrim(pg_catalog.current_setting('notify.wakes', true), '+');
    perform pg_catalog.set_config('notify.wakes', '', true);
    perform notify._wake(x.channel, case when x.at > now() then x.at end)
       from (select distinct split_part(w, '@', 1)::notify.channel as channel,
                             to_timestamp(nullif(split_part(w, '@', 2), '')::double precision) as at
               from unnest(string_to_array(v_wakes, ';')) w where w <> '') x
      order by x.channel, x.at nulls first;
    return (select jsonb_build_object('items', jsonb_agg(r order by i),
                                      'accepted', count(*) filter (where r ->> 'outcome' = 'accepted'),
                                      'replayed', count(*) filter (where r ->> 'outcome' = 'replayed'),
                                      'failed', count(*) filter (where r ->> 'outcome' = 'error'))
              from unnest(v_results) with ordinality u(r, i));
end
$$;
comment on function notify_api.submit_notifications_v1(uuid, jsonb) is
    'Batch: up to 1,000 independent intents [{idempotency_key?, notification}] in one call. The usual ones are taken set-based (notify._submit_batch_usual); every other item succeeds or fails alone (its own subtransaction). The answer reports each item''s outcome in order: accepted, replayed, or its error.';


