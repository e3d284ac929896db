-- 0003: row-level security on every tenant table, owned by notify_owner (subject to it) and notify_system (cross-tenant).
-- Tenant-scoped notify_api functions now bind the transaction to their tenant first (notify._enter).
-- Same content as sql/000 (roles), sql/030 (helpers), the changed functions of sql/05x-10x, sql/890 and the end of sql/900.

do $$
begin
    if not exists (select from pg_roles where rolname = 'notify_service') then
        create role notify_service nologin;
    end if;
    if not exists (select from pg_roles where rolname = 'notify_caller') then
        create role notify_caller nologin;
    end if;
    -- Owners, never logged in as: notify_owner owns the tables and the tenant-scoped functions and is subject to
    -- row security (FORCE); notify_system owns the named cross-tenant functions (worker, webhooks, key lookup).
    if not exists (select from pg_roles where rolname = 'notify_owner') then
        create role notify_owner nologin nosuperuser nobypassrls;
    end if;
    if not exists (select from pg_roles where rolname = 'notify_system') then
        create role notify_system nologin nosuperuser nobypassrls;
    end if;
    -- ALTER ... OWNER TO needs membership; a superuser has it, a CREATEROLE migrator grants it to itself.
    if not (select rolsuper from pg_roles where rolname = current_user) then
        execute format('grant notify_owner, notify_system to %I', current_user);
    end if;
end
$$;

create function notify._tenant()
    returns uuid
    language sql
    stable
as $$
    select nullif(pg_catalog.current_setting('notify.tenant_id', true), '')::uuid
$$;
comment on function notify._tenant() is
    'The tenant this transaction belongs to (setting notify.tenant_id), or null: what every row security policy compares with. Inlined, so no SET clause.';

create function notify._enter(p_tenant_id uuid)
    returns void
    language plpgsql
    volatile
    set search_path = ''
as $$
declare
    v_current uuid := notify._tenant();
begin
    if p_tenant_id is null then
        perform notify._raise('ND404', 'not_found', 'no such tenant', 'tenant_id');
    elsif v_current is null then
        perform set_config('notify.tenant_id', p_tenant_id::text, true);
    elsif v_current <> p_tenant_id then
        -- A transaction belongs to one tenant: the one a caller set, or the first a function entered.
        perform notify._raise('ND404', 'not_found', 'no such tenant in this transaction', 'tenant_id');
    end if;
end
$$;
comment on function notify._enter(uuid) is
    'Binds this transaction to a tenant (transaction-local notify.tenant_id) so row security shows only its rows; ND404 if the transaction is already bound to another tenant. First statement of every tenant-scoped notify_api function.';

create or replace function notify_api.set_retry_policy_v1(p_tenant_id uuid, p_max_attempts integer, p_base_ms integer, p_max_ms integer)
    returns void
    language plpgsql
    security definer
    set search_path = ''
as $$
begin
    perform notify._enter(p_tenant_id);
    update notify.tenants
       set retry_max_attempts = p_max_attempts, retry_base_ms = p_base_ms, retry_max_ms = p_max_ms
     where id = p_tenant_id;
    if not found then
        perform notify._raise('ND404', 'not_found', 'no such tenant', 'tenant_id');
    end if;
exception
    when check_violation then
        perform notify._raise('ND422', 'invalid_retry_policy', 'max_attempts must be 1-100, base_ms > 0 and max_ms >= base_ms', 'retry');
end
$$;

create or replace function notify_api.create_api_key_v1(p_tenant_id uuid, p_name text, p_prefix text, p_key_hash bytea,
                                             p_scopes text[] default '{submit,read,admin}')
    returns jsonb
    language plpgsql
    security definer
    set search_path = ''
as $$
declare
    v notify.api_clients;
