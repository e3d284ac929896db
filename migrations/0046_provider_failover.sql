-- 0046: provider failover (issue #16). A channel's providers form an ordered chain per tenant
-- (notify.channel_providers.position, 0 the primary); notify_api.set_channel_providers_v1 replaces a chain, its entries
-- checked by notify._provider_entry (set_channel_provider_v1's checks, moved there); list_channel_providers_v1 shows it
-- with each provider's health; the claim returns each delivery's chain, demoted providers last; the worker records
-- how chained providers did (notify.provider_health, record_provider_health_v1); operators read it
-- (provider_health_v1). Readers that want one provider per channel (the preview) take position 0; the WhatsApp
-- account-level lookup (notify._whatsapp_tenants) returns each tenant once, whatever its chain holds.

alter type notify.claimed_delivery add attribute provider_position smallint, add attribute fallbacks jsonb;
comment on type notify.claimed_delivery is
    'What the worker needs to send one claimed delivery: where to, the template content, the variables, and the tenant''s provider for the channel (settings and secret references, never secrets). provider_position: the place of that provider in the tenant''s chain (notify.channel_providers.position; null for the built-in mock); fallbacks: the rest of the chain in the order to try them, [{provider, position, provider_config}], null when there is none (docs/architecture.md, "Provider failover").';

alter table notify.channel_providers add column position smallint not null default 0;
alter table notify.channel_providers drop constraint channel_providers_pkey;
alter table notify.channel_providers add constraint channel_providers_pkey primary key (tenant_id, channel, position);
alter table notify.channel_providers add constraint channel_providers_position check (position between 0 and 4);
comment on column notify.channel_providers.position is
    'The provider''s place in the channel''s failover chain: 0 the primary, 1.. the fallbacks tried in order when a send is known not to have been accepted (notify_api.set_channel_providers_v1). Every reader that wants one provider per channel takes position 0 on purpose.';

-- Failover (docs/architecture.md, "Provider failover"): how a chain's providers have been doing, shared by every worker.
create table notify.provider_health (
    tenant_id uuid not null,
    channel notify.channel not null,
    position smallint not null,
    errors integer not null default 0,
    window_started_at timestamptz,
    demoted_until timestamptz,
    demotions integer not null default 0,
    last_error_code text,
    last_error_at timestamptz,
    last_success_at timestamptz,
    updated_at timestamptz not null default now(),
    primary key (tenant_id, channel, position),
    constraint provider_health_provider foreign key (tenant_id, channel, position)
        references notify.channel_providers (tenant_id, channel, position) on delete cascade
);
comment on table notify.provider_health is
    'Recent "not sent" errors of each provider of a chain (notify_api.record_provider_health_v1, written by the worker once per batch): N errors within M seconds demote it until demoted_until (the claim tries it after the healthy ones); a success resets it. Replacing a chain or its primary starts its health afresh.';
comment on column notify.provider_health.errors is
    '"Not sent" errors (connection refused, authentication refused, refused before acceptance) since window_started_at; reset by a success, a demotion, or a window older than the deployment''s failover_window_seconds.';
comment on column notify.provider_health.demoted_until is
    'Until then the claim puts this provider after the healthy ones of its chain (or alone, last, when all are demoted). Null or past: not demoted.';

alter table notify.provider_health enable row level security;
alter table notify.provider_health force row level security;
create policy tenant_rows on notify.provider_health to notify_owner
    using (tenant_id = (select notify._tenant())) with check (tenant_id = (select notify._tenant()));
create policy system_rows on notify.provider_health to notify_system using (true) with check (true);

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
    when unique_violation then  -- channel_providers_phone_number_id_key (WhatsApp), _twilio_number_key: the number is another tenant's
        get stacked diagnostics v_constraint = constraint_name;
        if v_constraint = 'channel_providers_twilio_number_key' then
            perform notify._raise('ND409', 'phone_number_taken',
                'settings.from_number is configured for another tenant: a Twilio number belongs to one tenant', 'settings.from_number');
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
    when unique_violation then  -- a WhatsApp or Twilio number is another tenant's, or twice in this chain
        get stacked diagnostics v_constraint = constraint_name;
        perform notify._raise('ND409', 'phone_number_taken',
            format('providers[%s]: %s is configured elsewhere (another tenant''s, or earlier in this chain): a number belongs to one tenant and one place',
                   v_at, case when v_constraint = 'channel_providers_twilio_number_key' then 'settings.from_number' else 'settings.phone_number_id' end),
            format('providers[%s].', v_at) || case when v_constraint = 'channel_providers_twilio_number_key' then 'settings.from_number'
                                                   else 'settings.phone_number_id' end);
end
$$;
comment on function notify_api.set_channel_providers_v1(uuid, notify.channel, jsonb) is
    'Replaces a tenant''s whole provider chain of a channel at once: an ordered array of 1 to 5 {provider, settings, secrets} (as set_channel_provider_v1 takes), the primary first, then the fallbacks a send known not to have been accepted moves to (docs/architecture.md, "Provider failover"). Each entry gets set_channel_provider_v1''s checks, an error naming providers[i].<field>; nothing is written unless every entry passes. The chain''s health starts afresh. Returns the channel as list_channel_providers_v1 shows it.';


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
          from notify._claim_shares(p_channel, p_limit) s
         cross join lateral (
                -- Each (priority, tenant) pair's share, oldest first; SKIP LOCKED within each, so concurrent claims
                -- take disjoint rows and still fill their batches from the rows behind the locked ones. The scan
                -- starts at the pair's oldest row, which _claim_shares found: the index entries before it (rows
                -- claimed since the last vacuum) are stepped over once per claim, not twice.
                select d.tenant_id, d.id, d.request_id, d.recipient_id, d.channel, d.address, d.template_locale, d.variables,
                       d.expires_at, d.test
                  from notify.notification_deliveries d
                 where d.channel = p_channel and d.priority = s.priority and d.tenant_id = s.tenant_id
                   and d.status in ('queued', 'scheduled', 'held', 'waiting') and d.due_at >= s.oldest and d.due_at <= now()
                 order by d.due_at
                 limit s.n
                   for update skip locked) d
         limit p_limit  -- the shares add up to p_limit at most: this tells the planner how many rows come (a nested loop)
    ), chain as materialized (
        -- The claimed tenants' provider chains of this channel (notify.channel_providers, position 0 the primary), the
        -- demoted providers (notify.provider_health) after the healthy ones, each group in position order: rank 1 is the
        -- provider to try first, the others its fallbacks (docs/architecture.md, "Provider failover"). One index probe
        -- per claimed tenant, not per row.
        select cp.tenant_id, cp.position, cp.provider, cp.settings, cp.secrets, cp.updated_at,
               row_number() over (partition by cp.tenant_id order by coalesce(h.demoted_until > now(), false), cp.position) as rank
          from notify.channel_providers cp
          left join notify.provider_health h on h.tenant_id = cp.tenant_id and h.channel = cp.channel and h.position = cp.position
         where cp.channel = p_channel and cp.tenant_id in (select distinct u.tenant_id from due u)
    ), fallbacks as materialized (
        select f.tenant_id,
               jsonb_agg(jsonb_build_object(
                   'provider', f.provider, 'position', f.position,
                   'provider_config', jsonb_build_object('settings', f.settings, 'secrets', f.secrets, 'updated_at', f.updated_at,
                                                         'grants', (select jsonb_build_object('env_prefix', g.env_prefix, 'file_dir', g.file_dir,
                                                                                              'private_endpoints', g.private_endpoints)
                                                                      from notify.provider_grants g where g.tenant_id = f.tenant_id)))
                   order by f.rank) as fallbacks
          from chain f
         where f.rank > 1
         group by f.tenant_id
    ), decided as materialized (
        -- Expiry and consent are checked again here: a revoke or a deadline between submit and send wins.
        -- Free-form WhatsApp text outside the 24-hour customer-service window is refused, not sent to fail.
        select d.tenant_id, d.id, d.recipient_id, d.expires_at, d.address, d.template_locale, r.template_key, t.content,
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
               case when not (d.test or r.test) then cp.position end as provider_position,
               case when not (d.test or r.test) then fb.fallbacks end as fallbacks,
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
          left join chain cp on cp.tenant_id = d.tenant_id and cp.rank = 1
          left join fallbacks fb on fb.tenant_id = d.tenant_id
          left join notify.templates t on t.tenant_id = d.tenant_id and t.key = r.template_key
                                      and t.channel = d.channel and t.locale = d.template_locale
    ), policed as materialized (
        -- Tenant policies (sql/077_api_policies.sql), only for rows about to be sent whose tenant has quiet hours or caps
        -- (one hashed probe per claim, so a tenant that sets nothing pays almost nothing) or whose provider is
        -- whatsapp_cloud (the pair rate limit): quiet hours hold them, a cap suppresses or holds them.
        -- notify._policy_claim is volatile, so it runs after the sort, once per row in (tenant, recipient) order: its
        -- per-recipient locks are taken in the same order by every claim.
        select x.tenant_id, x.id,
               notify._policy_claim(x.tenant_id, x.id, x.recipient_id, p_channel, x.category, x.provider, x.expires_at) as policy
          from decided x
         where x.next_status = 'sending'
           and (x.provider = 'whatsapp_cloud'
                or x.tenant_id in (select q.tenant_id from notify.quiet_hours q union all select c.tenant_id from notify.frequency_caps c))
         order by x.tenant_id, x.recipient_id
    ), final as (
        select x.*, p.policy,
               case (p.policy).decision when 'hold' then 'held' when 'suppress' then 'suppressed' when 'expire' then 'expired'
                                        else x.next_status::text end::notify.delivery_status as final_status
          from decided x
          left join policed p on p.tenant_id = x.tenant_id and p.id = x.id
    ), updated as (
        update notify.notification_deliveries d
           set status = x.final_status,
               attempt = d.attempt + (x.final_status = 'sending')::integer,
               lease_expires_at = case when x.final_status = 'sending' then now() + make_interval(secs => p_lease_seconds) end,
               reason = case when (x.policy).decision <> 'send' then (x.policy).reason
                             else case x.next_status when 'expired' then 'expired_before_send' when 'suppressed' then 'no_consent'
                                                     when 'failed' then 'outside_customer_service_window'
                                                     -- the hold is over: its reason no longer says why (the history does)
                                                     else case when d.status = 'held' then null else d.reason end end end,
               due_at = case when (x.policy).decision = 'hold' then (x.policy).until else d.due_at end
          from final x
         where d.tenant_id = x.tenant_id and d.id = x.id
        returning d.tenant_id, d.id, d.attempt, d.channel, d.status, x.address, x.template_key, x.template_locale,
                  x.content, x.variables, x.category, x.request_id, x.provider, x.provider_config, x.http_request_id,
                  x.trace_parent, x.provider_position, x.fallbacks
    ), attempts as (
        insert into notify.delivery_attempts (tenant_id, delivery_id, attempt)
        select u.tenant_id, u.id, u.attempt from updated u where u.status = 'sending'
    )
    select u.tenant_id, u.id, u.attempt, u.channel, u.address, u.template_key, u.template_locale, u.content,
           u.variables, u.category, u.request_id, coalesce(u.provider, 'mock'), u.provider_config,
           u.http_request_id, u.trace_parent, u.provider_position, u.fallbacks
      from updated u
     where u.status = 'sending';
