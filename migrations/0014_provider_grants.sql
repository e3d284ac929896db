-- 0014: provider settings a tenant admin sets can no longer reach the worker's secrets or internal hosts (issue #11).
--
-- 1. notify.provider_grants: per tenant, set by the operator only (set_provider_grants_v1, not granted to the API's role):
--    the env-variable prefix and file directory its secret references must lie in, and whether its endpoints may be
--    private. set_channel_provider_v1 refuses references outside it (secret_not_allowed), and a WhatsApp base_url or
--    SMTP host that is not a public host without the grant (unsafe_endpoint); the claim hands the grant to the worker,
--    which checks both again at every send. Existing tenants get no grant: their saved references stop resolving until
--    the operator grants a namespace (`dispatcher tenant secrets`), which is the point.
-- 2. A WhatsApp phone_number_id belongs to one tenant (a unique index; phone_number_taken).
-- 3. list_channel_providers_v1 shows secret references in full ("env:NAME"): a name is not a secret.

do $$
begin
    if exists (select from notify.channel_providers where provider = 'whatsapp_cloud'
                group by settings ->> 'phone_number_id' having count(*) > 1) then
        raise exception 'two tenants use the same WhatsApp phone_number_id; give it to one of them before migrating'
            using hint = 'select settings ->> ''phone_number_id'', array_agg(tenant_id) from notify.channel_providers where provider = ''whatsapp_cloud'' group by 1 having count(*) > 1';
    end if;
end
$$;

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

-- A business number belongs to one tenant: inbound messages (the 24-hour window, opt-out keywords) are routed by it.
-- (Global, not per tenant, like api_clients.key_hash: a webhook names the number before its tenant is known.)
create unique index channel_providers_phone_number_id_key on notify.channel_providers ((settings ->> 'phone_number_id'))
    where provider = 'whatsapp_cloud';

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
    'Sets the provider of a tenant''s channel: {provider: mock|whatsapp_cloud|smtp, settings, secrets: {name: "env:VAR"|"file:/path"}}. Settings are checked per provider and merged over its defaults; secret references must lie in the tenant''s operator-set grant (notify.provider_grants), endpoints must be public hosts unless granted, a WhatsApp number belongs to one tenant.';

create or replace function notify_api.list_channel_providers_v1(p_tenant_id uuid)
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
               'default', p.provider is null, 'updated_at', p.updated_at) order by c)
      from unnest(enum_range(null::notify.channel)) c
      left join notify.channel_providers p on p.tenant_id = p_tenant_id and p.channel = c
