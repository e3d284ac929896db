-- 0039: SMS through Twilio Programmable Messaging (issue #16).
-- 1. Provider twilio serves channel sms (constraint channel_providers_known; settings checked by set_channel_provider_v1,
--    defaults in _provider_defaults); a Twilio number belongs to one tenant (channel_providers_twilio_number_key).
-- 2. Twilio signs webhooks with each tenant's auth token: notify_api.webhook_keys_v1 hands the API the reference of the
--    key to verify with (cross-tenant, so owned by notify_system through _settle_owners).
-- 3. Inbound SMS keywords (STOP and Twilio's synonyms, START, HELP, the tenant's own) revoke and restore SMS consent
--    (notify._record_inbound hands twilio to notify._record_sms_inbound); a send refused or failed with 21610 suppresses
--    the delivery and revokes SMS consent (trigger _410_revoke_sms_consent).
-- 4. What an SMS costs: attempt_result.pricing (the worker's count of the text it sent: encoding and segments) is kept on
--    the delivery by record_attempts_v1; upsert_template_v1 warns when an sms text needs UCS-2 or several segments
--    (notify._sms_parts).

alter type notify.attempt_result add attribute pricing jsonb;
comment on type notify.attempt_result is
    'One provider call''s outcome, as the worker reports it to notify_api.record_attempts_v1. attempt is the fencing token returned by the claim; pricing, what the provider knows at send time of what the message costs (SMS: its encoding and segments), is kept on the delivery.';
comment on type notify.inbound_message is
    'A message a recipient sent to a business number: WhatsApp (phone_number_id, the Graph id of the number): it opens the 24-hour window, and an opt-out keyword revokes consent; the sender is known by its phone number (sender), its business-scoped user id (user_id), or both. SMS through Twilio (phone_number_id: the E.164 number it was sent to, sender: the E.164 sender): STOP and START keywords revoke and restore SMS consent.';

alter table notify.channel_providers drop constraint channel_providers_known;
alter table notify.channel_providers add constraint channel_providers_known check (
        (provider = 'mock') or (provider = 'whatsapp_cloud' and channel = 'whatsapp') or (provider = 'smtp' and channel = 'email')
        or (provider = 'twilio' and channel = 'sms'));
-- A Twilio number belongs to one tenant too: inbound SMS (STOP, START, HELP) are routed by the number they were sent to.
create unique index channel_providers_twilio_number_key on notify.channel_providers ((settings ->> 'from_number'))
    where provider = 'twilio';

create function notify._sms_parts(p_text text)
    returns jsonb
    language plpgsql
    immutable
    set search_path = pg_catalog, pg_temp
as $$
declare
    v_basic constant text := E'@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !"#¤%&''()*+,-./0123456789:;<=>?¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà';
    v_extension constant text := E'\f^{}\\[~]|€';
    v_gsm boolean := true;
    v_costs integer[] := '{}';
    v_char text;
    v_units integer := 0;
    v_single integer;
    v_multi integer;
    v_segments integer := 0;
    v_used integer := 0;
    v_cost integer;
begin
    if p_text is null or p_text = '' then
        return jsonb_build_object('encoding', 'GSM-7', 'segments', 0, 'units', 0);
    end if;
    foreach v_char in array regexp_split_to_array(p_text, '') loop
        if strpos(v_basic, v_char) > 0 then
            v_costs := v_costs || 1;
        elsif strpos(v_extension, v_char) > 0 then
            v_costs := v_costs || 2;
        else
            v_gsm := false;
            exit;
        end if;
    end loop;
    if not v_gsm then
        v_costs := '{}';
        foreach v_char in array regexp_split_to_array(p_text, '') loop
            v_costs := v_costs || case when ascii(v_char) > 65535 then 2 else 1 end;
        end loop;
    end if;
    v_single := case when v_gsm then 160 else 70 end;
    v_multi := case when v_gsm then 153 else 67 end;
    select coalesce(sum(c), 0) into v_units from unnest(v_costs) c;
    if v_units <= v_single then
        v_segments := 1;
    else
        v_segments := 1;
        foreach v_cost in array v_costs loop
            if v_used + v_cost > v_multi then
                v_segments := v_segments + 1;
                v_used := 0;
            end if;
            v_used := v_used + v_cost;
        end loop;
    end if;
    return jsonb_build_object('encoding', case when v_gsm then 'GSM-7' else 'UCS-2' end, 'segments', v_segments, 'units', v_units);
end
$$;
comment on function notify._sms_parts(text) is
    'How an SMS text is sent: {encoding: GSM-7|UCS-2, segments, units (septets or UTF-16 code units)}, by GSM 03.38 (extension characters count two septets; 160/153 septets, 70/67 units per segment; a two-unit character never split). The worker counts with the same rules (providers/twilio.py sms_parts).';


create or replace function notify._provider_defaults(p_provider text)
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
        -- Twilio's own opt-out, opt-in and help keywords are always matched (notify._sms_keyword); these are the tenant's extra ones.
        when 'twilio' then jsonb_build_object(
            'base_url', 'https://api.twilio.com', 'rate_per_second', 10, 'timeout_seconds', 15,
            'opt_out_keywords', '[]'::jsonb, 'opt_in_keywords', '[]'::jsonb)
        else '{}'::jsonb
    end
$$;
comment on function notify._provider_defaults(text) is 'Default settings of each provider, merged under what a tenant sets.';

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
    v_constraint text;
begin
    perform notify._enter(p_tenant_id);
    select * into v_grant from notify.provider_grants g where g.tenant_id = p_tenant_id;
    perform notify._check_keys(p_body, array['provider', 'settings', 'secrets'], '');
    v_provider := notify._text_field(p_body, 'provider', '', true, 40);
    if v_provider not in ('mock', 'whatsapp_cloud', 'smtp', 'twilio')
       or (v_provider = 'whatsapp_cloud' and p_channel <> 'whatsapp') or (v_provider = 'smtp' and p_channel <> 'email')
       or (v_provider = 'twilio' and p_channel <> 'sms') then
        perform notify._raise('ND422', 'invalid_provider',
            format('provider %s cannot serve %s (mock: any channel; whatsapp_cloud: whatsapp; smtp: email; twilio: sms)', v_provider, p_channel), 'provider');
    end if;
    v_settings := coalesce(p_body -> 'settings', '{}');
    v_secrets := coalesce(p_body -> 'secrets', '{}');
    if jsonb_typeof(v_settings -> 'phone_number_id') = 'number' then  -- an id, whatever JSON type it came as
        v_settings := v_settings || jsonb_build_object('phone_number_id', v_settings ->> 'phone_number_id');
    end if;
    v_allowed := case v_provider
        when 'whatsapp_cloud' then array['phone_number_id', 'api_version', 'base_url', 'rate_per_second', 'timeout_seconds', 'opt_out_keywords',
                                         'waba_id']
        when 'smtp' then array['host', 'port', 'security', 'username', 'from_address', 'from_name', 'timeout_seconds', 'validate_certs',
                               'esp', 'transactional_categories', 'max_connections', 'public_url']
        when 'twilio' then array['account_sid', 'api_key_sid', 'from_number', 'messaging_service_sid', 'base_url', 'rate_per_second',
                                 'timeout_seconds', 'validity_period', 'opt_out_keywords', 'opt_in_keywords']
        else array[]::text[] end;
    perform notify._check_keys(v_settings, v_allowed, 'settings');
    perform notify._check_keys(v_secrets, case v_provider when 'whatsapp_cloud' then array['access_token']
                                                          when 'smtp' then array['password']
                                                          when 'twilio' then array['auth_token', 'api_key_secret'] else array[]::text[] end, 'secrets');
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
                                  when 'smtp' then array['settings.host', 'settings.from_address']
                                  -- The auth token even with an API key: Twilio signs its webhooks with it.
                                  when 'twilio' then array['settings.account_sid', 'secrets.auth_token'] else array[]::text[] end;
    foreach v_key in array v_required loop
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
    values (p_tenant_id, p_channel, v_provider, notify._provider_defaults(v_provider) || v_settings, v_secrets)
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


create or replace function notify_api.record_attempts_v1(p_results notify.attempt_result[])
    returns table (delivery_id uuid, status notify.delivery_status, applied boolean)
    language plpgsql
    security definer
    set search_path = pg_catalog, pg_temp
as $$
declare
    -- Rows whose provider message id another delivery already has (in the table, or earlier in this batch): each
    -- keeps its own outcome with the id left null, so one provider's reused ids cannot fail the whole batch's record.
    v_duplicates uuid[];
    v_constraint text;
    v_ids uuid[];
    v_statuses notify.delivery_status[];
    v_applied boolean[];
begin
    if exists (select from unnest(p_results) r where r.outcome not in ('sent', 'retry', 'failed', 'unknown', 'suppressed', 'bounced')) then
        perform notify._raise('ND400', 'invalid_value', 'outcome must be sent, retry, failed, unknown, suppressed or bounced', 'outcome');
    end if;
    perform notify._set_source('worker');

    -- Duplicates within the batch are found by sorting it. Duplicates of ids already in the table are rare, and the
    -- unique index finds them anyway while it stores the new ids: the batch is written first without probing the
    -- index once per row, and only when the index refuses an id is it written again (this block is rolled back)
    -- with those rows found and left out.
    select coalesce(array_agg(q.delivery_id), '{}') into v_duplicates
      from (select r.delivery_id,
                   row_number() over (partition by r.provider, r.provider_message_id order by r.tenant_id, r.delivery_id) as n
              from unnest(p_results) r
             where r.provider_message_id is not null) q
     where q.n > 1;

    for v_try in 1 .. 2 loop
        begin
            -- The attempt rows first (fenced the same way), so the history is complete even when a webhook overtook us.
            update notify.delivery_attempts a
               set finished_at = now(), outcome = r.outcome, provider = r.provider, provider_message_id = r.provider_message_id,
                   error_code = case when r.delivery_id = any (v_duplicates) then 'duplicate_provider_message_id' else r.error_code end,
                   error_message = case when r.delivery_id = any (v_duplicates) then 'the provider returned a message id another delivery already has'
                                        else left(r.error_message, 1000) end
              from unnest(p_results) r
             where a.tenant_id = r.tenant_id and a.delivery_id = r.delivery_id and a.attempt = r.attempt and a.finished_at is null
               -- Only the last day's partitions (sql/105_retention.sql): an attempt still open after a day had its lease
               -- expire and was closed by maintenance; without the bound each row probes every daily partition's index.
               and a.started_at > now() - interval '1 day';

            with input as (
                select r.*, t.retry_max_attempts, r.delivery_id = any (v_duplicates) as duplicate
                  from unnest(p_results) r
                  join notify.tenants t on t.id = r.tenant_id
            ), changed as (
                update notify.notification_deliveries d
                   set status = case
                           when i.outcome = 'sent' and d.status in ('sending', 'unknown') then 'sent'
                           when i.outcome = 'retry' and d.status = 'sending' and d.attempt >= i.retry_max_attempts then 'failed'
                           when i.outcome = 'retry' and d.status = 'sending' then 'queued'
                           when i.outcome = 'failed' and d.status in ('sending', 'unknown') then 'failed'
                           when i.outcome = 'unknown' and d.status = 'sending' then 'unknown'
                           when i.outcome = 'suppressed' and d.status = 'sending' then 'suppressed'
                           when i.outcome = 'bounced' and d.status in ('sending', 'unknown') then 'bounced'
                           else d.status end::notify.delivery_status,
                       reason = case
                           when i.outcome = 'retry' and d.status = 'sending' and d.attempt >= i.retry_max_attempts then 'retries_exhausted'
                           when i.outcome = 'failed' and d.status in ('sending', 'unknown') and i.error_code = 'render_failed' then 'render_failed'
                           when i.outcome = 'failed' and d.status in ('sending', 'unknown') then 'provider_rejected'
                           when i.outcome = 'unknown' and d.status = 'sending' then 'outcome_unknown'
                           when i.outcome = 'suppressed' and d.status = 'sending' then 'provider_opt_out'
                           when i.outcome = 'bounced' and d.status in ('sending', 'unknown') then 'rejected_by_recipient_server'
                           else d.reason end,
                       due_at = case when i.outcome = 'retry' and d.status = 'sending' and d.attempt < i.retry_max_attempts
                                     then now() + notify._backoff(i.tenant_id, d.attempt, i.retry_after_seconds)
                                     else d.due_at end,
                       provider = coalesce(i.provider, d.provider),
                       provider_message_id = coalesce(d.provider_message_id, case when not i.duplicate then i.provider_message_id end),
                       sent_at = case when i.outcome = 'sent' then coalesce(d.sent_at, now()) else d.sent_at end,
                       -- What the message costs as the provider sent it (SMS: encoding and segments); the first one given.
                       pricing = coalesce(d.pricing, case when jsonb_typeof(i.pricing) = 'object' then i.pricing end),
                       last_error_code = case when i.duplicate then 'duplicate_provider_message_id'
                                              when i.outcome = 'sent' then d.last_error_code else coalesce(i.error_code, d.last_error_code) end,
                       last_error_message = case when i.duplicate then 'the provider returned a message id another delivery already has'
                                                 when i.outcome = 'sent' then d.last_error_message
                                                 else coalesce(left(i.error_message, 1000), d.last_error_message) end
                  from input i
                 where d.tenant_id = i.tenant_id and d.id = i.delivery_id and d.attempt = i.attempt
                returning d.id, d.channel, d.status, d.due_at
            ), woken as (
                select notify._wake(c.channel, min(c.due_at)) from changed c where c.status = 'queued' group by c.channel
            )
            select array_agg(i.delivery_id), array_agg(c.status), array_agg(c.id is not null)
              into v_ids, v_statuses, v_applied
              from input i
              left join changed c on c.id = i.delivery_id
             cross join (select count(*) from woken) w;
            exit;
        exception when unique_violation then
            get stacked diagnostics v_constraint = constraint_name;
            if v_constraint is distinct from 'notification_deliveries_provider_message' or v_try = 2 then
                raise;
            end if;
            -- An id the table already has (or one a concurrent batch committed meanwhile): find those rows.
            select coalesce(array_agg(q.delivery_id), '{}') into v_duplicates
              from (select r.tenant_id, r.delivery_id, r.provider, r.provider_message_id,
                           row_number() over (partition by r.provider, r.provider_message_id order by r.tenant_id, r.delivery_id) as n
                      from unnest(p_results) r
                     where r.provider_message_id is not null) q
             where q.n > 1
                or exists (select from notify.notification_deliveries x
                            where x.provider = q.provider and x.provider_message_id = q.provider_message_id
                              and not (x.tenant_id = q.tenant_id and x.id = q.delivery_id));
        end;
    end loop;

    return query select * from unnest(v_ids, v_statuses, v_applied);
end
$$;
comment on function notify_api.record_attempts_v1(notify.attempt_result[]) is
    'Writes a batch of provider outcomes, each fenced by its attempt number (a stale worker changes nothing): sent, retry (backoff with jitter, or failed when attempts are used up), failed (reason render_failed for a template that could not be rendered, else provider_rejected), unknown, suppressed, bounced. A provider message id another delivery already has (in the table or earlier in the batch) is not stored: that row keeps its outcome with error code duplicate_provider_message_id. A result''s pricing (an object: SMS encoding and segments) is kept on a delivery that has none yet. Wakes the worker for retries.';


create or replace function notify_api.upsert_template_v1(p_tenant_id uuid, p_key text, p_body jsonb)
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
    -- The number it was sent to belongs to one tenant (channel_providers_twilio_number_key).
    select cp.tenant_id, cp.settings into v_tenant from notify.channel_providers cp
     where cp.provider = 'twilio' and cp.channel = 'sms' and cp.settings ->> 'from_number' = m.phone_number_id;
    if v_tenant.tenant_id is null then
        return 'unmatched';
    end if;
    v_keyword := notify._sms_keyword(m.text, v_tenant.settings);
    if v_keyword is null then
        return 'received';
    elsif v_keyword = 'help' then
        return 'help_requested';  -- Twilio answers HELP itself (the Messaging Service's help text); kept as the outcome
    end if;
    v_evidence := jsonb_strip_nulls(jsonb_build_object('message_id', m.message_id, 'text', left(m.text, 160), 'received_at', m.received_at,
                                                       'to', m.phone_number_id, 'provider', p_provider));
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
    'Records an inbound SMS for the tenant whose Twilio number received it (m.phone_number_id, E.164): an opt-out keyword revokes the sender''s SMS consent (every category), an opt-in keyword restores it where the latest entry is a revoke, HELP is kept as the outcome help_requested; the message id, text and time are the evidence.';


create or replace function notify._record_inbound(p_provider text, m notify.inbound_message)
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
    -- (our correlation id, ?nd=tenant:delivery), an inbound message the number it was sent to; the account must match too.
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
                     else cp.settings ->> 'from_number' = p_hints ->> 'number' end)), '[]');
