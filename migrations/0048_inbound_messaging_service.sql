-- 0048: inbound SMS to a Twilio Messaging Service (issue #16). A tenant that sends through a Messaging Service (a sender
-- pool) receives replies on any number of its pool, none of them its from_number: those messages (STOP, START, HELP)
-- matched no tenant. A Messaging Service now belongs to one tenant (channel_providers_twilio_service_key, ND409
-- phone_number_taken naming settings.messaging_service_sid); an inbound message carries the service Twilio names
-- (notify.inbound_message.messaging_service_sid); webhook_keys_v1 and notify._record_sms_inbound find the tenant by the
-- number it was sent to, else by that service; erasure reaches such a message's stored payload by the service.
-- (Deploying over two tenants that share a Messaging Service SID fails on the index: one of them must change first.)

alter type notify.inbound_message add attribute messaging_service_sid text;
comment on type notify.inbound_message is
    'A message a recipient sent to a business number: WhatsApp (phone_number_id, the Graph id of the number): it opens the 24-hour window, and an opt-out keyword revokes consent; the sender is known by its phone number (sender), its business-scoped user id (user_id), or both. SMS through Twilio (phone_number_id: the E.164 number it was sent to, sender: the E.164 sender, messaging_service_sid: the Messaging Service the number belongs to, if any): STOP and START keywords revoke and restore SMS consent.';

-- And a Messaging Service (a sender pool): inbound SMS to any number of its pool are routed by the service they name.
create unique index channel_providers_twilio_service_key on notify.channel_providers ((settings ->> 'messaging_service_sid'))
    where provider = 'twilio';

create or replace function notify_api.set_channel_provider_v1(p_tenant_id uuid, p_channel notify.channel, p_body jsonb)
    returns jsonb
    language plpgsql
    security definer
    set search_path = pg_catalog, pg_temp
as $$
declare
    v_entry jsonb;
    v_constraint text;
begin
    perform notify._enter(p_tenant_id);
    v_entry := notify._provider_entry(p_tenant_id, p_channel, p_body);
    insert into notify.channel_providers as c (tenant_id, channel, position, provider, settings, secrets)
    values (p_tenant_id, p_channel, 0, v_entry ->> 'provider', v_entry -> 'settings', v_entry -> 'secrets')
    on conflict (tenant_id, channel, position) do update
        set provider = excluded.provider, settings = excluded.settings, secrets = excluded.secrets, updated_at = now();
    delete from notify.provider_health h where h.tenant_id = p_tenant_id and h.channel = p_channel and h.position = 0;  -- a new primary starts afresh
    return (select p from jsonb_array_elements(notify_api.list_channel_providers_v1(p_tenant_id)) p where p ->> 'channel' = p_channel::text);
exception
    when unique_violation then  -- channel_providers_phone_number_id_key (WhatsApp), _twilio_number_key, _twilio_service_key: another tenant's
        get stacked diagnostics v_constraint = constraint_name;
        if v_constraint = 'channel_providers_twilio_number_key' then
            perform notify._raise('ND409', 'phone_number_taken',
                'settings.from_number is configured for another tenant: a Twilio number belongs to one tenant', 'settings.from_number');
        end if;
        if v_constraint = 'channel_providers_twilio_service_key' then
            perform notify._raise('ND409', 'phone_number_taken',
                'settings.messaging_service_sid is configured for another tenant: a Twilio Messaging Service (its numbers) belongs to one tenant',
                'settings.messaging_service_sid');
        end if;
        perform notify._raise('ND409', 'phone_number_taken',
            'settings.phone_number_id is configured for another tenant: a WhatsApp business number belongs to one tenant',
            'settings.phone_number_id');
end
$$;
comment on function notify_api.set_channel_provider_v1(uuid, notify.channel, jsonb) is
    'Sets the provider of a tenant''s channel (its primary, position 0 of the failover chain; the fallbacks stay): {provider: mock|whatsapp_cloud|smtp|twilio, settings, secrets: {name: "env:VAR"|"file:/path"}}. Settings are checked per provider and merged over its defaults (WhatsApp: rate_per_second at most 1000, waba_id routes account-level webhooks; Twilio (sms): account_sid, from_number and/or messaging_service_sid, api_key_sid with secrets.api_key_secret, secrets.auth_token always, validity_period, extra opt_out_keywords/opt_in_keywords); secret references must lie in the tenant''s operator-set grant (notify.provider_grants), endpoints must be public hosts unless granted, a WhatsApp or Twilio number belongs to one tenant.';


