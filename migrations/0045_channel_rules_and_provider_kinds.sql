-- 0045: one place per channel and per provider kind (issue #16). What is special about a channel (default consent
-- policy, resend after an ambiguous outcome, whether read exists, how a late failure ranks against delivered, the
-- address format, how long unknown lasts) was spread over `case` tests on the channel's name in a dozen functions; it is
-- now one row per channel in notify._channel_rules (an immutable SQL function the planner inlines and folds, so the hot
-- paths pay nothing), and those functions read it there. Reads exist only where the channel has them (WhatsApp): a
-- `read` report on e-mail or SMS no longer moves the status, and a route step on SMS may not wait for a read (as e-mail
-- could not). The provider kinds (which channel each serves, the settings and secrets a tenant may give it, what is
-- required, its defaults) were `case` blocks in set_channel_provider_v1 and a check constraint; they are rows of
-- notify.provider_kinds, which channel_providers now references. notify_api.channel_rules_v1 hands the channel rules to
-- the worker (the mock's read reports, a crashed provider's outcome).
-- Also: one ISO 8601 duration parser, notify._parse_iso_duration (null for junk), for a route's `within` and a frequency
-- cap's `period`, which had two (a regex and a cast for the caps); each caller keeps its own errors and bounds.

create type notify.channel_rules as (
    default_policy notify.consent_policy,  -- consent when the tenant set no policy for the channel
    resend_after_ambiguous boolean,        -- a send whose outcome is unknown (a crash, an expired lease) goes again
    has_read boolean,                      -- the channel reports reads (a `read` status exists)
    failure_beats_delivery boolean,        -- a failure reported after `delivered` wins (a bounce); else delivered wins
    address_kind text,                     -- the address format: email, e164 or e164_or_bsuid (notify._address_valid)
    unknown_deadline_seconds integer       -- how long `unknown` waits for a report when the tenant set no deadline
);
comment on type notify.channel_rules is
    'The rules that differ by channel (notify._channel_rules): default consent policy, resend after an ambiguous outcome, whether read exists, how a late failure ranks against delivered, the address format, how long unknown lasts.';

create function notify._channel_rules(p_channel notify.channel)
    returns notify.channel_rules
    language sql
    immutable
    -- inlinable: no SET clause (see docs/architecture.md, "Hot helpers are inlined"); each row folds to a constant
as $$
    -- One row per channel: a new channel is one enum value (sql/010_types.sql) and one line here.
    --                                          policy     resend  read   late failure  address          unknown for
    select case p_channel
        when 'email'    then row('opt_out', true,  false, true,  'email',         86400)::notify.channel_rules
        when 'whatsapp' then row('opt_in',  false, true,  false, 'e164_or_bsuid', 604800)::notify.channel_rules
        when 'sms'      then row('opt_in',  false, false, false, 'e164',          604800)::notify.channel_rules
    end
$$;
comment on function notify._channel_rules(notify.channel) is
    'What is special about each channel (notify.channel_rules), in one place: e-mail is opt-out, resent after an ambiguous outcome (a duplicate e-mail is acceptable), has no reads, lets a bounce after delivered win, and an unknown lasts a day; WhatsApp and SMS are opt-in, never resent after an ambiguous outcome, delivered beats a late failure, an unknown lasts 7 days; only WhatsApp reports reads and takes business-scoped user ids.';


create or replace function notify._address_valid(p_channel notify.channel, p_address text)
    returns boolean
    language sql
    immutable
    -- inlinable: no SET clause (see docs/architecture.md, "Hot helpers are inlined")