begin
    perform notify._enter(p_tenant_id);
    if p_scopes is null or cardinality(p_scopes) = 0 or not p_scopes <@ array['submit', 'read', 'admin'] then
        perform notify._raise('ND422', 'invalid_scopes', 'scopes must be a non-empty subset of submit, read, admin', 'scopes');
    end if;
    if not exists (select from notify.tenants where id = p_tenant_id) then
        perform notify._raise('ND404', 'not_found', 'no such tenant', 'tenant_id');
    end if;
    if octet_length(p_key_hash) is distinct from 32 then
        perform notify._raise('ND422', 'invalid_key_hash', 'key_hash must be a SHA-256 digest (32 bytes)', 'key_hash');
    end if;
    insert into notify.api_clients (tenant_id, name, prefix, key_hash, scopes)
    values (p_tenant_id, coalesce(p_name, 'default'), p_prefix, p_key_hash, p_scopes)
    returning * into v;
    return jsonb_build_object('id', v.id, 'tenant_id', v.tenant_id, 'name', v.name, 'prefix', v.prefix,
                              'scopes', to_jsonb(v.scopes), 'created_at', v.created_at);
end
$$;

create or replace function notify_api.revoke_api_key_v1(p_tenant_id uuid, p_key_id uuid)
    returns jsonb
    language plpgsql
    security definer
    set search_path = ''
as $$
declare
    v notify.api_clients;
begin
    perform notify._enter(p_tenant_id);
    update notify.api_clients set revoked_at = coalesce(revoked_at, now())
     where tenant_id = p_tenant_id and id = p_key_id
    returning * into v;
    if v.id is null then
        perform notify._raise('ND404', 'not_found', 'no such API key', 'key_id');
    end if;
    return jsonb_build_object('id', v.id, 'revoked_at', v.revoked_at);
end
$$;

create or replace function notify_api.list_api_keys_v1(p_tenant_id uuid)
    returns jsonb
    language sql
    stable
    security definer
    set search_path = ''
as $$
    select notify._enter(p_tenant_id);
    select coalesce(jsonb_agg(jsonb_build_object('id', c.id, 'name', c.name, 'prefix', c.prefix, 'scopes', to_jsonb(c.scopes),
                                                 'created_at', c.created_at, 'last_used_at', c.last_used_at,
                                                 'expires_at', c.expires_at, 'revoked_at', c.revoked_at) order by c.created_at), '[]')
      from notify.api_clients c where c.tenant_id = p_tenant_id
$$;

create or replace function notify_api.rotate_api_key_v1(p_tenant_id uuid, p_key_id uuid, p_prefix text, p_key_hash bytea, p_overlap_seconds integer default 86400)
    returns jsonb
    language plpgsql
    security definer
    set search_path = ''
as $$
declare
    v notify.api_clients;
    v_new jsonb;
begin
    perform notify._enter(p_tenant_id);
    select * into v from notify.api_clients c
     where c.tenant_id = p_tenant_id and c.id = p_key_id and c.revoked_at is null and (c.expires_at is null or c.expires_at > now())
       for update;
    if v.id is null then
        perform notify._raise('ND404', 'not_found', 'no such active API key', 'key_id');
    end if;
    if p_overlap_seconds is null or p_overlap_seconds < 0 then
        perform notify._raise('ND422', 'invalid_value', 'overlap must be zero or more seconds', 'overlap_seconds');
    end if;
    v_new := notify_api.create_api_key_v1(p_tenant_id, v.name, p_prefix, p_key_hash, v.scopes);
    update notify.api_clients c set expires_at = now() + make_interval(secs => p_overlap_seconds)
     where c.tenant_id = p_tenant_id and c.id = p_key_id;
    return v_new || jsonb_build_object('replaces', p_key_id, 'old_key_expires_at', now() + make_interval(secs => p_overlap_seconds));
end
$$;

create or replace function notify_api.set_api_rate_v1(p_tenant_id uuid, p_rate_per_second double precision)
    returns void
    language plpgsql
    security definer
    set search_path = ''
as $$
begin
    perform notify._enter(p_tenant_id);
    if p_rate_per_second is null or p_rate_per_second <= 0 then
        perform notify._raise('ND422', 'invalid_value', 'rate must be a positive number of requests per second', 'rate_per_second');
    end if;
    update notify.tenants set api_rate_per_second = p_rate_per_second where id = p_tenant_id;
end
$$;

create or replace function notify_api.set_channel_policy_v1(p_tenant_id uuid, p_channel notify.channel, p_policy notify.consent_policy)
    returns jsonb
    language sql
    security definer
    set search_path = ''
