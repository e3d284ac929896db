-- notify_api: submit, read and cancel notifications.
-- Called by POST/GET /internal/notifications and by trusted SQL clients inside their own transactions.

-- One submission path: the body is read once into a notify.submission; a single recipient and a fan-out then share
-- the idempotency claim (_claim_submission), template resolution (_resolve_template, sql/030_helpers.sql) and the
-- wake-up (_wake_submission). Only what differs in kind is their own: the single recipient's few rows in one statement each,
-- the fan-out's set-based statements over an analyzed temporary table (sql/072_api_fanout.sql).
create type notify.submission as (
    idempotency_key text,
    fingerprint bytea,
    recipient jsonb,
    recipients jsonb,
    channels notify.channel[],
    template text,
    variables jsonb,
    category text,
    send_at timestamptz,
    expires_at timestamptz,
    metadata jsonb,
    callback_url text,
    -- Added by migration 0034 (issue #14): the route, normalized (notify._parse_route; null: channels, every one sent),
    -- whose channels are also in channels, in step order; and the priority (never null: normal unless given).
    route jsonb,
    priority notify.priority
);
comment on type notify.submission is
    'A submission body read and checked once (notify._parse_submission): recipient (one, the object) or recipients (a fan-out, the list, checked by notify._submit_fanout), and what every recipient shares. fingerprint is the body''s SHA-256, compared on replay. route: the fallback route normalized ([{channel, until, within?}], until filled in), or null when the body named channels; channels is then the route''s channels in step order. priority: high, normal or bulk (normal unless given).';

create function notify._parse_submission(p_tenant_id uuid, p_request jsonb, p_idempotency_key text)
    returns notify.submission
    language plpgsql
    stable
    set search_path = pg_catalog, pg_temp
as $$
declare
    s notify.submission;
begin
    -- The usual body (one recipient; channels, template, variables, category, metadata; no times, no callback URL) is
    -- recognised by one jsonpath predicate (notify._is_usual_submission) and read without the checks below, which every
    -- other body takes (each of its errors names its field). The predicate accepts only bodies the checks below accept.
    -- (Each PL/pgSQL expression is compiled once per transaction: for one submission per transaction, fewer of them is
    -- what makes this cheap. docs/benchmarks.md)
    if notify._is_usual_submission(p_request)
       and (p_idempotency_key is null or (p_idempotency_key ~ '^[\x21-\x7e]+$' and length(p_idempotency_key) <= 255)) then
        s := row(p_idempotency_key, sha256(convert_to(p_request::text, 'UTF8')), p_request -> 'recipient', null,
                 string_to_array(translate((p_request -> 'channels')::text, '[]" ', ''), ',')::notify.channel[],
                 p_request ->> 'template', coalesce(nullif(p_request -> 'variables', 'null'), '{}'), p_request ->> 'category',
                 null, null, coalesce(nullif(p_request -> 'metadata', 'null'), '{}'), null,
                 null, coalesce((p_request ->> 'priority')::notify.priority, 'normal'))::notify.submission;
        if cardinality(s.channels) = 1 or cardinality(s.channels) = (select count(distinct c) from unnest(s.channels) c) then
            return s;
        end if;
    end if;
    -- Every error names its field; nothing is written yet.
    if p_request is null or jsonb_typeof(p_request) <> 'object' then
        perform notify._raise('ND400', 'invalid_type', 'body must be a JSON object', '');
    end if;
    perform notify._check_keys(p_request,
        array['recipient', 'recipients', 'channels', 'route', 'template', 'variables', 'category', 'send_at', 'expires_at', 'metadata',
              'callback_url', 'priority'], '');
    if (p_request ? 'recipient') = (p_request ? 'recipients') then
        perform notify._raise('ND400', 'missing_field', 'give either recipient (one) or recipients (a fan-out), not both', 'recipient');
    end if;
    if p_request ? 'recipient' then
        if jsonb_typeof(p_request -> 'recipient') is distinct from 'object' then
            perform notify._raise('ND400', 'missing_field', 'recipient is required and must be an object', 'recipient');
        end if;
        perform notify._check_keys(p_request -> 'recipient', array['ref', 'addresses', 'locale', 'timezone'], 'recipient');
        s.recipient := p_request -> 'recipient';
    else
        s.recipients := p_request -> 'recipients';
    end if;
    -- channels (every one sent) or a route (an ordered fallback, notify._parse_route): exactly one of the two (a null
    -- one is absent, as for the other fields).
    if coalesce(p_request -> 'route', 'null') <> 'null' and coalesce(p_request -> 'channels', 'null') <> 'null' then
        perform notify._raise('ND400', 'invalid_value', 'give either channels (every one sent) or route (a fallback, in order), not both', 'route');
    end if;
    if coalesce(p_request -> 'route', 'null') <> 'null' then
        s.route := notify._parse_route(p_request -> 'route');
        select array_agg((e ->> 'channel')::notify.channel order by i) into s.channels
          from jsonb_array_elements(s.route) with ordinality as x(e, i);
    else
        if jsonb_typeof(p_request -> 'channels') is distinct from 'array' or jsonb_array_length(p_request -> 'channels') = 0 then
            perform notify._raise('ND400', 'missing_field', 'channels (or route) must be a non-empty list', 'channels');
        end if;
        select array_agg(notify._channel_field(c, 'channels[' || (i - 1) || ']') order by i)
          into s.channels
          from jsonb_array_elements(p_request -> 'channels') with ordinality as e(c, i);
        if cardinality(s.channels) <> (select count(distinct c) from unnest(s.channels) c) then
            perform notify._raise('ND400', 'duplicate_channel', 'channels must not repeat a channel', 'channels');
        end if;
    end if;
    s.priority := notify._priority_field(p_request -> 'priority');
    s.template := notify._text_field(p_request, 'template', '', true, 100);
    s.variables := coalesce(p_request -> 'variables', '{}');
    if jsonb_typeof(s.variables) = 'null' then s.variables := '{}'; end if;
    if jsonb_typeof(s.variables) <> 'object' then
        perform notify._raise('ND400', 'invalid_type', 'variables must be an object', 'variables');
    end if;
    s.category := notify._text_field(p_request, 'category', '', false, 100);
    s.send_at := notify._time_field(p_request, 'send_at', '');
    s.expires_at := notify._time_field(p_request, 'expires_at', '');
    if s.expires_at is not null and s.expires_at <= now() then
        perform notify._raise('ND422', 'invalid_expiry', 'expires_at must be in the future', 'expires_at');
    end if;
    if s.expires_at is not null and s.send_at is not null and s.expires_at <= s.send_at then
        perform notify._raise('ND422', 'invalid_expiry', 'expires_at must be after send_at', 'expires_at');
    end if;
    s.metadata := coalesce(p_request -> 'metadata', '{}');
    if jsonb_typeof(s.metadata) = 'null' then s.metadata := '{}'; end if;
    if jsonb_typeof(s.metadata) <> 'object' then
        perform notify._raise('ND400', 'invalid_type', 'metadata must be an object', 'metadata');
    end if;
    if p_idempotency_key is not null and (p_idempotency_key !~ '^[\x21-\x7e]+$' or length(p_idempotency_key) > 255) then
        perform notify._raise('ND400', 'invalid_idempotency_key', 'Idempotency-Key must be 1-255 printable ASCII characters', 'Idempotency-Key');
    end if;
    s.idempotency_key := p_idempotency_key;
    s.callback_url := notify._text_field(p_request, 'callback_url', '', false, 2000);
    if s.callback_url is not null then
        if not notify._is_http_url(s.callback_url) then
            perform notify._raise('ND400', 'invalid_format', 'callback_url must be an http(s) URL without credentials or fragment', 'callback_url');
        end if;
        if not exists (select from notify.callback_endpoints e where e.tenant_id = p_tenant_id and e.enabled) then
            perform notify._raise('ND422', 'callbacks_not_configured',
                'set up callbacks first (PUT /internal/callbacks): that gives the secret callbacks are signed with', 'callback_url');
        end if;
    end if;
    s.fingerprint := sha256(convert_to(p_request::text, 'UTF8'));
    return s;
end
$$;
comment on function notify._parse_submission(uuid, jsonb, text) is
    'Reads and checks a submission body (everything but the recipients themselves) into a notify.submission, refusing the first wrong field by name. Writes nothing.';

create function notify._claim_submission(p_tenant_id uuid, s notify.submission, p_recipient_id uuid, p_recipient_count integer,
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

create function notify._wake_submission(s notify.submission, p_channels notify.channel[])
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

create function notify_api.submit_notification_v1(p_tenant_id uuid, p_request jsonb, p_idempotency_key text default null)
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

create function notify._delivery_json(d notify.notification_deliveries, p_detail boolean)
    returns jsonb
    language sql
    stable
    set search_path = pg_catalog, pg_temp
as $$
    select jsonb_strip_nulls(jsonb_build_object(
        'id', d.id, 'channel', d.channel, 'step', d.route_step, 'status', d.status, 'reason', d.reason, 'attempts', d.attempt,
        'test', case when d.test then true end, 'provider', d.provider, 'provider_message_id', d.provider_message_id,
        'error', case when d.last_error_code is not null or d.last_error_message is not null
                      then jsonb_build_object('code', d.last_error_code, 'message', d.last_error_message) end,
        'due_at', d.due_at, 'expires_at', d.expires_at, 'created_at', d.created_at, 'updated_at', d.updated_at,
        'sent_at', d.sent_at, 'delivered_at', d.delivered_at, 'read_at', d.read_at, 'opened_at', d.opened_at,
        'finished_at', d.finished_at, 'pricing', d.pricing))
    || case when p_detail then jsonb_build_object(
        'events', coalesce((select jsonb_agg(jsonb_strip_nulls(jsonb_build_object(
                        'seq', e.seq, 'from', e.from_status, 'to', e.to_status, 'source', e.source, 'reason', e.reason,
                        'at', e.occurred_at)) order by e.seq, e.id)
                    from notify.delivery_events e where e.tenant_id = d.tenant_id and e.delivery_id = d.id), '[]'),
        'attempt_history', coalesce((select jsonb_agg(jsonb_strip_nulls(jsonb_build_object(
                        'attempt', a.attempt, 'started_at', a.started_at, 'finished_at', a.finished_at, 'outcome', a.outcome,
                        'provider', a.provider, 'provider_message_id', a.provider_message_id,
                        'error_code', a.error_code, 'error_message', a.error_message)) order by a.attempt)
                    from notify.delivery_attempts a where a.tenant_id = d.tenant_id and a.delivery_id = d.id), '[]'))
       else '{}' end
$$;
comment on function notify._delivery_json(notify.notification_deliveries, boolean) is
    'The public JSON form of a delivery (step: its place in the request''s route, when it has one; timestamps include opened_at, the first e-mail open or click reported; "test": true for a test delivery; pricing, what the provider said it cost), with its history when p_detail.';

create function notify_api.get_notification_v1(p_tenant_id uuid, p_id uuid)
    returns jsonb
    language plpgsql
    stable
    security definer
    set search_path = pg_catalog, pg_temp
as $$
declare
    v notify.notification_requests;
    v_deliveries jsonb;
    v_open boolean;
begin
    perform notify._enter(p_tenant_id);
    select * into v from notify.notification_requests r where r.tenant_id = p_tenant_id and r.id = p_id;
    if v.id is null then
        perform notify._raise('ND404', 'not_found', 'no such notification', 'id');
    end if;
    select jsonb_agg(notify._delivery_json(d, true) order by array_position(v.channels, d.channel), d.id),
           bool_or(d.status in ('scheduled', 'queued', 'sending', 'unknown', 'held', 'waiting'))
      into v_deliveries, v_open
      from notify.notification_deliveries d where d.tenant_id = p_tenant_id and d.request_id = p_id;
    return jsonb_strip_nulls(jsonb_build_object(
        'id', v.id, 'status', case when v_open then 'in_progress' else 'completed' end,
        'created_at', v.created_at, 'idempotency_key', v.idempotency_key,
        'recipient', (select r.ref from notify.recipients r where r.tenant_id = v.tenant_id and r.id = v.recipient_id),
        'recipient_count', case when v.recipient_id is null then v.recipient_count end,
        'template', v.template_key, 'category', v.category, 'channels', to_jsonb(v.channels),
        'send_at', v.send_at, 'expires_at', v.expires_at, 'metadata', v.metadata, 'http_request_id', v.http_request_id,
        'callback_url', v.callback_url, 'test', case when v.test then true end, 'route', v.route, 'priority', v.priority))
        || jsonb_build_object('deliveries', coalesce(v_deliveries, '[]'));
end
$$;
comment on function notify_api.get_notification_v1(uuid, uuid) is
    'A notification with every delivery''s status, attempts, provider message id, timestamps and event history ("test": true for a test key''s; its route and each delivery''s step, when it has one; its priority). 404 for another tenant''s id.';

create function notify_api.cancel_notification_v1(p_tenant_id uuid, p_id uuid)
    returns jsonb
    language plpgsql
    security definer
    set search_path = pg_catalog, pg_temp
as $$
declare
    v_result jsonb;
begin
    perform notify._enter(p_tenant_id);
    if not exists (select from notify.notification_requests r where r.tenant_id = p_tenant_id and r.id = p_id) then
        perform notify._raise('ND404', 'not_found', 'no such notification', 'id');
    end if;
    perform notify._set_source('cancel');
    -- Lock every delivery (waiting for a claim in progress), then cancel only what no worker has claimed.
    with locked as (
        -- FOR UPDATE returns each row's latest committed version, so a claim that won the race shows as sending.
        select d.id, d.channel, d.status from notify.notification_deliveries d
         where d.tenant_id = p_tenant_id and d.request_id = p_id
         order by d.id
           for update
    ), cancelled as (
        update notify.notification_deliveries d set status = 'cancelled', reason = 'cancelled_by_caller'
          from locked l
         where d.tenant_id = p_tenant_id and d.id = l.id and l.status in ('scheduled', 'queued', 'held', 'waiting')
           and d.status in ('scheduled', 'queued', 'held', 'waiting')
        returning d.id
    )
    select jsonb_build_object('id', p_id, 'deliveries', jsonb_agg(jsonb_build_object(
               'id', l.id, 'channel', l.channel,
               'status', case when c.id is not null then 'cancelled' else l.status::text end,
               'cancelled', c.id is not null,
               'reason', case when c.id is not null then 'cancelled'
                              when l.status = 'sending' then 'already_sending'
                              else 'already_' || l.status end) order by l.channel))
      into v_result
      from locked l
      left join cancelled c on c.id = l.id;
    return v_result;
end
$$;
comment on function notify_api.cancel_notification_v1(uuid, uuid) is
    'Cancels the deliveries of a notification that no worker has claimed yet; says per delivery whether it was cancelled and, if not, why.';