as $$
    select case (notify._channel_rules(p_channel)).address_kind
        -- No counted repetition ({1,64}) inside the pattern: it makes Postgres' regex engine 20x slower; lengths are checked apart.
        when 'email' then p_address ~ '^[A-Za-z0-9.!#$%&''*+/=?^_`{|}~-]+@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)+$'
                          and length(p_address) <= 254 and strpos(p_address, '@') <= 65
        when 'e164_or_bsuid' then p_address ~ '^\+[1-9][0-9]{6,14}$' or notify._is_bsuid(p_address)
        when 'e164' then p_address ~ '^\+[1-9][0-9]{6,14}$'
        else false
    end
$$;
comment on function notify._address_valid(notify.channel, text) is
    'Whether an address has its channel''s format (notify._channel_rules: address_kind): E.164 (+ and 7 to 15 digits) for whatsapp and sms, or a business-scoped user id for whatsapp (notify._is_bsuid); a practical RFC 5322 addr-spec subset for email.';


create or replace function notify._default_policy(p_channel notify.channel)
    returns notify.consent_policy
    language sql
    immutable
    -- inlinable: no SET clause (see docs/architecture.md, "Hot helpers are inlined")
as $$
    select (notify._channel_rules(p_channel)).default_policy
$$;
comment on function notify._default_policy(notify.channel) is 'Consent policy of a channel when the tenant has set none (notify._channel_rules).';


create or replace function notify._rank(p_channel notify.channel, p_status notify.delivery_status)
    returns integer
    language sql
    immutable
    -- inlinable: no SET clause (see docs/architecture.md, "Hot helpers are inlined")
as $$
    select case p_status
        when 'scheduled' then 10
        when 'queued' then 20
        when 'sending' then 30
        when 'unknown' then 35
        when 'sent' then 40
        when 'failed' then case when (notify._channel_rules(p_channel)).failure_beats_delivery then 70 else 45 end
        when 'delivered' then 50
        when 'read' then 60
        when 'bounced' then 70
        when 'suppressed' then 70
        when 'cancelled' then 90
        when 'expired' then 90
        when 'waiting' then 10
        when 'held' then 20
        when 'not_needed' then 90
    end
$$;
comment on function notify._rank(notify.channel, notify.delivery_status) is
    'Monotonic rank used to apply provider reports in any order: a report applies only if it ranks higher. Where a late failure beats delivery (notify._channel_rules: e-mail) a bounce or failure beats delivered; elsewhere (WhatsApp, SMS) a failed loses to delivered.';


create or replace function notify._transition_allowed(p_channel notify.channel, p_from notify.delivery_status, p_to notify.delivery_status)
    returns boolean
    language sql
    immutable
    -- inlinable: no SET clause (see docs/architecture.md, "Hot helpers are inlined")
as $$
    select case p_from
        when 'scheduled' then p_to in ('queued', 'sending', 'suppressed', 'cancelled', 'expired', 'failed', 'held', 'not_needed')
        when 'queued' then p_to in ('sending', 'suppressed', 'cancelled', 'expired', 'failed', 'held', 'not_needed')
        when 'waiting' then p_to in ('queued', 'scheduled', 'held', 'sending', 'suppressed', 'cancelled', 'expired', 'failed', 'not_needed')
        when 'held' then p_to in ('queued', 'sending', 'suppressed', 'cancelled', 'expired', 'failed', 'not_needed')
        when 'sending' then p_to in ('queued', 'sent', 'delivered', 'read', 'failed', 'bounced', 'suppressed', 'unknown')
        when 'unknown' then p_to in ('queued', 'sent', 'delivered', 'read', 'failed', 'bounced')
        when 'sent' then p_to in ('delivered', 'read', 'failed', 'bounced', 'suppressed')
        when 'delivered' then p_to = 'read' or (p_to = 'bounced' and (notify._channel_rules(p_channel)).failure_beats_delivery)
        when 'failed' then p_to in ('delivered', 'read') and not (notify._channel_rules(p_channel)).failure_beats_delivery
        else false
    end
    -- only a channel that reports reads reaches read (notify._channel_rules)
    and (p_to <> 'read' or (notify._channel_rules(p_channel)).has_read)