end
$$;
comment on function notify_api.claim_deliveries_v1(notify.channel, integer, integer) is
    'Claims up to p_limit due deliveries of a channel (FOR UPDATE SKIP LOCKED), higher priority first and within a priority each tenant its share (notify._claim_shares): expired ones become expired, revoked ones (and marketing templates without marketing consent) suppressed, WhatsApp text outside the 24-hour window failed, those the tenant''s policies stop (notify._policy_claim: quiet hours, frequency caps, WhatsApp''s pair rate limit) held until due_at, suppressed or expired with the policy''s reason, the rest sending with attempt+1 and a lease. Returns what the worker needs to send them, with the tenant''s provider and its operator grant (checked again at send time) and, for a failover chain, its place (provider_position) and the fallbacks in order, demoted providers (notify.provider_health) after the healthy ones; for a test delivery always the mock provider, with config {"test": true}.';


create or replace function notify_api.preview_notification_v1(p_tenant_id uuid, p_request jsonb)
    returns jsonb
    language plpgsql
    security definer
    set search_path = pg_catalog, pg_temp
as $$
declare
    s notify.submission;
    v_items jsonb;
    v_now timestamptz := now();
    v_due timestamptz;
    v_default_locale text;
    v_default_timezone text;
    v_test boolean := coalesce(pg_catalog.current_setting('notify.test', true), '') = 'true';
    v_deliveries jsonb;
    v_refusal jsonb;
    v_fanout boolean;
    v_suppressed_channels notify.channel[];
    v_has_policies boolean;