as $$
    select notify._enter(p_tenant_id);
    insert into notify.channel_policies (tenant_id, channel, policy) values (p_tenant_id, p_channel, p_policy)
    on conflict (tenant_id, channel) do update set policy = excluded.policy, updated_at = now()
    returning jsonb_build_object('channel', channel, 'policy', policy, 'updated_at', updated_at)
$$;

create or replace function notify_api.list_channel_policies_v1(p_tenant_id uuid)
    returns jsonb
    language sql
    stable
    security definer
    set search_path = ''
as $$
    select notify._enter(p_tenant_id);
    select jsonb_agg(jsonb_build_object('channel', c, 'policy', coalesce(p.policy, notify._default_policy(c)),
                                        'default', p.policy is null) order by c)
      from unnest(enum_range(null::notify.channel)) c
      left join notify.channel_policies p on p.tenant_id = p_tenant_id and p.channel = c
$$;

create or replace function notify_api.upsert_recipient_v1(p_tenant_id uuid, p_ref text, p_body jsonb)
    returns jsonb
    language plpgsql
    security definer
    set search_path = ''
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

create or replace function notify_api.get_recipient_v1(p_tenant_id uuid, p_ref text)
    returns jsonb
    language plpgsql
    stable
    security definer
    set search_path = ''
as $$
begin
    perform notify._enter(p_tenant_id);
    return notify._recipient_json(p_tenant_id, notify._recipient_id(p_tenant_id, p_ref));
end
$$;

create or replace function notify_api.record_consent_v1(p_tenant_id uuid, p_ref text, p_body jsonb, p_recorded_by text default null)
    returns jsonb
    language plpgsql
    security definer
    set search_path = ''
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

create or replace function notify_api.list_consents_v1(p_tenant_id uuid, p_ref text)
    returns jsonb
    language plpgsql
    stable
    security definer
    set search_path = ''
as $$
declare
    v_id uuid;
begin
    perform notify._enter(p_tenant_id);
    v_id := notify._recipient_id(p_tenant_id, p_ref);
    return jsonb_build_object(
        'ref', p_ref,
        'current', (select jsonb_agg(jsonb_build_object(
                        'channel', c, 'allowed', notify._consent_allows(p_tenant_id, v_id, c, null),
                        'policy', coalesce(p.policy, notify._default_policy(c))) order by c)
                      from unnest(enum_range(null::notify.channel)) c
                      left join notify.channel_policies p on p.tenant_id = p_tenant_id and p.channel = c),
        'history', coalesce((select jsonb_agg(jsonb_build_object(
                        'id', e.id, 'channel', e.channel, 'category', e.category, 'status', e.status, 'source', e.source,
                        'evidence', e.evidence, 'recorded_at', e.recorded_at, 'recorded_by', e.recorded_by) order by e.id)
                      from notify.recipient_consents e where e.tenant_id = p_tenant_id and e.recipient_id = v_id), '[]'));
end
$$;

create or replace function notify_api.upsert_template_v1(p_tenant_id uuid, p_key text, p_body jsonb)
    returns jsonb
    language plpgsql
    security definer
    set search_path = ''
as $$
declare
    v_locale text;
    v_channels jsonb;
    v_key text;
    v_content jsonb;
    v_channel notify.channel;
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
                perform notify._text_field(v_content, 'subject', 'channels.email', true, 998);
                perform notify._text_field(v_content, 'text', 'channels.email', true, 100000);
                perform notify._text_field(v_content, 'html', 'channels.email', false, 500000);
            when 'whatsapp' then
                perform notify._check_keys(v_content, array['name', 'language', 'parameters', 'header_parameters', 'buttons', 'text'],
                                           'channels.whatsapp');
                if (v_content ? 'text') = (v_content ? 'name') then
                    perform notify._raise('ND400', 'invalid_template',
                        'channels.whatsapp needs either name (an approved template) or text (free-form)', 'channels.whatsapp');
                end if;
                perform notify._text_field(v_content, 'name', 'channels.whatsapp', false, 512);
                perform notify._text_field(v_content, 'language', 'channels.whatsapp', false, 16);
                perform notify._text_field(v_content, 'text', 'channels.whatsapp', false, 4096);
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
                perform notify._text_field(v_content, 'text', 'channels.' || v_key, true, 1600);
        end case;
        insert into notify.templates as t (tenant_id, key, channel, locale, content, required_variables)
        values (p_tenant_id, p_key, v_channel, v_locale, v_content, notify._template_variables(v_content))
        on conflict (tenant_id, key, channel, locale) do update
            set content = excluded.content, required_variables = excluded.required_variables,
                version = t.version + 1, updated_at = now()
            where t.content is distinct from excluded.content;
    end loop;
    return notify_api.list_templates_v1(p_tenant_id, p_key);
