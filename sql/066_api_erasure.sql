-- notify_api: a recipient's personal data on request — erase every copy of it (with a receipt), or export all of it.
-- Called by DELETE /internal/recipients/{ref}, GET /internal/recipients/{ref}/export, `dispatcher recipients erase|export`
-- and trusted SQL clients.

create function notify_api.erase_recipient_v1(p_tenant_id uuid, p_ref text, p_erased_by text default null)
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

create function notify_api.export_recipient_v1(p_tenant_id uuid, p_ref text)
    returns jsonb
    language plpgsql
    stable
    security definer
    set search_path = pg_catalog, pg_temp
as $$
declare
    v_id uuid;
begin
    perform notify._enter(p_tenant_id);
    v_id := notify._recipient_id(p_tenant_id, p_ref);
    return jsonb_build_object(
        'exported_at', now(),
        'recipient', notify._recipient_json(p_tenant_id, v_id),
        'consents', notify_api.list_consents_v1(p_tenant_id, p_ref),
        'notifications', coalesce((
            select jsonb_agg(notify._notification_head(r) || jsonb_build_object(
                       'variables', r.variables,
                       'deliveries', (select jsonb_agg(notify._delivery_json(d, true) || jsonb_strip_nulls(jsonb_build_object(
                                                 'address', d.address, 'variables', d.variables, 'template_locale', d.template_locale))
                                             order by d.channel)
                                        from notify.notification_deliveries d
                                       where d.tenant_id = p_tenant_id and d.request_id = r.id and d.recipient_id = v_id))
                       order by r.created_at desc, r.id desc)
              from notify.notification_requests r
             where r.tenant_id = p_tenant_id
               and r.id in (select d.request_id from notify.notification_deliveries d
                             where d.tenant_id = p_tenant_id and d.recipient_id = v_id and d.created_at > '-infinity')), '[]'),
        'mock_messages', coalesce((
            select jsonb_agg(jsonb_build_object('delivery_id', m.delivery_id, 'channel', m.channel, 'address', m.address,
                                                'rendered', m.rendered, 'sent_at', m.sent_at) order by m.id)
              from notify.mock_messages m
             where m.tenant_id = p_tenant_id
               and m.delivery_id in (select d.id from notify.notification_deliveries d
                                      where d.tenant_id = p_tenant_id and d.recipient_id = v_id and d.created_at > '-infinity')), '[]'),
        'erasures', coalesce((
            select jsonb_agg(jsonb_build_object('id', e.id, 'erased_at', e.erased_at, 'erased_by', e.erased_by,
                                                'rows_changed', e.rows_changed) order by e.erased_at)
              from notify.recipient_erasures e where e.tenant_id = p_tenant_id and e.recipient_id = v_id), '[]'));
end
$$;
comment on function notify_api.export_recipient_v1(uuid, text) is
    'Everything held about a recipient, for an access request, as one document: the recipient and its addresses, its consent (in force and the ledger with evidence), its notifications with their variables and its deliveries (address, variables, history, attempts), what the mock provider "sent" it, and its past erasures. 404 for an unknown ref.';
