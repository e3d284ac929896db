-- 0049: a provider's timeout_seconds is bounded (0.1 to 60 s) where it is stored (notify._provider_entry, for
-- set_channel_provider_v1 and every entry of set_channel_providers_v1): a provider that accepts the connection and never
-- answers held one of the worker's slots per delivery for as long as the tenant chose, so one tenant could stall the
-- worker for every tenant. Configurations stored before keep their value (the worker reads it as given).

create or replace function notify._provider_entry(p_tenant_id uuid, p_channel notify.channel, p_body jsonb)
    returns jsonb
    language plpgsql
    stable
    set search_path = pg_catalog, pg_temp
as $$
declare
    v_provider text;
    v_settings jsonb;
    v_secrets jsonb;
    v_kind notify.provider_kinds;
    v_key text;
    v_ref text;
    v_grant notify.provider_grants;
    v_host text;
begin
    select * into v_grant from notify.provider_grants g where g.tenant_id = p_tenant_id;
    perform notify._check_keys(p_body, array['provider', 'settings', 'secrets'], '');
    v_provider := notify._text_field(p_body, 'provider', '', true, 40);
    select * into v_kind from notify.provider_kinds k where k.name = v_provider and k.channel = p_channel;
    if v_kind.name is null then
        perform notify._raise('ND422', 'invalid_provider',
            format('provider %s cannot serve %s (%s)', v_provider, p_channel,
                   (select string_agg(format('%s: %s', k.name, k.channels), '; ' order by k.name)
                      from (select name, string_agg(channel::text, ', ' order by channel) as channels
                              from notify.provider_kinds group by name) k)), 'provider');
    end if;
    v_settings := coalesce(p_body -> 'settings', '{}');
    v_secrets := coalesce(p_body -> 'secrets', '{}');
    if jsonb_typeof(v_settings -> 'phone_number_id') = 'number' then  -- an id, whatever JSON type it came as
        v_settings := v_settings || jsonb_build_object('phone_number_id', v_settings ->> 'phone_number_id');
    end if;
    perform notify._check_keys(v_settings, v_kind.settings_keys, 'settings');
    perform notify._check_keys(v_secrets, v_kind.secret_keys, 'secrets');
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
    foreach v_key in array v_kind.required loop
        if jsonb_typeof(jsonb_build_object('settings', v_settings, 'secrets', v_secrets) #> string_to_array(v_key, '.')) is distinct from 'string' then
            perform notify._raise('ND400', 'missing_field', format('%s is required for %s', v_key, v_provider), v_key);
        end if;
    end loop;
    if v_provider = 'whatsapp_cloud' and v_settings ->> 'phone_number_id' !~ '^[0-9]{5,20}$' then
        perform notify._raise('ND400', 'invalid_format', 'settings.phone_number_id is the numeric Graph id of the business number',
                              'settings.phone_number_id');
    end if;
    if v_provider = 'twilio' then
        if v_settings ->> 'account_sid' !~ '^AC[0-9a-fA-F]{32}$' then
            perform notify._raise('ND400', 'invalid_format', 'settings.account_sid is the Twilio account SID (AC and 32 hex digits)',
                                  'settings.account_sid');
        end if;
        if not (v_settings ? 'from_number' or v_settings ? 'messaging_service_sid') then
            perform notify._raise('ND400', 'missing_field', 'settings.from_number or settings.messaging_service_sid is required for twilio',
                                  'settings.from_number');
        end if;
        if v_settings ? 'from_number' and (jsonb_typeof(v_settings -> 'from_number') <> 'string'
                                            or not notify._address_valid('sms', v_settings ->> 'from_number')) then
            perform notify._raise('ND400', 'invalid_format', 'settings.from_number must be an E.164 phone number (+ and 7 to 15 digits)',
                                  'settings.from_number');
        end if;
        if v_settings ? 'messaging_service_sid' and coalesce(v_settings ->> 'messaging_service_sid', '') !~ '^MG[0-9a-fA-F]{32}$' then
            perform notify._raise('ND400', 'invalid_format', 'settings.messaging_service_sid is a Messaging Service SID (MG and 32 hex digits)',
                                  'settings.messaging_service_sid');
        end if;
        if v_settings ? 'api_key_sid' and coalesce(v_settings ->> 'api_key_sid', '') !~ '^SK[0-9a-fA-F]{32}$' then
            perform notify._raise('ND400', 'invalid_format', 'settings.api_key_sid is an API key SID (SK and 32 hex digits)', 'settings.api_key_sid');
        end if;
        if (v_settings ? 'api_key_sid') <> (v_secrets ? 'api_key_secret') then
            perform notify._raise('ND400', 'missing_field', 'settings.api_key_sid and secrets.api_key_secret go together',
                                  case when v_settings ? 'api_key_sid' then 'secrets.api_key_secret' else 'settings.api_key_sid' end);
        end if;
        if v_settings ? 'validity_period' and (jsonb_typeof(v_settings -> 'validity_period') <> 'number'
                                                or (v_settings ->> 'validity_period')::numeric not between 1 and 36000
                                                or (v_settings ->> 'validity_period')::numeric <> trunc((v_settings ->> 'validity_period')::numeric)) then
            perform notify._raise('ND400', 'invalid_value', 'settings.validity_period must be 1-36000 seconds', 'settings.validity_period');
        end if;
        foreach v_key in array array['opt_out_keywords', 'opt_in_keywords'] loop
            if v_settings ? v_key and (jsonb_typeof(v_settings -> v_key) <> 'array' or jsonb_array_length(v_settings -> v_key) > 20
                 or exists (select from jsonb_array_elements(v_settings -> v_key) k
                             where jsonb_typeof(k) <> 'string' or k #>> '{}' !~ '^[[:alnum:]]{1,40}$')) then
                perform notify._raise('ND400', 'invalid_value',
                    format('settings.%s must be a list of at most 20 single words (letters and digits, up to 40)', v_key), 'settings.' || v_key);
            end if;
        end loop;
    end if;
    if v_provider in ('whatsapp_cloud', 'twilio') and v_settings ? 'base_url' then
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
    -- Bounded: a provider that accepts the connection and never answers holds one of the worker's slots per delivery for
    -- as long as this (its e-mail requeued at each lease expiry, claimed again): unbounded, one tenant could fill them all.
    if v_settings ? 'timeout_seconds' and (jsonb_typeof(v_settings -> 'timeout_seconds') <> 'number'
                                            or (v_settings ->> 'timeout_seconds')::numeric not between 0.1 and 60) then
        perform notify._raise('ND400', 'invalid_value', 'settings.timeout_seconds must be a number of seconds, 0.1 to 60',
                              'settings.timeout_seconds');
    end if;
    if v_settings ? 'rate_per_second' and (jsonb_typeof(v_settings -> 'rate_per_second') <> 'number'
                                            or (v_settings ->> 'rate_per_second')::numeric <= 0) then
        perform notify._raise('ND400', 'invalid_value', 'settings.rate_per_second must be a positive number', 'settings.rate_per_second');
    end if;
    -- Meta's throughput per number: 80 messages per second by default, up to 1,000 once upgraded (whatsapp-2026.md §1).
    if v_provider in ('whatsapp_cloud', 'twilio') and (v_settings ->> 'rate_per_second')::numeric > 1000 then
        perform notify._raise('ND400', 'invalid_value', 'settings.rate_per_second must be at most 1000 (Meta''s highest throughput per number; Twilio queues what exceeds a sender''s rate)',
                              'settings.rate_per_second');
    end if;
    if v_provider = 'whatsapp_cloud' and v_settings ? 'waba_id'
       and (jsonb_typeof(v_settings -> 'waba_id') not in ('string', 'number') or v_settings ->> 'waba_id' !~ '^[0-9]{1,32}$') then
        perform notify._raise('ND400', 'invalid_value', 'settings.waba_id must be the WhatsApp business account id (digits)', 'settings.waba_id');
    end if;
    if jsonb_typeof(v_settings -> 'waba_id') = 'number' then
        v_settings := v_settings || jsonb_build_object('waba_id', v_settings ->> 'waba_id');
    end if;

    return jsonb_build_object('provider', v_provider, 'settings', v_kind.defaults || v_settings, 'secrets', v_secrets);
end
$$;
comment on function notify._provider_entry(uuid, notify.channel, jsonb) is
    'The checks of one provider configuration {provider, settings, secrets} for a tenant''s channel (the tenant entered by the caller), the errors naming the field within the entry (settings.host); returns it ready to store, settings merged over the provider''s defaults. Shared by notify_api.set_channel_provider_v1 and set_channel_providers_v1 (which prefixes the field with providers[i].).';