end
$$;

create or replace function notify_api.list_templates_v1(p_tenant_id uuid, p_key text default null)
    returns jsonb
    language sql
    stable
    security definer
    set search_path = ''
as $$
    select notify._enter(p_tenant_id);
    select coalesce(jsonb_agg(jsonb_build_object('key', t.key, 'channel', t.channel, 'locale', t.locale, 'content', t.content,
                                                 'required_variables', to_jsonb(t.required_variables), 'version', t.version,
                                                 'updated_at', t.updated_at) order by t.key, t.channel, t.locale), '[]')
      from notify.templates t
     where t.tenant_id = p_tenant_id and (p_key is null or t.key = p_key)
$$;

create or replace function notify_api.submit_notification_v1(p_tenant_id uuid, p_request jsonb, p_idempotency_key text default null)
    returns table (response jsonb, replayed boolean)
    language plpgsql
    security definer
    set search_path = ''
as $$
declare
    v_fingerprint bytea;
    v_recipient notify.recipients;
    v_channels notify.channel[];
    v_template text;
    v_variables jsonb;
    v_category text;
    v_send_at timestamptz;
    v_expires_at timestamptz;
    v_metadata jsonb;
    v_request_id uuid;
    v_channel notify.channel;
    v_tpl notify.templates;
    v_missing text;
    v_locale text;
    v_now timestamptz := now();
    v_response jsonb;
