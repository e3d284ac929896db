-- Private helper functions that read no table: validation, ranks, transitions, error raising.
-- Called by the tables' check constraints, the triggers and the notify_api functions.

create function notify._raise(p_code text, p_type text, p_message text, p_field text default null)
    returns void
    language plpgsql
    set search_path = pg_catalog, pg_temp
as $$
begin
    -- Codes are ND + HTTP status (see docs/errors.md); CONSTRAINT carries the problem type, COLUMN the field.
    raise exception using errcode = p_code, message = p_message, constraint = p_type, column = coalesce(p_field, '');
end
$$;
comment on function notify._raise(text, text, text, text) is
    'Raises a documented error: SQLSTATE ND<http status>, problem type in CONSTRAINT, offending field in COLUMN.';

create function notify._is_bsuid(p_value text)
    returns boolean
    language sql
    immutable
    -- inlinable: no SET clause (see docs/architecture.md, "Hot helpers are inlined")
as $$
    -- CC.<alphanumerics>, or a parent BSUID CC.ENT.<alphanumerics> (whatsapp-2026.md §7); at most 128 after the country.
    select p_value ~ '^[A-Z][A-Z]\.([A-Z]+\.)?[A-Za-z0-9]+$' and length(p_value) <= 140
$$;
comment on function notify._is_bsuid(text) is
    'A WhatsApp business-scoped user id: a two-letter country code, a period, up to 128 letters and digits (US.13491208655302741918; a parent BSUID US.ENT.…).';

create function notify._uuidv7()
    returns uuid
    language sql
    volatile
    parallel safe
    -- inlinable: no SET clause (see docs/architecture.md, "Hot helpers are inlined"); the default of hot tables' ids.
    -- Not pure (it reads the clock), but here because the tables' defaults need it before sql/020_tables.sql.
as $$
    select pg_catalog.encode(
               pg_catalog.set_bit(pg_catalog.set_bit(
                   pg_catalog.overlay(pg_catalog.uuid_send(pg_catalog.gen_random_uuid()),
                                      pg_catalog.substr(pg_catalog.int8send(
                                          pg_catalog.floor(pg_catalog.date_part('epoch', pg_catalog.clock_timestamp()) * 1000)::pg_catalog.int8), 3),
                                      1, 6),
                   52, 1), 53, 1),
               'hex')::pg_catalog.uuid
$$;
comment on function notify._uuidv7() is
    'A time-ordered UUID (RFC 9562 version 7: 48-bit Unix milliseconds, then random bits) on PostgreSQL 16 and later alike (18''s uuidv7() is not there before). New rows of a table keyed by it land at the right edge of its indexes instead of anywhere in them.';

create function notify._channel_rules(p_channel notify.channel)
    returns notify.channel_rules
    language sql
    immutable
    -- inlinable: no SET clause (see docs/architecture.md, "Hot helpers are inlined"); each row folds to a constant
as $$
    -- One row per channel: a new channel is one enum value (sql/010_types.sql) and one line here.
    --                                          policy     resend  read   late failure  address          unknown for
    select case p_channel
        when 'email'    then row('opt_out', true,  false, true,  'email',         86400)::notify.channel_rules
        when 'whatsapp' then row('opt_in',  false, true,  false, 'e164_or_bsuid', 604800)::notify.channel_rules
        when 'sms'      then row('opt_in',  false, false, false, 'e164',          604800)::notify.channel_rules
    end
$$;
comment on function notify._channel_rules(notify.channel) is
    'What is special about each channel (notify.channel_rules), in one place: e-mail is opt-out, resent after an ambiguous outcome (a duplicate e-mail is acceptable), has no reads, lets a bounce after delivered win, and an unknown lasts a day; WhatsApp and SMS are opt-in, never resent after an ambiguous outcome, delivered beats a late failure, an unknown lasts 7 days; only WhatsApp reports reads and takes business-scoped user ids.';

create function notify._address_valid(p_channel notify.channel, p_address text)
    returns boolean
    language sql
    immutable
    -- inlinable: no SET clause (see docs/architecture.md, "Hot helpers are inlined")
