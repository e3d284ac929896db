-- notify_api: per-tenant provider configuration, shared send pacing, one-click unsubscribe.
-- Called by PUT/GET /internal/channels/*/provider, the `dispatcher provider` CLI, the worker and /public/unsubscribe.

-- What a tenant's providers may use is the operator's decision, never a tenant admin's: which secrets it may name
-- (an environment-variable prefix, a file directory) and whether its endpoints may be private hosts.
create table notify.provider_grants (
    tenant_id uuid primary key references notify.tenants (id),
    env_prefix text,
    file_dir text,
    private_endpoints boolean not null default false,
    updated_at timestamptz not null default now(),
    constraint provider_grants_env_prefix check (
        env_prefix ~ '^[A-Za-z_][A-Za-z0-9_]{2,62}_$' and env_prefix !~* '^(DISPATCHER_|DATABASE_|PG)'),
    constraint provider_grants_file_dir check (
        file_dir ~ '^(/[A-Za-z0-9._-]+)+/$' and file_dir !~ '/\.\.?/' and length(file_dir) <= 500)
);
comment on table notify.provider_grants is
    'Set by the operator only (notify_api.set_provider_grants_v1, `dispatcher tenant secrets`): the secrets a tenant''s provider settings may reference and whether its provider endpoints may be private. No row: no secrets, public endpoints only.';
comment on column notify.provider_grants.env_prefix is
    'Secret references env:NAME are allowed when NAME starts with this prefix (e.g. NOTIFY_TENANT_ACME_). Never a prefix or extension of another tenant''s.';
comment on column notify.provider_grants.file_dir is
    'Secret references file:/path are allowed when the path lies below this directory (e.g. /run/secrets/acme/), without . or .. segments; the worker also resolves symlinks before reading.';
comment on column notify.provider_grants.private_endpoints is
    'If true, the tenant''s WhatsApp base_url and SMTP host may be http, private, loopback or single-label hosts (a local relay, the dev stack). Otherwise public only, checked at save time and at every send.';

create function notify._secret_ref_allowed(p_ref text, g notify.provider_grants)
    returns boolean
    language sql
    immutable
    set search_path = pg_catalog, pg_temp
as $$
    select case
        when p_ref like 'env:%' then coalesce(starts_with(substr(p_ref, 5), g.env_prefix) and length(p_ref) - 4 > length(g.env_prefix), false)
        when p_ref like 'file:%' then coalesce(starts_with(substr(p_ref, 6), g.file_dir) and length(p_ref) - 5 > length(g.file_dir)
                                               and substr(p_ref, 6) !~ '(/\.\.?(/|$))|//', false)
        else false end
$$;
comment on function notify._secret_ref_allowed(text, notify.provider_grants) is
    'True if a secret reference lies inside the tenant''s grant: env:NAME with the granted prefix, file:/path below the granted directory with no . or .. segment. False without a grant.';

create function notify._ip_public(p_address inet)
    returns boolean
    language sql
    immutable
    set search_path = pg_catalog, pg_temp
as $$
    select not p_address <<= any (array[
        '0.0.0.0/8', '10.0.0.0/8', '100.64.0.0/10', '127.0.0.0/8', '169.254.0.0/16', '172.16.0.0/12', '192.0.0.0/24',
        '192.0.2.0/24', '192.88.99.0/24', '192.168.0.0/16', '198.18.0.0/15', '198.51.100.0/24', '203.0.113.0/24', '224.0.0.0/3',
        '::/127', '::ffff:0:0/96', '64:ff9b::/96', '100::/64', '2001::/23', '2001:db8::/32', 'fc00::/7', 'fe80::/10', 'ff00::/8']::inet[])
$$;
comment on function notify._ip_public(inet) is
    'False for private, loopback, link-local, shared, documentation, multicast and reserved addresses (the ranges Python''s ipaddress is_global excludes).';

create function notify._host_public(p_host text)
    returns boolean
    language plpgsql
    immutable
    set search_path = pg_catalog, pg_temp
as $$
begin
    -- What can be told without DNS (the worker resolves and checks every address again at each send, see
    -- dispatcher/callback_urls.py): an IP literal must be public; a name needs a dot, a TLD with a letter, and no
    -- local suffix (single-label names like "postgres" or "mailpit" resolve inside the deployment's network).
    if p_host ~ '^[0-9.]+$' and p_host !~ '^[0-9]{1,3}(\.[0-9]{1,3}){3}$' then
        return false;  -- 2130706433, 127.1: what some resolvers read as an address, and not a name either
    end if;
    if p_host ~ '^\[[0-9A-Fa-f:.]+\]$' or p_host ~ '^[0-9.]+$' or p_host ~ ':' then
        return notify._ip_public(btrim(p_host, '[]')::inet);
    end if;
    return lower(p_host) ~ '^([a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9])?\.)+[a-z]([a-z0-9-]{0,61}[a-z0-9])?\.?$'
       and lower(rtrim(p_host, '.')) !~ '(^|\.)(localhost|local|localdomain|internal|home\.arpa|lan|intranet|corp)$';
exception
    when invalid_text_representation then
        return false;
end
$$;
comment on function notify._host_public(text) is
    'True if a host name or IP literal may be a tenant''s provider endpoint without a private_endpoints grant (syntax only; the worker checks the resolved addresses).';

create function notify._provider_entry(p_tenant_id uuid, p_channel notify.channel, p_body jsonb)
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

create function notify_api.set_channel_provider_v1(p_tenant_id uuid, p_channel notify.channel, p_body jsonb)
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

create function notify_api.set_channel_providers_v1(p_tenant_id uuid, p_channel notify.channel, p_providers jsonb)
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

create function notify_api.list_channel_providers_v1(p_tenant_id uuid)
    returns jsonb
    language sql
    stable
    security definer
    set search_path = pg_catalog, pg_temp
as $$
    select notify._enter(p_tenant_id);
    select jsonb_agg(jsonb_build_object(
               'channel', c, 'provider', coalesce(p.provider, 'mock'), 'settings', coalesce(p.settings, '{}'),
               'secrets', coalesce(p.secrets, '{}'),
               'default', p.provider is null, 'updated_at', p.updated_at,
               -- the failover chain in order (the primary first), each with its health (notify.provider_health)
               'chain', coalesce((
                   select jsonb_agg(jsonb_build_object(
                              'position', x.position, 'provider', x.provider, 'settings', x.settings, 'secrets', x.secrets,
                              'updated_at', x.updated_at,
                              'health', jsonb_build_object(
                                  'demoted', coalesce(h.demoted_until > now(), false), 'demoted_until', h.demoted_until,
                                  'errors', coalesce(h.errors, 0), 'demotions', coalesce(h.demotions, 0),
                                  'last_error_code', h.last_error_code, 'last_error_at', h.last_error_at,
                                  'last_success_at', h.last_success_at)) order by x.position)
                     from notify.channel_providers x
                     left join notify.provider_health h on h.tenant_id = x.tenant_id and h.channel = x.channel and h.position = x.position
                    where x.tenant_id = p_tenant_id and x.channel = c), '[]')) order by c)
      from unnest(enum_range(null::notify.channel)) c
      left join notify.channel_providers p on p.tenant_id = p_tenant_id and p.channel = c and p.position = 0
$$;
comment on function notify_api.list_channel_providers_v1(uuid) is
    'The provider of every channel of a tenant (its primary, position 0), with its secret references ("env:NAME", "file:/path"; a name is not a secret, values are never stored), and the whole failover chain in order with each provider''s health (chain: [{position, provider, settings, secrets, updated_at, health: {demoted, demoted_until, errors, demotions, last_error_code, last_error_at, last_success_at}}]; empty for the built-in mock).';

create function notify_api.record_provider_health_v1(p_health jsonb, p_errors integer, p_window_seconds double precision,
                                                     p_demote_seconds double precision)
    returns jsonb
    language plpgsql
    security definer
    set search_path = pg_catalog, pg_temp
as $$
declare
    v_demoted jsonb;
begin
    -- The worker's one call per batch (runner/drainer.py), for the providers of chains only: per (tenant, channel,
    -- position), how many sends it was known not to accept ("not sent") and how many it accepted. A success resets the
    -- count and ends a demotion; p_errors "not sent" within p_window_seconds demote it for p_demote_seconds. Rows are
    -- locked in key order, so two workers' batches wait for each other instead of deadlocking.
    update notify.provider_health h
       set errors = 0, window_started_at = null, demoted_until = null, last_success_at = now(), updated_at = now()
      from jsonb_to_recordset(coalesce(p_health, '[]')) as i(tenant_id uuid, channel notify.channel, position smallint, failures integer, successes integer, error_code text)
     where h.tenant_id = i.tenant_id and h.channel = i.channel and h.position = i.position and i.successes > 0
       and (h.errors > 0 or h.demoted_until is not null);
    insert into notify.provider_health as h (tenant_id, channel, position, errors, window_started_at, last_error_code, last_error_at)
    select i.tenant_id, i.channel, i.position, sum(i.failures), now(), left(max(i.error_code), 100), now()
      from jsonb_to_recordset(coalesce(p_health, '[]')) as i(tenant_id uuid, channel notify.channel, position smallint, failures integer, successes integer, error_code text)
     where i.failures > 0
       -- the chain may have been replaced since the claim: a position that is gone has no health
       and exists (select from notify.channel_providers cp
                    where cp.tenant_id = i.tenant_id and cp.channel = i.channel and cp.position = i.position)
     group by i.tenant_id, i.channel, i.position
     order by i.tenant_id, i.channel, i.position
    on conflict on constraint provider_health_pkey do update
       set errors = case when h.window_started_at is null or h.window_started_at < now() - make_interval(secs => p_window_seconds)
                         then excluded.errors else h.errors + excluded.errors end,
           window_started_at = case when h.window_started_at is null or h.window_started_at < now() - make_interval(secs => p_window_seconds)
                                    then now() else h.window_started_at end,
           last_error_code = excluded.last_error_code, last_error_at = now(), updated_at = now();
    with demoted as (
    update notify.provider_health h
       set demoted_until = now() + make_interval(secs => p_demote_seconds), demotions = h.demotions + 1, errors = 0,
           window_started_at = null, updated_at = now()
      from jsonb_to_recordset(coalesce(p_health, '[]')) as i(tenant_id uuid, channel notify.channel, position smallint, failures integer, successes integer, error_code text)
     where h.tenant_id = i.tenant_id and h.channel = i.channel and h.position = i.position and i.failures > 0
       and h.errors >= greatest(p_errors, 1)
    returning h.tenant_id, h.channel, h.position, h.demoted_until)
    select coalesce(jsonb_agg(jsonb_build_object('tenant_id', d.tenant_id, 'channel', d.channel, 'position', d.position,
                                                 'demoted_until', d.demoted_until)), '[]')
      into v_demoted from demoted d;
    return v_demoted;
end
$$;
comment on function notify_api.record_provider_health_v1(jsonb, integer, double precision, double precision) is
    'The worker''s record of its batch''s sends per chained provider, [{tenant_id, channel, position, failures, successes, error_code}] (failures: sends known not to have been accepted). A success resets the provider''s count and ends its demotion; p_errors failures within p_window_seconds demote it for p_demote_seconds (the deployment''s failover settings). Returns the providers this call demoted, [{tenant_id, channel, position, demoted_until}]. Cross-tenant (runs as notify_system); granted to notify_service only.';

create function notify_api.provider_health_v1()
    returns table (tenant text, channel notify.channel, "position" smallint, provider text, errors integer, demoted boolean,
                   demoted_until timestamptz, demotions integer, last_error_code text, last_error_at timestamptz)
    language sql
    stable
    security definer
    set search_path = pg_catalog, pg_temp
as $$
    select t.slug, h.channel, h.position, cp.provider, h.errors, coalesce(h.demoted_until > now(), false), h.demoted_until,
           h.demotions, h.last_error_code, h.last_error_at
      from notify.provider_health h
      join notify.channel_providers cp on cp.tenant_id = h.tenant_id and cp.channel = h.channel and cp.position = h.position
      join notify.tenants t on t.id = h.tenant_id
     where h.errors > 0 or h.demoted_until > now()
     order by 1, 2, 3
$$;
comment on function notify_api.provider_health_v1() is
    'Operators (dispatcher status, the metrics endpoint): every chained provider with recent "not sent" errors or a demotion in force, per tenant, channel and position.';

create function notify_api.set_provider_grants_v1(p_tenant_id uuid, p_env_prefix text, p_file_dir text, p_private_endpoints boolean)
    returns jsonb
    language plpgsql
    security definer
    set search_path = pg_catalog, pg_temp
as $$
declare
    v notify.provider_grants;
begin
    -- Operator only: not granted to notify_service (the API and worker) nor notify_caller (sql/900_grants.sql), so no
    -- API key reaches it. Cross-tenant (owned by notify_system): a namespace may not overlap another tenant's.
    if not exists (select from notify.tenants t where t.id = p_tenant_id) then
        perform notify._raise('ND404', 'not_found', 'no such tenant', 'tenant');
    end if;
    -- The overlap check below reads other tenants' grants before this one is written: two grants at once must not
    -- both pass it, so grants are serialized (a lock on the table that conflicts only with itself and writers).
    lock table notify.provider_grants in share row exclusive mode;
    if exists (select from notify.provider_grants g
                where g.tenant_id <> p_tenant_id and (starts_with(g.env_prefix, p_env_prefix) or starts_with(p_env_prefix, g.env_prefix))) then
        perform notify._raise('ND409', 'secret_namespace_overlaps', 'env_prefix overlaps another tenant''s prefix (one starts with the other)', 'env_prefix');
    end if;
    if exists (select from notify.provider_grants g
                where g.tenant_id <> p_tenant_id and (starts_with(g.file_dir, p_file_dir) or starts_with(p_file_dir, g.file_dir))) then
        perform notify._raise('ND409', 'secret_namespace_overlaps', 'file_dir overlaps another tenant''s directory (one contains the other)', 'file_dir');
    end if;
    insert into notify.provider_grants as g (tenant_id, env_prefix, file_dir, private_endpoints)
    values (p_tenant_id, p_env_prefix, p_file_dir, coalesce(p_private_endpoints, false))
    on conflict (tenant_id) do update
        set env_prefix = excluded.env_prefix, file_dir = excluded.file_dir, private_endpoints = excluded.private_endpoints, updated_at = now()
    returning * into v;
    return jsonb_build_object('env_prefix', v.env_prefix, 'file_dir', v.file_dir, 'private_endpoints', v.private_endpoints, 'updated_at', v.updated_at);
exception
    when check_violation then
        perform notify._raise('ND422', 'invalid_secret_namespace',
            case when sqlerrm like '%file_dir%' then 'file_dir must be an absolute directory ending in /, without . or .. segments'
                 else 'env_prefix must be a variable-name prefix ending in _ (4-64 characters), not DISPATCHER_, DATABASE_ or PG' end,
            case when sqlerrm like '%file_dir%' then 'file_dir' else 'env_prefix' end);
end
$$;
comment on function notify_api.set_provider_grants_v1(uuid, text, text, boolean) is
    'Operator only (`dispatcher tenant secrets`): sets what a tenant''s provider settings may use: the env-variable prefix and the file directory its secret references must lie in (null: none), and whether its endpoints may be private hosts. Replaces the previous grant; references already saved are checked again by the worker at every send.';

create function notify_api.get_provider_grants_v1(p_tenant_id uuid)
    returns jsonb
    language sql
    stable
    security definer
    set search_path = pg_catalog, pg_temp
as $$
    select notify._enter(p_tenant_id);
    select jsonb_build_object('env_prefix', g.env_prefix, 'file_dir', g.file_dir, 'private_endpoints', coalesce(g.private_endpoints, false))
      from (select) x left join notify.provider_grants g on g.tenant_id = p_tenant_id
$$;
comment on function notify_api.get_provider_grants_v1(uuid) is
    'The secret namespace and endpoint grant the operator gave a tenant (read-only for the tenant): {env_prefix, file_dir, private_endpoints}.';

create function notify_api.take_tokens_v1(p_key text, p_rate double precision, p_wanted integer)
    returns integer
    language plpgsql
    security definer
    set search_path = pg_catalog, pg_temp
as $$
declare
    v_tokens double precision;
    v_granted integer;
begin
    -- A token bucket of capacity p_rate (one second of sending), refilled continuously; the row lock
    -- serializes every worker process that sends for the same key.
    insert into notify.rate_buckets as b (key, tokens, updated_at) values (p_key, p_rate, clock_timestamp())
    on conflict (key) do update
        set tokens = least(p_rate, b.tokens + extract(epoch from clock_timestamp() - b.updated_at) * p_rate),
            updated_at = clock_timestamp()
    returning tokens into v_tokens;
    v_granted := greatest(0, least(p_wanted, floor(v_tokens)::integer));
    update notify.rate_buckets set tokens = tokens - v_granted where key = p_key;
    return v_granted;
end
$$;
comment on function notify_api.take_tokens_v1(text, double precision, integer) is
    'Takes up to p_wanted tokens from the shared bucket p_key (rate p_rate per second, burst one second); returns how many were granted.';

create function notify_api.unsubscribe_v1(p_tenant_id uuid, p_delivery_id uuid, p_source text default 'list_unsubscribe')
    returns jsonb
    language plpgsql
    security definer
    set search_path = pg_catalog, pg_temp
as $$
declare
    v record;
begin
    perform notify._enter(p_tenant_id);
    select d.recipient_id, d.channel, r.category into v
      from notify.notification_deliveries d
      join notify.notification_requests r on r.tenant_id = d.tenant_id and r.id = d.request_id
     where d.tenant_id = p_tenant_id and d.id = p_delivery_id;
    if v.recipient_id is null then
        perform notify._raise('ND404', 'not_found', 'no such delivery', 'delivery_id');
    end if;
    if notify._consent_allows(p_tenant_id, v.recipient_id, v.channel, v.category) then
        insert into notify.recipient_consents (tenant_id, recipient_id, channel, category, status, source, evidence, recorded_by)
        values (p_tenant_id, v.recipient_id, v.channel, v.category, 'revoked', p_source,
                jsonb_build_object('delivery_id', p_delivery_id), 'dispatcher');
    end if;
    return jsonb_build_object('channel', v.channel, 'category', v.category, 'unsubscribed', true);
end
$$;
comment on function notify_api.unsubscribe_v1(uuid, uuid, text) is
    'Records an opt-out for the channel and category of a delivery (RFC 8058 one-click unsubscribe). Idempotent.';