begin
    perform notify._enter(p_tenant_id);
    -- 1. Validate the shape; every error names its field, nothing is written yet.
    if p_request is null or jsonb_typeof(p_request) <> 'object' then
        perform notify._raise('ND400', 'invalid_type', 'body must be a JSON object', '');
    end if;
    perform notify._check_keys(p_request,
        array['recipient', 'recipients', 'channels', 'template', 'variables', 'category', 'send_at', 'expires_at', 'metadata'], '');
    if (p_request ? 'recipient') = (p_request ? 'recipients') then
        perform notify._raise('ND400', 'missing_field', 'give either recipient (one) or recipients (a fan-out), not both', 'recipient');
    end if;
    if p_request ? 'recipient' then
        if jsonb_typeof(p_request -> 'recipient') is distinct from 'object' then
            perform notify._raise('ND400', 'missing_field', 'recipient is required and must be an object', 'recipient');
        end if;
        perform notify._check_keys(p_request -> 'recipient', array['ref', 'addresses', 'locale', 'timezone'], 'recipient');
    end if;
    if jsonb_typeof(p_request -> 'channels') is distinct from 'array' or jsonb_array_length(p_request -> 'channels') = 0 then
        perform notify._raise('ND400', 'missing_field', 'channels must be a non-empty list', 'channels');
    end if;
    select array_agg(notify._channel_field(c, 'channels[' || (i - 1) || ']') order by i)
      into v_channels
      from jsonb_array_elements(p_request -> 'channels') with ordinality as e(c, i);
    if cardinality(v_channels) <> (select count(distinct c) from unnest(v_channels) c) then
        perform notify._raise('ND400', 'duplicate_channel', 'channels must not repeat a channel', 'channels');
    end if;
    v_template := notify._text_field(p_request, 'template', '', true, 100);
    v_variables := coalesce(p_request -> 'variables', '{}');
    if jsonb_typeof(v_variables) = 'null' then v_variables := '{}'; end if;
    if jsonb_typeof(v_variables) <> 'object' then
        perform notify._raise('ND400', 'invalid_type', 'variables must be an object', 'variables');
    end if;
    v_category := notify._text_field(p_request, 'category', '', false, 100);
    v_send_at := notify._time_field(p_request, 'send_at', '');
    v_expires_at := notify._time_field(p_request, 'expires_at', '');
    if v_expires_at is not null and v_expires_at <= v_now then
        perform notify._raise('ND422', 'invalid_expiry', 'expires_at must be in the future', 'expires_at');
    end if;
    if v_expires_at is not null and v_send_at is not null and v_expires_at <= v_send_at then
        perform notify._raise('ND422', 'invalid_expiry', 'expires_at must be after send_at', 'expires_at');
    end if;
    v_metadata := coalesce(p_request -> 'metadata', '{}');
    if jsonb_typeof(v_metadata) = 'null' then v_metadata := '{}'; end if;
    if jsonb_typeof(v_metadata) <> 'object' then
        perform notify._raise('ND400', 'invalid_type', 'metadata must be an object', 'metadata');
    end if;
    if p_idempotency_key is not null and p_idempotency_key !~ '^[\x21-\x7e]{1,255}$' then
        perform notify._raise('ND400', 'invalid_idempotency_key', 'Idempotency-Key must be 1-255 printable ASCII characters', 'Idempotency-Key');
    end if;
    if p_request ? 'recipients' then
        return query select * from notify._submit_fanout(p_tenant_id, p_request, p_idempotency_key, v_channels, v_template,
                                                          v_variables, v_category, v_send_at, v_expires_at, v_metadata);
        return;
    end if;

    -- 2. The recipient and its addresses.
    v_recipient := notify._upsert_recipient(p_tenant_id, notify._text_field(p_request -> 'recipient', 'ref', 'recipient', true, 200),
                                            p_request -> 'recipient', 'recipient');

    -- 3. Claim the idempotency key. A concurrent twin waits here for our commit, then replays it.
    v_fingerprint := sha256(convert_to(p_request::text, 'UTF8'));
    insert into notify.notification_requests
        (tenant_id, idempotency_key, fingerprint, recipient_id, template_key, variables, category, channels,
         send_at, expires_at, metadata)
    values (p_tenant_id, p_idempotency_key, v_fingerprint, v_recipient.id, v_template, v_variables, v_category, v_channels,
            v_send_at, v_expires_at, v_metadata)
    on conflict (tenant_id, idempotency_key) do nothing
    returning id into v_request_id;
    if v_request_id is null then
        response := notify._replay(p_tenant_id, p_idempotency_key, v_fingerprint);
        replayed := true;
        return next;
        return;
    end if;

    -- 4. Templates and variables, checked now rather than at send time.
    v_locale := coalesce(v_recipient.locale, (select default_locale from notify.tenants where id = p_tenant_id));
    foreach v_channel in array v_channels loop
        v_tpl := notify._resolve_template(p_tenant_id, v_template, v_channel, v_locale);
        if v_tpl.key is null then
            perform notify._raise('ND422', 'template_not_found',
                format('template %s has no %s content for locale %s or its fallbacks', v_template, v_channel, v_locale), 'template');
        end if;
        select string_agg(r, ', ') into v_missing
          from unnest(v_tpl.required_variables) r where not v_variables ? r;
        if v_missing is not null then
            perform notify._raise('ND422', 'missing_variables',
                format('template %s (%s) needs variables: %s', v_template, v_channel, v_missing),
                'variables.' || split_part(v_missing, ', ', 1));
        end if;
    end loop;

    -- 5. One delivery per channel, suppressed ones with their reason; consent checked now and again at claim.
    perform notify._set_source('submit');
    with inserted as (
        insert into notify.notification_deliveries
            (tenant_id, request_id, recipient_id, channel, address, template_locale, status, reason, due_at, expires_at)
        select p_tenant_id, v_request_id, v_recipient.id, c.channel, a.address,
               (notify._resolve_template(p_tenant_id, v_template, c.channel, v_locale)).locale,
               case when a.address is null or not notify._consent_allows(p_tenant_id, v_recipient.id, c.channel, v_category)
                        then 'suppressed'
                    when v_send_at > v_now then 'scheduled'
                    else 'queued' end::notify.delivery_status,
               case when a.address is null then 'no_address'
                    when not notify._consent_allows(p_tenant_id, v_recipient.id, c.channel, v_category) then 'no_consent' end,
               greatest(coalesce(v_send_at, v_now), v_now), v_expires_at
          from unnest(v_channels) with ordinality as c(channel, ord)
          left join notify.recipient_addresses a
                 on a.tenant_id = p_tenant_id and a.recipient_id = v_recipient.id and a.channel = c.channel
         order by c.ord
        returning *
    )
    select jsonb_build_object(
               'id', v_request_id, 'created_at', v_now,
               'status', case when bool_and(i.status = 'suppressed') then 'suppressed' else 'accepted' end,
               'deliveries', jsonb_agg(jsonb_strip_nulls(jsonb_build_object(
                    'id', i.id, 'channel', i.channel, 'status', i.status, 'reason', i.reason))
                    order by array_position(v_channels, i.channel)))
      into v_response
      from inserted i;

    update notify.notification_requests r set response = v_response
     where r.tenant_id = p_tenant_id and r.id = v_request_id;

    -- 6. Wake the worker, with the caller's commit: now, or when the scheduled work falls due.
    perform notify._wake(d.channel, d.due_at)
       from (select distinct channel, due_at from notify.notification_deliveries
              where tenant_id = p_tenant_id and request_id = v_request_id and status in ('queued', 'scheduled')) d;

    response := v_response;
    replayed := false;
    return next;