as $$
    select case (notify._channel_rules(p_channel)).address_kind
        -- No counted repetition ({1,64}) inside the pattern: it makes Postgres' regex engine 20x slower; lengths are checked apart.
        when 'email' then p_address ~ '^[A-Za-z0-9.!#$%&''*+/=?^_`{|}~-]+@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)+$'
                          and length(p_address) <= 254 and strpos(p_address, '@') <= 65
        when 'e164_or_bsuid' then p_address ~ '^\+[1-9][0-9]{6,14}$' or notify._is_bsuid(p_address)
        when 'e164' then p_address ~ '^\+[1-9][0-9]{6,14}$'
        else false
    end
$$;
comment on function notify._address_valid(notify.channel, text) is
    'Whether an address has its channel''s format (notify._channel_rules: address_kind): E.164 (+ and 7 to 15 digits) for whatsapp and sms, or a business-scoped user id for whatsapp (notify._is_bsuid); a practical RFC 5322 addr-spec subset for email.';

create function notify._default_policy(p_channel notify.channel)
    returns notify.consent_policy
    language sql
    immutable
    -- inlinable: no SET clause (see docs/architecture.md, "Hot helpers are inlined")
as $$
    select (notify._channel_rules(p_channel)).default_policy
$$;
comment on function notify._default_policy(notify.channel) is 'Consent policy of a channel when the tenant has set none (notify._channel_rules).';

create function notify._is_http_url(p_url text)
    returns boolean
    language sql
    immutable
    strict   -- null is null without a call: every request row's check constraint passes its (usually null) URL
    parallel safe
    set search_path = pg_catalog, pg_temp
as $$
    select p_url ~ '^https?://[^\s/?#@]+(/[^\s#]*)?$' and length(p_url) <= 2000
$$;
comment on function notify._is_http_url(text) is
    'The one shape of a callback URL (a tenant''s and a request''s): http(s), a host, no credentials or fragment, at most 2,000 characters. Whether its address is public is decided when it is used (API and worker).';

create function notify._is_final(p_status notify.delivery_status)
    returns boolean
    language sql
    immutable
    -- inlinable: no SET clause (see docs/architecture.md, "Hot helpers are inlined")
as $$
    select p_status in ('read', 'bounced', 'suppressed', 'cancelled', 'expired', 'failed', 'delivered', 'not_needed')
$$;
comment on function notify._is_final(notify.delivery_status) is
    'True where no further work is planned (the delivery may still move by a provider report, e.g. delivered -> read).';

create function notify._rank(p_channel notify.channel, p_status notify.delivery_status)
    returns integer
    language sql
    immutable
    -- inlinable: no SET clause (see docs/architecture.md, "Hot helpers are inlined")
as $$
    select case p_status
        when 'scheduled' then 10
        when 'queued' then 20
        when 'sending' then 30
        when 'unknown' then 35
        when 'sent' then 40
        when 'failed' then case when (notify._channel_rules(p_channel)).failure_beats_delivery then 70 else 45 end
        when 'delivered' then 50
        when 'read' then 60
        when 'bounced' then 70
        when 'suppressed' then 70
        when 'cancelled' then 90
        when 'expired' then 90
        when 'waiting' then 10
        when 'held' then 20
        when 'not_needed' then 90
    end
$$;
comment on function notify._rank(notify.channel, notify.delivery_status) is
    'Monotonic rank used to apply provider reports in any order: a report applies only if it ranks higher. Where a late failure beats delivery (notify._channel_rules: e-mail) a bounce or failure beats delivered; elsewhere (WhatsApp, SMS) a failed loses to delivered.';

create function notify._transition_allowed(p_channel notify.channel, p_from notify.delivery_status, p_to notify.delivery_status)
    returns boolean
    language sql
    immutable
    -- inlinable: no SET clause (see docs/architecture.md, "Hot helpers are inlined")
