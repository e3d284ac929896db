-- 0020: one submission path. The body is read once into a notify.submission (notify._parse_submission); a single
-- recipient and a fan-out share the idempotency claim (notify._claim_submission), template resolution
-- (notify._resolve_template, once per channel and locale) and the wake-up (notify._wake_submission).
-- notify._submit_fanout takes the parsed submission instead of its fields one by one. Answers, errors and replays
-- are unchanged.

drop function notify._submit_fanout(uuid, jsonb, text, notify.channel[], text, jsonb, text, timestamptz, timestamptz, jsonb);

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
    callback_url text
);
comment on type notify.submission is
    'A submission body read and checked once (notify._parse_submission): recipient (one, the object) or recipients (a fan-out, the list, checked by notify._submit_fanout), and what every recipient shares. fingerprint is the body''s SHA-256, compared on replay.';

create or replace function notify._parse_submission(p_tenant_id uuid, p_request jsonb, p_idempotency_key text)
    returns notify.submission
    language plpgsql
    stable
    set search_path = pg_catalog, pg_temp
as $$
declare
    s notify.submission;
begin
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
    if p_idempotency_key is not null and p_idempotency_key !~ '^[\x21-\x7e]{1,255}$' then
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
                                         out request_id uuid, out replay jsonb)
    language plpgsql
    volatile
    set search_path = pg_catalog, pg_temp
as $$
begin
    -- A concurrent twin waits here for our commit, then replays it.
    insert into notify.notification_requests
        (tenant_id, idempotency_key, fingerprint, recipient_id, recipient_count, template_key, variables, category, channels,
         send_at, expires_at, metadata, callback_url)
    values (p_tenant_id, s.idempotency_key, s.fingerprint, p_recipient_id, p_recipient_count, s.template, s.variables,
            s.category, s.channels, s.send_at, s.expires_at, s.metadata, s.callback_url)
    on conflict (tenant_id, idempotency_key) do nothing
    returning id into request_id;
    if request_id is null then
        replay := notify._replay(p_tenant_id, s.idempotency_key, s.fingerprint);
    end if;
end
$$;
comment on function notify._claim_submission(uuid, notify.submission, uuid, integer) is
    'Claims the submission''s idempotency key with its request row (recipient_id for one recipient, null for a fan-out of p_recipient_count): the new request''s id, or, when the key was taken, the stored response to replay (ND422 idempotency_key_reused for another body).';

create or replace function notify._wake_submission(s notify.submission, p_channels notify.channel[])
    returns void
    language plpgsql
    volatile
    set search_path = pg_catalog, pg_temp
as $$
begin
    -- With the caller's commit: now, or when the scheduled work falls due. In channel order, whatever order the
    -- caller gave: a wake-up's insert waits for a concurrent one of the same lock, so every submission takes them alike.
    perform notify._wake(c, case when s.send_at > now() then s.send_at end) from unnest(p_channels) c order by c;
end
$$;
comment on function notify._wake_submission(notify.submission, notify.channel[]) is
    'Wakes the worker for the channels a submission queued or scheduled deliveries on: now, or at send_at if it is in the future.';

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
    v_claim := notify._claim_submission(p_tenant_id, s, null, v_count);
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

create or replace function notify_api.submit_notification_v1(p_tenant_id uuid, p_request jsonb, p_idempotency_key text default null)
    returns table (response jsonb, replayed boolean)
    language plpgsql
    security definer
    set search_path = pg_catalog, pg_temp
as $$
declare
    s notify.submission;
    v_recipient notify.recipients;
    v_claim record;
    v_channel notify.channel;
    v_tpl notify.templates;
    v_template_locales text[] := '{}';
    v_missing text;
    v_locale text;
    v_now timestamptz := now();
    v_response jsonb;
    v_open notify.channel[];