end
$$;

create or replace function notify_api.get_notification_v1(p_tenant_id uuid, p_id uuid)
    returns jsonb
    language plpgsql
    stable
    security definer
    set search_path = ''
as $$
declare
    v notify.notification_requests;
    v_deliveries jsonb;
    v_open boolean;
begin
    perform notify._enter(p_tenant_id);
    select * into v from notify.notification_requests r where r.tenant_id = p_tenant_id and r.id = p_id;
    if v.id is null then
        perform notify._raise('ND404', 'not_found', 'no such notification', 'id');
    end if;
    select jsonb_agg(notify._delivery_json(d, true) order by array_position(v.channels, d.channel), d.id),
           bool_or(d.status in ('scheduled', 'queued', 'sending', 'unknown'))
      into v_deliveries, v_open
      from notify.notification_deliveries d where d.tenant_id = p_tenant_id and d.request_id = p_id;
    return jsonb_strip_nulls(jsonb_build_object(
        'id', v.id, 'status', case when v_open then 'in_progress' else 'completed' end,
        'created_at', v.created_at, 'idempotency_key', v.idempotency_key,
        'recipient', (select r.ref from notify.recipients r where r.tenant_id = v.tenant_id and r.id = v.recipient_id),
        'recipient_count', case when v.recipient_id is null then v.recipient_count end,
        'template', v.template_key, 'category', v.category, 'channels', to_jsonb(v.channels),
        'send_at', v.send_at, 'expires_at', v.expires_at, 'metadata', v.metadata))
        || jsonb_build_object('deliveries', coalesce(v_deliveries, '[]'));
end
$$;

create or replace function notify_api.cancel_notification_v1(p_tenant_id uuid, p_id uuid)
    returns jsonb
    language plpgsql
    security definer
    set search_path = ''
as $$
declare
    v_result jsonb;
begin
    perform notify._enter(p_tenant_id);
    if not exists (select from notify.notification_requests r where r.tenant_id = p_tenant_id and r.id = p_id) then
        perform notify._raise('ND404', 'not_found', 'no such notification', 'id');
    end if;
    perform notify._set_source('cancel');
    -- Lock every delivery (waiting for a claim in progress), then cancel only what no worker has claimed.
    with locked as (
        -- FOR UPDATE returns each row's latest committed version, so a claim that won the race shows as sending.
        select d.id, d.channel, d.status from notify.notification_deliveries d
         where d.tenant_id = p_tenant_id and d.request_id = p_id
         order by d.id
           for update
    ), cancelled as (
        update notify.notification_deliveries d set status = 'cancelled', reason = 'cancelled_by_caller'
          from locked l
         where d.tenant_id = p_tenant_id and d.id = l.id and l.status in ('scheduled', 'queued')
           and d.status in ('scheduled', 'queued')
        returning d.id
    )
    select jsonb_build_object('id', p_id, 'deliveries', jsonb_agg(jsonb_build_object(
               'id', l.id, 'channel', l.channel,
               'status', case when c.id is not null then 'cancelled' else l.status::text end,
               'cancelled', c.id is not null,
               'reason', case when c.id is not null then 'cancelled'
                              when l.status = 'sending' then 'already_sending'
                              else 'already_' || l.status end) order by l.channel))
      into v_result
      from locked l
      left join cancelled c on c.id = l.id;
    return v_result;