end
$$;
comment on function notify_api.webhook_keys_v1(text, jsonb) is
    'The signing-key references a webhook adapter needs before it can verify a request, for providers that sign with each tenant''s own secret (twilio: the auth token of the account named by hints.account_sid, of the tenant named by hints.tenant_id (a status callback''s correlation) or owning hints.number (an inbound message)): [{tenant_id, settings: {account_sid}, secrets: {auth_token: reference}, grants}]. References only, never values.';


create function notify.tg_notification_deliveries__revoke_sms_consent()
    returns trigger
    language plpgsql
    set search_path = pg_catalog, pg_temp
as $$
begin
    if notify._consent_allows(new.tenant_id, new.recipient_id, new.channel, null) then
        insert into notify.recipient_consents (tenant_id, recipient_id, channel, category, status, source, evidence, recorded_by)
        values (new.tenant_id, new.recipient_id, new.channel, null, 'revoked', 'provider_opt_out',
                jsonb_strip_nulls(jsonb_build_object('delivery_id', new.id, 'provider', new.provider, 'provider_message_id', new.provider_message_id,
                                                     'error_code', new.last_error_code, 'error_message', new.last_error_message,
                                                     'reported_at', now())), 'dispatcher');
    end if;
    return null;
end
$$;
comment on function notify.tg_notification_deliveries__revoke_sms_consent() is
    'An SMS delivery suppressed with Twilio error 21610 (the recipient replied STOP) revokes the recipient''s SMS consent, with the delivery and the error as evidence.';


