-- 0049: a provider's timeout_seconds is bounded (0.1 to 60 s) where it is stored (notify._provider_entry, for
-- set_channel_provider_v1 and every entry of set_channel_providers_v1): a provider that accepts the connection and never
-- answers held one of the worker's slots per delivery for as long as the tenant chose, so one tenant could stall the
-- worker for every tenant. Configurations stored before keep their value (the worker reads it as given).
-- The claim (notify_api.claim_deliveries_v1) leaves out of a free-form WhatsApp text's fallbacks the numbers whose
-- 24-hour window with the recipient is closed: the worker failed over to them, and Meta refuses such text (131047),
-- so a message the first number would have retried ended failed. And when the number tried first (after a demotion,
-- the chain's second) has no open window but another number of the chain has, that number is tried first: the text
-- was failed as "outside the customer-service window" without any attempt.

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
               -- Free-form WhatsApp text goes only through a number whose 24-hour window is open (checked above for the
               -- provider tried first): a fallback number the recipient has not written to is left out of its chain.
               case when d.test or r.test then null
                    when not (t.content ? 'text' and fb.fallbacks @> '[{"provider": "whatsapp_cloud"}]') then fb.fallbacks
                    else (select jsonb_agg(x.f order by x.n)
                            from jsonb_array_elements(fb.fallbacks) with ordinality as x (f, n)
                           where x.f ->> 'provider' <> 'whatsapp_cloud'
                              or (x.f ->> 'position')::integer is distinct from wa.position  -- the number tried first instead
                                 and exists (select from notify.whatsapp_windows w
                                              where w.tenant_id = d.tenant_id
                                                and w.phone_number_id = x.f #>> '{provider_config,settings,phone_number_id}'
                                                and w.wa_id = ltrim(d.address, '+') and w.last_inbound_at > now() - interval '24 hours'))
               end as fallbacks,
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
          left join chain c1 on c1.tenant_id = d.tenant_id and c1.rank = 1
          left join fallbacks fb on fb.tenant_id = d.tenant_id
          left join notify.templates t on t.tenant_id = d.tenant_id and t.key = r.template_key
                                      and t.channel = d.channel and t.locale = d.template_locale
          -- Free-form WhatsApp text whose first number has no open window with the recipient (the window is per number):
          -- the first of the chain's numbers that has one (a demoted number the recipient wrote to rather than fail the
          -- text outside the window). Only for such rows: the others take the chain's first provider.
          left join lateral (
                select c.position, c.provider, c.settings, c.secrets, c.updated_at
                  from chain c
                 where c1.provider = 'whatsapp_cloud' and t.content ? 'text' and fb.fallbacks is not null
                   and not exists (select from notify.whatsapp_windows w
                                    where w.tenant_id = d.tenant_id and w.phone_number_id = c1.settings ->> 'phone_number_id'
                                      and w.wa_id = ltrim(d.address, '+') and w.last_inbound_at > now() - interval '24 hours')
                   and c.tenant_id = d.tenant_id and c.rank > 1 and c.provider = 'whatsapp_cloud'
                   and exists (select from notify.whatsapp_windows w
                                where w.tenant_id = d.tenant_id and w.phone_number_id = c.settings ->> 'phone_number_id'
                                  and w.wa_id = ltrim(d.address, '+') and w.last_inbound_at > now() - interval '24 hours')
                 order by c.rank
                 limit 1) wa on true
         cross join lateral (
                select case when wa.position is null then c1.position else wa.position end as position,
                       case when wa.position is null then c1.provider else wa.provider end as provider,
                       case when wa.position is null then c1.settings else wa.settings end as settings,
                       case when wa.position is null then c1.secrets else wa.secrets end as secrets,
                       case when wa.position is null then c1.updated_at else wa.updated_at end as updated_at) cp
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


