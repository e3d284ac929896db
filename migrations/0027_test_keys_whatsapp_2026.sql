-- 0027 (issue #17): test keys, and WhatsApp as it is in 2026.
-- Test keys: a key may be a test key; what it submits is marked test (request and deliveries) and the claim hands test
-- deliveries to the mock provider whatever the tenant configured.
-- WhatsApp: business-scoped user ids (BSUIDs) as addresses and in webhooks (mapping, windows, opt-outs, user_id_update),
-- template categories (template_category_update; marketing consent; 131050 revokes it), pricing per delivery, the
-- portfolio's messaging tier (business_capability_update), throughput per number up to 1,000/s.

alter table notify.api_clients add column test boolean not null default false;
comment on column notify.api_clients.test is
    'A test key: everything it submits goes through the whole path but is sent by the mock provider only, whatever provider the tenant configured (notify.notification_deliveries.test).';
alter table notify.notification_requests
    add column test boolean not null default coalesce(nullif(current_setting('notify.test', true), '')::boolean, false);
comment on column notify.notification_requests.test is
    'Submitted with a test key (transaction setting notify.test, set from the key by notify._enter_key): its deliveries are test deliveries.';
alter table notify.notification_deliveries
    add column test boolean not null default coalesce(nullif(current_setting('notify.test', true), '')::boolean, false);
comment on column notify.notification_deliveries.test is
    'A test delivery (submitted with a test key): the claim hands it to the mock provider whatever the tenant configured, so it never reaches a real provider.';
alter table notify.notification_deliveries add column pricing jsonb;
comment on column notify.notification_deliveries.pricing is
    'What the provider says the message cost, from its status reports (WhatsApp: {pricing_model, category, billable, type}); the first report that carries it.';

alter type notify.status_event add attribute user_id text, add attribute recipient_phone text, add attribute pricing jsonb;
alter type notify.inbound_message add attribute user_id text;
comment on type notify.inbound_message is
    'A message a recipient sent to a business number (WhatsApp): it opens the 24-hour window, and an opt-out keyword revokes consent. The sender is known by its phone number (sender), its business-scoped user id (user_id), or both.';

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

create or replace function notify._address_valid(p_channel notify.channel, p_address text)
    returns boolean
    language sql
    immutable
    -- inlinable: no SET clause (see docs/architecture.md, "Hot helpers are inlined")
as $$
    select case p_channel
        -- No counted repetition ({1,64}) inside the pattern: it makes Postgres' regex engine 20x slower; lengths are checked apart.
        when 'email' then p_address ~ '^[A-Za-z0-9.!#$%&''*+/=?^_`{|}~-]+@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)+$'
                          and length(p_address) <= 254 and strpos(p_address, '@') <= 65
        when 'whatsapp' then p_address ~ '^\+[1-9][0-9]{6,14}$' or notify._is_bsuid(p_address)
        else p_address ~ '^\+[1-9][0-9]{6,14}$'
    end
$$;
comment on function notify._address_valid(notify.channel, text) is
    'E.164 (+ and 7 to 15 digits) for whatsapp and sms, or a business-scoped user id for whatsapp (notify._is_bsuid); a practical RFC 5322 addr-spec subset for email.';

create table notify.whatsapp_users (
    tenant_id uuid not null references notify.tenants (id),
    user_id text not null,
    wa_id text,
    parent_user_id text,
    updated_at timestamptz not null default now(),
    primary key (tenant_id, user_id),
    constraint whatsapp_users_user_id_format check (notify._is_bsuid(user_id)),
    constraint whatsapp_users_wa_id_format check (wa_id ~ '^[1-9][0-9]{6,14}$')
);
comment on table notify.whatsapp_users is
    'WhatsApp business-scoped user ids (BSUIDs) and the phone number each stands for when Meta has told us (statuses, inbound messages, user_id_update): a recipient addressed by either, and the 24-hour window and opt-out keywords of either, are the same user.';
comment on column notify.whatsapp_users.wa_id is 'The phone number, digits only (as Meta writes wa_id); null while only the BSUID is known.';
create index whatsapp_users_wa_id on notify.whatsapp_users (tenant_id, wa_id) where wa_id is not null;

create table notify.whatsapp_business_limits (
    tenant_id uuid not null references notify.tenants (id),
    waba_id text not null,
    messaging_tier text,
    payload jsonb not null default '{}',
    reported_at timestamptz not null default now(),
    primary key (tenant_id, waba_id)
);
comment on table notify.whatsapp_business_limits is
    'The messaging limit tier of a tenant''s WhatsApp business portfolio as Meta last reported it (business_capability_update): shared by every number of the portfolio; shown by dispatcher status.';

do $$
declare
    v_table text;
begin
    foreach v_table in array array['whatsapp_users', 'whatsapp_business_limits']
    loop
        execute format('alter table notify.%I enable row level security', v_table);
        execute format('alter table notify.%I force row level security', v_table);
        execute format('create policy tenant_rows on notify.%I to notify_owner
                            using (tenant_id = (select notify._tenant())) with check (tenant_id = (select notify._tenant()))', v_table);
        execute format('create policy system_rows on notify.%I to notify_system using (true) with check (true)', v_table);
    end loop;
end
$$;

-- A test key's submissions say "test": true in the answer stored with the request, so its replays say it too.
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
      from (select u.channel, u.ord, t.locale as template_locale, a.address, notify._uuidv7() as id,
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


grant select, insert, update, delete on notify.whatsapp_users, notify.whatsapp_business_limits to notify_system;

drop function notify_api.create_api_key_v1(uuid, text, text, bytea, text[]);
drop function notify_api.ingest_webhook_v1(text, text, jsonb, notify.status_event[], notify.inbound_message[], text[]);
create function notify_api.create_api_key_v1(p_tenant_id uuid, p_name text, p_prefix text, p_key_hash bytea,
                                             p_scopes text[] default '{submit,read,admin}', p_test boolean default false)
    returns jsonb
    language plpgsql
    security definer
    set search_path = pg_catalog, pg_temp
as $$
declare
    v notify.api_clients;
begin
    perform notify._enter(p_tenant_id);
    if p_scopes is null or cardinality(p_scopes) = 0 or not p_scopes <@ array['submit', 'read', 'admin'] then
        perform notify._raise('ND422', 'invalid_scopes', 'scopes must be a non-empty subset of submit, read, admin', 'scopes');
    end if;
    if not exists (select from notify.tenants where id = p_tenant_id) then
        perform notify._raise('ND404', 'not_found', 'no such tenant', 'tenant_id');
    end if;
    if octet_length(p_key_hash) is distinct from 32 then
        perform notify._raise('ND422', 'invalid_key_hash', 'key_hash must be a SHA-256 digest (32 bytes)', 'key_hash');
    end if;
    insert into notify.api_clients (tenant_id, name, prefix, key_hash, scopes, test)
    values (p_tenant_id, coalesce(p_name, 'default'), p_prefix, p_key_hash, p_scopes, coalesce(p_test, false))
    returning * into v;
    return jsonb_build_object('id', v.id, 'tenant_id', v.tenant_id, 'name', v.name, 'prefix', v.prefix,
                              'scopes', to_jsonb(v.scopes), 'test', v.test, 'created_at', v.created_at);
end
$$;
comment on function notify_api.create_api_key_v1(uuid, text, text, bytea, text[], boolean) is
    'Registers an API key by its SHA-256. The caller generates the key and shows it once; the database never sees it. p_test: a test key (everything it submits is sent by the mock provider only, README "Test keys").';

create or replace function notify_api.list_api_keys_v1(p_tenant_id uuid)
    returns jsonb
    language sql
    stable
    security definer
    set search_path = pg_catalog, pg_temp
as $$
    select notify._enter(p_tenant_id);
    select coalesce(jsonb_agg(jsonb_build_object('id', c.id, 'name', c.name, 'prefix', c.prefix, 'scopes', to_jsonb(c.scopes),
                                                 'test', c.test, 'created_at', c.created_at, 'last_used_at', c.last_used_at,
                                                 'expires_at', c.expires_at, 'revoked_at', c.revoked_at) order by c.created_at), '[]')
      from notify.api_clients c where c.tenant_id = p_tenant_id
$$;
comment on function notify_api.list_api_keys_v1(uuid) is 'A tenant''s keys (prefix only, never a hash), each saying whether it is a test key.';

create or replace function notify_api.rotate_api_key_v1(p_tenant_id uuid, p_key_id uuid, p_prefix text, p_key_hash bytea, p_overlap_seconds integer default 86400)
    returns jsonb
    language plpgsql
    security definer
    set search_path = pg_catalog, pg_temp
as $$
declare
    v notify.api_clients;
    v_new jsonb;
begin
    perform notify._enter(p_tenant_id);
    select * into v from notify.api_clients c
     where c.tenant_id = p_tenant_id and c.id = p_key_id and c.revoked_at is null and (c.expires_at is null or c.expires_at > now())
       for update;
    if v.id is null then
        perform notify._raise('ND404', 'not_found', 'no such active API key', 'key_id');
    end if;
    if p_overlap_seconds is null or p_overlap_seconds < 0 then
        perform notify._raise('ND422', 'invalid_value', 'overlap must be zero or more seconds', 'overlap_seconds');
    end if;
    v_new := notify_api.create_api_key_v1(p_tenant_id, v.name, p_prefix, p_key_hash, v.scopes, v.test);
    update notify.api_clients c set expires_at = now() + make_interval(secs => p_overlap_seconds)
     where c.tenant_id = p_tenant_id and c.id = p_key_id;
    return v_new || jsonb_build_object('replaces', p_key_id, 'old_key_expires_at', now() + make_interval(secs => p_overlap_seconds));
end
$$;
comment on function notify_api.rotate_api_key_v1(uuid, uuid, text, bytea, integer) is
    'Replaces a key with a new one of the same name, scopes and test flag; the old one keeps working for the overlap window, then stops.';

create function notify._enter_key(p_tenant_id uuid, p_key_id uuid)
    returns boolean
    language plpgsql
    volatile
    set search_path = pg_catalog, pg_temp
as $$
declare
    v_test boolean;
begin
    -- Decided from the key's row, never from anything the caller sends: the column defaults of requests and
    -- deliveries read this setting (notify.notification_deliveries.test), for this transaction only.
    select c.test into v_test from notify.api_clients c where c.tenant_id = p_tenant_id and c.id = p_key_id;
    v_test := coalesce(v_test, false);
    perform pg_catalog.set_config('notify.test', v_test::text, true);
    return v_test;
end
$$;
comment on function notify._enter_key(uuid, uuid) is
    'Sets the transaction setting notify.test from the API key (true for a test key, else false) and returns it: what a submission with that key writes is then marked test (the column defaults of notify.notification_requests and notification_deliveries read it).';

create or replace function notify_api.submit_notification_http_v1(p_tenant_id uuid, p_body jsonb, p_idempotency_key text, p_request_id text,
                                                       p_traceparent text, p_key_id uuid, p_rate double precision)
    returns table (response jsonb, replayed boolean)
    language plpgsql
    security definer
    set search_path = pg_catalog, pg_temp
as $$
begin
    perform notify._enter(p_tenant_id);
    -- The columns' defaults read these settings (notify.notification_requests.http_request_id and trace_parent, and
    -- the test flag of the request and its deliveries, from the key: notify._enter_key).
    perform pg_catalog.set_config('notify.request_id', coalesce(p_request_id, ''), true),
            pg_catalog.set_config('notify.traceparent', coalesce(p_traceparent, ''), true),
            notify._enter_key(p_tenant_id, p_key_id);
    select s.response, s.replayed into response, replayed
      from notify_api.submit_notification_v1(p_tenant_id, p_body, p_idempotency_key) s;
    -- The guard only checked the key (check_api_key_v1); the token is taken last, so the bucket's row lock is held
    -- only while the submission commits. ND429 here rolls the submission back.
    perform notify_api.charge_api_key_v1(p_key_id, p_rate);
    return next;
end
$$;
comment on function notify_api.submit_notification_http_v1(uuid, jsonb, text, text, text, uuid, double precision) is
    'POST /internal/notifications in one statement: sets notify.request_id, notify.traceparent and notify.test (from the key) for this transaction, calls submit_notification_v1 (its answer says "test": true for a test request), then takes the key''s rate token (charge_api_key_v1), last. Returns the response and whether it is a replay.';

create or replace function notify_api.submit_notifications_http_v1(p_tenant_id uuid, p_body jsonb, p_request_id text, p_traceparent text,
                                                        p_key_id uuid, p_rate double precision)
    returns jsonb
    language plpgsql
    security definer
    set search_path = pg_catalog, pg_temp
as $$
declare
    v_answer jsonb;
    v_test boolean;
begin
    perform notify._enter(p_tenant_id);
    perform pg_catalog.set_config('notify.request_id', coalesce(p_request_id, ''), true),
            pg_catalog.set_config('notify.traceparent', coalesce(p_traceparent, ''), true);
    v_test := notify._enter_key(p_tenant_id, p_key_id);
    v_answer := notify_api.submit_notifications_v1(p_tenant_id, p_body -> 'items');
    if v_test then
        v_answer := v_answer || '{"test": true}';   -- (each item's answer says so itself, as it was stored)
    end if;
    perform notify_api.charge_api_key_v1(p_key_id, p_rate);
    return v_answer;
end
$$;
comment on function notify_api.submit_notifications_http_v1(uuid, jsonb, text, text, uuid, double precision) is
    'POST /internal/notifications/batch in one statement: sets notify.request_id, notify.traceparent and notify.test (from the key) for this transaction, calls submit_notifications_v1 on the body''s items (a test key''s answer and items say "test": true), then takes the key''s rate token (charge_api_key_v1), last.';

create or replace function notify._delivery_json(d notify.notification_deliveries, p_detail boolean)
    returns jsonb
    language sql
    stable
    set search_path = pg_catalog, pg_temp
as $$
    select jsonb_strip_nulls(jsonb_build_object(
        'id', d.id, 'channel', d.channel, 'status', d.status, 'reason', d.reason, 'attempts', d.attempt,
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
    'The public JSON form of a delivery (timestamps include opened_at, the first e-mail open or click reported; "test": true for a test delivery; pricing, what the provider said it cost), with its history when p_detail.';

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
           bool_or(d.status in ('scheduled', 'queued', 'sending', 'unknown'))
      into v_deliveries, v_open
      from notify.notification_deliveries d where d.tenant_id = p_tenant_id and d.request_id = p_id;
    return jsonb_strip_nulls(jsonb_build_object(
        'id', v.id, 'status', case when v_open then 'in_progress' else 'completed' end,
        'created_at', v.created_at, 'idempotency_key', v.idempotency_key,
        'recipient', (select r.ref from notify.recipients r where r.tenant_id = v.tenant_id and r.id = v.recipient_id),
        'recipient_count', case when v.recipient_id is null then v.recipient_count end,
        'template', v.template_key, 'category', v.category, 'channels', to_jsonb(v.channels),
        'send_at', v.send_at, 'expires_at', v.expires_at, 'metadata', v.metadata, 'http_request_id', v.http_request_id,
        'callback_url', v.callback_url, 'test', case when v.test then true end))
        || jsonb_build_object('deliveries', coalesce(v_deliveries, '[]'));
end
$$;
comment on function notify_api.get_notification_v1(uuid, uuid) is
    'A notification with every delivery''s status, attempts, provider message id, timestamps and event history ("test": true for a test key''s). 404 for another tenant''s id.';

create or replace function notify_api.claim_deliveries_v1(p_channel notify.channel, p_limit integer, p_lease_seconds integer default 60)
    returns setof notify.claimed_delivery
    language plpgsql
    security definer
    set search_path = pg_catalog, pg_temp
as $$
begin
    if p_limit is null or p_limit < 1 or p_limit > 10000 then
        perform notify._raise('ND400', 'invalid_value', 'limit must be 1 to 10000', 'limit');
    end if;
    perform notify._set_source('claim');
    -- One pass: the locking scan returns the columns the decision needs (a locked row is its newest version), the
    -- decision is made once per row (materialized: its consent lookups run once, not once per column using it), and
    -- the update returns what the worker needs straight from the decision, without joining the rows again.
    return query
    with due as materialized (
        select d.tenant_id, d.id, d.request_id, d.recipient_id, d.channel, d.address, d.template_locale, d.variables,
               d.expires_at, d.test
          from notify.notification_deliveries d
         where d.channel = p_channel and d.status in ('queued', 'scheduled') and d.due_at <= now()
         order by d.due_at
         limit p_limit
           for update skip locked
    ), decided as materialized (
        -- Expiry and consent are checked again here: a revoke or a deadline between submit and send wins.
        -- Free-form WhatsApp text outside the 24-hour customer-service window is refused, not sent to fail.
        select d.tenant_id, d.id, d.address, d.template_locale, r.template_key, t.content,
               r.variables || coalesce(d.variables, '{}') as variables, r.category, d.request_id,
               -- A test delivery (README "Test keys") goes to the mock, whatever the tenant configured: never a real provider.
               case when d.test or r.test then 'mock' else cp.provider end as provider,
               case when d.test or r.test then '{"test": true}'::jsonb
                    when cp.provider is not null
                    then jsonb_build_object('settings', cp.settings, 'secrets', cp.secrets, 'updated_at', cp.updated_at,
                                            'grants', (select jsonb_build_object('env_prefix', g.env_prefix, 'file_dir', g.file_dir,
                                                                                 'private_endpoints', g.private_endpoints)
                                                         from notify.provider_grants g where g.tenant_id = d.tenant_id)) end
                   as provider_config,
               r.http_request_id, r.trace_parent,
               case when d.expires_at is not null and d.expires_at <= now() then 'expired'
                    when not consent.allowed then 'suppressed'
                    -- A marketing template (its WhatsApp category, followed from Meta's template_category_update) needs
                    -- marketing consent, whatever category the request named.
                    when t.content ->> 'category' = 'marketing'
                         and not notify._consent_allows(d.tenant_id, d.recipient_id, d.channel, 'marketing') then 'suppressed'
                    when cp.provider = 'whatsapp_cloud' and t.content ? 'text' and not exists (
                             select from notify.whatsapp_windows w
                              where w.tenant_id = d.tenant_id and w.phone_number_id = cp.settings ->> 'phone_number_id'
                                and w.wa_id = ltrim(d.address, '+') and w.last_inbound_at > now() - interval '24 hours')
                         then 'failed'
                    else 'sending' end::notify.delivery_status as next_status
          from due d
          join notify.notification_requests r on r.tenant_id = d.tenant_id and r.id = d.request_id
         cross join lateral notify._consent(d.tenant_id, d.recipient_id, d.channel, r.category) consent
          left join notify.channel_providers cp on cp.tenant_id = d.tenant_id and cp.channel = d.channel
          left join notify.templates t on t.tenant_id = d.tenant_id and t.key = r.template_key
                                      and t.channel = d.channel and t.locale = d.template_locale
    ), updated as (
        update notify.notification_deliveries d
           set status = x.next_status,
               attempt = d.attempt + (x.next_status = 'sending')::integer,
               lease_expires_at = case when x.next_status = 'sending' then now() + make_interval(secs => p_lease_seconds) end,
               reason = case x.next_status when 'expired' then 'expired_before_send' when 'suppressed' then 'no_consent'
                                           when 'failed' then 'outside_customer_service_window' else d.reason end
          from decided x
         where d.tenant_id = x.tenant_id and d.id = x.id
        returning d.tenant_id, d.id, d.attempt, d.channel, d.status, x.address, x.template_key, x.template_locale,
                  x.content, x.variables, x.category, x.request_id, x.provider, x.provider_config, x.http_request_id,
                  x.trace_parent
    ), attempts as (
        insert into notify.delivery_attempts (tenant_id, delivery_id, attempt)
        select u.tenant_id, u.id, u.attempt from updated u where u.status = 'sending'
    )
    select u.tenant_id, u.id, u.attempt, u.channel, u.address, u.template_key, u.template_locale, u.content,
           u.variables, u.category, u.request_id, coalesce(u.provider, 'mock'), u.provider_config,
           u.http_request_id, u.trace_parent
      from updated u
     where u.status = 'sending';
end
$$;
comment on function notify_api.claim_deliveries_v1(notify.channel, integer, integer) is
    'Claims up to p_limit due deliveries of a channel (FOR UPDATE SKIP LOCKED): expired ones become expired, revoked ones (and marketing templates without marketing consent) suppressed, WhatsApp text outside the 24-hour window failed, the rest sending with attempt+1 and a lease. Returns what the worker needs to send them, with the tenant''s provider and its operator grant (checked again at send time); for a test delivery always the mock provider, with config {"test": true}.';

create or replace function notify._callback_event(c notify.notification_deliveries, p_previous notify.delivery_status, r notify.notification_requests)
    returns jsonb
    language sql
    stable
    set search_path = pg_catalog, pg_temp
as $$
    select jsonb_build_object('type', 'delivery.status_changed', 'timestamp', now(), 'data', jsonb_strip_nulls(jsonb_build_object(
        'notification_id', c.request_id, 'delivery_id', c.id, 'sequence', c.seq, 'channel', c.channel,
        'status', c.status, 'previous_status', p_previous, 'reason', coalesce(c.reason, c.last_error_code),
        'attempt', nullif(c.attempt, 0), 'provider', c.provider, 'provider_message_id', c.provider_message_id,
        'metadata', nullif(r.metadata, '{}'::jsonb), 'http_request_id', r.http_request_id, 'test', case when c.test then true end)))
$$;
comment on function notify._callback_event(notify.notification_deliveries, notify.delivery_status, notify.notification_requests) is
    'The Standard Webhooks payload of one delivery status change: ids, sequence, channel, status and reason, the request''s metadata, "test": true for a test delivery. No address, no content.';

create or replace function notify._apply_provider_status(p_provider text, e notify.status_event)
    returns text
    language plpgsql
    set search_path = pg_catalog, pg_temp
as $$
declare
    d notify.notification_deliveries;
    v_at timestamptz := coalesce(e.occurred_at, now());
    v_matches integer;
begin
    if e.tenant_id is not null and e.delivery_id is not null then
        select * into d from notify.notification_deliveries x
         where x.tenant_id = e.tenant_id and x.id = e.delivery_id and (x.provider is null or x.provider = any (notify._provider_family(p_provider)))
           for update;
    end if;
    if d.id is null and e.provider_message_id is not null then
        -- Two deliveries may carry the id (an ESP reporting on its own and on SMTP-relayed mail, or ids a provider
        -- reused): the report cannot be attributed, so it changes nothing rather than pick one.
        select count(*) into v_matches from notify.notification_deliveries x
         where x.provider = any (notify._provider_family(p_provider)) and x.provider_message_id = e.provider_message_id;
        if v_matches > 1 then
            return 'ambiguous';
        end if;
        select * into d from notify.notification_deliveries x
         where x.provider = any (notify._provider_family(p_provider)) and x.provider_message_id = e.provider_message_id
           for update;
    end if;
    if d.id is null then
        return 'unmatched';
    end if;
    -- A WhatsApp report may name the recipient by its business-scoped user id, with or without the phone number: what it
    -- says ties the two together (the phone from the report, else the delivery's own address).
    if e.user_id is not null and p_provider = 'whatsapp_cloud' then
        perform notify._learn_whatsapp_user(d.tenant_id, e.user_id,
            coalesce(nullif(ltrim(e.recipient_phone, '+'), ''), case when d.address like '+%' then ltrim(d.address, '+') end));
    end if;

    if e.status is null then
        -- An engagement flag: never a status of its own, but it proves delivery, and a complaint is an opt-out.
        if e.flag is null or e.flag not in ('opened', 'clicked', 'complained', 'unsubscribed') then
            return 'ignored';
        end if;
        update notify.notification_deliveries x
           set opened_at = case when e.flag in ('opened', 'clicked') then least(x.opened_at, v_at) else x.opened_at end,
               complained_at = case when e.flag = 'complained' then least(x.complained_at, v_at) else x.complained_at end,
               status = case when notify._rank(x.channel, 'delivered') > notify._rank(x.channel, x.status)
                              and notify._transition_allowed(x.channel, x.status, 'delivered') then 'delivered' else x.status end,
               delivered_at = case when x.status in ('sending', 'sent', 'unknown') then least(x.delivered_at, v_at) else x.delivered_at end
         where x.tenant_id = d.tenant_id and x.id = d.id;
        if e.flag in ('complained', 'unsubscribed') and notify._consent_allows(d.tenant_id, d.recipient_id, d.channel, null) then
            insert into notify.recipient_consents (tenant_id, recipient_id, channel, status, source, evidence, recorded_by)
            values (d.tenant_id, d.recipient_id, d.channel, 'revoked', case e.flag when 'complained' then 'complaint' else 'provider_unsubscribe' end,
                    jsonb_build_object('delivery_id', d.id, 'provider', p_provider, 'reported_at', v_at), 'dispatcher');
        end if;
        return 'flagged';
    end if;

    if notify._rank(d.channel, e.status) > notify._rank(d.channel, d.status)
       and notify._transition_allowed(d.channel, d.status, e.status) then
        update notify.notification_deliveries x
           set status = e.status,
               reason = case when e.status in ('failed', 'bounced', 'suppressed') then 'provider_reported' else x.reason end,
               provider = coalesce(x.provider, p_provider),
               -- The report's id is taken only if no other delivery has it (the unique index would fail the webhook).
               provider_message_id = case
                   when x.provider_message_id is null and e.provider_message_id is not null
                        and not exists (select from notify.notification_deliveries y
                                         where y.provider = coalesce(x.provider, p_provider) and y.provider_message_id = e.provider_message_id
                                           and not (y.tenant_id = x.tenant_id and y.id = x.id))
                   then e.provider_message_id else x.provider_message_id end,
               sent_at = case when e.status in ('sent', 'delivered', 'read') then least(x.sent_at, v_at) else x.sent_at end,
               delivered_at = case when e.status in ('delivered', 'read') then least(x.delivered_at, v_at) else x.delivered_at end,
               read_at = case when e.status = 'read' then least(x.read_at, v_at) else x.read_at end,
               last_error_code = case when e.status in ('failed', 'bounced', 'suppressed') then coalesce(e.error_code, x.last_error_code)
                                      else x.last_error_code end,
               last_error_message = case when e.status in ('failed', 'bounced', 'suppressed') then coalesce(left(e.error_message, 1000), x.last_error_message)
                                         else x.last_error_message end
         where x.tenant_id = d.tenant_id and x.id = d.id;
        return 'applied';
    end if;
    -- A late or lower-ranked report changes no status, but still fills the time it happened.
    update notify.notification_deliveries x
       set sent_at = case when e.status in ('sent', 'delivered', 'read') then least(x.sent_at, v_at) else x.sent_at end,
           delivered_at = case when e.status in ('delivered', 'read') and x.status in ('delivered', 'read')
                               then least(x.delivered_at, v_at) else x.delivered_at end
     where x.tenant_id = d.tenant_id and x.id = d.id
       and e.status in ('sent', 'delivered', 'read');
    return 'stale';
end
$$;
comment on function notify._apply_provider_status(text, notify.status_event) is
    'Applies one provider status report to its delivery if it ranks higher and the move is legal (applied); otherwise only fills timestamps (stale). A WhatsApp report naming the recipient''s business-scoped user id maps it to the phone number (notify.whatsapp_users). A provider message id that two deliveries carry matches neither (ambiguous), and a report never gives its delivery an id another delivery has. Flags (opened, clicked, complained, unsubscribed) set their time, imply delivered, and a complaint or unsubscribe revokes consent (flagged). unmatched when no delivery is found.';

create or replace function notify._record_inbound(p_provider text, m notify.inbound_message)
    returns text
    language plpgsql
    set search_path = pg_catalog, pg_temp
as $$
declare
    v_tenant record;
    v_outcome text := 'unmatched';
    v_phone text := nullif(ltrim(coalesce(m.sender, ''), '+'), '');
    v_user_id text := case when notify._is_bsuid(m.user_id) then m.user_id end;
    v_ids text[];
    v_revoked integer;
begin
    if v_phone is null and v_user_id is null then
        return 'no_sender';
    end if;
    for v_tenant in
        select cp.tenant_id, cp.settings from notify.channel_providers cp
         where cp.provider = p_provider and cp.channel = 'whatsapp' and cp.settings ->> 'phone_number_id' = m.phone_number_id
    loop
        -- The sender may be known by its phone number, its business-scoped user id, or both (a user with a username may
        -- hide the number): both open the window and match opt-outs, with every identifier mapped to them.
        if v_user_id is not null and v_phone is not null then
            perform notify._learn_whatsapp_user(v_tenant.tenant_id, v_user_id, v_phone);
        end if;
        v_ids := notify._whatsapp_aliases(v_tenant.tenant_id, array_remove(array[v_phone, v_user_id], null));
        insert into notify.whatsapp_windows as w (tenant_id, phone_number_id, wa_id, last_inbound_at)
        select v_tenant.tenant_id, m.phone_number_id, i, coalesce(m.received_at, now()) from unnest(v_ids) i
        on conflict (tenant_id, phone_number_id, wa_id) do update
            set last_inbound_at = greatest(w.last_inbound_at, excluded.last_inbound_at);
        v_outcome := 'window_opened';
        if upper(btrim(coalesce(m.text, ''))) in (select upper(k) from jsonb_array_elements_text(coalesce(v_tenant.settings -> 'opt_out_keywords', '[]')) k) then
            insert into notify.recipient_consents (tenant_id, recipient_id, channel, status, source, evidence, recorded_by)
            select distinct a.tenant_id, a.recipient_id, 'whatsapp'::notify.channel, 'revoked'::notify.consent_status, 'inbound_keyword',
                   jsonb_strip_nulls(jsonb_build_object('message_id', m.message_id, 'text', m.text, 'received_at', m.received_at,
                                                        'phone_number_id', m.phone_number_id, 'user_id', v_user_id)), 'dispatcher'
              from notify.recipient_addresses a
             where a.tenant_id = v_tenant.tenant_id and a.channel = 'whatsapp'
               and a.address = any (select case when i ~ '^[0-9]+$' then '+' || i else i end from unnest(v_ids) i)
               and notify._consent_allows(a.tenant_id, a.recipient_id, 'whatsapp', null);
            get diagnostics v_revoked = row_count;
            v_outcome := case when v_revoked > 0 or v_outcome = 'opted_out' then 'opted_out' else 'opt_out_unknown_sender' end;
        end if;
    end loop;
    return v_outcome;
end
$$;
comment on function notify._record_inbound(text, notify.inbound_message) is
    'Records an inbound WhatsApp message for every tenant using that business number: opens the 24-hour window, and an opt-out keyword (settings.opt_out_keywords) revokes the sender''s WhatsApp consent with the message as evidence. The sender is matched by its phone number or its business-scoped user id, and by whatever notify.whatsapp_users maps either to.';

create function notify._whatsapp_aliases(p_tenant_id uuid, p_ids text[])
    returns text[]
    language sql
    stable
    set search_path = pg_catalog, pg_temp
as $$
    -- Phone numbers as digits (wa_id), BSUIDs as they are.
    select coalesce(array_agg(distinct x) filter (where x is not null and x <> ''), '{}')
      from (select unnest(p_ids) x
            union all
            select unnest(array[u.user_id, u.wa_id]) from notify.whatsapp_users u
             where u.tenant_id = p_tenant_id and (u.user_id = any (p_ids) or u.wa_id = any (p_ids))) s
$$;
comment on function notify._whatsapp_aliases(uuid, text[]) is
    'Every identifier of the same WhatsApp users: the given phone numbers (digits) and business-scoped user ids, and what notify.whatsapp_users maps them to.';

create function notify._learn_whatsapp_user(p_tenant_id uuid, p_user_id text, p_wa_id text, p_parent_user_id text default null)
    returns void
    language plpgsql
    set search_path = pg_catalog, pg_temp
as $$
declare
    v_wa_id text := case when p_wa_id ~ '^[1-9][0-9]{6,14}$' then p_wa_id end;
    v_changed integer;
begin
    if not coalesce(notify._is_bsuid(p_user_id), false) then
        return;
    end if;
    insert into notify.whatsapp_users as u (tenant_id, user_id, wa_id, parent_user_id)
    values (p_tenant_id, p_user_id, v_wa_id, case when notify._is_bsuid(p_parent_user_id) then p_parent_user_id end)
    on conflict (tenant_id, user_id) do update
        set wa_id = coalesce(excluded.wa_id, u.wa_id), parent_user_id = coalesce(excluded.parent_user_id, u.parent_user_id), updated_at = now()
        where (u.wa_id, u.parent_user_id) is distinct from (coalesce(excluded.wa_id, u.wa_id), coalesce(excluded.parent_user_id, u.parent_user_id));
    get diagnostics v_changed = row_count;
    -- Only a new mapping carries windows across (the common case, a status repeating what we know, reads nothing more).
    if v_wa_id is not null and v_changed > 0 then
        -- A window already open under one identifier is open under the other.
        insert into notify.whatsapp_windows as w (tenant_id, phone_number_id, wa_id, last_inbound_at)
        select w0.tenant_id, w0.phone_number_id, x.id, max(w0.last_inbound_at)
          from notify.whatsapp_windows w0 cross join (values (p_user_id), (v_wa_id)) x(id)
         where w0.tenant_id = p_tenant_id and w0.wa_id in (p_user_id, v_wa_id)
         group by w0.tenant_id, w0.phone_number_id, x.id
        on conflict (tenant_id, phone_number_id, wa_id) do update
            set last_inbound_at = greatest(w.last_inbound_at, excluded.last_inbound_at)
            where excluded.last_inbound_at > w.last_inbound_at;
    end if;
end
$$;
comment on function notify._learn_whatsapp_user(uuid, text, text, text) is
    'Records that a business-scoped user id stands for a phone number (digits; null: not known yet) and carries an open 24-hour window across to the other identifier. Writes nothing when nothing is new.';

create function notify._whatsapp_tenants(p_provider text, u jsonb)
    returns setof uuid
    language sql
    stable
    set search_path = pg_catalog, pg_temp
as $$
    -- A change names the business number (metadata.phone_number_id) or only the business account (entry.id, settings.waba_id).
    select cp.tenant_id from notify.channel_providers cp
     where cp.provider = p_provider and cp.channel = 'whatsapp'
       and ((u ->> 'phone_number_id') is not null and cp.settings ->> 'phone_number_id' = u ->> 'phone_number_id'
            or (u ->> 'phone_number_id') is null and (u ->> 'waba_id') is not null and cp.settings ->> 'waba_id' = u ->> 'waba_id')
$$;
comment on function notify._whatsapp_tenants(text, jsonb) is
    'The tenants a WhatsApp account-level change is about: by its business number when it names one, else by its business account id (settings.waba_id).';

create function notify._apply_whatsapp_update(p_provider text, u jsonb)
    returns text
    language plpgsql
    set search_path = pg_catalog, pg_temp
as $$
declare
    v_tenant uuid;
    v_outcome text := 'no_tenant';
    v_count integer;
    v_old text := u ->> 'previous_user_id';
    v_new text := u ->> 'user_id';
begin
    case u ->> 'kind'
    when 'user_id_update' then
        -- A user's BSUID changed (e.g. a new phone number): the mapping, the recipients addressed by the old one and its
        -- open windows move to the new one; consent belongs to the recipient, so it stays.
        if not coalesce(notify._is_bsuid(v_new), false) then
            return 'ignored';
        end if;
        for v_tenant in select t from notify._whatsapp_tenants(p_provider, u) t loop
            perform notify._learn_whatsapp_user(v_tenant, v_new,
                coalesce(nullif(ltrim(u ->> 'wa_id', '+'), ''),
                         (select x.wa_id from notify.whatsapp_users x where x.tenant_id = v_tenant and x.user_id = v_old)),
                u ->> 'parent_user_id');
            v_outcome := 'user_id_recorded';
            if notify._is_bsuid(v_old) and v_old <> v_new then
                update notify.recipient_addresses a set address = v_new, updated_at = now()
                 where a.tenant_id = v_tenant and a.channel = 'whatsapp' and a.address = v_old;
                get diagnostics v_count = row_count;
                -- Deliveries still waiting to be sent go to the new id too (a rare event: a scan of the waiting WhatsApp rows).
                update notify.notification_deliveries x set address = v_new
                 where x.channel = 'whatsapp' and x.status in ('queued', 'scheduled') and x.tenant_id = v_tenant and x.address = v_old;
                insert into notify.whatsapp_windows as w (tenant_id, phone_number_id, wa_id, last_inbound_at)
                select w0.tenant_id, w0.phone_number_id, v_new, w0.last_inbound_at from notify.whatsapp_windows w0
                 where w0.tenant_id = v_tenant and w0.wa_id = v_old
                on conflict (tenant_id, phone_number_id, wa_id) do update
                    set last_inbound_at = greatest(w.last_inbound_at, excluded.last_inbound_at);
                delete from notify.whatsapp_users x where x.tenant_id = v_tenant and x.user_id = v_old;
                v_outcome := case when v_count > 0 then 'user_id_updated' else 'user_id_recorded' end;
            end if;
        end loop;
    when 'template_category_update' then
        -- Meta moved an approved template to another category. Only the completed change (previous_category) is followed;
        -- an impending one (correct_category) is kept as its outcome, never routed on (whatsapp-2026.md §6).
        if u ->> 'previous_category' is null or lower(u ->> 'new_category') not in ('marketing', 'utility', 'authentication') then
            return case when u ->> 'correct_category' is not null then 'category_update_impending' else 'ignored' end;
        end if;
        for v_tenant in select t from notify._whatsapp_tenants(p_provider, u) t loop
            update notify.templates t
               set content = t.content || jsonb_build_object('category', lower(u ->> 'new_category')), version = t.version + 1, updated_at = now()
             where t.tenant_id = v_tenant and t.channel = 'whatsapp' and t.content ->> 'name' = u ->> 'name'
               and (u ->> 'language' is null or t.content ->> 'language' = u ->> 'language')
               and t.content ->> 'category' is distinct from lower(u ->> 'new_category');
            get diagnostics v_count = row_count;
            v_outcome := case when v_count > 0 or v_outcome = 'category_updated' then 'category_updated' else 'no_such_template' end;
        end loop;
    when 'messaging_tier' then
        for v_tenant in select t from notify._whatsapp_tenants(p_provider, u) t loop
            insert into notify.whatsapp_business_limits as l (tenant_id, waba_id, messaging_tier, payload, reported_at)
            values (v_tenant, coalesce(u ->> 'waba_id', ''), u ->> 'tier', coalesce(u -> 'payload', '{}'), coalesce((u ->> 'reported_at')::timestamptz, now()))
            on conflict (tenant_id, waba_id) do update
                set messaging_tier = coalesce(excluded.messaging_tier, l.messaging_tier), payload = excluded.payload, reported_at = excluded.reported_at
                where excluded.reported_at >= l.reported_at;
            v_outcome := 'tier_recorded';
        end loop;
    else
        v_outcome := 'ignored';
    end case;
    return v_outcome;
end
$$;
comment on function notify._apply_whatsapp_update(text, jsonb) is
    'Applies one WhatsApp account-level change, as the adapter normalized it ({kind, phone_number_id?, waba_id?, ...}): user_id_update (a BSUID replaced: mapping, addresses, waiting deliveries and windows follow), template_category_update (completed: the templates of that name and language get the new category; impending: kept only), messaging_tier (the portfolio''s tier, for dispatcher status).';

create function notify._record_pricing(p_provider text, e notify.status_event)
    returns boolean
    language plpgsql
    set search_path = pg_catalog, pg_temp
as $$
declare
    v_id uuid;
begin
    if e.pricing is null or jsonb_typeof(e.pricing) <> 'object' then
        return false;
    end if;
    -- The first report that carries it (Meta repeats it on sent, delivered and read): true when it is new.
    update notify.notification_deliveries x set pricing = e.pricing
     where x.pricing is null
       and ((e.tenant_id is not null and e.delivery_id is not null and x.tenant_id = e.tenant_id and x.id = e.delivery_id)
            or (e.delivery_id is null and e.provider_message_id is not null
                and x.provider = any (notify._provider_family(p_provider)) and x.provider_message_id = e.provider_message_id))
    returning x.id into v_id;
    return v_id is not null;
end
$$;
comment on function notify._record_pricing(text, notify.status_event) is
    'Keeps the pricing a status report carries ({pricing_model, category, billable, type}) on its delivery, once; true when it was recorded now (the API counts it in its metrics).';

create function notify_api.ingest_webhook_v1(p_provider text, p_event_key text, p_payload jsonb, p_events notify.status_event[],
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
    insert into notify.webhook_events (provider, event_key, payload)
    values (p_provider, p_event_key, coalesce(p_payload, 'null'))
    on conflict (provider, event_key) do nothing
    returning id into v_id;
    if v_id is null then
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
    update notify.webhook_events set outcomes = v_outcomes where id = v_id;
    return jsonb_build_object('stored', true, 'duplicate', false, 'id', v_id, 'outcomes', v_outcomes);
end
$$;
comment on function notify_api.ingest_webhook_v1(text, text, jsonb, notify.status_event[], notify.inbound_message[], text[], jsonb) is
    'Stores a verified provider webhook once per (provider, event key), applies its normalized status events by rank (keeping the pricing they carry: outcome priced) and records its inbound messages and account-level changes (p_updates, notify._apply_whatsapp_update); p_notes (what the adapter could not apply, and why) are kept as outcomes "kept" with their reason. A duplicate changes nothing.';

create function notify.tg_notification_deliveries__revoke_marketing_consent()
    returns trigger
    language plpgsql
    set search_path = pg_catalog, pg_temp
as $$
begin
    if notify._consent_allows(new.tenant_id, new.recipient_id, new.channel, 'marketing') then
        insert into notify.recipient_consents (tenant_id, recipient_id, channel, category, status, source, evidence, recorded_by)
        values (new.tenant_id, new.recipient_id, new.channel, 'marketing', 'revoked', 'provider_opt_out',
                jsonb_strip_nulls(jsonb_build_object('delivery_id', new.id, 'provider', new.provider, 'provider_message_id', new.provider_message_id,
                                                     'error_code', new.last_error_code, 'error_message', new.last_error_message,
                                                     'reported_at', now())), 'dispatcher');
    end if;
    return null;
end
$$;
comment on function notify.tg_notification_deliveries__revoke_marketing_consent() is
    'A WhatsApp delivery suppressed with error 131050 (the user stopped marketing messages) revokes the recipient''s marketing consent, with the delivery and the error as evidence.';

create or replace function notify_api.set_channel_provider_v1(p_tenant_id uuid, p_channel notify.channel, p_body jsonb)
    returns jsonb
    language plpgsql
    security definer
    set search_path = pg_catalog, pg_temp
as $$
declare
    v_provider text;
    v_settings jsonb;
    v_secrets jsonb;
    v_allowed text[];
    v_required text[];
    v_key text;
    v_ref text;
    v_grant notify.provider_grants;
    v_host text;
begin
    perform notify._enter(p_tenant_id);
    select * into v_grant from notify.provider_grants g where g.tenant_id = p_tenant_id;
    perform notify._check_keys(p_body, array['provider', 'settings', 'secrets'], '');
    v_provider := notify._text_field(p_body, 'provider', '', true, 40);
    if v_provider not in ('mock', 'whatsapp_cloud', 'smtp')
       or (v_provider = 'whatsapp_cloud' and p_channel <> 'whatsapp') or (v_provider = 'smtp' and p_channel <> 'email') then
        perform notify._raise('ND422', 'invalid_provider',
            format('provider %s cannot serve %s (mock: any channel; whatsapp_cloud: whatsapp; smtp: email)', v_provider, p_channel), 'provider');
    end if;
    v_settings := coalesce(p_body -> 'settings', '{}');
    v_secrets := coalesce(p_body -> 'secrets', '{}');
    if jsonb_typeof(v_settings -> 'phone_number_id') = 'number' then  -- an id, whatever JSON type it came as
        v_settings := v_settings || jsonb_build_object('phone_number_id', v_settings ->> 'phone_number_id');
    end if;
    v_allowed := case v_provider
        when 'whatsapp_cloud' then array['phone_number_id', 'api_version', 'base_url', 'rate_per_second', 'timeout_seconds', 'opt_out_keywords',
                                         'waba_id']
        when 'smtp' then array['host', 'port', 'security', 'username', 'from_address', 'from_name', 'timeout_seconds', 'validate_certs',
                               'esp', 'transactional_categories', 'max_connections', 'public_url']
        else array[]::text[] end;
    perform notify._check_keys(v_settings, v_allowed, 'settings');
    perform notify._check_keys(v_secrets, case v_provider when 'whatsapp_cloud' then array['access_token']
                                                          when 'smtp' then array['password'] else array[]::text[] end, 'secrets');
    if not notify._secret_refs_valid(v_secrets) then
        select k into v_key from jsonb_each(v_secrets) e(k, v) where not notify._secret_refs_valid(jsonb_build_object(k, v)) limit 1;
        perform notify._raise('ND422', 'invalid_secret_reference',
            'secrets take references, not values: "env:VARIABLE" or "file:/absolute/path"', 'secrets.' || v_key);
    end if;
    for v_key, v_ref in select k, v #>> '{}' from jsonb_each(v_secrets) e(k, v) order by k loop
        if not notify._secret_ref_allowed(v_ref, v_grant) then
            perform notify._raise('ND422', 'secret_not_allowed',
                case when v_grant.env_prefix is null and v_grant.file_dir is null
                     then 'this tenant may not reference secrets until the operator grants it a namespace (dispatcher tenant secrets)'
                     else 'secrets must name ' || concat_ws(' or ', 'an environment variable starting with ' || v_grant.env_prefix,
                                                          'a file below ' || v_grant.file_dir) || ' (the namespace the operator granted this tenant)' end,
                'secrets.' || v_key);
        end if;
    end loop;
    v_required := case v_provider when 'whatsapp_cloud' then array['settings.phone_number_id', 'secrets.access_token']
                                  when 'smtp' then array['settings.host', 'settings.from_address'] else array[]::text[] end;
    foreach v_key in array v_required loop
        if jsonb_typeof(jsonb_build_object('settings', v_settings, 'secrets', v_secrets) #> string_to_array(v_key, '.')) is distinct from 'string' then
            perform notify._raise('ND400', 'missing_field', format('%s is required for %s', v_key, v_provider), v_key);
        end if;
    end loop;
    if v_provider = 'whatsapp_cloud' and v_settings ->> 'phone_number_id' !~ '^[0-9]{5,20}$' then
        perform notify._raise('ND400', 'invalid_format', 'settings.phone_number_id is the numeric Graph id of the business number',
                              'settings.phone_number_id');
    end if;
    if v_provider = 'whatsapp_cloud' and v_settings ? 'base_url' then
        v_host := substring(v_settings ->> 'base_url' from '^https?://(\[[0-9A-Fa-f:.]+\]|[^][/?#@:\s]+)(:[0-9]{1,5})?(/[^\s?#]*)?$');
        if jsonb_typeof(v_settings -> 'base_url') <> 'string' or v_host is null then
            perform notify._raise('ND400', 'invalid_format', 'settings.base_url must be an http(s) URL without credentials, query or fragment',
                                  'settings.base_url');
        end if;
        if not coalesce(v_grant.private_endpoints, false) and (v_settings ->> 'base_url' !~ '^https://' or not notify._host_public(v_host)) then
            perform notify._raise('ND422', 'unsafe_endpoint',
                'settings.base_url must be an https URL of a public host (private, loopback and single-label hosts need the operator''s grant)',
                'settings.base_url');
        end if;
    end if;
    if v_provider = 'smtp' then
        if v_settings ->> 'host' !~ '^([A-Za-z0-9_.-]{1,253}|\[?[0-9A-Fa-f:.]{2,45}\]?)$' then
            perform notify._raise('ND400', 'invalid_format', 'settings.host must be a host name or an IP address', 'settings.host');
        end if;
        if not coalesce(v_grant.private_endpoints, false) and not notify._host_public(v_settings ->> 'host') then
            perform notify._raise('ND422', 'unsafe_endpoint',
                'settings.host must be a public host (private, loopback and single-label hosts need the operator''s grant)', 'settings.host');
        end if;
        if not notify._address_valid('email', v_settings ->> 'from_address') then
            perform notify._raise('ND400', 'invalid_address', 'settings.from_address must be an e-mail address', 'settings.from_address');
        end if;
        if coalesce(v_settings ->> 'security', 'starttls') not in ('starttls', 'tls', 'none') then
            perform notify._raise('ND400', 'invalid_value', 'settings.security must be starttls, tls or none', 'settings.security');
        end if;
        if coalesce(v_settings ->> 'esp', 'sendgrid') not in ('sendgrid', 'mailgun') then
            perform notify._raise('ND400', 'invalid_value', 'settings.esp must be sendgrid or mailgun', 'settings.esp');
        end if;
        if v_settings ? 'port' and (jsonb_typeof(v_settings -> 'port') <> 'number' or (v_settings ->> 'port')::numeric not between 1 and 65535) then
            perform notify._raise('ND400', 'invalid_value', 'settings.port must be 1-65535', 'settings.port');
        end if;
    end if;
    if v_settings ? 'rate_per_second' and (jsonb_typeof(v_settings -> 'rate_per_second') <> 'number'
                                            or (v_settings ->> 'rate_per_second')::numeric <= 0) then
        perform notify._raise('ND400', 'invalid_value', 'settings.rate_per_second must be a positive number', 'settings.rate_per_second');
    end if;
    -- Meta's throughput per number: 80 messages per second by default, up to 1,000 once upgraded (whatsapp-2026.md §1).
    if v_provider = 'whatsapp_cloud' and (v_settings ->> 'rate_per_second')::numeric > 1000 then
        perform notify._raise('ND400', 'invalid_value', 'settings.rate_per_second must be at most 1000 (Meta''s highest throughput per number)',
                              'settings.rate_per_second');
    end if;
    if v_provider = 'whatsapp_cloud' and v_settings ? 'waba_id'
       and (jsonb_typeof(v_settings -> 'waba_id') not in ('string', 'number') or v_settings ->> 'waba_id' !~ '^[0-9]{1,32}$') then
        perform notify._raise('ND400', 'invalid_value', 'settings.waba_id must be the WhatsApp business account id (digits)', 'settings.waba_id');
    end if;
    if jsonb_typeof(v_settings -> 'waba_id') = 'number' then
        v_settings := v_settings || jsonb_build_object('waba_id', v_settings ->> 'waba_id');
    end if;

    insert into notify.channel_providers as c (tenant_id, channel, provider, settings, secrets)
    values (p_tenant_id, p_channel, v_provider, notify._provider_defaults(v_provider) || v_settings, v_secrets)
    on conflict (tenant_id, channel) do update
        set provider = excluded.provider, settings = excluded.settings, secrets = excluded.secrets, updated_at = now();
    return (select p from jsonb_array_elements(notify_api.list_channel_providers_v1(p_tenant_id)) p where p ->> 'channel' = p_channel::text);
exception
    when unique_violation then  -- channel_providers_phone_number_id_key: the number is another tenant's
        perform notify._raise('ND409', 'phone_number_taken',
            'settings.phone_number_id is configured for another tenant: a WhatsApp business number belongs to one tenant',
            'settings.phone_number_id');
end
$$;
comment on function notify_api.set_channel_provider_v1(uuid, notify.channel, jsonb) is
    'Sets the provider of a tenant''s channel: {provider: mock|whatsapp_cloud|smtp, settings, secrets: {name: "env:VAR"|"file:/path"}}. Settings are checked per provider and merged over its defaults (WhatsApp: rate_per_second at most 1000, waba_id routes account-level webhooks); secret references must lie in the tenant''s operator-set grant (notify.provider_grants), endpoints must be public hosts unless granted, a WhatsApp number belongs to one tenant.';

create or replace function notify_api.upsert_template_v1(p_tenant_id uuid, p_key text, p_body jsonb)
    returns jsonb
    language plpgsql
    security definer
    set search_path = pg_catalog, pg_temp
as $$
declare
    v_locale text;
    v_channels jsonb;
    v_key text;
    v_content jsonb;
    v_channel notify.channel;
begin
    perform notify._enter(p_tenant_id);
    perform notify._check_keys(p_body, array['locale', 'channels'], '');
    if p_key is null or p_key !~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$' then
        perform notify._raise('ND400', 'invalid_format', 'template key must be 1-100 letters, digits, _ . or -', 'key');
    end if;
    v_locale := coalesce(notify._text_field(p_body, 'locale', '', false, 35),
                         (select default_locale from notify.tenants where id = p_tenant_id));
    if v_locale !~ '^[A-Za-z]{2,3}(-[A-Za-z0-9]{2,8})*$' then
        perform notify._raise('ND400', 'invalid_format', 'locale must be a BCP 47 tag such as es-ES', 'locale');
    end if;
    v_channels := p_body -> 'channels';
    if v_channels is null or jsonb_typeof(v_channels) <> 'object' or v_channels = '{}' then
        perform notify._raise('ND400', 'missing_field', 'channels must map at least one channel to its content', 'channels');
    end if;
    perform notify._check_keys(v_channels, enum_range(null::notify.channel)::text[], 'channels');
    for v_key, v_content in select * from jsonb_each(v_channels) loop
        v_channel := v_key::notify.channel;
        if jsonb_typeof(v_content) <> 'object' then
            perform notify._raise('ND400', 'invalid_type', format('channels.%s must be an object', v_key), 'channels.' || v_key);
        end if;
        case v_channel
            when 'email' then
                perform notify._check_keys(v_content, array['subject', 'text', 'html'], 'channels.email');
                -- Sizes match the render limits (DISPATCHER_RENDER_MAX_*): a template that passes here fits when rendered
                -- unless its variables or loops make it grow.
                perform notify._template_text(v_content, 'subject', 'channels.email', true, 998);
                perform notify._template_text(v_content, 'text', 'channels.email', true, 65536);
                perform notify._template_text(v_content, 'html', 'channels.email', false, 262144);
            when 'whatsapp' then
                perform notify._check_keys(v_content, array['name', 'language', 'parameters', 'header_parameters', 'buttons', 'text',
                                                            'category'], 'channels.whatsapp');
                -- Meta's category of the approved template (followed afterwards from template_category_update webhooks):
                -- a marketing template needs marketing consent.
                if v_content ? 'category' and coalesce(v_content ->> 'category', '') not in ('marketing', 'utility', 'authentication') then
                    perform notify._raise('ND400', 'invalid_value', 'channels.whatsapp.category must be marketing, utility or authentication',
                                          'channels.whatsapp.category');
                end if;
                if (v_content ? 'text') = (v_content ? 'name') then
                    perform notify._raise('ND400', 'invalid_template',
                        'channels.whatsapp needs either name (an approved template) or text (free-form)', 'channels.whatsapp');
                end if;
                perform notify._text_field(v_content, 'name', 'channels.whatsapp', false, 512);
                perform notify._text_field(v_content, 'language', 'channels.whatsapp', false, 16);
                perform notify._template_text(v_content, 'text', 'channels.whatsapp', false, 4096);
                foreach v_key in array array['parameters', 'header_parameters'] loop
                    if v_content ? v_key and (jsonb_typeof(v_content -> v_key) <> 'array'
                         or exists (select from jsonb_array_elements(v_content -> v_key) e
                                     where jsonb_typeof(e) <> 'string' or e #>> '{}' !~ '^[A-Za-z_][A-Za-z0-9_]*$')) then
                        perform notify._raise('ND400', 'invalid_type', format('channels.whatsapp.%s must be a list of variable names', v_key),
                                              'channels.whatsapp.' || v_key);
                    end if;
                end loop;
                if v_content ? 'buttons' and (jsonb_typeof(v_content -> 'buttons') <> 'array'
                     or exists (select from jsonb_array_elements(v_content -> 'buttons') b
                                 where jsonb_typeof(b) <> 'object'
                                    or (select count(*) from jsonb_object_keys(b) k where k not in ('sub_type', 'index', 'parameter')) > 0
                                    or b ->> 'sub_type' not in ('quick_reply', 'url')
                                    or jsonb_typeof(b -> 'index') <> 'number'
                                    or coalesce(b ->> 'parameter', '') !~ '^[A-Za-z_][A-Za-z0-9_]*$')) then
                    perform notify._raise('ND400', 'invalid_type',
                        'channels.whatsapp.buttons must be a list of {sub_type: quick_reply|url, index, parameter: variable name}',
                        'channels.whatsapp.buttons');
                end if;
            else
                perform notify._check_keys(v_content, array['text'], 'channels.' || v_key);
                perform notify._template_text(v_content, 'text', 'channels.' || v_key, true, 1600);
        end case;
        insert into notify.templates as t (tenant_id, key, channel, locale, content, required_variables)
        values (p_tenant_id, p_key, v_channel, v_locale, v_content, notify._template_variables(v_content))
        on conflict (tenant_id, key, channel, locale) do update
            set content = excluded.content, required_variables = excluded.required_variables,
                version = t.version + 1, updated_at = now()
            where t.content is distinct from excluded.content;
    end loop;
    return notify_api.list_templates_v1(p_tenant_id, p_key);
end
$$;
comment on function notify_api.upsert_template_v1(uuid, text, jsonb) is
    'Sets the content of a template key for one locale: {locale?, channels: {email: {subject, text, html?}, whatsapp: {name, language, category?, parameters[], header_parameters[], buttons[{sub_type, index, parameter}]} | {text}, sms: {text}}} (category: marketing, utility or authentication, Meta''s). Texts over their size (subject 998, e-mail text 65,536, HTML 262,144, WhatsApp text 4,096, SMS 1,600 characters) are 422 template_too_large.';

create function notify_api.whatsapp_limits_v1()
    returns table (tenant text, waba_id text, messaging_tier text, reported_at timestamptz)
    language sql
    stable
    security definer
    set search_path = pg_catalog, pg_temp
as $$
    select t.slug, l.waba_id, l.messaging_tier, l.reported_at
      from notify.whatsapp_business_limits l join notify.tenants t on t.id = l.tenant_id
     order by t.slug, l.waba_id
$$;
comment on function notify_api.whatsapp_limits_v1() is
    'Per tenant and WhatsApp business account: the portfolio''s messaging limit tier as Meta last reported it (business_capability_update), for dispatcher status.';

create or replace function notify._settle_owners()
    returns void
    language plpgsql
    set search_path = pg_catalog, pg_temp
as $$
declare
    r record;
begin
    for r in select c.oid::regclass as rel from pg_class c where c.relnamespace = 'notify'::regnamespace and c.relkind in ('r', 'p') loop
        execute format('alter table %s owner to notify_owner', r.rel);
    end loop;
    for r in select t.oid::regtype as typ from pg_type t left join pg_class c on c.oid = t.typrelid
              where t.typnamespace = 'notify'::regnamespace and (t.typtype = 'e' or c.relkind = 'c') loop
        execute format('alter type %s owner to notify_owner', r.typ);
    end loop;
    for r in select p.oid::regprocedure as fn, p.pronamespace = 'notify_api'::regnamespace and p.proname = any (array[
                 'create_tenant_v1', 'get_tenant_v1', 'authenticate_api_key_v1', 'authorize_v1', 'take_tokens_v1',
                 'claim_deliveries_v1', 'record_attempts_v1', 'run_maintenance_v1', 'queue_health_v1', 'ingest_webhook_v1',
                 'record_mock_messages_v1', 'claim_callbacks_v1', 'record_callback_attempts_v1', 'check_api_key_v1',
                 'charge_api_key_v1', 'set_provider_grants_v1', 'whatsapp_limits_v1']) as cross_tenant
               from pg_proc p where p.pronamespace in ('notify'::regnamespace, 'notify_api'::regnamespace) loop
        execute format('alter function %s owner to %s', r.fn, case when r.cross_tenant then 'notify_system' else 'notify_owner' end);
    end loop;
end
$$;
comment on function notify._settle_owners() is
    'Gives every notify table, type and function to notify_owner, and the cross-tenant notify_api functions to notify_system. Run by the migrating role (a member of both) at the end of every migration that creates objects.';

create trigger _400_revoke_marketing_consent
    after update of status on notify.notification_deliveries
    for each row
    when (new.status = 'suppressed' and old.status is distinct from new.status and new.channel = 'whatsapp'
          and new.last_error_code = 'whatsapp_131050')
    execute function notify.tg_notification_deliveries__revoke_marketing_consent();

revoke execute on function notify_api.create_api_key_v1(uuid, text, text, bytea, text[], boolean) from public;
revoke execute on function notify_api.ingest_webhook_v1(text, text, jsonb, notify.status_event[], notify.inbound_message[], text[], jsonb) from public;
revoke execute on function notify_api.whatsapp_limits_v1() from public;
revoke execute on function notify._enter_key(uuid, uuid) from public;
revoke execute on function notify._is_bsuid(text) from public;
revoke execute on function notify._whatsapp_aliases(uuid, text[]) from public;
revoke execute on function notify._learn_whatsapp_user(uuid, text, text, text) from public;
revoke execute on function notify._whatsapp_tenants(text, jsonb) from public;
revoke execute on function notify._apply_whatsapp_update(text, jsonb) from public;
revoke execute on function notify._record_pricing(text, notify.status_event) from public;
revoke execute on function notify.tg_notification_deliveries__revoke_marketing_consent() from public;
grant execute on function notify_api.create_api_key_v1(uuid, text, text, bytea, text[], boolean) to notify_service;
grant execute on function notify_api.ingest_webhook_v1(text, text, jsonb, notify.status_event[], notify.inbound_message[], text[], jsonb) to notify_service;
grant execute on function notify_api.whatsapp_limits_v1() to notify_service;
grant execute on function notify._enter_key(uuid, uuid) to notify_system;
grant execute on function notify._is_bsuid(text) to notify_system;
grant execute on function notify._whatsapp_aliases(uuid, text[]) to notify_system;
grant execute on function notify._learn_whatsapp_user(uuid, text, text, text) to notify_system;
grant execute on function notify._whatsapp_tenants(text, jsonb) to notify_system;
grant execute on function notify._apply_whatsapp_update(text, jsonb) to notify_system;
grant execute on function notify._record_pricing(text, notify.status_event) to notify_system;
grant execute on function notify.tg_notification_deliveries__revoke_marketing_consent() to notify_system;
select notify._settle_owners();