begin
    perform notify._enter(p_tenant_id);
    -- 1. The body, read and checked once; every error names its field, nothing is written yet.
    s := notify._parse_submission(p_tenant_id, p_request, p_idempotency_key);
    if s.recipient is null then
        return query select * from notify._submit_fanout(p_tenant_id, s);
        return;
    end if;

    -- 2. The recipient and its addresses.
    v_recipient := notify._upsert_recipient(p_tenant_id, notify._text_field(s.recipient, 'ref', 'recipient', true, 200),
                                            s.recipient, 'recipient');

    -- 3. Claim the idempotency key, or replay the request that holds it.
    v_claim := notify._claim_submission(p_tenant_id, s, v_recipient.id, 1);
    if v_claim.request_id is null then
        response := v_claim.replay;
        replayed := true;
        return next;
        return;
    end if;

    -- 4. Templates and variables, checked now rather than at send time, channel by channel.
    v_locale := coalesce(v_recipient.locale, (select default_locale from notify.tenants where id = p_tenant_id));
    foreach v_channel in array s.channels loop
        v_tpl := notify._resolve_template(p_tenant_id, s.template, v_channel, v_locale);
        if v_tpl.key is null then
            perform notify._raise('ND422', 'template_not_found',
                format('template %s has no %s content for locale %s or its fallbacks', s.template, v_channel, v_locale), 'template');
        end if;
        select string_agg(r, ', ') into v_missing
          from unnest(v_tpl.required_variables) r where not s.variables ? r;
        if v_missing is not null then
            perform notify._raise('ND422', 'missing_variables',
                format('template %s (%s) needs variables: %s', s.template, v_channel, v_missing),
                'variables.' || split_part(v_missing, ', ', 1));
        end if;
        v_template_locales := v_template_locales || v_tpl.locale;   -- resolved once: the deliveries below reuse it
    end loop;

    -- 5. One delivery per channel, suppressed ones with their reason; consent checked now and again at claim.
    perform notify._set_source('submit');
    with inserted as (
        insert into notify.notification_deliveries
            (tenant_id, request_id, recipient_id, channel, address, template_locale, status, reason, due_at, expires_at)
        select p_tenant_id, v_claim.request_id, v_recipient.id, c.channel, a.address, v_template_locales[c.ord],
               case when a.address is null or not c.allowed then 'suppressed'
                    when s.send_at > v_now then 'scheduled'
                    else 'queued' end::notify.delivery_status,
               case when a.address is null then 'no_address'
                    when not c.allowed then 'no_consent' end,
               greatest(coalesce(s.send_at, v_now), v_now), s.expires_at
          from (select u.channel, u.ord, notify._consent_allows(p_tenant_id, v_recipient.id, u.channel, s.category) as allowed
                  from unnest(s.channels) with ordinality as u(channel, ord) offset 0) c
          left join notify.recipient_addresses a
                 on a.tenant_id = p_tenant_id and a.recipient_id = v_recipient.id and a.channel = c.channel
         order by c.ord
        returning *
    )
    select jsonb_build_object(
               'id', v_claim.request_id, 'created_at', v_now,
               'status', case when bool_and(i.status = 'suppressed') then 'suppressed' else 'accepted' end,
               'deliveries', jsonb_agg(jsonb_strip_nulls(jsonb_build_object(
                    'id', i.id, 'channel', i.channel, 'status', i.status, 'reason', i.reason))
                    order by array_position(s.channels, i.channel))),
           array_agg(i.channel) filter (where i.status in ('queued', 'scheduled'))
      into v_response, v_open
      from inserted i;

    update notify.notification_requests r set response = v_response
     where r.tenant_id = p_tenant_id and r.id = v_claim.request_id;

    -- 6. Wake the worker, with the caller's commit: now, or when the scheduled work falls due.
    perform notify._wake_submission(s, v_open);

    response := v_response;
    replayed := false;
    return next;
end
$$;
comment on function notify_api.submit_notification_v1(uuid, jsonb, text) is
    'Accepts a notification intent (the POST /internal/notifications body) in one transaction: idempotency, recipient upsert, template and variable checks, consent, one delivery per channel (per recipient for a fan-out), worker wake-up. Returns the response and whether it is a replay.';

revoke execute on function notify._parse_submission(uuid, jsonb, text) from public;
revoke execute on function notify._claim_submission(uuid, notify.submission, uuid, integer) from public;
revoke execute on function notify._wake_submission(notify.submission, notify.channel[]) from public;
revoke execute on function notify._submit_fanout(uuid, notify.submission) from public;
grant execute on function notify._parse_submission(uuid, jsonb, text) to notify_system;
grant execute on function notify._claim_submission(uuid, notify.submission, uuid, integer) to notify_system;
grant execute on function notify._wake_submission(notify.submission, notify.channel[]) to notify_system;
grant execute on function notify._submit_fanout(uuid, notify.submission) to notify_system;
select notify._settle_owners();