$$;
comment on function notify_api.list_channel_providers_v1(uuid) is
    'The provider of every channel of a tenant, with its secret references ("env:NAME", "file:/path"; a name is not a secret, values are never stored).';

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
    return query
    with due as (
        select d.tenant_id, d.id
          from notify.notification_deliveries d
         where d.channel = p_channel and d.status in ('queued', 'scheduled') and d.due_at <= now()
         order by d.due_at
         limit p_limit
           for update skip locked
    ), decided as (
        -- Expiry and consent are checked again here: a revoke or a deadline between submit and send wins.
        -- Free-form WhatsApp text outside the 24-hour customer-service window is refused, not sent to fail.
        select d.tenant_id, d.id,
               case when d.expires_at is not null and d.expires_at <= now() then 'expired'
                    when not consent.allowed then 'suppressed'
                    when cp.provider = 'whatsapp_cloud' and t.content ? 'text' and not exists (
                             select from notify.whatsapp_windows w
                              where w.tenant_id = d.tenant_id and w.phone_number_id = cp.settings ->> 'phone_number_id'
                                and w.wa_id = ltrim(d.address, '+') and w.last_inbound_at > now() - interval '24 hours')
                         then 'failed'
                    else 'sending' end as next_status
          from due
          join notify.notification_deliveries d on d.tenant_id = due.tenant_id and d.id = due.id
          join notify.notification_requests r on r.tenant_id = d.tenant_id and r.id = d.request_id
         cross join lateral notify._consent(d.tenant_id, d.recipient_id, d.channel, r.category) consent
          left join notify.channel_providers cp on cp.tenant_id = d.tenant_id and cp.channel = d.channel
          left join notify.templates t on t.tenant_id = d.tenant_id and t.key = r.template_key
                                      and t.channel = d.channel and t.locale = d.template_locale
    ), updated as (
        update notify.notification_deliveries d
           set status = x.next_status::notify.delivery_status,
               attempt = d.attempt + (x.next_status = 'sending')::integer,
               lease_expires_at = case when x.next_status = 'sending' then now() + make_interval(secs => p_lease_seconds) end,
               reason = case x.next_status when 'expired' then 'expired_before_send' when 'suppressed' then 'no_consent'
                                           when 'failed' then 'outside_customer_service_window' else d.reason end
          from decided x
         where d.tenant_id = x.tenant_id and d.id = x.id
        returning d.*
    ), attempts as (
        insert into notify.delivery_attempts (tenant_id, delivery_id, attempt)
        select u.tenant_id, u.id, u.attempt from updated u where u.status = 'sending'
    )
    select u.tenant_id, u.id, u.attempt, u.channel, u.address, r.template_key, u.template_locale, t.content,
           r.variables || coalesce(u.variables, '{}'), r.category, u.request_id, coalesce(cp.provider, 'mock'),
           case when cp.provider is not null
                then jsonb_build_object('settings', cp.settings, 'secrets', cp.secrets, 'updated_at', cp.updated_at,
                                        'grants', (select jsonb_build_object('env_prefix', g.env_prefix, 'file_dir', g.file_dir,
                                                                             'private_endpoints', g.private_endpoints)
                                                     from notify.provider_grants g where g.tenant_id = u.tenant_id)) end,
           r.http_request_id, r.trace_parent
      from updated u
      join notify.notification_requests r on r.tenant_id = u.tenant_id and r.id = u.request_id
      left join notify.templates t on t.tenant_id = u.tenant_id and t.key = r.template_key
                                  and t.channel = u.channel and t.locale = u.template_locale
      left join notify.channel_providers cp on cp.tenant_id = u.tenant_id and cp.channel = u.channel
     where u.status = 'sending';
end
$$;
comment on function notify_api.claim_deliveries_v1(notify.channel, integer, integer) is
    'Claims up to p_limit due deliveries of a channel (FOR UPDATE SKIP LOCKED): expired ones become expired, revoked ones suppressed, WhatsApp text outside the 24-hour window failed, the rest sending with attempt+1 and a lease. Returns what the worker needs to send them, with the tenant''s provider and its operator grant (checked again at send time).';

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
                 'charge_api_key_v1', 'set_provider_grants_v1']) as cross_tenant
               from pg_proc p where p.pronamespace in ('notify'::regnamespace, 'notify_api'::regnamespace) loop
        execute format('alter function %s owner to %s', r.fn, case when r.cross_tenant then 'notify_system' else 'notify_owner' end);
    end loop;
end
$$;
comment on function notify._settle_owners() is
    'Gives every notify table, type and function to notify_owner, and the cross-tenant notify_api functions to notify_system. Run by the migrating role (a member of both) at the end of every migration that creates objects.';

alter table notify.provider_grants enable row level security;
alter table notify.provider_grants force row level security;
create policy tenant_rows on notify.provider_grants to notify_owner
    using (tenant_id = (select notify._tenant())) with check (tenant_id = (select notify._tenant()));
create policy system_rows on notify.provider_grants to notify_system using (true) with check (true);

revoke execute on all functions in schema notify from public;
revoke execute on all functions in schema notify_api from public;
grant execute on all functions in schema notify_api to notify_service;
revoke execute on function notify_api.set_provider_grants_v1(uuid, text, text, boolean) from notify_service;
grant select, insert, update, delete on all tables in schema notify to notify_system;
grant execute on all functions in schema notify to notify_system;
select notify._settle_owners();