$$;
comment on function notify._transition_allowed(notify.channel, notify.delivery_status, notify.delivery_status) is
    'The delivery state machine: the only legal status changes (read only on a channel that has reads; a late failure after delivered only where it beats delivery, notify._channel_rules). Enforced by trigger _100_check_transition.';


create or replace function notify._parse_route(p_route jsonb)
    returns jsonb
    language plpgsql
    immutable
    set search_path = pg_catalog, pg_temp
as $$
declare
    v_step jsonb;
    v_path text;
    v_channel notify.channel;
    v_channels notify.channel[] := '{}';
    v_until text;
    v_out jsonb := '[]';
    v_n integer;
begin
    if jsonb_typeof(p_route) is distinct from 'array' or jsonb_array_length(p_route) = 0 then
        perform notify._raise('ND400', 'missing_field', 'route must be a non-empty list of steps {channel, until?, within?}', 'route');
    end if;
    v_n := jsonb_array_length(p_route);
    for i in 0 .. v_n - 1 loop
        v_step := p_route -> i;
        v_path := format('route[%s]', i);
        if jsonb_typeof(v_step) <> 'object' then
            perform notify._raise('ND400', 'invalid_type', format('%s must be an object {channel, until?, within?}', v_path), v_path);
        end if;
        perform notify._check_keys(v_step, array['channel', 'until', 'within'], v_path);
        v_channel := notify._channel_field(v_step -> 'channel', v_path || '.channel');
        if v_channel = any (v_channels) then
            perform notify._raise('ND400', 'duplicate_channel',
                format('%s.channel: a route must not repeat a channel (%s is step %s already)', v_path, v_channel,
                       array_position(v_channels, v_channel)), v_path || '.channel');
        end if;
        v_channels := v_channels || v_channel;
        -- The goal that makes the later steps unnecessary; delivered unless said (on the last step it changes nothing).
        v_until := coalesce(nullif(v_step -> 'until', 'null') #>> '{}', 'delivered');
        if jsonb_typeof(coalesce(nullif(v_step -> 'until', 'null'), '"delivered"')) <> 'string'
           or v_until not in ('sent', 'delivered', 'read') then
            perform notify._raise('ND400', 'invalid_value', format('%s.until must be one of sent, delivered, read', v_path), v_path || '.until');
        end if;
        -- E-mail and SMS report no reads (an e-mail open is a flag, not a status; notify._channel_rules): a step waiting
        -- for one would keep the next step waiting until the route expires, or always send it after within.
        if v_until = 'read' and not (notify._channel_rules(v_channel)).has_read and i < v_n - 1 then
            perform notify._raise('ND400', 'invalid_value',
                format('%s.until: %s never reports read (an e-mail open is not a status), so the next step would always follow; use sent or delivered',
                       v_path, v_channel), v_path || '.until');
        end if;
        perform notify._duration_field(v_step -> 'within', v_path || '.within');
        if i = v_n - 1 and jsonb_typeof(v_step -> 'within') is distinct from 'null' and v_step ? 'within' then
            perform notify._raise('ND400', 'invalid_value',
                format('%s.within: the last step has no later step to fall back to', v_path), v_path || '.within');
        end if;
        v_out := v_out || jsonb_build_array(jsonb_strip_nulls(jsonb_build_object(
            'channel', v_channel, 'until', v_until, 'within', nullif(v_step -> 'within', 'null'))));
    end loop;
    return v_out;
end
$$;
comment on function notify._parse_route(jsonb) is
    'Reads a submission''s route, [{channel, until?, within?}, ...], refusing the first wrong step by field (route[1].within): a known channel not repeated, until one of sent, delivered (the default), read (not on an e-mail step before another: e-mail reports no reads), within an ISO 8601 duration (notify._duration_field), none on the last step. Returns it normalized (until filled in; within as given).';


create or replace function notify._address_hash(p_channel notify.channel, p_address text)
    returns bytea
    language sql
    stable
    set search_path = pg_catalog, pg_temp
as $$
    -- HMAC-SHA256 (RFC 2104) with the server's key: H((K ^ opad) || H((K ^ ipad) || m)); e-mail addresses lower-cased.
    select pg_catalog.sha256(k.outer_pad || pg_catalog.sha256(k.inner_pad || pg_catalog.convert_to(
               p_channel::text || ':' || case when (notify._channel_rules(p_channel)).address_kind = 'email' then pg_catalog.lower(p_address)
                                            else p_address end, 'UTF8')))
      from notify.address_hash_key k
$$;
comment on function notify._address_hash(notify.channel, text) is
    'The keyed hash (HMAC-SHA256, key in notify.address_hash_key) of a channel address, for the suppression list of erased recipients. Not executable by application roles: with it, a phone number''s hash could be guessed by trying numbers.';


create or replace function notify._unknown_deadline_default(p_channel notify.channel)
    returns integer
    language sql
    immutable
    set search_path = pg_catalog, pg_temp
as $$
    -- A provider that accepted a message reports it within minutes, and retries its webhook for days (Meta: up to 7);
    -- past that, no report is coming.
    select (notify._channel_rules(p_channel)).unknown_deadline_seconds
$$;
comment on function notify._unknown_deadline_default(notify.channel) is
    'Seconds a delivery may stay unknown when the tenant set no deadline for the channel (notify._channel_rules): 7 days for WhatsApp and SMS, 1 day for e-mail.';


create or replace function notify_api.run_maintenance_v1()
    returns jsonb
    language plpgsql
    security definer
    set search_path = pg_catalog, pg_temp
as $$
declare
    v_requeued integer;
    v_unknown integer;
    v_exhausted integer;
    v_expired integer;
    v_woken text[];
    v_unknown_final integer;
    v_policy_sends integer;
begin
    perform notify._set_source('maintenance');

    -- Crashed sends (lease past due): a channel where a duplicate is acceptable (notify._channel_rules: e-mail) goes back
    -- to the queue; WhatsApp and SMS must not be sent twice, so they become unknown until a provider report says what
    -- happened. An expired lease was an attempt: a resend whose attempts are used up fails instead of being requeued forever.
    with stale as (
        select d.tenant_id, d.id, d.attempt, (notify._channel_rules(d.channel)).resend_after_ambiguous as resend,
               d.attempt >= t.retry_max_attempts as exhausted
          from notify.notification_deliveries d
          join notify.tenants t on t.id = d.tenant_id
         where d.status = 'sending' and d.lease_expires_at < now()
           for update of d skip locked
    ), attempts as (
        update notify.delivery_attempts a set finished_at = now(), outcome = 'lease_expired'
          from stale s
         where a.tenant_id = s.tenant_id and a.delivery_id = s.id and a.attempt = s.attempt and a.finished_at is null
    ), moved as (
        update notify.notification_deliveries d
           set status = case when not s.resend then 'unknown' when s.exhausted then 'failed' else 'queued' end::notify.delivery_status,
               reason = case when not s.resend then 'lease_expired' when s.exhausted then 'retries_exhausted' else d.reason end,
               last_error_code = case when s.resend then 'lease_expired' else d.last_error_code end,
               last_error_message = case when s.resend then format('attempt %s: the worker''s lease expired before it recorded an outcome', s.attempt)
                                         else d.last_error_message end,
               due_at = case when s.resend and not s.exhausted then now() else d.due_at end
          from stale s
         where d.tenant_id = s.tenant_id and d.id = s.id
        returning d.status
    )
    select count(*) filter (where status = 'queued'), count(*) filter (where status = 'unknown'),
           count(*) filter (where status = 'failed')
      into v_requeued, v_unknown, v_exhausted from moved;

    -- Deadlines: anything still waiting past its expires_at is never sent.
    with gone as (
        update notify.notification_deliveries d set status = 'expired', reason = 'expired_before_send'
         where d.status in ('queued', 'scheduled', 'held', 'waiting') and d.expires_at <= now()
        returning 1
    )
    select count(*) into v_expired from gone;

    -- Unknown outcomes past their channel's deadline become final (failed, never resent; sql/086_api_unknown.sql).
    v_unknown_final := notify._finish_unknown_deliveries();

    -- The frequency caps' ledger: sends no cap or pair limit can count any more (sql/077_api_policies.sql).
    v_policy_sends := notify._prune_policy_sends();

    -- Safety net: a wake-up for every channel with due work (coalesced, so cheap when one is pending).
    select array_agg(c::text) into v_woken
      from unnest(enum_range(null::notify.channel)) c
     where exists (select from notify.notification_deliveries d
                    where d.channel = c and d.status in ('queued', 'scheduled', 'held', 'waiting') and d.due_at <= now());
    perform notify._wake(c::notify.channel) from unnest(v_woken) c;

    return jsonb_build_object('requeued', v_requeued, 'unknown', v_unknown, 'exhausted', v_exhausted, 'expired', v_expired,
                              'unknown_finalized', v_unknown_final, 'policy_sends_pruned', v_policy_sends, 'woken', coalesce(to_jsonb(v_woken), '[]'));
end
$$;
comment on function notify_api.run_maintenance_v1() is
    'Periodic upkeep: expired leases, each counted as an attempt (email -> queued, or failed/retries_exhausted when the tenant''s retry_max_attempts are used up; whatsapp/sms -> unknown), deliveries past expires_at -> expired, unknown outcomes past their channel''s deadline -> failed (outcome_unknown_deadline; notify._finish_unknown_deliveries), the frequency caps'' ledger pruned (notify._prune_policy_sends), a wake-up for every channel with due work.';


-- The provider kinds, in one place: which channel each serves and what a tenant may configure of it. A new provider is
-- one row here (in its migration), its Python module (providers/) and its per-kind checks in
-- notify_api.set_channel_provider_v1, if it has any beyond these.
create table notify.provider_kinds (
    name text not null,
    channel notify.channel not null,
    settings_keys text[] not null default '{}',
    secret_keys text[] not null default '{}',
    required text[] not null default '{}',
    defaults jsonb not null default '{}',
    primary key (name, channel),
    constraint provider_kinds_required check (array_to_string(required, ',') ~ '^((settings|secrets)\.[a-z_]+(,|$))*$')
);
comment on table notify.provider_kinds is
    'Which provider serves which channel (one row per pair; the mock serves every channel), the settings and secret references a tenant may give it, which of them are required (settings.x / secrets.y), and its default settings (merged under the tenant''s).';
insert into notify.provider_kinds (name, channel, settings_keys, secret_keys, required, defaults) values
    ('mock', 'whatsapp', '{}', '{}', '{}', '{}'),
    ('mock', 'email', '{}', '{}', '{}', '{}'),
    ('mock', 'sms', '{}', '{}', '{}', '{}'),
    ('whatsapp_cloud', 'whatsapp',
     '{phone_number_id,api_version,base_url,rate_per_second,timeout_seconds,opt_out_keywords,waba_id}', '{access_token}',
     '{settings.phone_number_id,secrets.access_token}',
     '{"api_version": "v22.0", "base_url": "https://graph.facebook.com", "rate_per_second": 80, "timeout_seconds": 15,
       "opt_out_keywords": ["STOP", "BAJA", "UNSUBSCRIBE", "CANCELAR"]}'),
    ('smtp', 'email',
     '{host,port,security,username,from_address,from_name,timeout_seconds,validate_certs,esp,transactional_categories,max_connections,public_url}',
     '{password}', '{settings.host,settings.from_address}',
     '{"port": 587, "security": "starttls", "timeout_seconds": 30, "validate_certs": true,
       "transactional_categories": ["transactional"], "max_connections": 8}'),
    -- The auth token even with an API key: Twilio signs its webhooks with it. Twilio's own opt-out, opt-in and help
    -- keywords are always matched (notify._sms_keyword); the defaults' lists are the tenant's extra ones.
    ('twilio', 'sms',
     '{account_sid,api_key_sid,from_number,messaging_service_sid,base_url,rate_per_second,timeout_seconds,validity_period,opt_out_keywords,opt_in_keywords}',
     '{auth_token,api_key_secret}', '{settings.account_sid,secrets.auth_token}',
     '{"base_url": "https://api.twilio.com", "rate_per_second": 10, "timeout_seconds": 15, "opt_out_keywords": [], "opt_in_keywords": []}');

alter table notify.channel_providers drop constraint channel_providers_known;
alter table notify.channel_providers
    add constraint channel_providers_kind foreign key (provider, channel) references notify.provider_kinds (name, channel);

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
    v_kind notify.provider_kinds;
    v_key text;
    v_ref text;
    v_grant notify.provider_grants;
    v_host text;
    v_constraint text;
begin
    perform notify._enter(p_tenant_id);
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

    insert into notify.channel_providers as c (tenant_id, channel, provider, settings, secrets)
    values (p_tenant_id, p_channel, v_provider, v_kind.defaults || v_settings, v_secrets)
    on conflict (tenant_id, channel) do update
        set provider = excluded.provider, settings = excluded.settings, secrets = excluded.secrets, updated_at = now();
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
    'Sets the provider of a tenant''s channel: {provider: mock|whatsapp_cloud|smtp|twilio, settings, secrets: {name: "env:VAR"|"file:/path"}}. Settings are checked per provider and merged over its defaults (WhatsApp: rate_per_second at most 1000, waba_id routes account-level webhooks; Twilio (sms): account_sid, from_number and/or messaging_service_sid, api_key_sid with secrets.api_key_secret, secrets.auth_token always, validity_period, extra opt_out_keywords/opt_in_keywords); secret references must lie in the tenant''s operator-set grant (notify.provider_grants), endpoints must be public hosts unless granted, a WhatsApp or Twilio number belongs to one tenant.';


create function notify_api.channel_rules_v1()
    returns jsonb
    language sql
    stable
    security definer
    set search_path = pg_catalog, pg_temp
as $$
    select jsonb_object_agg(c, to_jsonb(notify._channel_rules(c)) order by c) from unnest(enum_range(null::notify.channel)) c
$$;
comment on function notify_api.channel_rules_v1() is
    'Each channel''s rules (notify._channel_rules), {channel: {default_policy, resend_after_ambiguous, has_read, failure_beats_delivery, address_kind, unknown_deadline_seconds}}: what the worker reads of them (the mock reports a read only where one exists; a provider that crashed mid-send is retried only where a duplicate is acceptable).';


drop function notify._provider_defaults(text);

create function notify._parse_iso_duration(p_text text)
    returns interval
    language sql
    immutable
    strict
    set search_path = pg_catalog, pg_temp
as $$
    -- Weeks, days, hours, minutes and seconds only: a year or a month has no fixed length. A part of more than 9 digits
    -- is far past every bound its callers set (and would overflow make_interval's integers): it comes back as 100,000
    -- days, which every caller refuses as too long, rather than as an error of its own.
    select case when x.m is null or length(p_text) > 40 or p_text in ('P', 'PT') or right(p_text, 1) = 'T' then null
                when greatest(length(x.m[1]), length(x.m[2]), length(x.m[3]), length(x.m[4]),
                              length(split_part(replace(x.m[5], ',', '.'), '.', 1))) > 9 then interval '100000 days'
                else make_interval(weeks => coalesce(x.m[1], '0')::integer, days => coalesce(x.m[2], '0')::integer,
                                   hours => coalesce(x.m[3], '0')::integer, mins => coalesce(x.m[4], '0')::integer,
                                   secs => coalesce(replace(x.m[5], ',', '.'), '0')::double precision) end
      from regexp_match(p_text, '^P(?:([0-9]+)W)?(?:([0-9]+)D)?(?:T(?:([0-9]+)H)?(?:([0-9]+)M)?(?:([0-9]+(?:[.,][0-9]+)?)S)?)?$') as x(m)
$$;
comment on function notify._parse_iso_duration(text) is
    'The one ISO 8601 duration parser: weeks, days, hours, minutes and seconds (PT15M, PT1H30M, P1D, PT1.5S) as an interval; null for anything else (years, months, junk, an empty P or PT). Callers raise their own errors and set their own bounds (a route''s within, a frequency cap''s period).';


create or replace function notify._duration_field(p_value jsonb, p_path text)
    returns interval
    language plpgsql
    immutable
    set search_path = pg_catalog, pg_temp
as $$
declare
    v_interval interval;
begin
    if p_value is null or jsonb_typeof(p_value) = 'null' then
        return null;
    end if;
    if jsonb_typeof(p_value) <> 'string' then
        perform notify._raise('ND400', 'invalid_type', format('%s must be an ISO 8601 duration such as PT15M', p_path), p_path);
    end if;
    v_interval := notify._parse_iso_duration(p_value #>> '{}');
    if v_interval is null then
        perform notify._raise('ND400', 'invalid_duration',
            format('%s must be an ISO 8601 duration of weeks, days, hours, minutes and seconds (PT15M, PT1H30M, P1D); years and months are not accepted', p_path),
            p_path);
    end if;
    if v_interval <= interval '0' then
        perform notify._raise('ND400', 'invalid_duration', format('%s must be longer than zero', p_path), p_path);
    end if;
    if v_interval > interval '30 days' then
        perform notify._raise('ND400', 'invalid_duration', format('%s must be at most 30 days (P30D)', p_path), p_path);
    end if;
    return v_interval;
end
$$;
comment on function notify._duration_field(jsonb, text) is
    'Reads an ISO 8601 duration (PnW, PnD, PTnHnMnS and their combinations; no years or months) as an interval, refusing junk, zero and more than 30 days with the field named; null for null.';


create or replace function notify_api.set_frequency_caps_v1(p_tenant_id uuid, p_body jsonb)
    returns jsonb
    language plpgsql
    security definer
    set search_path = pg_catalog, pg_temp
as $$
declare
    v_cap jsonb;
    v_i integer := 0;
    v_path text;
    v_max jsonb;
    v_period text;
    v_interval interval;
    v_channel notify.channel;
    v_category text;
    v_action text;
    v_rows notify.frequency_caps[] := '{}';
begin
    perform notify._enter(p_tenant_id);
    if p_body is null or jsonb_typeof(p_body) <> 'object' then
        perform notify._raise('ND400', 'invalid_type', 'body must be an object', '');
    end if;
    if not exists (select from notify.tenants t where t.id = p_tenant_id) then
        perform notify._raise('ND404', 'not_found', 'no such tenant', 'tenant_id');
    end if;
    perform notify._check_keys(p_body, array['caps'], '');
    if jsonb_typeof(p_body -> 'caps') is distinct from 'array' then
        perform notify._raise('ND400', case when p_body ? 'caps' then 'invalid_type' else 'missing_field' end,
                              'caps must be an array of caps', 'caps');
    end if;
    if jsonb_array_length(p_body -> 'caps') > 20 then
        perform notify._raise('ND422', 'invalid_frequency_cap', 'at most 20 caps', 'caps');
    end if;
    for v_cap in select * from jsonb_array_elements(p_body -> 'caps') loop
        v_path := format('caps[%s]', v_i);
        if jsonb_typeof(v_cap) <> 'object' then
            perform notify._raise('ND400', 'invalid_type', format('%s must be an object', v_path), v_path);
        end if;
        perform notify._check_keys(v_cap, array['max', 'period', 'channel', 'category', 'action'], v_path);
        v_max := v_cap -> 'max';
        if v_max is null or jsonb_typeof(v_max) = 'null' then
            perform notify._raise('ND400', 'missing_field', format('%s.max is required', v_path), v_path || '.max');
        end if;
        if jsonb_typeof(v_max) <> 'number' or v_max::numeric <> trunc(v_max::numeric) then
            perform notify._raise('ND400', 'invalid_type', format('%s.max must be a whole number', v_path), v_path || '.max');
        end if;
        if v_max::numeric not between 1 and 10000 then
            perform notify._raise('ND422', 'invalid_frequency_cap', format('%s.max must be 1 to 10000', v_path), v_path || '.max');
        end if;
        v_period := notify._text_field(v_cap, 'period', v_path, true, 32);
        v_interval := notify._parse_iso_duration(v_period);  -- the one parser (sql/015), a route's within's too
        if v_interval is null then
            perform notify._raise('ND400', 'invalid_format', format('%s.period must be an ISO 8601 duration in weeks, days, hours, minutes or seconds (P1D, PT6H)', v_path),
                                  v_path || '.period');
        end if;
        if v_interval not between interval '1 second' and interval '31 days' then
            perform notify._raise('ND422', 'invalid_frequency_cap', format('%s.period must be 1 second to 31 days', v_path), v_path || '.period');
        end if;
        v_channel := case when jsonb_typeof(v_cap -> 'channel') is distinct from 'null' and v_cap ? 'channel'
                          then notify._channel_field(v_cap -> 'channel', v_path || '.channel') end;
        v_category := notify._text_field(v_cap, 'category', v_path, false, 100);
        v_action := coalesce(notify._text_field(v_cap, 'action', v_path, false, 16), 'suppress');
        if v_action not in ('suppress', 'hold') then
            perform notify._raise('ND400', 'invalid_value', format('%s.action must be suppress or hold', v_path), v_path || '.action');
        end if;
        if exists (select from unnest(v_rows) r where r.channel is not distinct from v_channel and r.category is not distinct from v_category
                                                 and r.period = v_interval) then
            perform notify._raise('ND422', 'invalid_frequency_cap', format('%s repeats the channel, category and period of an earlier cap', v_path), v_path);
        end if;
        v_rows := v_rows || row(p_tenant_id, gen_random_uuid(), v_max::integer, v_interval, v_channel, v_category, v_action, v_i, now())::notify.frequency_caps;
        v_i := v_i + 1;
    end loop;
    delete from notify.frequency_caps where tenant_id = p_tenant_id;
    insert into notify.frequency_caps select * from unnest(v_rows);
    perform notify._release_held(p_tenant_id, array['frequency_cap']);
    return notify._frequency_caps_json(p_tenant_id);
end
$$;
comment on function notify_api.set_frequency_caps_v1(uuid, jsonb) is
    'Sets a tenant''s frequency caps, {caps: [{max, period, channel?, category?, action?}]} (max 1-10000 messages per recipient in a sliding period, an ISO 8601 duration of 1 second to 31 days; channel, category: null = any; action suppress (default) or hold). Replaces the previous caps ([] removes them); what a holding cap held is due again at once (notify._release_held). Errors name the field (caps[0].period).';


revoke execute on function notify._channel_rules(notify.channel) from public;
revoke execute on function notify._parse_iso_duration(text) from public;
revoke execute on function notify_api.channel_rules_v1() from public;
grant execute on function notify_api.channel_rules_v1() to notify_service;
grant select, insert, update, delete on notify.provider_kinds to notify_system;
grant execute on function notify._channel_rules(notify.channel), notify._parse_iso_duration(text) to notify_system;
select notify._settle_owners();