create or replace function notify_api.set_channel_providers_v1(p_tenant_id uuid, p_channel notify.channel, p_providers jsonb)
    returns jsonb
    language plpgsql
    security definer
    set search_path = pg_catalog, pg_temp
as $$
declare
    v_entries jsonb[] := '{}';
    v_at integer;
    v_state text;
    v_message text;
    v_type text;
    v_field text;
    v_constraint text;
begin
    perform notify._enter(p_tenant_id);
    if jsonb_typeof(p_providers) is distinct from 'array' or jsonb_array_length(p_providers) not between 1 and 5 then
        perform notify._raise('ND400', 'invalid_value', 'providers must be a list of 1 to 5 providers, the primary first', 'providers');
    end if;
    -- Every entry is checked before anything is written, with set_channel_provider_v1's checks (notify._provider_entry),
    -- its error's field prefixed with the entry: providers[1].settings.host.
    for v_i in 0 .. jsonb_array_length(p_providers) - 1 loop
        begin
            v_entries := v_entries || notify._provider_entry(p_tenant_id, p_channel, p_providers -> v_i);
        exception
            when others then
                get stacked diagnostics v_state = returned_sqlstate, v_message = message_text, v_type = constraint_name,
                                        v_field = column_name;
                if v_state !~ '^ND' then
                    raise;
                end if;
                perform notify._raise(v_state, v_type, format('providers[%s]: %s', v_i, v_message),
                                      format('providers[%s]', v_i) || coalesce('.' || nullif(v_field, ''), ''));
        end;
    end loop;
    -- The whole chain is replaced (its health with it: provider_health cascades), each number still one tenant's.
    delete from notify.channel_providers c where c.tenant_id = p_tenant_id and c.channel = p_channel;
    for v_i in 1 .. cardinality(v_entries) loop
        v_at := v_i - 1;
        insert into notify.channel_providers (tenant_id, channel, position, provider, settings, secrets)
        values (p_tenant_id, p_channel, v_at, v_entries[v_i] ->> 'provider', v_entries[v_i] -> 'settings', v_entries[v_i] -> 'secrets');
    end loop;
    return (select p from jsonb_array_elements(notify_api.list_channel_providers_v1(p_tenant_id)) p where p ->> 'channel' = p_channel::text);
exception
    when unique_violation then  -- a WhatsApp or Twilio number (or Messaging Service) is another tenant's, or twice in this chain
        get stacked diagnostics v_constraint = constraint_name;
        v_field := case v_constraint when 'channel_providers_twilio_number_key' then 'settings.from_number'
                                     when 'channel_providers_twilio_service_key' then 'settings.messaging_service_sid'
                                     else 'settings.phone_number_id' end;
        perform notify._raise('ND409', 'phone_number_taken',
            format('providers[%s]: %s is configured elsewhere (another tenant''s, or earlier in this chain): a number belongs to one tenant and one place',
                   v_at, v_field),
            format('providers[%s].', v_at) || v_field);
end
$$;
comment on function notify_api.set_channel_providers_v1(uuid, notify.channel, jsonb) is
    'Replaces a tenant''s whole provider chain of a channel at once: an ordered array of 1 to 5 {provider, settings, secrets} (as set_channel_provider_v1 takes), the primary first, then the fallbacks a send known not to have been accepted moves to (docs/architecture.md, "Provider failover"). Each entry gets set_channel_provider_v1''s checks, an error naming providers[i].<field>; nothing is written unless every entry passes. The chain''s health starts afresh. Returns the channel as list_channel_providers_v1 shows it.';


create or replace function notify._record_sms_inbound(p_provider text, m notify.inbound_message)
    returns text
    language plpgsql
    set search_path = pg_catalog, pg_temp
as $$
declare
    v_tenant record;
    v_keyword text;
    v_count integer;
    v_evidence jsonb;
