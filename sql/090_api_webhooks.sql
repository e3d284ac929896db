-- notify_api: provider webhook ingestion — store once, apply status reports by rank.
-- Called by POST /public/webhooks/{provider} after the signature over the raw body was verified.

create function notify._provider_family(p_webhook_provider text)
    returns text[]
    language sql
    immutable
    -- inlinable: no SET clause (see docs/architecture.md, "Hot helpers are inlined")
as $$
    -- E-mail service providers report on messages we handed to them over SMTP.
    select case when p_webhook_provider in ('sendgrid', 'mailgun') then array[p_webhook_provider, 'smtp']
                else array[p_webhook_provider] end
$$;
comment on function notify._provider_family(text) is 'The sending providers whose messages a webhook provider reports on.';

create function notify._apply_provider_status(p_provider text, e notify.status_event)
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

create function notify._record_inbound(p_provider text, m notify.inbound_message)
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
    if p_provider = 'twilio' then
        return notify._record_sms_inbound(p_provider, m);
    end if;
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
    'Records an inbound WhatsApp message for every tenant using that business number: opens the 24-hour window, and an opt-out keyword (settings.opt_out_keywords) revokes the sender''s WhatsApp consent with the message as evidence. The sender is matched by its phone number or its business-scoped user id, and by whatever notify.whatsapp_users maps either to. An inbound SMS (provider twilio) goes to notify._record_sms_inbound.';

create function notify._sms_keyword(p_text text, p_settings jsonb)
    returns text
    language sql
    immutable
    set search_path = pg_catalog, pg_temp
as $$
    -- The whole message, trimmed of spaces and end punctuation, case-insensitive: "stop", " Stop! " match, "stop it" does not.
    select case
        when w = any (array['STOP', 'STOPALL', 'UNSUBSCRIBE', 'CANCEL', 'END', 'QUIT'])
             or w in (select upper(k) from jsonb_array_elements_text(coalesce(p_settings -> 'opt_out_keywords', '[]')) k) then 'opt_out'
        when w = any (array['START', 'YES', 'UNSTOP'])
             or w in (select upper(k) from jsonb_array_elements_text(coalesce(p_settings -> 'opt_in_keywords', '[]')) k) then 'opt_in'
        when w = any (array['HELP', 'INFO']) then 'help'
    end
      from (select upper(btrim(coalesce(p_text, ''), E' \t\r\n.!')) as w) x
$$;
comment on function notify._sms_keyword(text, jsonb) is
    'What an inbound SMS asks for: opt_out (Twilio''s STOP, STOPALL, UNSUBSCRIBE, CANCEL, END, QUIT, or a tenant''s settings.opt_out_keywords), opt_in (START, YES, UNSTOP, or settings.opt_in_keywords), help (HELP, INFO), or null. The whole message is the keyword, trimmed, case-insensitive.';

create function notify._record_sms_inbound(p_provider text, m notify.inbound_message)
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
    -- Distinct: a tenant's failover chain may hold two numbers of one business account.
    select distinct cp.tenant_id from notify.channel_providers cp
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
                 where x.channel = 'whatsapp' and x.status in ('queued', 'scheduled', 'held', 'waiting') and x.tenant_id = v_tenant and x.address = v_old;
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

create function notify_api.webhook_keys_v1(p_provider text, p_hints jsonb)
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
    -- The key first: a key already claimed (committed, or by a concurrent ingest, which this waits for) is a duplicate.
    insert into notify.webhook_event_keys (provider, event_key)
    values (p_provider, p_event_key)
    on conflict (provider, event_key) do nothing;
    if not found then
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
    -- The payload last, with its outcomes, in one insert (today's partition of notify.webhook_events).
    insert into notify.webhook_events (provider, event_key, payload, outcomes)
    values (p_provider, p_event_key, coalesce(p_payload, 'null'), v_outcomes)
    returning id into v_id;
    return jsonb_build_object('stored', true, 'duplicate', false, 'id', v_id, 'outcomes', v_outcomes);
end
$$;
comment on function notify_api.ingest_webhook_v1(text, text, jsonb, notify.status_event[], notify.inbound_message[], text[], jsonb) is
    'Stores a verified provider webhook once per (provider, event key) (the key claimed in notify.webhook_event_keys first, the payload stored with its outcomes last), applies its normalized status events by rank (keeping the pricing they carry: outcome priced) and records its inbound messages and account-level changes (p_updates, notify._apply_whatsapp_update); p_notes (what the adapter could not apply, and why) are kept as outcomes "kept" with their reason. A duplicate changes nothing.';
