-- 0034: fallback routes and the priority field of a submission (issue #14, part 1).
-- A submission may give route instead of channels: [{channel, until?, within?}, ...] (until: sent | delivered | read,
-- delivered by default; within: an ISO 8601 duration, at most 30 days). Every step's delivery exists from submit on:
-- the first step not suppressed is due (queued or scheduled), the later ones wait (status waiting, due_at 'infinity');
-- their ids are in step order. A priority (high | normal | bulk, normal by default) is stored on the request and on
-- each delivery. notify.submission carries both (route, priority).

alter type notify.submission add attribute route jsonb, add attribute priority notify.priority;
comment on type notify.submission is
    'A submission body read and checked once (notify._parse_submission): recipient (one, the object) or recipients (a fan-out, the list, checked by notify._submit_fanout), and what every recipient shares. fingerprint is the body''s SHA-256, compared on replay. route: the fallback route normalized ([{channel, until, within?}], until filled in), or null when the body named channels; channels is then the route''s channels in step order. priority: high, normal or bulk (normal unless given).';

create or replace function notify._duration_field(p_value jsonb, p_path text)
    returns interval
    language plpgsql
    immutable
    set search_path = pg_catalog, pg_temp
as $$
declare
    v text;
    m text[];
    v_interval interval;
begin
    if p_value is null or jsonb_typeof(p_value) = 'null' then
        return null;
    end if;
    if jsonb_typeof(p_value) <> 'string' then
        perform notify._raise('ND400', 'invalid_type', format('%s must be an ISO 8601 duration such as PT15M', p_path), p_path);
    end if;
    v := p_value #>> '{}';
    -- Weeks, days, hours, minutes and seconds only: a year or a month has no fixed length.
    m := regexp_match(v, '^P(?:([0-9]+)W)?(?:([0-9]+)D)?(?:T(?:([0-9]+)H)?(?:([0-9]+)M)?(?:([0-9]+(?:[.,][0-9]+)?)S)?)?$');
    if m is null or length(v) > 40 or v in ('P', 'PT') or right(v, 1) = 'T' then
        perform notify._raise('ND400', 'invalid_duration',
            format('%s must be an ISO 8601 duration of weeks, days, hours, minutes and seconds (PT15M, PT1H30M, P1D); years and months are not accepted', p_path),
            p_path);
    end if;
    begin
        v_interval := make_interval(weeks => coalesce(m[1], '0')::integer, days => coalesce(m[2], '0')::integer,
                                    hours => coalesce(m[3], '0')::integer, mins => coalesce(m[4], '0')::integer,
                                    secs => coalesce(replace(m[5], ',', '.'), '0')::double precision);
    exception when numeric_value_out_of_range or datetime_field_overflow or interval_field_overflow then
        v_interval := interval '1000 days';
    end;
    if v_interval <= interval '0' then
        perform notify._raise('ND400', 'invalid_duration', format('%s must be longer than zero', p_path), p_path);
    end if;
    if v_interval > interval '30 days' then
        perform notify._raise('ND400', 'invalid_duration', format('%s must be at most 30 days (P30D)', p_path), p_path);
    end if;
    return v_interval;
end
$$;
comment on function notify._duration_field(jsonb, text) is
    'Reads an ISO 8601 duration (PnW, PnD, PTnHnMnS and their combinations; no years or months) as an interval, refusing junk, zero and more than 30 days with the field named; null for null.';


create or replace function notify._priority_field(p_value jsonb)
    returns notify.priority
    language plpgsql
    immutable
    set search_path = pg_catalog, pg_temp
as $$
begin
    if p_value is null or jsonb_typeof(p_value) = 'null' then
        return 'normal';
    end if;
    if jsonb_typeof(p_value) <> 'string' or (p_value #>> '{}') <> all (enum_range(null::notify.priority)::text[]) then
        perform notify._raise('ND400', 'invalid_value', 'priority must be one of high, normal, bulk', 'priority');
    end if;
    return (p_value #>> '{}')::notify.priority;
end
$$;
comment on function notify._priority_field(jsonb) is 'Reads a submission''s priority (high, normal or bulk; absent or null: normal), refusing anything else by name.';


create or replace function notify._parse_route(p_route jsonb)
    returns jsonb
    language plpgsql
    immutable
    set search_path = pg_catalog, pg_temp
as $$
declare
    v_step jsonb;
    v_path text;
    v_channel notify.channel;
    v_channels notify.channel[] := '{}';
    v_until text;
    v_out jsonb := '[]';
    v_n integer;
begin
    if jsonb_typeof(p_route) is distinct from 'array' or jsonb_array_length(p_route) = 0 then
        perform notify._raise('ND400', 'missing_field', 'route must be a non-empty list of steps {channel, until?, within?}', 'route');
    end if;
    v_n := jsonb_array_length(p_route);
    for i in 0 .. v_n - 1 loop
        v_step := p_route -> i;
        v_path := format('route[%s]', i);
        if jsonb_typeof(v_step) <> 'object' then
            perform notify._raise('ND400', 'invalid_type', format('%s must be an object {channel, until?, within?}', v_path), v_path);
        end if;
        perform notify._check_keys(v_step, array['channel', 'until', 'within'], v_path);
        v_channel := notify._channel_field(v_step -> 'channel', v_path || '.channel');
        if v_channel = any (v_channels) then
            perform notify._raise('ND400', 'duplicate_channel',
                format('%s.channel: a route must not repeat a channel (%s is step %s already)', v_path, v_channel,
                       array_position(v_channels, v_channel)), v_path || '.channel');
        end if;
        v_channels := v_channels || v_channel;
        -- The goal that makes the later steps unnecessary; delivered unless said (on the last step it changes nothing).
        v_until := coalesce(nullif(v_step -> 'until', 'null') #>> '{}', 'delivered');
        if jsonb_typeof(coalesce(nullif(v_step -> 'until', 'null'), '"delivered"')) <> 'string'
           or v_until not in ('sent', 'delivered', 'read') then
            perform notify._raise('ND400', 'invalid_value', format('%s.until must be one of sent, delivered, read', v_path), v_path || '.until');
        end if;
        perform notify._duration_field(v_step -> 'within', v_path || '.within');
        if i = v_n - 1 and jsonb_typeof(v_step -> 'within') is distinct from 'null' and v_step ? 'within' then
            perform notify._raise('ND400', 'invalid_value',
                format('%s.within: the last step has no later step to fall back to', v_path), v_path || '.within');
        end if;
        v_out := v_out || jsonb_build_array(jsonb_strip_nulls(jsonb_build_object(
            'channel', v_channel, 'until', v_until, 'within', nullif(v_step -> 'within', 'null'))));
    end loop;
    return v_out;
end
$$;
comment on function notify._parse_route(jsonb) is
    'Reads a submission''s route, [{channel, until?, within?}, ...], refusing the first wrong step by field (route[1].within): a known channel not repeated, until one of sent, delivered (the default), read, within an ISO 8601 duration (notify._duration_field), none on the last step. Returns it normalized (until filled in; within as given).';


create or replace function notify._is_usual_submission(p_request jsonb)
    returns boolean
    language sql
    stable   -- as enum_range and to_jsonb are: an inlined body may be no more volatile than its function
    -- inlinable: no SET clause (see docs/architecture.md, "Hot helpers are inlined"); the jsonpath is a constant, so it
    -- is compiled once per plan
as $$
    select jsonb_path_match(p_request,
           '$.type() == "object"
            && !exists($.keyvalue() ? (!(@.key == "recipient" || @.key == "channels" || @.key == "template"
                                          || @.key == "variables" || @.key == "category" || @.key == "metadata"
                                          || @.key == "priority")))
            && $.recipient.type() == "object"
            && !exists($.recipient.keyvalue() ? (!(@.key == "ref" || @.key == "addresses" || @.key == "locale" || @.key == "timezone")))
            && $.channels.type() == "array" && $.channels.size() >= 1
            && !exists($.channels[*].type() ? (@ != "string")) && !exists($.channels[*] ? (!(@ == $channel_names[*])))
            && $.template.type() == "string" && $.template != ""
            && (!exists($.variables) || $.variables.type() == "object" || $.variables.type() == "null")
            && (!exists($.metadata) || $.metadata.type() == "object" || $.metadata.type() == "null")
            && (!exists($.category) || $.category.type() == "null" || $.category.type() == "string")
            && (!exists($.priority) || $.priority.type() == "null" || $.priority == "high" || $.priority == "normal"
                || $.priority == "bulk")',
           jsonb_build_object('channel_names', to_jsonb(enum_range(null::notify.channel))), true)
       -- lengths apart: a counted repetition ({1,100}) makes a regular expression many times slower
       and length(p_request ->> 'template') <= 100 and coalesce(length(p_request ->> 'category'), 0) <= 100
$$;
comment on function notify._is_usual_submission(jsonb) is
    'True for the usual submission body (one recipient object; channels, template, variables, category, metadata, priority of the right types; no route, no times, no callback URL), which notify._parse_submission and the batch read without checking field by field. Accepts only bodies those checks accept; false (or null) sends a body to them.';


create or replace function notify._parse_submission(p_tenant_id uuid, p_request jsonb, p_idempotency_key text)
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
    -- channels (every one sent) or a route (an ordered fallback, notify._parse_route): exactly one of the two.
    if p_request ? 'route' and p_request ? 'channels' then
        perform notify._raise('ND400', 'invalid_value', 'give either channels (every one sent) or route (a fallback, in order), not both', 'route');
    end if;
    if p_request ? 'route' then
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
    values (p_tenant_id, coalesce(p_request_id, gen_random_uuid()), s.idempotency_key, s.fingerprint, p_recipient_id,
            p_recipient_count, s.template, s.variables, s.category, s.channels, s.send_at, s.expires_at, s.metadata,
            s.callback_url, p_response, s.route, coalesce(s.priority, 'normal'))
    on conflict (tenant_id, idempotency_key) do nothing
    returning id into request_id;
    if request_id is null then
        replay := notify._replay(p_tenant_id, s.idempotency_key, s.fingerprint);
    end if;
end
$$;
comment on function notify._claim_submission(uuid, notify.submission, uuid, integer, uuid, jsonb) is
    'Claims the submission''s idempotency key with its request row (recipient_id for one recipient, null for a fan-out of p_recipient_count; the id and the response when the caller knows them already, so the row is written once): the new request''s id, or, when the key was taken, the stored response to replay (ND422 idempotency_key_reused for another body).';


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
       and exists (select from notify.notification_requests r where r.tenant_id = p_tenant_id and r.idempotency_key = s.idempotency_key) then
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


create or replace function notify._delivery_json(d notify.notification_deliveries, p_detail boolean)
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


create or replace function notify_api.get_notification_v1(p_tenant_id uuid, p_id uuid)
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


create or replace function notify._notification_head(v notify.notification_requests)
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


create or replace function notify_api.find_notifications_v1(p_tenant_id uuid, p_filters jsonb default '{}', p_cursor text default null,
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

    insert into notify.recipients as x (tenant_id, ref, locale, timezone)
    select p_tenant_id, f.ref, f.locale, f.timezone from pg_temp._fanout_input f
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

    insert into notify.recipient_addresses as a (tenant_id, recipient_id, channel, address)
    select p_tenant_id, f.recipient_id, kv.key::notify.channel, kv.value #>> '{}'
      from pg_temp._fanout_input f cross join lateral jsonb_each(coalesce(f.addresses, '{}')) kv
     where jsonb_typeof(kv.value) = 'string'
    on conflict (tenant_id, recipient_id, channel) do update
        set address = excluded.address, updated_at = now()
        where a.address is distinct from excluded.address;
    delete from notify.recipient_addresses a
     using pg_temp._fanout_input f, lateral jsonb_each(coalesce(f.addresses, '{}')) kv
     where jsonb_typeof(kv.value) = 'null'
       and a.tenant_id = p_tenant_id and a.recipient_id = f.recipient_id and a.channel = kv.key::notify.channel;

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
        select p_tenant_id, id, v_claim.request_id, recipient_id, channel, address, template_locale, variables, status, reason,
               case when status = 'waiting' then 'infinity' else greatest(coalesce(s.send_at, v_now), v_now) end, s.expires_at,
               case when s.route is not null then ord end, (s.route -> (ord::integer - 1) ->> 'until')::notify.delivery_status,
               notify._duration_field(s.route -> (ord::integer - 1) -> 'within', 'route'), s.priority
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

    update notify.notification_requests r set response = v_response
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
       and not exists (select from notify.notification_requests q where q.tenant_id = p_tenant_id and q.idempotency_key = it.key);

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
           b.variables, b.category, b.channels, b.metadata, b.response, b.priority
      from pg_temp._batch b order by b.i
    on conflict (tenant_id, idempotency_key) do nothing;
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


revoke execute on function notify._duration_field(jsonb, text) from public;
revoke execute on function notify._priority_field(jsonb) from public;
revoke execute on function notify._parse_route(jsonb) from public;
grant execute on function notify._duration_field(jsonb, text), notify._priority_field(jsonb), notify._parse_route(jsonb)
    to notify_system;

select notify._settle_owners();