begin
    if m.sender is null or not notify._address_valid('sms', m.sender) then
        return 'no_sender';
    end if;
    -- The number it was sent to belongs to one tenant (channel_providers_twilio_number_key); a number of a Messaging
    -- Service's pool is no tenant's from_number, and the service it names belongs to one tenant
    -- (channel_providers_twilio_service_key). The number decides first, as in notify_api.webhook_keys_v1 (whose key
    -- verified the request).
    select cp.tenant_id, cp.settings into v_tenant from notify.channel_providers cp
     where cp.provider = 'twilio' and cp.channel = 'sms' and cp.settings ->> 'from_number' = m.phone_number_id;
    if v_tenant.tenant_id is null and m.messaging_service_sid is not null then
        select cp.tenant_id, cp.settings into v_tenant from notify.channel_providers cp
         where cp.provider = 'twilio' and cp.channel = 'sms' and cp.settings ->> 'messaging_service_sid' = m.messaging_service_sid;
    end if;
    if v_tenant.tenant_id is null then
        return 'unmatched';
    end if;
    v_keyword := notify._sms_keyword(m.text, v_tenant.settings);
    if v_keyword is null then
        return 'received';
    elsif v_keyword = 'help' then
        return 'help_requested';  -- Twilio answers HELP itself (the Messaging Service's help text); kept as the outcome
    end if;
    -- Which number, and which Messaging Service when it named the tenant's.
    v_evidence := jsonb_strip_nulls(jsonb_build_object('message_id', m.message_id, 'text', left(m.text, 160), 'received_at', m.received_at,
                                                       'to', m.phone_number_id, 'provider', p_provider,
                                                       'messaging_service_sid', case when m.messaging_service_sid = v_tenant.settings ->> 'messaging_service_sid'
                                                                                     then m.messaging_service_sid end));
    -- Every category (category null): Twilio itself blocks the number after STOP, whatever the message is about.
    insert into notify.recipient_consents (tenant_id, recipient_id, channel, status, source, evidence, recorded_by)
    select a.tenant_id, a.recipient_id, 'sms'::notify.channel,
           case v_keyword when 'opt_out' then 'revoked' else 'granted' end::notify.consent_status, 'inbound_keyword', v_evidence, 'dispatcher'
      from notify.recipient_addresses a
     where a.tenant_id = v_tenant.tenant_id and a.channel = 'sms' and a.address = m.sender
       and case v_keyword
               when 'opt_out' then notify._consent_allows(a.tenant_id, a.recipient_id, 'sms', null)
               -- START restores what a STOP took: only where the recipient's latest channel-wide entry is a revoke (a START
               -- from someone who never opted in grants nothing).
               else (select c.status from notify.recipient_consents c
                      where c.tenant_id = a.tenant_id and c.recipient_id = a.recipient_id and c.channel = 'sms' and c.category is null
                      order by c.id desc limit 1) = 'revoked' end;
    get diagnostics v_count = row_count;
    return case when v_count > 0 then case v_keyword when 'opt_out' then 'opted_out' else 'opted_in' end
                else case v_keyword when 'opt_out' then 'opt_out_unknown_sender' else 'opt_in_nothing_to_restore' end end;
end
$$;
comment on function notify._record_sms_inbound(text, notify.inbound_message) is
    'Records an inbound SMS for the tenant whose Twilio number received it (m.phone_number_id, E.164), else, a number of a Messaging Service''s pool, the tenant whose service it names (m.messaging_service_sid): an opt-out keyword revokes the sender''s SMS consent (every category), an opt-in keyword restores it where the latest entry is a revoke, HELP is kept as the outcome help_requested; the message id, text, time, number and service are the evidence.';


create or replace function notify_api.webhook_keys_v1(p_provider text, p_hints jsonb)
    returns jsonb
    language plpgsql
    stable
    security definer
    set search_path = pg_catalog, pg_temp
