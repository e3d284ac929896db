-- 0026: a cheaper submission (issue #13). The usual body is recognised by one jsonpath predicate
-- (notify._is_usual_submission); a known recipient whose addresses are unchanged is one read (and its time zone is
-- looked up only when it changes: pg_timezone_names reads the whole time zone database); per channel, template,
-- missing variables, consent and address are one read; the request row is written once, with its answer (no UPDATE
-- after the INSERT); a batch takes its usual items set-based (notify._submit_batch_usual) and the others item by item,
-- collecting answers in an array instead of copying a growing jsonb list per item. Answers and errors are unchanged.

drop function notify._claim_submission(uuid, notify.submission, uuid, integer);

-- The same rules without counted repetitions ({1,255} made each check cost about 20 us a row). NOT VALID, then
-- VALIDATE: the scan of existing rows does not block submissions.
alter table notify.notification_requests
    drop constraint notification_requests_http_request_id,
    add constraint notification_requests_http_request_id
        check (http_request_id ~ '^[\x21-\x7e]+$' and length(http_request_id) <= 200) not valid,
    drop constraint notification_requests_key_format,
    add constraint notification_requests_key_format
        check (idempotency_key ~ '^[\x21-\x7e]+$' and length(idempotency_key) <= 255) not valid;
alter table notify.notification_requests validate constraint notification_requests_http_request_id;
alter table notify.notification_requests validate constraint notification_requests_key_format;
-- Its check constraint called notify._is_http_url for every request, though a request rarely names a callback URL.
alter function notify._is_http_url(text) strict;

create function notify._is_usual_submission(p_request jsonb)
    returns boolean
    language sql
    stable   -- as enum_range and to_jsonb are: an inlined body may be no more volatile than its function
    -- inlinable: no SET clause (see docs/architecture.md, "Hot helpers are inlined"); the jsonpath is a constant, so it
    -- is compiled once per plan
as $$
    select jsonb_path_match(p_request,
           '$.type() == "object"
            && !exists($.keyvalue() ? (!(@.key == "recipient" || @.key == "channels" || @.key == "template"
                                          || @.key == "variables" || @.key == "category" || @.key == "metadata")))
            && $.recipient.type() == "object"
            && !exists($.recipient.keyvalue() ? (!(@.key == "ref" || @.key == "addresses" || @.key == "locale" || @.key == "timezone")))
            && $.channels.type() == "array" && $.channels.size() >= 1
            && !exists($.channels[*].type() ? (@ != "string")) && !exists($.channels[*] ? (!(@ == $channel_names[*])))
            && $.template.type() == "string" && $.template != ""
            && (!exists($.variables) || $.variables.type() == "object" || $.variables.type() == "null")
            && (!exists($.metadata) || $.metadata.type() == "object" || $.metadata.type() == "null")
            && (!exists($.category) || $.category.type() == "null" || $.category.type() == "string")',
           jsonb_build_object('channel_names', to_jsonb(enum_range(null::notify.channel))), true)
       -- lengths apart: a counted repetition ({1,100}) makes a regular expression many times slower
       and length(p_request ->> 'template') <= 100 and coalesce(length(p_request ->> 'category'), 0) <= 100
$$;
comment on function notify._is_usual_submission(jsonb) is
    'True for the usual submission body (one recipient object; channels, template, variables, category, metadata of the right types; no times, no callback URL), which notify._parse_submission and the batch read without checking field by field. Accepts only bodies those checks accept; false (or null) sends a body to them.';

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
                 null, null, coalesce(nullif(p_request -> 'metadata', 'null'), '{}'), null)::notify.submission;
        if cardinality(s.channels) = 1 or cardinality(s.channels) = (select count(distinct c) from unnest(s.channels) c) then
            return s;
        end if;
    end if;
    -- Every error names its field; nothing is written yet.
    if p_request is null or jsonb_typeof(p_request) <> 'object' then
        perform notify._raise('ND400', 'invalid_type', 'body must be a JSON object', '');
    end if;
    perform notify._check_keys(p_request,
        array['recipient', 'recipients', 'channels', 'template', 'variables', 'category', 'send_at', 'expires_at', 'metadata',
              'callback_url'], '');
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
    if jsonb_typeof(p_request -> 'channels') is distinct from 'array' or jsonb_array_length(p_request -> 'channels') = 0 then
        perform notify._raise('ND400', 'missing_field', 'channels must be a non-empty list', 'channels');
    end if;
    select array_agg(notify._channel_field(c, 'channels[' || (i - 1) || ']') order by i)
      into s.channels
      from jsonb_array_elements(p_request -> 'channels') with ordinality as e(c, i);
    if cardinality(s.channels) <> (select count(distinct c) from unnest(s.channels) c) then
        perform notify._raise('ND400', 'duplicate_channel', 'channels must not repeat a channel', 'channels');
    end if;
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
         send_at, expires_at, metadata, callback_url, response)
    values (p_tenant_id, coalesce(p_request_id, gen_random_uuid()), s.idempotency_key, s.fingerprint, p_recipient_id,
            p_recipient_count, s.template, s.variables, s.category, s.channels, s.send_at, s.expires_at, s.metadata,
            s.callback_url, p_response)
    on conflict (tenant_id, idempotency_key) do nothing
    returning id into request_id;
    if request_id is null then
        replay := notify._replay(p_tenant_id, s.idempotency_key, s.fingerprint);
    end if;