as $$
    select case p_from
        when 'scheduled' then p_to in ('queued', 'sending', 'suppressed', 'cancelled', 'expired', 'failed', 'held', 'not_needed')
        when 'queued' then p_to in ('sending', 'suppressed', 'cancelled', 'expired', 'failed', 'held', 'not_needed')
        when 'waiting' then p_to in ('queued', 'scheduled', 'held', 'sending', 'suppressed', 'cancelled', 'expired', 'failed', 'not_needed')
        when 'held' then p_to in ('queued', 'sending', 'suppressed', 'cancelled', 'expired', 'failed', 'not_needed')
        when 'sending' then p_to in ('queued', 'sent', 'delivered', 'read', 'failed', 'bounced', 'suppressed', 'unknown')
        when 'unknown' then p_to in ('queued', 'sent', 'delivered', 'read', 'failed', 'bounced')
        when 'sent' then p_to in ('delivered', 'read', 'failed', 'bounced', 'suppressed')
        when 'delivered' then p_to = 'read' or (p_to = 'bounced' and (notify._channel_rules(p_channel)).failure_beats_delivery)
        when 'failed' then p_to in ('delivered', 'read') and not (notify._channel_rules(p_channel)).failure_beats_delivery
        else false
    end
    -- only a channel that reports reads reaches read (notify._channel_rules)
    and (p_to <> 'read' or (notify._channel_rules(p_channel)).has_read)
$$;
comment on function notify._transition_allowed(notify.channel, notify.delivery_status, notify.delivery_status) is
    'The delivery state machine: the only legal status changes (read only on a channel that has reads; a late failure after delivered only where it beats delivery, notify._channel_rules). Enforced by trigger _100_check_transition.';

create function notify._template_variables(p_content jsonb)
    returns text[]
    language sql
    immutable
    set search_path = pg_catalog, pg_temp
as $$
    select coalesce(array_agg(distinct v order by v), '{}')
    from (
        select m[1] as v
        from jsonb_path_query(p_content, 'strict $.**') as s(value)
        cross join lateral regexp_matches(s.value #>> '{}', '\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}', 'g') as m
        where jsonb_typeof(s.value) = 'string'
        union
        -- WhatsApp parameter mappings name variables directly (body, header, buttons).
        select jsonb_array_elements_text(p_content -> 'parameters')
        where jsonb_typeof(p_content -> 'parameters') = 'array'
        union
        select jsonb_array_elements_text(p_content -> 'header_parameters')
        where jsonb_typeof(p_content -> 'header_parameters') = 'array'
        union
        select b ->> 'parameter' from jsonb_array_elements(case when jsonb_typeof(p_content -> 'buttons') = 'array'
                                                              then p_content -> 'buttons' else '[]' end) b
        where b ->> 'parameter' is not null
    ) names(v)
$$;
comment on function notify._template_variables(jsonb) is
    'Variable names a template needs: every {{name}} placeholder in its strings plus the variables a WhatsApp template maps to its body, header and button parameters.';

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
            && (!exists($.priority) || $.priority.type() == "null"
                || ($.priority.type() == "string" && ($.priority == "high" || $.priority == "normal" || $.priority == "bulk")))',
           jsonb_build_object('channel_names', to_jsonb(enum_range(null::notify.channel))), true)
       -- lengths apart: a counted repetition ({1,100}) makes a regular expression many times slower
       and length(p_request ->> 'template') <= 100 and coalesce(length(p_request ->> 'category'), 0) <= 100
$$;
comment on function notify._is_usual_submission(jsonb) is
    'True for the usual submission body (one recipient object; channels, template, variables, category, metadata, priority of the right types; no route, no times, no callback URL), which notify._parse_submission and the batch read without checking field by field. Accepts only bodies those checks accept; false (or null) sends a body to them.';

create function notify._check_keys(p_object jsonb, p_allowed text[], p_path text)
    returns void
    language plpgsql
    immutable
    set search_path = pg_catalog, pg_temp
as $$
declare
    v_key text;
