-- notify_api: recipients, the consent ledger and templates.
-- Called by the /internal/recipients and /internal/templates routes and by trusted SQL clients.

create function notify._upsert_recipient(p_tenant_id uuid, p_ref text, p_body jsonb, p_path text)
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
comment on function notify._upsert_recipient(uuid, text, jsonb, text) is
    'Creates or updates a recipient and its addresses from {addresses, locale, timezone}; an address set to null is removed. Errors name fields under p_path.';

create function notify._recipient_json(p_tenant_id uuid, p_recipient_id uuid)
    returns jsonb
    language sql
    stable
    set search_path = pg_catalog, pg_temp
as $$
    select jsonb_build_object(
        'ref', r.ref, 'locale', r.locale, 'timezone', r.timezone, 'created_at', r.created_at, 'updated_at', r.updated_at,
        'addresses', coalesce((select jsonb_object_agg(a.channel, a.address) from notify.recipient_addresses a
                                where a.tenant_id = r.tenant_id and a.recipient_id = r.id), '{}'))
      from notify.recipients r where r.tenant_id = p_tenant_id and r.id = p_recipient_id
$$;
comment on function notify._recipient_json(uuid, uuid) is 'The public JSON form of a recipient.';

create function notify_api.upsert_recipient_v1(p_tenant_id uuid, p_ref text, p_body jsonb)
    returns jsonb
    language plpgsql
    security definer
    set search_path = pg_catalog, pg_temp
as $$
declare
    v notify.recipients;
begin
    perform notify._enter(p_tenant_id);
    perform notify._check_keys(coalesce(p_body, '{}'), array['addresses', 'locale', 'timezone'], '');
    v := notify._upsert_recipient(p_tenant_id, p_ref, coalesce(p_body, '{}'), '');
    return notify._recipient_json(p_tenant_id, v.id);
end
$$;
comment on function notify_api.upsert_recipient_v1(uuid, text, jsonb) is
    'PUT semantics for a recipient: {addresses: {channel: address|null}, locale, timezone}. Returns the recipient.';

create function notify_api.get_recipient_v1(p_tenant_id uuid, p_ref text)
    returns jsonb
    language plpgsql
    stable
    security definer
    set search_path = pg_catalog, pg_temp
as $$
begin
    perform notify._enter(p_tenant_id);
    return notify._recipient_json(p_tenant_id, notify._recipient_id(p_tenant_id, p_ref));
end
$$;
comment on function notify_api.get_recipient_v1(uuid, text) is 'A recipient by ref; 404 if it does not exist for this tenant.';

create function notify_api.record_consent_v1(p_tenant_id uuid, p_ref text, p_body jsonb, p_recorded_by text default null)
    returns jsonb
    language plpgsql
    security definer
    set search_path = pg_catalog, pg_temp
as $$
declare
    v_recipient notify.recipients;
    v_channel notify.channel;
    v_status text;
    v_entry notify.recipient_consents;
begin
    perform notify._enter(p_tenant_id);
    perform notify._check_keys(p_body, array['channel', 'status', 'category', 'source', 'evidence'], '');
    if p_body is null then
        perform notify._raise('ND400', 'missing_field', 'body is required', '');
    end if;
    v_channel := notify._channel_field(p_body -> 'channel', 'channel');
    v_status := notify._text_field(p_body, 'status', '', true, 16);
    if v_status not in ('granted', 'revoked') then
        perform notify._raise('ND400', 'invalid_value', 'status must be granted or revoked', 'status');
    end if;
    v_recipient := notify._upsert_recipient(p_tenant_id, p_ref, '{}', '');
    insert into notify.recipient_consents (tenant_id, recipient_id, channel, category, status, source, evidence, recorded_by)
    values (p_tenant_id, v_recipient.id, v_channel, notify._text_field(p_body, 'category', '', false, 100),
            v_status::notify.consent_status, notify._text_field(p_body, 'source', '', true, 200),
            p_body -> 'evidence', p_recorded_by)
    returning * into v_entry;
    return jsonb_build_object('id', v_entry.id, 'channel', v_entry.channel, 'category', v_entry.category,
                              'status', v_entry.status, 'source', v_entry.source, 'evidence', v_entry.evidence,
                              'recorded_at', v_entry.recorded_at, 'recorded_by', v_entry.recorded_by);
end
$$;
comment on function notify_api.record_consent_v1(uuid, text, jsonb, text) is
    'Appends a consent entry {channel, status: granted|revoked, category?, source, evidence?}; creates the recipient if new.';