end
$$;

create or replace function notify_api.submit_notifications_v1(p_tenant_id uuid, p_items jsonb)
    returns jsonb
    language plpgsql
    security definer
    set search_path = ''
as $$
declare
    v_item jsonb;
    v_index integer := 0;
    v_key text;
    v_row record;
    v_results jsonb := '[]';
    v_state text;
    v_message text;
    v_type text;
    v_field text;
begin
    perform notify._enter(p_tenant_id);
    if jsonb_typeof(p_items) is distinct from 'array' or jsonb_array_length(p_items) not between 1 and 1000 then
        perform notify._raise('ND400', 'invalid_length', 'items must be a list of 1 to 1000 intents', 'items');
    end if;
    for v_item in select value from jsonb_array_elements(p_items) loop
        begin
            -- Each item is its own subtransaction: a bad one is rolled back alone and reported; the others stay.
            if jsonb_typeof(v_item) <> 'object' or jsonb_typeof(v_item -> 'notification') <> 'object' then
                perform notify._raise('ND400', 'invalid_type', 'each item is {"idempotency_key"?, "notification": {...}}', 'notification');
            end if;
            perform notify._check_keys(v_item, array['idempotency_key', 'notification'], '');
            v_key := notify._text_field(v_item, 'idempotency_key', '', false, 255);
            select * into v_row from notify_api.submit_notification_v1(p_tenant_id, v_item -> 'notification', v_key);
            v_results := v_results || jsonb_build_object(
                'index', v_index, 'outcome', case when v_row.replayed then 'replayed' else 'accepted' end,
                'status', case when v_row.replayed then 200 else 202 end, 'body', v_row.response);
        exception
            when sqlstate 'ND400' or sqlstate 'ND404' or sqlstate 'ND409' or sqlstate 'ND422' then
                get stacked diagnostics v_state = returned_sqlstate, v_message = message_text,
                                        v_type = constraint_name, v_field = column_name;
                v_results := v_results || jsonb_build_object(
                    'index', v_index, 'outcome', 'error', 'status', substr(v_state, 3)::integer,
                    'error', jsonb_strip_nulls(jsonb_build_object('type', v_type, 'detail', v_message, 'field', nullif(v_field, ''))));
        end;
        v_index := v_index + 1;
    end loop;
    return jsonb_build_object('items', v_results,
        'accepted', (select count(*) from jsonb_array_elements(v_results) r where r ->> 'outcome' = 'accepted'),
        'replayed', (select count(*) from jsonb_array_elements(v_results) r where r ->> 'outcome' = 'replayed'),
        'failed', (select count(*) from jsonb_array_elements(v_results) r where r ->> 'outcome' = 'error'));
end
$$;

create or replace function notify_api.set_channel_provider_v1(p_tenant_id uuid, p_channel notify.channel, p_body jsonb)
    returns jsonb
    language plpgsql
    security definer
    set search_path = ''
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

create or replace function notify_api.list_channel_providers_v1(p_tenant_id uuid)
    returns jsonb
    language sql
    stable
    security definer
    set search_path = ''