as $$
begin
    -- Twilio signs a webhook with the auth token of the tenant's own account: the adapter needs that tenant's secret
    -- reference (resolved in the API process, inside the operator's grant) before it can verify anything. The hints come
    -- from the unverified request, so they only choose whose key to try: a status callback names its tenant in its URL
    -- (our correlation id, ?nd=tenant:delivery), an inbound message the number it was sent to, or, when that number is
    -- no tenant's from_number (a number of a Messaging Service's pool), the service it names (as
    -- notify._record_sms_inbound matches it); the account must match too.
    if p_provider <> 'twilio' or jsonb_typeof(p_hints) <> 'object' then
        return '[]';
    end if;
    return coalesce((
        select jsonb_agg(jsonb_build_object(
                   'tenant_id', cp.tenant_id, 'settings', jsonb_build_object('account_sid', cp.settings ->> 'account_sid'),
                   'secrets', jsonb_build_object('auth_token', cp.secrets ->> 'auth_token'),
                   'grants', (select jsonb_build_object('env_prefix', g.env_prefix, 'file_dir', g.file_dir)
                                from notify.provider_grants g where g.tenant_id = cp.tenant_id)))
          from notify.channel_providers cp
         where cp.provider = 'twilio' and cp.channel = 'sms'
           and cp.settings ->> 'account_sid' = p_hints ->> 'account_sid'
           and (case when p_hints ->> 'tenant_id' ~ '^[0-9a-fA-F-]{36}$' then cp.tenant_id = (p_hints ->> 'tenant_id')::uuid
                     when exists (select from notify.channel_providers n
                                   where n.provider = 'twilio' and n.settings ->> 'from_number' = p_hints ->> 'number')
                         then cp.settings ->> 'from_number' = p_hints ->> 'number'
                     else cp.settings ->> 'messaging_service_sid' = p_hints ->> 'messaging_service_sid' end)), '[]');
end
$$;
comment on function notify_api.webhook_keys_v1(text, jsonb) is
    'The signing-key references a webhook adapter needs before it can verify a request, for providers that sign with each tenant''s own secret (twilio: the auth token of the account named by hints.account_sid, of the tenant named by hints.tenant_id (a status callback''s correlation) or owning hints.number (an inbound message), else owning hints.messaging_service_sid (an inbound message to a number of a Messaging Service''s pool)): [{tenant_id, settings: {account_sid}, secrets: {auth_token: reference}, grants}]. References only, never values.';


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
    v_sms_numbers text[];        -- the tenant's Twilio numbers (an inbound SMS names the one it was sent To)
    v_sms_services text[];       -- the tenant's Twilio Messaging Services (an inbound SMS to a pool number names its service)
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
    select coalesce(array_agg(cp.settings ->> 'phone_number_id') filter (where cp.provider = 'whatsapp_cloud'), '{}'),
           coalesce(array_agg(cp.settings ->> 'from_number') filter (where cp.provider = 'twilio' and cp.settings ? 'from_number'), '{}'),
           coalesce(array_agg(cp.settings ->> 'messaging_service_sid')
                        filter (where cp.provider = 'twilio' and cp.settings ? 'messaging_service_sid'), '{}')
      into v_numbers, v_sms_numbers, v_sms_services
      from notify.channel_providers cp where cp.tenant_id = p_tenant_id and cp.provider in ('whatsapp_cloud', 'twilio');

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
     where d.tenant_id = p_tenant_id and d.id = any (v_deliveries) and d.status in ('scheduled', 'queued', 'held', 'waiting');
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
            or jsonb_path_exists(e.payload, 'lax $.**.phone_number_id ? (@ == $ids[*])', jsonb_build_object('ids', to_jsonb(v_numbers)))
            -- an inbound SMS (Twilio's form, stored as an object) to one of the tenant's numbers, or to a number of one of
            -- its Messaging Services' pools (the form names the service), from the recipient
            or (e.provider = 'twilio' and (e.payload ->> 'To' = any (v_sms_numbers)
                                           or e.payload ->> 'MessagingServiceSid' = any (v_sms_services))));
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
comment on function notify_api.erase_recipient_v1(uuid, text, text) is
    'Erases a recipient''s personal data on request: cancels its pending deliveries, puts what it had opted out of on the suppression list (keyed hashes), removes its addresses and every copy of them and of its content (deliveries'' addresses, variables and errors, its requests'' variables, consent evidence, the mock outbox, webhook payloads that mention it, callback bodies'' metadata, WhatsApp windows), keeps the content-free history and its ref, and records the erasure. Returns the receipt {id, ref, erased_at, erased_by, rows_changed per table, in_flight, suppressed}. 404 for an unknown ref.';