create function notify_api.list_consents_v1(p_tenant_id uuid, p_ref text)
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
    -- the state in force is what submit and claim decide (notify._consent): per channel for messages without a
    -- category (and any category the ledger never names), and per category the ledger names for that channel
    return jsonb_build_object(
        'ref', p_ref,
        'current', (select jsonb_agg(jsonb_build_object(
                        'channel', c, 'allowed', notify._consent_allows(p_tenant_id, v_id, c, null),
                        'policy', coalesce(p.policy, notify._default_policy(c)),
                        'categories', coalesce((select jsonb_agg(jsonb_build_object(
                                           'category', k.category,
                                           'allowed', notify._consent_allows(p_tenant_id, v_id, c, k.category))
                                           order by k.category)
                                         from (select distinct e.category from notify.recipient_consents e
                                                where e.tenant_id = p_tenant_id and e.recipient_id = v_id
                                                  and e.channel = c and e.category is not null) k), '[]')) order by c)
                      from pg_catalog.unnest(pg_catalog.enum_range(null::notify.channel)) c
                      left join notify.channel_policies p on p.tenant_id = p_tenant_id and p.channel = c),
        'history', coalesce((select jsonb_agg(jsonb_build_object(
                        'id', e.id, 'channel', e.channel, 'category', e.category, 'status', e.status, 'source', e.source,
                        'evidence', e.evidence, 'recorded_at', e.recorded_at, 'recorded_by', e.recorded_by) order by e.id)
                      from notify.recipient_consents e where e.tenant_id = p_tenant_id and e.recipient_id = v_id), '[]'));
end
$$;
comment on function notify_api.list_consents_v1(uuid, text) is
    'A recipient''s consent in force, as submit and claim decide it: per channel (allowed for messages without a category, and for categories the ledger never names) with the policy and, under categories, each category the ledger names for that channel; and the full ledger.';

create function notify_api.upsert_template_v1(p_tenant_id uuid, p_key text, p_body jsonb)
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
    v_answer jsonb;
    v_parts jsonb;
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
    v_answer := notify_api.list_templates_v1(p_tenant_id, p_key);
    if v_channels ? 'sms' then
        -- What the SMS text costs, counted on its fixed text: placeholders ({{ }}, and {% %} and {# #} tags) count as
        -- nothing, so a warning is certain (variables can only add to it; the delivery keeps the count of what was sent).
        v_parts := notify._sms_parts(regexp_replace(v_channels #>> '{sms,text}',
                                               '\{\{(?:[^}]|\}(?!\}))*\}\}|\{%(?:[^%]|%(?!\}))*%\}|\{#(?:[^#]|#(?!\}))*#\}', '', 'g'));
        select jsonb_agg(case when t ->> 'channel' = 'sms' and t ->> 'locale' = v_locale
                              then t || jsonb_build_object('sms', v_parts, 'warnings', to_jsonb(array_remove(array[
                                  case when v_parts ->> 'encoding' = 'UCS-2' then jsonb_build_object('code', 'sms_ucs2', 'message',
                                      'the text has a character outside the GSM-7 alphabet: it is sent as UCS-2, 70 characters per segment instead of 160') end,
                                  case when (v_parts ->> 'segments')::integer > 1 then jsonb_build_object('code', 'sms_segments', 'message',
                                      format('the text without its variables already needs %s segments (%s %s units; one segment holds %s)',
                                             v_parts ->> 'segments', v_parts ->> 'units', v_parts ->> 'encoding',
                                             case when v_parts ->> 'encoding' = 'UCS-2' then 70 else 160 end)) end], null)))
                              else t end order by o)
          into v_answer
          from jsonb_array_elements(v_answer) with ordinality x(t, o);
    end if;
    return v_answer;
end
$$;
comment on function notify_api.upsert_template_v1(uuid, text, jsonb) is
    'Sets the content of a template key for one locale: {locale?, channels: {email: {subject, text, html?}, whatsapp: {name, language, category?, parameters[], header_parameters[], buttons[{sub_type, index, parameter}]} | {text}, sms: {text}}} (category: marketing, utility or authentication, Meta''s). Texts over their size (subject 998, e-mail text 65,536, HTML 262,144, WhatsApp text 4,096, SMS 1,600 characters) are 422 template_too_large. The answer''s sms template (of this locale) carries sms: {encoding, segments, units} of its fixed text (placeholders count as nothing) and warnings: [{code: sms_ucs2|sms_segments, message}] when it needs UCS-2 or more than one segment.';

create function notify_api.list_templates_v1(p_tenant_id uuid, p_key text default null)
    returns jsonb
    language sql
    stable
    security definer
    set search_path = pg_catalog, pg_temp
as $$
    select notify._enter(p_tenant_id);
    select coalesce(jsonb_agg(jsonb_build_object('key', t.key, 'channel', t.channel, 'locale', t.locale, 'content', t.content,
                                                 'required_variables', to_jsonb(t.required_variables), 'version', t.version,
                                                 'updated_at', t.updated_at) order by t.key, t.channel, t.locale), '[]')
      from notify.templates t
     where t.tenant_id = p_tenant_id and (p_key is null or t.key = p_key)
$$;
comment on function notify_api.list_templates_v1(uuid, text) is 'A tenant''s templates, all or one key, with the variables each needs.';
