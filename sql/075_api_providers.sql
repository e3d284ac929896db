-- notify_api: per-tenant provider configuration, shared send pacing, one-click unsubscribe.
-- Called by PUT/GET /internal/channels/*/provider, the `dispatcher provider` CLI, the worker and /public/unsubscribe.

create function notify._provider_defaults(p_provider text)
    returns jsonb
    language sql
    immutable
    set search_path = pg_catalog, pg_temp
as $$
    select case p_provider
        when 'whatsapp_cloud' then jsonb_build_object(
            'api_version', 'v22.0', 'base_url', 'https://graph.facebook.com', 'rate_per_second', 80,
            'timeout_seconds', 15, 'opt_out_keywords', jsonb_build_array('STOP', 'BAJA', 'UNSUBSCRIBE', 'CANCELAR'))
        when 'smtp' then jsonb_build_object(
            'port', 587, 'security', 'starttls', 'timeout_seconds', 30, 'validate_certs', true,
            'transactional_categories', jsonb_build_array('transactional'), 'max_connections', 8)
        else '{}'::jsonb
    end
$$;
comment on function notify._provider_defaults(text) is 'Default settings of each provider, merged under what a tenant sets.';

create function notify_api.set_channel_provider_v1(p_tenant_id uuid, p_channel notify.channel, p_body jsonb)
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
begin
    perform notify._enter(p_tenant_id);
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
        when 'whatsapp_cloud' then array['phone_number_id', 'api_version', 'base_url', 'rate_per_second', 'timeout_seconds', 'opt_out_keywords']
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
    if v_provider = 'smtp' then
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

    insert into notify.channel_providers as c (tenant_id, channel, provider, settings, secrets)
    values (p_tenant_id, p_channel, v_provider, notify._provider_defaults(v_provider) || v_settings, v_secrets)
    on conflict (tenant_id, channel) do update
        set provider = excluded.provider, settings = excluded.settings, secrets = excluded.secrets, updated_at = now();
    return (select p from jsonb_array_elements(notify_api.list_channel_providers_v1(p_tenant_id)) p where p ->> 'channel' = p_channel::text);
end
$$;
comment on function notify_api.set_channel_provider_v1(uuid, notify.channel, jsonb) is
    'Sets the provider of a tenant''s channel: {provider: mock|whatsapp_cloud|smtp, settings, secrets: {name: "env:VAR"|"file:/path"}}. Settings are checked per provider and merged over its defaults.';

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
               'secrets', coalesce((select jsonb_object_agg(k, split_part(v #>> '{}', ':', 1) || ':***') from jsonb_each(p.secrets) e(k, v)), '{}'),
               'default', p.provider is null, 'updated_at', p.updated_at) order by c)
      from unnest(enum_range(null::notify.channel)) c
      left join notify.channel_providers p on p.tenant_id = p_tenant_id and p.channel = c
$$;
comment on function notify_api.list_channel_providers_v1(uuid) is
    'The provider of every channel of a tenant; secret references are shown masked ("env:***").';

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