as $$
    select notify._enter(p_tenant_id);
    select jsonb_agg(jsonb_build_object(
               'channel', c, 'provider', coalesce(p.provider, 'mock'), 'settings', coalesce(p.settings, '{}'),
               'secrets', coalesce((select jsonb_object_agg(k, split_part(v #>> '{}', ':', 1) || ':***') from jsonb_each(p.secrets) e(k, v)), '{}'),
               'default', p.provider is null, 'updated_at', p.updated_at) order by c)
      from unnest(enum_range(null::notify.channel)) c
      left join notify.channel_providers p on p.tenant_id = p_tenant_id and p.channel = c
$$;

create or replace function notify_api.unsubscribe_v1(p_tenant_id uuid, p_delivery_id uuid, p_source text default 'list_unsubscribe')
    returns jsonb
    language plpgsql
    security definer
    set search_path = ''
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

create or replace function notify_api.list_mock_messages_v1(p_tenant_id uuid, p_delivery_id uuid default null, p_limit integer default 100)
    returns jsonb
    language sql
    stable
    security definer
    set search_path = ''
as $$
    select notify._enter(p_tenant_id);
    select coalesce(jsonb_agg(x.j order by x.id desc), '[]')
      from (select m.id, jsonb_build_object('delivery_id', m.delivery_id, 'attempt', m.attempt, 'channel', m.channel,
                                            'address', m.address, 'provider_message_id', m.provider_message_id,
                                            'rendered', m.rendered, 'sent_at', m.sent_at) j
              from notify.mock_messages m
             where m.tenant_id = p_tenant_id and (p_delivery_id is null or m.delivery_id = p_delivery_id)
             order by m.id desc
             limit least(greatest(p_limit, 1), 1000)) x
$$;

-- Row-level security: the second line of tenant isolation, behind the tenant argument of every notify_api function.
-- Tenant-scoped functions run as notify_owner, which owns the tables and is subject to the policies (FORCE); they bind
-- the transaction to their tenant first (notify._enter). Cross-tenant functions run as notify_system, whose policy
-- admits every row; nothing else has any privilege on these tables, so any other role sees nothing at all.
-- Not tenant tables (no tenant_id): rate_buckets (per sender) and webhook_events (deduplicated before the tenant is known).

alter table notify.tenants enable row level security;
alter table notify.tenants force row level security;
create policy tenant_rows on notify.tenants to notify_owner
    using (id = (select notify._tenant())) with check (id = (select notify._tenant()));
create policy system_rows on notify.tenants to notify_system using (true) with check (true);

do $$
declare
    v_table text;
begin
    foreach v_table in array array['api_clients', 'channel_policies', 'channel_providers', 'whatsapp_windows', 'recipients',
                                   'recipient_addresses', 'recipient_consents', 'templates', 'notification_requests',
                                   'notification_deliveries', 'delivery_attempts', 'delivery_events', 'mock_messages']
    loop
        execute format('alter table notify.%I enable row level security', v_table);
        execute format('alter table notify.%I force row level security', v_table);
        execute format('create policy tenant_rows on notify.%I to notify_owner
                            using (tenant_id = (select notify._tenant())) with check (tenant_id = (select notify._tenant()))', v_table);
        execute format('create policy system_rows on notify.%I to notify_system using (true) with check (true)', v_table);
    end loop;
end
$$;

create function notify._settle_owners()
    returns void
    language plpgsql
    set search_path = ''
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
                 'record_mock_messages_v1']) as cross_tenant
               from pg_proc p where p.pronamespace in ('notify'::regnamespace, 'notify_api'::regnamespace) loop
        execute format('alter function %s owner to %s', r.fn, case when r.cross_tenant then 'notify_system' else 'notify_owner' end);
    end loop;
end
$$;
comment on function notify._settle_owners() is
    'Gives every notify table, type and function to notify_owner, and the cross-tenant notify_api functions to notify_system. Run by the migrating role (a member of both) at the end of every migration that creates objects.';

-- The owning roles (sql/890_row_security.sql): notify_owner owns the tables; notify_system reads and writes every row
-- through its own policy; both run procrastinate's wake-ups.
-- (The revokes repeat the top of this file, so a migration ending with this block leaves no new function open.)
revoke execute on all functions in schema notify from public;
revoke execute on all functions in schema notify_api from public;
grant usage on schema notify, notify_api to notify_owner, notify_system;
grant select, insert, update, delete on all tables in schema notify to notify_system;
grant usage, select on all sequences in schema notify to notify_system;
grant execute on all functions in schema notify to notify_system;
grant select, insert, update, delete on all tables in schema public to notify_owner, notify_system;
grant usage, select on all sequences in schema public to notify_owner, notify_system;
grant execute on all functions in schema public to notify_owner, notify_system;
select notify._settle_owners();