end
$$;
comment on function notify._claim_submission(uuid, notify.submission, uuid, integer, uuid, jsonb) is
    'Claims the submission''s idempotency key with its request row (recipient_id for one recipient, null for a fan-out of p_recipient_count; the id and the response when the caller knows them already, so the row is written once): the new request''s id, or, when the key was taken, the stored response to replay (ND422 idempotency_key_reused for another body).';

create or replace function notify._upsert_recipient(p_tenant_id uuid, p_ref text, p_body jsonb, p_path text)
    returns notify.recipients
    language plpgsql
    set search_path = pg_catalog, pg_temp
as $$
declare
    v notify.recipients;
    v_locale text;
    v_timezone text;
    v_addresses jsonb;
    v_known record;
    v_same_addresses boolean;
    v_channel notify.channel;
    v_key text;
    v_value jsonb;
    v_prefix text := nullif(p_path, '');
begin
    if p_ref is null or length(p_ref) not between 1 and 200 then
        perform notify._raise('ND400', 'invalid_length', 'ref must be 1 to 200 characters', ltrim(coalesce(v_prefix, '') || '.ref', '.'));
    end if;
    v_locale := notify._text_field(p_body, 'locale', p_path, false, 35);
    if v_locale is not null and v_locale !~ '^[A-Za-z]{2,3}(-[A-Za-z0-9]{2,8})*$' then
        perform notify._raise('ND400', 'invalid_format', 'locale must be a BCP 47 tag such as es-ES',
                              ltrim(coalesce(v_prefix, '') || '.locale', '.'));
    end if;
    v_timezone := notify._text_field(p_body, 'timezone', p_path, false, 64);

    -- Known and unchanged (the usual case) is only read: no new row version, and no row lock held until commit
    -- that would queue every other submission to the same recipient behind this one.
    v_addresses := p_body -> 'addresses';
    select r as recipient,
           -- every address given is the one stored (so it was checked when stored): nothing to write
           v_addresses is null or jsonb_typeof(v_addresses) = 'null'
           or (jsonb_typeof(v_addresses) = 'object'
               and not exists (select from jsonb_each(v_addresses) e
                                where jsonb_typeof(e.value) <> 'string'
                                   or not exists (select from notify.recipient_addresses a
                                                   where a.tenant_id = p_tenant_id and a.recipient_id = r.id
                                                     and a.channel::text = e.key and a.address = e.value #>> '{}'))) as same_addresses
      into v_known
      from notify.recipients r where r.tenant_id = p_tenant_id and r.ref = p_ref;
    v := v_known.recipient;
    v_same_addresses := v_known.same_addresses;
    if v.id is not null and v_same_addresses
       and (v_locale is null or v_locale = v.locale) and (v_timezone is null or v_timezone = v.timezone) then
        return v;
    end if;
    -- (pg_timezone_names reads the whole time zone database, about 40 ms: only a time zone the recipient does not
    -- have already is looked up.)
    if v_timezone is not null and v_timezone is distinct from v.timezone
       and not exists (select from pg_catalog.pg_timezone_names where name = v_timezone) then
        perform notify._raise('ND400', 'invalid_timezone', format('timezone %s is not an IANA time zone', v_timezone),
                              ltrim(coalesce(v_prefix, '') || '.timezone', '.'));
    end if;
    if v.id is null or (v_locale is not null and v_locale is distinct from v.locale)
       or (v_timezone is not null and v_timezone is distinct from v.timezone) then
        insert into notify.recipients as r (tenant_id, ref, locale, timezone)
        values (p_tenant_id, p_ref, v_locale, v_timezone)
        on conflict (tenant_id, ref) do update
            set locale = coalesce(excluded.locale, r.locale),
                timezone = coalesce(excluded.timezone, r.timezone),
                updated_at = case when (excluded.locale, excluded.timezone) is distinct from (r.locale, r.timezone)
                                  then now() else r.updated_at end
        returning * into v;
    end if;

    if v_addresses is not null and jsonb_typeof(v_addresses) <> 'null' then
        perform notify._check_keys(v_addresses, enum_range(null::notify.channel)::text[], ltrim(coalesce(v_prefix, '') || '.addresses', '.'));
        for v_key, v_value in select * from jsonb_each(v_addresses) loop
            v_channel := v_key::notify.channel;
            if jsonb_typeof(v_value) = 'null' then
                delete from notify.recipient_addresses a
                 where a.tenant_id = p_tenant_id and a.recipient_id = v.id and a.channel = v_channel;
            elsif jsonb_typeof(v_value) <> 'string' or not notify._address_valid(v_channel, v_value #>> '{}') then
                perform notify._raise('ND400', 'invalid_address',
                    case v_channel when 'email' then format('addresses.%s must be an e-mail address', v_key)
                                   else format('addresses.%s must be an E.164 phone number such as +34600111222', v_key) end,
                    ltrim(coalesce(v_prefix, '') || '.addresses.' || v_key, '.'));
            elsif not exists (select from notify.recipient_addresses a
                               where a.tenant_id = p_tenant_id and a.recipient_id = v.id and a.channel = v_channel
                                 and a.address = v_value #>> '{}') then
                -- (an unchanged address is only read: ON CONFLICT DO UPDATE would lock its row even when it writes nothing)
                insert into notify.recipient_addresses as a (tenant_id, recipient_id, channel, address)
                values (p_tenant_id, v.id, v_channel, v_value #>> '{}')
                on conflict (tenant_id, recipient_id, channel) do update
                    set address = excluded.address, updated_at = now()
                    where a.address is distinct from excluded.address;
            end if;
        end loop;
    end if;
    return v;
end
$$;
comment on function notify._upsert_recipient(uuid, text, jsonb, text) is
    'Creates or updates a recipient and its addresses from {addresses, locale, timezone}; an address set to null is removed. Errors name fields under p_path.';

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
    select coalesce(v_recipient.locale, n.default_locale) into v_locale from notify.tenants n where n.id = p_tenant_id;
    select array_agg(x.channel order by x.ord), array_agg(x.template_locale order by x.ord),
           array_agg(x.missing order by x.ord), array_agg(x.address order by x.ord), array_agg(x.id order by x.ord),
           array_agg(x.status order by x.ord), array_agg(x.reason order by x.ord),
           jsonb_agg(jsonb_strip_nulls(jsonb_build_object('id', x.id, 'channel', x.channel, 'status', x.status, 'reason', x.reason))
                     order by x.ord),
           array_agg(x.channel order by x.channel) filter (where x.status in ('queued', 'scheduled'))
      into v_channels, v_template_locales, v_missing, v_addresses, v_ids, v_statuses, v_reasons, v_deliveries, v_open
      from (select u.channel, u.ord, t.locale as template_locale, a.address, gen_random_uuid() as id,
                   (select string_agg(r, ', ') from unnest(t.required_variables) r where not s.variables ? r) as missing,
                   case when a.address is null or not c.allowed then 'suppressed'
                        when s.send_at > v_now then 'scheduled'
                        else 'queued' end::notify.delivery_status as status,
                   case when a.address is null then 'no_address' when not c.allowed then 'no_consent' end as reason
              from unnest(s.channels) with ordinality as u(channel, ord)
             cross join lateral notify._resolve_template(p_tenant_id, s.template, u.channel, v_locale) t
             cross join lateral notify._consent(p_tenant_id, v_recipient.id, u.channel, s.category) c
              left join notify.recipient_addresses a
                     on a.tenant_id = p_tenant_id and a.recipient_id = v_recipient.id and a.channel = u.channel
            offset 0) x;
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
        'deliveries', v_deliveries);
    v_claim := notify._claim_submission(p_tenant_id, s, v_recipient.id, 1, v_request_id, v_response);
    if v_claim.request_id is null then
        response := v_claim.replay;
        replayed := true;
        return next;
        return;
    end if;

    -- 5. One delivery per channel, suppressed ones with their reason.
    perform notify._set_source('submit');
    insert into notify.notification_deliveries
        (tenant_id, id, request_id, recipient_id, channel, address, template_locale, status, reason, due_at, expires_at)
    select p_tenant_id, d.id, v_request_id, v_recipient.id, d.channel, d.address, d.template_locale, d.status, d.reason,
           greatest(coalesce(s.send_at, v_now), v_now), s.expires_at
      from unnest(v_ids, v_channels, v_addresses, v_template_locales, v_statuses, v_reasons)
           as d(id, channel, address, template_locale, status, reason);

    -- 6. Wake the worker, with the caller's commit: now, or when the scheduled work falls due.
    perform notify._wake_submission(s, v_open);

    response := v_response;
    replayed := false;
    return next;
end
$$;
comment on function notify_api.submit_notification_v1(uuid, jsonb, text) is
    'Accepts a notification intent (the POST /internal/notifications body) in one transaction: idempotency, recipient upsert, template and variable checks, consent, one delivery per channel (per recipient for a fan-out), worker wake-up. Returns the response and whether it is a replay.';

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

    -- 5. One delivery per recipient and channel, consent checked set-based.
    perform notify._set_source('submit');
    with rows as materialized (
        select f.recipient_id, c.channel, a.address, t.template_locale, f.variables, consent.allowed, f.i, c.ord
          from pg_temp._fanout_input f
         cross join unnest(s.channels) with ordinality c(channel, ord)
          join pg_temp._fanout_templates t on t.channel = c.channel and t.locale = f.effective_locale
          left join notify.recipient_addresses a on a.tenant_id = p_tenant_id and a.recipient_id = f.recipient_id and a.channel = c.channel
         cross join lateral notify._consent(p_tenant_id, f.recipient_id, c.channel, s.category) consent
    ), inserted as (
        insert into notify.notification_deliveries
            (tenant_id, request_id, recipient_id, channel, address, template_locale, variables, status, reason, due_at, expires_at)
        select p_tenant_id, v_claim.request_id, recipient_id, channel, address, template_locale, variables,
               case when address is null or not allowed then 'suppressed'
                    when s.send_at > v_now then 'scheduled' else 'queued' end::notify.delivery_status,
               case when address is null then 'no_address' when not allowed then 'no_consent' end,
               greatest(coalesce(s.send_at, v_now), v_now), s.expires_at
          from rows order by i, ord
        returning channel, status, reason
    ), counted as (
        select channel, status, reason, count(*) as n from inserted group by channel, status, reason
    )
    select jsonb_build_object(
               'id', v_claim.request_id, 'created_at', v_now, 'recipient_count', v_count,
               'status', case when bool_and(status = 'suppressed') then 'suppressed' else 'accepted' end,
               'summary', jsonb_agg(jsonb_strip_nulls(jsonb_build_object('channel', channel, 'status', status, 'reason', reason, 'count', n))
                                    order by channel, status, reason))
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

create function notify._submit_batch_usual(p_tenant_id uuid, p_items jsonb)
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
        request_id uuid, response jsonb
    ) on commit drop;
    with items as (
        select e.i - 1 as i, e.item, e.item -> 'notification' as body, e.item -> 'notification' -> 'recipient' as r
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
                                recipient_id, effective_locale, request_id)
    select it.i, it.item ->> 'idempotency_key', it.body, it.r ->> 'ref', nullif(it.r -> 'addresses', 'null'),
           it.r ->> 'locale', string_to_array(translate((it.body -> 'channels')::text, '[]" ', ''), ',')::notify.channel[],
           it.body ->> 'template', coalesce(nullif(it.body -> 'variables', 'null'), '{}'), it.body ->> 'category',
           coalesce(nullif(it.body -> 'metadata', 'null'), '{}'), rec.id,
           coalesce(it.r ->> 'locale', rec.locale, n.default_locale), gen_random_uuid()
      from items it
      join notify.tenants n on n.id = p_tenant_id
      left join notify.recipients rec on rec.tenant_id = p_tenant_id and rec.ref = it.r ->> 'ref'
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
       and not exists (select from shared sh where sh.kind = 'key' and sh.v = it.item ->> 'idempotency_key')
       and not exists (select from shared sh where sh.kind = 'ref' and sh.v = it.r ->> 'ref')
       and not exists (select from notify.notification_requests q
                        where q.tenant_id = p_tenant_id and q.idempotency_key = it.item ->> 'idempotency_key');

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
    select b.i, c.ord, gen_random_uuid(), c.channel, a.address, t.template_locale,
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
      from (select i, bool_and(status = 'suppressed') as all_suppressed,
                   jsonb_agg(jsonb_strip_nulls(jsonb_build_object('id', id, 'channel', channel, 'status', status, 'reason', reason))
                             order by ord) as deliveries
              from pg_temp._batch_deliveries group by i) d
     where d.i = b.i;

    -- 5. Claim the keys. One a concurrent twin took meanwhile (it waited for the twin's commit) leaves its item to the
    --    item-by-item path, which replays it.
    insert into notify.notification_requests
        (tenant_id, id, idempotency_key, fingerprint, recipient_id, recipient_count, template_key, variables, category,
         channels, metadata, response)
    select p_tenant_id, b.request_id, b.key, sha256(convert_to(b.body::text, 'UTF8')), b.recipient_id, 1, b.template,
           b.variables, b.category, b.channels, b.metadata, b.response
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
        (tenant_id, id, request_id, recipient_id, channel, address, template_locale, status, reason, due_at)
    select p_tenant_id, d.id, b.request_id, b.recipient_id, d.channel, d.address, d.template_locale, d.status, d.reason, v_now
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
begin
    perform notify._enter(p_tenant_id);
    if jsonb_typeof(p_items) is distinct from 'array' or jsonb_array_length(p_items) not between 1 and 1000 then
        perform notify._raise('ND400', 'invalid_length', 'items must be a list of 1 to 1000 intents', 'items');
    end if;
    -- The usual items together (notify._submit_batch_usual), then every other one alone, in order.
    v_results := array_fill(null::jsonb, array[jsonb_array_length(p_items)]);
    for v_row in select * from notify._submit_batch_usual(p_tenant_id, p_items) loop
        v_results[v_row.idx + 1] := v_row.result;
    end loop;
    for v_item, v_index in select e.value, e.i - 1 from jsonb_array_elements(p_items) with ordinality e(value, i) loop
        continue when v_results[v_index + 1] is not null;
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
    return (select jsonb_build_object('items', jsonb_agg(r order by i),
                                      'accepted', count(*) filter (where r ->> 'outcome' = 'accepted'),
                                      'replayed', count(*) filter (where r ->> 'outcome' = 'replayed'),
                                      'failed', count(*) filter (where r ->> 'outcome' = 'error'))
              from unnest(v_results) with ordinality u(r, i));
end
$$;
comment on function notify_api.submit_notifications_v1(uuid, jsonb) is
    'Batch: up to 1,000 independent intents [{idempotency_key?, notification}] in one call. The usual ones are taken set-based (notify._submit_batch_usual); every other item succeeds or fails alone (its own subtransaction). The answer reports each item''s outcome in order: accepted, replayed, or its error.';


revoke execute on function notify._is_usual_submission(jsonb) from public;
revoke execute on function notify._claim_submission(uuid, notify.submission, uuid, integer, uuid, jsonb) from public;
revoke execute on function notify._submit_batch_usual(uuid, jsonb) from public;
grant execute on function notify._is_usual_submission(jsonb) to notify_system;
grant execute on function notify._claim_submission(uuid, notify.submission, uuid, integer, uuid, jsonb) to notify_system;
grant execute on function notify._submit_batch_usual(uuid, jsonb) to notify_system;
select notify._settle_owners();