create trigger _410_revoke_sms_consent
    after update of status on notify.notification_deliveries
    for each row
    when (new.status = 'suppressed' and old.status is distinct from new.status and new.channel = 'sms'
          and new.last_error_code = 'twilio_21610')
    execute function notify.tg_notification_deliveries__revoke_sms_consent();

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
                 'run_retention_v1', 'scrub_expired_v1', 'webhook_keys_v1']) as cross_tenant
               from pg_proc p where p.pronamespace in ('notify'::regnamespace, 'notify_api'::regnamespace) loop
        execute format('alter function %s owner to %s', r.fn, case when r.cross_tenant then 'notify_system' else 'notify_owner' end);
    end loop;
end
$$;
comment on function notify._settle_owners() is
    'Gives every notify table, type and function to notify_owner, and the cross-tenant notify_api functions to notify_system. Run by the migrating role (a member of both) at the end of every migration that creates objects.';


revoke execute on function notify._sms_parts(text) from public;
revoke execute on function notify._sms_keyword(text, jsonb) from public;
revoke execute on function notify._record_sms_inbound(text, notify.inbound_message) from public;
revoke execute on function notify.tg_notification_deliveries__revoke_sms_consent() from public;
revoke execute on function notify_api.webhook_keys_v1(text, jsonb) from public;
grant execute on function notify_api.webhook_keys_v1(text, jsonb) to notify_service;
grant execute on function notify._sms_parts(text) to notify_system;
grant execute on function notify._sms_keyword(text, jsonb) to notify_system;
grant execute on function notify._record_sms_inbound(text, notify.inbound_message) to notify_system;
grant execute on function notify.tg_notification_deliveries__revoke_sms_consent() to notify_system;
select notify._settle_owners();
