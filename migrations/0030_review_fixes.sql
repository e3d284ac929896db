-- 0030: review fixes of round 13.
-- Erasure (notify_api.erase_recipient_v1) reaches the WhatsApp identifiers mapped to the recipient's addresses
-- (notify.whatsapp_users): the 24-hour windows kept under its business-scoped user id, the webhook payloads that name
-- only that id, and its opt-outs, which stay out under the BSUID too. A raw webhook payload is the erasing tenant's
-- only when it names one of its deliveries, their provider message ids or its business numbers exactly (no longer as
-- substrings: another tenant's erasure could rewrite it).
-- notify._ensure_partitions locks the default partition against writers before it moves a day's rows out of it: a row
-- committed between the move and the attach made ATTACH fail, and with it the whole retention run.
-- A submission (notify._upsert_recipient, notify._submit_batch_usual) locks a known recipient KEY SHARE (as its deliveries'
-- foreign-key check does anyway) before it reads the addresses: one racing an erasure waits for it instead of copying an
-- erased address into a delivery.

create or replace function notify_api.erase_recipient_v1(p_tenant_id uuid, p_ref text, p_erased_by text default null)
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
    v_wa_ids text[];             -- its WhatsApp identifiers (phones' digits, BSUIDs) and what notify.whatsapp_users maps them to
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
    -- Since 2026 Meta may name a user by its business-scoped user id alone: the ids mapped to its addresses are its too,
    -- its WhatsApp addresses under either form (so an opt-out stays out under both, and both forms' copies go).
    select array_agg(distinct x) into v_addresses
      from (select unnest(coalesce(v_addresses, '{}'))
            union all
            select 'whatsapp:' || w
              from unnest(notify._whatsapp_aliases(p_tenant_id, array(select ltrim(substr(a, 10), '+')
                                                                         from unnest(coalesce(v_addresses, '{}')) a
                                                                        where a like 'whatsapp:%'))) i,
                   lateral (select case when i ~ '^[0-9]+$' then '+' || i else i end) v(w)
             where notify._address_valid('whatsapp', w)) s(x);
    v_wa_ids := notify._whatsapp_aliases(p_tenant_id, array(select ltrim(substr(x, strpos(x, ':') + 1), '+')
                                                            from unnest(coalesce(v_addresses, '{}')) x));
    select array_agg(distinct n) into v_needles
      from (select v.n
              from unnest(coalesce(v_addresses, '{}')) a,
                   lateral (values (split_part(a, ':', 2)), (lower(split_part(a, ':', 2))), (ltrim(split_part(a, ':', 2), '+'))) v(n)
            union all
            select unnest(v_wa_ids)) x(n)
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
    -- by the business-scoped user id, and by whatever the mapping links them to (a window is kept under both).
    delete from notify.whatsapp_windows w
     where w.tenant_id = p_tenant_id and w.wa_id = any (v_wa_ids);
    get diagnostics v_n = row_count;
    v_counts := v_counts || jsonb_build_object('whatsapp_windows', v_n);
    delete from notify.whatsapp_users u
     where u.tenant_id = p_tenant_id and (u.wa_id = any (v_wa_ids) or u.user_id = any (v_wa_ids));
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
            -- exactly (as a value, a business number as a phone_number_id): a substring would let another tenant's
            -- erasure rewrite ours (phone_number_id is any 5-20 digits, the digits of a phone for one)
            or jsonb_path_exists(e.payload, 'lax $.** ? (@ == $ids[*])', jsonb_build_object('ids', to_jsonb(v_message_ids)))
            or jsonb_path_exists(e.payload, 'lax $.**.phone_number_id ? (@ == $ids[*])', jsonb_build_object('ids', to_jsonb(v_numbers))));
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

create or replace function notify._ensure_partitions(p_from date, p_to date)
    returns integer
    language plpgsql
    security definer
    set search_path = pg_catalog, pg_temp
    set lock_timeout = '2s'
as $$
declare
    t record;
    v_day date;
    v_name text;
    v_from timestamptz;
    v_to timestamptz;
    v_made integer := 0;
begin
    -- A day is a UTC day. A partition is created as a table of its own and attached (which locks the parent only in SHARE
    -- UPDATE EXCLUSIVE mode, so inserts and reads go on); rows the default partition took for that day move into it first.
    for t in select * from notify._partitioned_tables() loop
        for v_day in select d::date from generate_series(p_from, p_to, interval '1 day') d loop
            v_name := t.table_name || '_p' || to_char(v_day, 'YYYYMMDD');
            continue when to_regclass('notify.' || v_name) is not null;
            v_from := v_day::timestamp at time zone 'UTC';
            v_to := (v_day + 1)::timestamp at time zone 'UTC';
            begin
                execute format('create table notify.%I (like notify.%I including defaults including constraints) with (fillfactor = %s)',
                               v_name, t.table_name, t.fillfactor);
                -- Writers of the default partition wait from here to the attach (which would find a row one of them
                -- committed after the move, and fail); reads go on. A writer holding it past lock_timeout: the next run.
                execute format('lock table notify.%I in exclusive mode', t.table_name || '_default');
                execute format('with moved as (delete from notify.%I where %I >= %L and %I < %L returning *) insert into notify.%I select * from moved',
                               t.table_name || '_default', t.column_name, v_from, t.column_name, v_to, v_name);
                execute format('alter table notify.%I attach partition notify.%I for values from (%L) to (%L)',
                               t.table_name, v_name, v_from, v_to);
                execute format('comment on table notify.%I is %L', v_name,
                               format('Partition of notify.%s for %s (UTC), made by notify._ensure_partitions.', t.table_name, v_day));
                v_made := v_made + 1;
            exception
                when lock_not_available then
                    null;  -- busy (a long reader of the default partition): the next run makes it, rows wait in the default
            end;
        end loop;
    end loop;
    return v_made;
end
$$;

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
      from notify.recipients r where r.tenant_id = p_tenant_id and r.ref = p_ref
       -- the lock the deliveries' foreign-key check takes anyway (KEY SHARE: no queue behind another submission), taken
       -- before the addresses are read, so an erasure in progress (FOR UPDATE) is waited for, not read around
       for key share of r;
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
                                recipient_id, effective_locale, request_id)
    select it.i, it.item ->> 'idempotency_key', it.body, it.r ->> 'ref', nullif(it.r -> 'addresses', 'null'),
           it.r ->> 'locale', string_to_array(translate((it.body -> 'channels')::text, '[]" ', ''), ',')::notify.channel[],
           it.body ->> 'template', coalesce(nullif(it.body -> 'variables', 'null'), '{}'), it.body ->> 'category',
           coalesce(nullif(it.body -> 'metadata', 'null'), '{}'), rec.id,
           coalesce(it.r ->> 'locale', rec.locale, n.default_locale), gen_random_uuid()
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