begin
    if p_object is null or jsonb_typeof(p_object) = 'null' then
        return;
    end if;
    if jsonb_typeof(p_object) <> 'object' then
        perform notify._raise('ND400', 'invalid_type', format('%s must be an object', coalesce(nullif(p_path, ''), 'body')), p_path);
    end if;
    select k into v_key from jsonb_object_keys(p_object) k where k <> all (p_allowed) limit 1;
    if v_key is not null then
        perform notify._raise('ND400', 'unknown_field', format('unknown field %s', ltrim(p_path || '.' || v_key, '.')),
                              ltrim(p_path || '.' || v_key, '.'));
    end if;
end
$$;
comment on function notify._check_keys(jsonb, text[], text) is 'Refuses a JSON object with a key outside p_allowed, naming the field.';

create function notify._text_field(p_object jsonb, p_key text, p_path text, p_required boolean default false, p_max integer default 1000)
    returns text
    language plpgsql
    immutable
    set search_path = pg_catalog, pg_temp
as $$
declare
    v jsonb := p_object -> p_key;
    v_path text := ltrim(p_path || '.' || p_key, '.');
begin
    if v is null or jsonb_typeof(v) = 'null' then
        if p_required then
            perform notify._raise('ND400', 'missing_field', format('%s is required', v_path), v_path);
        end if;
        return null;
    end if;
    if jsonb_typeof(v) <> 'string' then
        perform notify._raise('ND400', 'invalid_type', format('%s must be a string', v_path), v_path);
    end if;
    if length(v #>> '{}') > p_max or (p_required and length(v #>> '{}') = 0) then
        perform notify._raise('ND400', 'invalid_length', format('%s must be 1 to %s characters', v_path, p_max), v_path);
    end if;
    return v #>> '{}';
end
$$;
comment on function notify._text_field(jsonb, text, text, boolean, integer) is 'Reads a string member of a JSON object, refusing a wrong type or length with the field named.';

create function notify._template_text(p_object jsonb, p_key text, p_path text, p_required boolean, p_max integer)
    returns text
    language plpgsql
    immutable
    set search_path = pg_catalog, pg_temp
as $$
declare
    v text := notify._text_field(p_object, p_key, p_path, p_required, 2147483647);
    v_path text := ltrim(p_path || '.' || p_key, '.');
begin
    if length(v) > p_max then
        perform notify._raise('ND422', 'template_too_large', format('%s must be at most %s characters', v_path, p_max), v_path);
    end if;
    return v;
end
$$;
comment on function notify._template_text(jsonb, text, text, boolean, integer) is
    'Reads a template text member like _text_field, but one over its size limit is refused as 422 template_too_large (the render limits are the same sizes).';

create function notify._time_field(p_object jsonb, p_key text, p_path text)
    returns timestamptz
    language plpgsql
    stable
    set search_path = pg_catalog, pg_temp
as $$
declare
    v text := notify._text_field(p_object, p_key, p_path, false, 64);
    v_path text := ltrim(p_path || '.' || p_key, '.');
begin
    if v is null then
        return null;
    end if;
    if v !~ '^\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}(:?\d{2})?)$' then
        perform notify._raise('ND400', 'invalid_format', format('%s must be an RFC 3339 time with an offset', v_path), v_path);
    end if;
    return v::timestamptz;
exception
    when datetime_field_overflow or invalid_datetime_format then
        perform notify._raise('ND400', 'invalid_format', format('%s is not a valid time', v_path), v_path);
end
$$;
comment on function notify._time_field(jsonb, text, text) is 'Reads an RFC 3339 timestamp member, refusing other formats with the field named.';

create function notify._channel_field(p_value jsonb, p_path text)
    returns notify.channel
    language plpgsql
    immutable
    set search_path = pg_catalog, pg_temp
as $$
begin
    if jsonb_typeof(p_value) is distinct from 'string'
       or (p_value #>> '{}') <> all (enum_range(null::notify.channel)::text[]) then
        perform notify._raise('ND400', 'invalid_channel',
            format('%s must be one of %s', p_path, array_to_string(enum_range(null::notify.channel)::text[], ', ')), p_path);
    end if;
    return (p_value #>> '{}')::notify.channel;
end
$$;
comment on function notify._channel_field(jsonb, text) is 'Reads a channel name, refusing unknown channels with the field named.';

create function notify._secret_refs_valid(p_secrets jsonb)
    returns boolean
    language sql
    immutable
    set search_path = pg_catalog, pg_temp
as $$
    select jsonb_typeof(p_secrets) = 'object'
       and not exists (select from jsonb_each(p_secrets) e
                        where jsonb_typeof(e.value) <> 'string' or e.value #>> '{}' !~ '^(env:[A-Za-z_][A-Za-z0-9_]*|file:/[^\s]+)$')
$$;
comment on function notify._secret_refs_valid(jsonb) is
    'True if every value is a secret reference (env:NAME or file:/absolute/path), so a secret itself can never be stored.';

-- Fallback routes and priority (issue #14, migration 0034): read by notify._parse_submission.
create function notify._parse_iso_duration(p_text text)
    returns interval
    language sql
    immutable
    strict
    set search_path = pg_catalog, pg_temp
as $$
    -- Weeks, days, hours, minutes and seconds only: a year or a month has no fixed length. A part of more than 9 digits
    -- is far past every bound its callers set (and would overflow make_interval's integers): it comes back as 100,000
    -- days, which every caller refuses as too long, rather than as an error of its own.
    select case when x.m is null or length(p_text) > 40 or p_text in ('P', 'PT') or right(p_text, 1) = 'T' then null
                when greatest(length(x.m[1]), length(x.m[2]), length(x.m[3]), length(x.m[4]),
                              length(split_part(replace(x.m[5], ',', '.'), '.', 1))) > 9 then interval '100000 days'
                else make_interval(weeks => coalesce(x.m[1], '0')::integer, days => coalesce(x.m[2], '0')::integer,
                                   hours => coalesce(x.m[3], '0')::integer, mins => coalesce(x.m[4], '0')::integer,
                                   secs => coalesce(replace(x.m[5], ',', '.'), '0')::double precision) end
      from regexp_match(p_text, '^P(?:([0-9]+)W)?(?:([0-9]+)D)?(?:T(?:([0-9]+)H)?(?:([0-9]+)M)?(?:([0-9]+(?:[.,][0-9]+)?)S)?)?$') as x(m)
$$;
comment on function notify._parse_iso_duration(text) is
    'The one ISO 8601 duration parser: weeks, days, hours, minutes and seconds (PT15M, PT1H30M, P1D, PT1.5S) as an interval; null for anything else (years, months, junk, an empty P or PT). Callers raise their own errors and set their own bounds (a route''s within, a frequency cap''s period).';

create function notify._duration_field(p_value jsonb, p_path text)
    returns interval
    language plpgsql
    immutable
    set search_path = pg_catalog, pg_temp
as $$
declare
    v_interval interval;
begin
    if p_value is null or jsonb_typeof(p_value) = 'null' then
        return null;
    end if;
    if jsonb_typeof(p_value) <> 'string' then
        perform notify._raise('ND400', 'invalid_type', format('%s must be an ISO 8601 duration such as PT15M', p_path), p_path);
    end if;
    v_interval := notify._parse_iso_duration(p_value #>> '{}');
    if v_interval is null then
        perform notify._raise('ND400', 'invalid_duration',
            format('%s must be an ISO 8601 duration of weeks, days, hours, minutes and seconds (PT15M, PT1H30M, P1D); years and months are not accepted', p_path),
            p_path);
    end if;
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

create function notify._priority_field(p_value jsonb)
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

create function notify._parse_route(p_route jsonb)
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
        -- E-mail and SMS report no reads (an e-mail open is a flag, not a status; notify._channel_rules): a step waiting
        -- for one would keep the next step waiting until the route expires, or always send it after within.
        if v_until = 'read' and not (notify._channel_rules(v_channel)).has_read and i < v_n - 1 then
            perform notify._raise('ND400', 'invalid_value',
                format('%s.until: %s never reports read (an e-mail open is not a status), so the next step would always follow; use sent or delivered',
                       v_path, v_channel), v_path || '.until');
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
    'Reads a submission''s route, [{channel, until?, within?}, ...], refusing the first wrong step by field (route[1].within): a known channel not repeated, until one of sent, delivered (the default), read (not on an e-mail step before another: e-mail reports no reads), within an ISO 8601 duration (notify._duration_field), none on the last step. Returns it normalized (until filled in; within as given).';

create function notify._route_level(p_status notify.delivery_status)
    returns integer
    language sql
    immutable
    set search_path = pg_catalog, pg_temp
as $$
    select case p_status when 'sent' then 1 when 'delivered' then 2 when 'read' then 3 else 0 end
$$;
comment on function notify._route_level(notify.delivery_status) is
    'How far a route step got towards its goal (route_until): sent 1, delivered 2, read 3, anything else 0 (unknown included: not reached). A step reached its goal when its level is at least its goal''s.';

-- SMS segments (issue #16). GSM 03.38: the basic set costs one septet, its extension table (escape + character) two; a
-- text with any other character goes as UCS-2 (UTF-16 code units: a character beyond the BMP, an emoji, costs two).
-- One segment holds 160 septets or 70 units; a longer text is split into segments of 153 septets or 67 units (the rest is
-- the concatenation header), and a two-unit character (an escape pair, a surrogate pair) is never split across two.
-- The worker counts the text it sends with the same rules (providers/twilio.py, sms_parts; tests/providers/test_twilio.py
-- checks that both agree); this one counts a template's fixed text at save time (notify_api.upsert_template_v1).
create function notify._sms_parts(p_text text)
    returns jsonb
    language plpgsql
    immutable
    set search_path = pg_catalog, pg_temp
as $$
declare
    v_basic constant text := E'@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !"#¤%&''()*+,-./0123456789:;<=>?¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà';
    v_extension constant text := E'\f^{}\\[~]|€';
    v_gsm boolean := true;
    v_costs integer[] := '{}';
    v_char text;
    v_units integer := 0;
    v_single integer;
    v_multi integer;
    v_segments integer := 0;
    v_used integer := 0;
    v_cost integer;
begin
    if p_text is null or p_text = '' then
        return jsonb_build_object('encoding', 'GSM-7', 'segments', 0, 'units', 0);
    end if;
    foreach v_char in array regexp_split_to_array(p_text, '') loop
        if strpos(v_basic, v_char) > 0 then
            v_costs := v_costs || 1;
        elsif strpos(v_extension, v_char) > 0 then
            v_costs := v_costs || 2;
        else
            v_gsm := false;
            exit;
        end if;
    end loop;
    if not v_gsm then
        v_costs := '{}';
        foreach v_char in array regexp_split_to_array(p_text, '') loop
            v_costs := v_costs || case when ascii(v_char) > 65535 then 2 else 1 end;
        end loop;
    end if;
    v_single := case when v_gsm then 160 else 70 end;
    v_multi := case when v_gsm then 153 else 67 end;
    select coalesce(sum(c), 0) into v_units from unnest(v_costs) c;
    if v_units <= v_single then
        v_segments := 1;
    else
        v_segments := 1;
        foreach v_cost in array v_costs loop
            if v_used + v_cost > v_multi then
                v_segments := v_segments + 1;
                v_used := 0;
            end if;
            v_used := v_used + v_cost;
        end loop;
    end if;
    return jsonb_build_object('encoding', case when v_gsm then 'GSM-7' else 'UCS-2' end, 'segments', v_segments, 'units', v_units);
end
$$;
comment on function notify._sms_parts(text) is
    'How an SMS text is sent: {encoding: GSM-7|UCS-2, segments, units (septets or UTF-16 code units)}, by GSM 03.38 (extension characters count two septets; 160/153 septets, 70/67 units per segment; a two-unit character never split). The worker counts with the same rules (providers/twilio.py sms_parts).';