begin
    perform notify._enter(p_tenant_id);
    -- 1. The body, read and checked exactly as a submission reads it: its errors stay errors (same type, status, field).
    --    (No Idempotency-Key: a preview claims none, and a key already used is not looked up.)
    s := notify._parse_submission(p_tenant_id, p_request, null);
    v_fanout := s.recipient is null;
    if v_fanout then
        perform notify._preview_check_fanout(s.recipients);
        v_items := s.recipients;
    else
        perform notify._preview_check_recipient(p_tenant_id, notify._text_field(s.recipient, 'ref', 'recipient', true, 200),
                                                s.recipient, 'recipient');
        v_items := jsonb_build_array(s.recipient);
    end if;
    select n.default_locale, n.default_timezone into v_default_locale, v_default_timezone from notify.tenants n where n.id = p_tenant_id;
    v_due := greatest(coalesce(s.send_at, v_now), v_now);
    -- As the claim does: the policies are evaluated only where the tenant has some (or for whatsapp_cloud), and an
    -- address is hashed for the suppression list only on a channel where the tenant has suppressed addresses.
    v_has_policies := exists (select from notify.quiet_hours q where q.tenant_id = p_tenant_id)
                      or exists (select from notify.frequency_caps c where c.tenant_id = p_tenant_id);
    v_suppressed_channels := array(select distinct x.channel from notify.address_suppressions x where x.tenant_id = p_tenant_id);

    -- 2. Per recipient and channel, in the submission's order, read only: the stored recipient overlaid with what the
    --    body gives (locale, time zone, addresses; an address given as null is removed), the template and its locale
    --    fallback, the variables it lacks, the consent in force (the entry that decides, or the tenant's policy, and an
    --    erased address's suppression), the provider, and so the status the submission would record.
    with input as (
        select e.i, e.r ->> 'ref' as ref,
               case when jsonb_typeof(e.r -> 'addresses') = 'object' then e.r -> 'addresses' else '{}' end as addresses,
               e.r ->> 'locale' as locale, e.r ->> 'timezone' as timezone,
               case when jsonb_typeof(e.r -> 'variables') = 'object' then e.r -> 'variables' end as variables
          from jsonb_array_elements(v_items) with ordinality e(r, i)
    ), people as (
        select f.i, f.ref, f.addresses, f.variables, rec.id as recipient_id,
               coalesce(f.locale, rec.locale, v_default_locale) as locale,
               coalesce(f.timezone, rec.timezone, v_default_timezone, 'UTC') as timezone
          from input f
          left join notify.recipients rec on rec.tenant_id = p_tenant_id and rec.ref = f.ref
    ), rows as (
        select p.i, c.ord, p.ref, p.recipient_id, p.locale, p.timezone, c.channel,
               case when p.addresses ? c.channel::text then p.addresses ->> c.channel::text else a.address end as address,
               case when p.addresses ? c.channel::text then 'request' when a.address is not null then 'stored' end as address_source,
               t.locale as template_locale, t.content, t.version as template_version,
               s.variables || coalesce(p.variables, '{}') as variables,
               array(select r from unnest(t.required_variables) r
                      where not (s.variables || coalesce(p.variables, '{}')) ? r) as missing,
               coalesce(pol.policy, notify._default_policy(c.channel)) as policy, pol.policy is not null as policy_set,
               ce.id as consent_id, ce.status as consent_status, ce.source as consent_source,
               ce.recorded_at as consent_recorded_at, ce.category as consent_category,
               cp.provider as configured_provider
          from people p
         cross join unnest(s.channels) with ordinality c(channel, ord)
          left join notify.recipient_addresses a
                 on a.tenant_id = p_tenant_id and a.recipient_id = p.recipient_id and a.channel = c.channel
          left join lateral notify._resolve_template(p_tenant_id, s.template, c.channel, p.locale) t on true
          left join notify.channel_policies pol on pol.tenant_id = p_tenant_id and pol.channel = c.channel
          left join lateral (
              select x.id, x.status, x.source, x.recorded_at, x.category
                from notify.recipient_consents x
               where x.tenant_id = p_tenant_id and x.recipient_id = p.recipient_id and x.channel = c.channel
                 and (x.category is null or x.category = s.category)
               order by x.id desc
               limit 1) ce on true
          -- the primary (position 0): what the dry run names as the provider (a failover chain's fallbacks are not shown)
          left join notify.channel_providers cp on cp.tenant_id = p_tenant_id and cp.channel = c.channel and cp.position = 0
    ), decided as (
        select r.*,
               case when v_test then 'mock' else coalesce(r.configured_provider, 'mock') end as provider_name,
               coalesce(r.consent_status = 'granted', r.policy = 'opt_out') as consent_allows,
               -- an erased recipient's opt-out of this address (notify._consent), unless a grant was recorded after it
               (select jsonb_build_object('category', nullif(sup.category, ''), 'recorded_at', sup.created_at)
                  from notify.address_suppressions sup
                 where r.address is not null and r.channel = any (v_suppressed_channels)
                   and sup.tenant_id = p_tenant_id and sup.channel = r.channel
                   and sup.address_hash = notify._address_hash(r.channel, r.address)
                   and sup.category in ('', coalesce(s.category, ''))
                   and not exists (select from notify.recipient_consents g
                                    where g.tenant_id = p_tenant_id and g.recipient_id = r.recipient_id and g.channel = r.channel
                                      and (g.category is null or g.category = s.category) and g.status = 'granted'
                                      and g.recorded_at > sup.created_at)
                 order by sup.created_at desc
                 limit 1) as suppression,
               -- what the claim checks again when it sends: a marketing template needs marketing consent, and free-form
               -- WhatsApp text needs the 24-hour customer-service window (notify_api.claim_deliveries_v1)
               -- (each condition coalesced, so that AND stops at the first false instead of going on past a null)
               coalesce(r.content ->> 'category', '') = 'marketing'
                   and not notify._consent_allows(p_tenant_id, r.recipient_id, r.channel, 'marketing') as marketing_refused,
               coalesce(not v_test and coalesce(r.configured_provider, '') = 'whatsapp_cloud' and coalesce(r.content ? 'text', false)
                        and r.address is not null
                   and not exists (
                       select from notify.whatsapp_windows w
                         join notify.channel_providers x on x.tenant_id = p_tenant_id and x.channel = 'whatsapp' and x.position = 0
                        where w.tenant_id = p_tenant_id and w.phone_number_id = x.settings ->> 'phone_number_id'
                          and w.wa_id = ltrim(r.address, '+') and w.last_inbound_at > v_now - interval '24 hours'), false) as outside_window
          from rows r
    ), stepped as (
        -- A route's first step that is not suppressed is due; the later ones wait (notify_api.submit_notification_v1).
        select d.*, d.address is null or not d.consent_allows or d.suppression is not null as suppressed,
               min(d.ord) filter (where d.address is not null and d.consent_allows and d.suppression is null)
                   over (partition by d.i) as active
          from decided d
    ), wanted as (
        select x.*, s.route,
               case when s.route is not null and x.ord > coalesce(x.active, 0) and not x.suppressed then
                   format('only if step %s does not reach %s', x.ord - 1, s.route -> (x.ord::integer - 2) ->> 'until')
                   || coalesce(' within ' || (s.route -> (x.ord::integer - 2) ->> 'within'), '')
                   || ' (or cannot: it is suppressed, fails, bounces or expires)' end as condition,
               coalesce(not x.suppressed and (s.route is null or x.ord = x.active)
                        and (v_has_policies or x.provider_name = 'whatsapp_cloud'), false) as policy_wanted
          from stepped x
    ), keyed as (
        -- The policies' decision depends on the recipient only through its time zone and its counted sends: recipients
        -- without any sends (every new one) in one time zone share one decision per channel and provider, so a
        -- 10,000-recipient fan-out asks for a few decisions instead of 20,000 (it took 13 s with quiet hours set).
        select w.*,
               case when w.policy_wanted and w.recipient_id is not null
                         and exists (select from notify.policy_sends l where l.tenant_id = p_tenant_id and l.recipient_id = w.recipient_id)
                    then w.recipient_id end as own_sends
          from wanted w
    ), decisions as materialized (
        select k.own_sends, k.known, k.channel, k.provider_name, k.timezone,
               notify._preview_policy(p_tenant_id, k.recipient_id, k.channel, s.category, k.provider_name, k.address,
                                      s.expires_at, v_due, k.timezone) as policy_decision
          from (select w.own_sends, w.recipient_id is not null as known, w.channel, w.provider_name, w.timezone,
                       (array_agg(w.recipient_id))[1] as recipient_id, (array_agg(w.address))[1] as address
                  from keyed w
                 where w.policy_wanted
                 group by 1, 2, 3, 4, 5) k
    ), policed as (
        -- The tenant's policies, as the claim applies them to a delivery about to be sent, when it falls due.
        select t.*, t.route is not null and t.ord > coalesce(t.active, 0) and not t.suppressed as waiting, p.policy_decision
          from keyed t
          left join decisions p
                 on t.policy_wanted and p.own_sends is not distinct from t.own_sends and p.known = (t.recipient_id is not null)
                and p.channel = t.channel and p.provider_name = t.provider_name and p.timezone = t.timezone
    ), answered as (
        select d.i, d.ord, d.ref, d.channel, d.locale, d.template_locale, d.missing, d.suppressed, d.waiting,
               d.policy_decision ->> 'decision' in ('suppress', 'expire') as refused_by_policy,
               jsonb_strip_nulls(jsonb_build_object(
                   'recipient', d.ref, 'index', case when v_fanout then d.i - 1 end,
                   'recipient_known', d.recipient_id is not null, 'channel', d.channel,
                   'step', case when s.route is not null then d.ord end,
                   'status', case when d.suppressed then 'suppressed' when d.waiting then 'waiting'
                                  when s.send_at > v_now then 'scheduled' else 'queued' end,
                   'reason', case when d.address is null then 'no_address'
                                  when not d.consent_allows or d.suppression is not null then 'no_consent'
                                  when s.route is not null and d.ord = d.active and d.ord > 1
                                  then format('step_%s_suppressed', d.ord - 1) end,
                   'due_at', case when not d.waiting then v_due end, 'expires_at', s.expires_at,
                   'condition', d.condition,
                   'policy', d.policy_decision,
                   'sends_at', case when not d.suppressed and not d.waiting
                                    and coalesce(d.policy_decision ->> 'decision', 'send') in ('send', 'hold')
                                    then coalesce((d.policy_decision ->> 'sends_at')::timestamptz, v_due) end,
                   'provider', jsonb_build_object(
                       'name', case when v_test then 'mock' else coalesce(d.configured_provider, 'mock') end,
                       'source', case when v_test then 'test_key' when d.configured_provider is null then 'default_mock'
                                      else 'channel_provider' end),
                   'address', jsonb_build_object('present', d.address is not null, 'source', d.address_source),
                   'locale', jsonb_build_object(
                       'wanted', d.locale,
                       'tried', to_jsonb(array(select u.l from unnest(array[d.locale, split_part(d.locale, '-', 1), v_default_locale])
                                                           with ordinality u(l, n) group by u.l order by min(u.n))),
                       'template_locale', d.template_locale),
                   'timezone', d.timezone,
                   'consent', jsonb_build_object(
                       'allowed', d.consent_allows and d.suppression is null,
                       'entry', case when d.consent_id is not null then jsonb_build_object(
                           'id', d.consent_id, 'status', d.consent_status, 'source', d.consent_source,
                           'recorded_at', d.consent_recorded_at, 'category', d.consent_category) end,
                       'policy', d.policy, 'policy_source', case when d.policy_set then 'tenant' else 'default' end,
                       'suppressed_address', d.suppression),
                   'template', jsonb_build_object('key', s.template, 'locale', d.template_locale,
                                                  'version', d.template_version, 'content', d.content),
                   'variables', d.variables,
                   'missing_variables', case when cardinality(d.missing) > 0 then to_jsonb(d.missing) end))
               || jsonb_build_object('reasons', to_jsonb(array_remove(array[
                   case when d.address is null then jsonb_build_object(
                       'reason', 'no_address', 'channel', d.channel,
                       'detail', case when d.address_source = 'request' then 'the request removes the address'
                                      when d.recipient_id is null then 'a new recipient without an address on this channel'
                                      else 'the recipient has no address on this channel' end) end,
                   case when not d.consent_allows then jsonb_build_object(
                       'reason', 'no_consent',
                       'detail', case when d.consent_id is not null then 'the consent entry in force is a revoke'
                                      else 'no consent entry, and the channel''s policy is ' || d.policy end) end,
                   case when d.suppression is not null then jsonb_build_object(
                       'reason', 'no_consent', 'detail', 'the address is on the suppression list of an erased recipient''s opt-out') end,
                   case when d.template_locale is null then jsonb_build_object(
                       'reason', 'template_not_found',
                       'detail', format('template %s has no %s content for locale %s or its fallbacks', s.template, d.channel, d.locale)) end,
                   case when cardinality(d.missing) > 0 then jsonb_build_object(
                       'reason', 'missing_variables', 'variables', to_jsonb(d.missing)) end,
                   case when d.marketing_refused then jsonb_build_object(
                       'reason', 'no_consent', 'at', 'claim',
                       'detail', 'a marketing template needs marketing consent') end,
                   case when d.policy_decision ->> 'decision' in ('suppress', 'expire') then jsonb_strip_nulls(jsonb_build_object(
                       'reason', d.policy_decision ->> 'reason', 'at', 'claim', 'until', d.policy_decision -> 'until'))
                       || coalesce(d.policy_decision -> 'detail', '{}') end,
                   case when d.waiting then jsonb_build_object('reason', 'route_step_waiting', 'step', d.ord - 1, 'detail', d.condition) end,
                   case when d.outside_window then jsonb_build_object(
                       'reason', 'outside_customer_service_window', 'at', 'claim',
                       'detail', 'free-form WhatsApp text needs an inbound message from the user in the last 24 hours') end
               ], null))) as delivery,
               coalesce(d.marketing_refused or d.outside_window, false) as refused_at_claim
          from policed d
    )
    select jsonb_agg(a.delivery || jsonb_build_object('would_send',
                     not a.suppressed and not a.waiting and not a.refused_at_claim and not coalesce(a.refused_by_policy, false)
                     and a.template_locale is not null and cardinality(a.missing) = 0)
                     order by a.i, a.ord),
           -- The error the submission would answer instead, as it orders its checks: for one recipient, channel by
           -- channel the template, then its variables; for a fan-out, every template first, then the variables.
           (select case when x.template_locale is null
                        then jsonb_build_object('status', 422, 'type', 'template_not_found', 'field', 'template',
                                 'detail', format('template %s has no %s content for locale %s or its fallbacks',
                                                  s.template, x.channel, x.locale))
                        when v_fanout
                        then jsonb_build_object('status', 422, 'type', 'missing_variables',
                                 'field', format('recipients[%s].variables.%s', x.i - 1, x.missing[1]),
                                 'detail', format('template %s needs variable %s for recipients[%s]', s.template, x.missing[1], x.i - 1))
                        else jsonb_build_object('status', 422, 'type', 'missing_variables',
                                 'field', 'variables.' || x.missing[1],
                                 'detail', format('template %s (%s) needs variables: %s', s.template, x.channel,
                                                  array_to_string(x.missing, ', '))) end
              from answered x
             where x.template_locale is null or cardinality(x.missing) > 0
             order by case when v_fanout then (x.template_locale is not null)::integer else 0 end, x.i, x.ord
             limit 1)
      into v_deliveries, v_refusal
      from answered a;

    return jsonb_strip_nulls(jsonb_build_object(
        'preview', true,
        'outcome', case when v_refusal is not null then 'refused'
                        when not exists (select from jsonb_array_elements(v_deliveries) e where e ->> 'status' <> 'suppressed')
                        then 'suppressed' else 'accepted' end,
        'refused', v_refusal,
        'test', case when v_test then true end,
        'template', s.template, 'category', s.category, 'send_at', s.send_at, 'expires_at', s.expires_at,
        'recipient_count', case when v_fanout then jsonb_array_length(v_items) end,
        'previewed_at', v_now))
        || jsonb_build_object('deliveries', coalesce(v_deliveries, '[]'));
end
$$;
comment on function notify_api.preview_notification_v1(uuid, jsonb) is
    'Dry run of submit_notification_v1 (the same body, read by notify._parse_submission, same errors): writes nothing, and answers per delivery (per recipient and channel) its status, whether it would be sent, when, through which provider, the template content (after locale fallback) and the merged variables to render it with, or every reason it would not be (the consent entry in force, the missing address, the missing template locale or variables, what the claim would refuse), and, where the submission would be refused, its error (refused). Rendering is the caller''s: the HTTP route and the CLI render content with the worker''s renderer (dispatcher.render).';


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
                 'charge_api_key_v1', 'set_provider_grants_v1', 'whatsapp_limits_v1',
                 'run_retention_v1', 'scrub_expired_v1', 'webhook_keys_v1', 'record_provider_health_v1', 'provider_health_v1']) as cross_tenant
               from pg_proc p where p.pronamespace in ('notify'::regnamespace, 'notify_api'::regnamespace) loop
        execute format('alter function %s owner to %s', r.fn, case when r.cross_tenant then 'notify_system' else 'notify_owner' end);
    end loop;
end
$$;
comment on function notify._settle_owners() is
    'Gives every notify table, type and function to notify_owner, and the cross-tenant notify_api functions to notify_system. Run by the migrating role (a member of both) at the end of every migration that creates objects.';


create or replace function notify._whatsapp_tenants(p_provider text, u jsonb)
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


revoke execute on function notify._provider_entry(uuid, notify.channel, jsonb) from public;
revoke execute on function notify_api.set_channel_providers_v1(uuid, notify.channel, jsonb) from public;
revoke execute on function notify_api.record_provider_health_v1(jsonb, integer, double precision, double precision) from public;
revoke execute on function notify_api.provider_health_v1() from public;
grant execute on function notify_api.set_channel_providers_v1(uuid, notify.channel, jsonb) to notify_service;
grant execute on function notify_api.record_provider_health_v1(jsonb, integer, double precision, double precision) to notify_service;
grant execute on function notify_api.provider_health_v1() to notify_service;
grant select, insert, update, delete on notify.provider_health to notify_system;
grant execute on function notify._provider_entry(uuid, notify.channel, jsonb) to notify_system;
select notify._settle_owners();
