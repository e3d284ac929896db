-- notification-dispatcher core schema, v1: the concatenation of sql/*.sql as they stood when this migration landed.
-- Never edited: later changes to sql/ land as new migrations, and tests/test_migrations.py proves both builds agree.

-- ==== sql/000_schemas.sql ====
-- Schemas and roles of notification-dispatcher.
-- Loaded first by every build (sql/ and migrations); nothing else depends on order before it.

-- Roles are cluster-wide, so they are created only when missing (several databases share a cluster).
do $$
begin
    if not exists (select from pg_roles where rolname = 'notify_service') then
        create role notify_service nologin;
    end if;
    if not exists (select from pg_roles where rolname = 'notify_caller') then
        create role notify_caller nologin;
    end if;
end
$$;

create schema notify;
comment on schema notify is
    'Private: tables, types, triggers and helper functions of notification-dispatcher. No role but the owner touches it directly.';

create schema notify_api;
comment on schema notify_api is
    'Public: the versioned functions that the HTTP layer, the worker and trusted SQL clients call.';

-- ==== sql/010_types.sql ====
-- Enumerations and composite types shared by tables and functions.
-- Read by every other file in sql/; batch functions take arrays of the composite types.

create type notify.channel as enum ('whatsapp', 'email', 'sms');
comment on type notify.channel is 'A delivery channel. A new channel is a new value (ALTER TYPE ... ADD VALUE).';

create type notify.delivery_status as enum (
    'scheduled',   -- waiting for send_at          -> queued | sending (claimed when due) | suppressed | cancelled | expired | failed (refused at claim)
    'queued',      -- due, or a retry waiting       -> sending | suppressed | cancelled | expired | failed
    'sending',     -- claimed; provider call may be in flight
                   --                               -> queued (retry) | sent | delivered | read | failed | bounced | suppressed | unknown
    'unknown',     -- lease expired or timeout after the request left us
                   --                               -> queued (channels that allow duplicates) | sent | delivered | read | failed | bounced
    'sent',        -- provider accepted             -> delivered | read | failed | bounced | suppressed
    'delivered',   -- reached the device/mailbox    -> read | bounced (e-mail)
    'read',        -- read receipt                  (final)
    'failed',      -- not deliverable               -> delivered | read (WhatsApp/SMS: positive evidence after a failure)
    'bounced',     -- e-mail rejected by the recipient server (final)
    'suppressed',  -- not sent: no consent, no address, opt-out (final)
    'cancelled',   -- caller cancelled before claim (final)
    'expired'      -- expires_at passed before claim (final)
);
comment on type notify.delivery_status is
    'Status of one delivery. Legal transitions are listed beside each value and enforced by notify._transition_allowed.';

create type notify.consent_status as enum ('granted', 'revoked');
comment on type notify.consent_status is 'One consent ledger entry either grants or revokes.';

create type notify.consent_policy as enum ('opt_in', 'opt_out');
comment on type notify.consent_policy is
    'opt_in: suppressed unless granted (WhatsApp, SMS default). opt_out: allowed unless revoked (e-mail default).';

create type notify.attempt_result as (
    tenant_id uuid,
    delivery_id uuid,
    attempt integer,
    outcome text,               -- sent | retry | failed | unknown | suppressed | bounced
    provider text,
    provider_message_id text,
    error_code text,
    error_message text,
    retry_after_seconds double precision
);
comment on type notify.attempt_result is
    'One provider call''s outcome, as the worker reports it to notify_api.record_attempts_v1. attempt is the fencing token returned by the claim.';

create type notify.status_event as (
    tenant_id uuid,
    delivery_id uuid,
    provider_message_id text,
    status notify.delivery_status,
    occurred_at timestamptz,
    error_code text,
    error_message text,
    flag text                   -- opened | clicked | complained: engagement, never a status
);
comment on type notify.status_event is
    'A provider status report normalized by its adapter: a status, or an engagement flag (status null). The delivery is found by (tenant_id, delivery_id) when the provider echoes our correlation id, else by provider_message_id.';

create type notify.inbound_message as (
    phone_number_id text,
    sender text,
    message_id text,
    text text,
    received_at timestamptz
);
comment on type notify.inbound_message is
    'A message a recipient sent to a business number (WhatsApp): it opens the 24-hour window, and an opt-out keyword revokes consent.';

create type notify.claimed_delivery as (
    tenant_id uuid,
    delivery_id uuid,
    attempt integer,
    channel notify.channel,
    address text,
    template_key text,
    locale text,
    content jsonb,
    variables jsonb,
    category text,
    request_id uuid,
    provider text,
    provider_config jsonb
);
comment on type notify.claimed_delivery is
    'What the worker needs to send one claimed delivery: where to, the template content, the variables, and the tenant''s provider for the channel (settings and secret references, never secrets).';

-- ==== sql/015_pure_helpers.sql ====
-- Private helper functions that read no table: validation, ranks, transitions, error raising.
-- Called by the tables' check constraints, the triggers and the notify_api functions.

create function notify._raise(p_code text, p_type text, p_message text, p_field text default null)
    returns void
    language plpgsql
    set search_path = ''
as $$
begin
    -- Codes are ND + HTTP status (see docs/errors.md); CONSTRAINT carries the problem type, COLUMN the field.
    raise exception using errcode = p_code, message = p_message, constraint = p_type, column = coalesce(p_field, '');
end
$$;
comment on function notify._raise(text, text, text, text) is
    'Raises a documented error: SQLSTATE ND<http status>, problem type in CONSTRAINT, offending field in COLUMN.';

create function notify._address_valid(p_channel notify.channel, p_address text)
    returns boolean
    language sql
    immutable
    -- inlinable: no SET clause (see docs/architecture.md, "Hot helpers are inlined")
as $$
    select case p_channel
        -- No counted repetition ({1,64}) inside the pattern: it makes Postgres' regex engine 20x slower; lengths are checked apart.
        when 'email' then p_address ~ '^[A-Za-z0-9.!#$%&''*+/=?^_`{|}~-]+@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)+$'
                          and length(p_address) <= 254 and strpos(p_address, '@') <= 65
        else p_address ~ '^\+[1-9][0-9]{6,14}$'
    end
$$;
comment on function notify._address_valid(notify.channel, text) is
    'E.164 (+ and 7 to 15 digits) for whatsapp and sms; a practical RFC 5322 addr-spec subset for email.';

create function notify._default_policy(p_channel notify.channel)
    returns notify.consent_policy
    language sql
    immutable
    -- inlinable: no SET clause (see docs/architecture.md, "Hot helpers are inlined")
as $$
    select case p_channel when 'email' then 'opt_out'::notify.consent_policy else 'opt_in'::notify.consent_policy end
$$;
comment on function notify._default_policy(notify.channel) is 'Consent policy of a channel when the tenant has set none.';

create function notify._is_final(p_status notify.delivery_status)
    returns boolean
    language sql
    immutable
    -- inlinable: no SET clause (see docs/architecture.md, "Hot helpers are inlined")
as $$
    select p_status in ('read', 'bounced', 'suppressed', 'cancelled', 'expired', 'failed', 'delivered')
$$;
comment on function notify._is_final(notify.delivery_status) is
    'True where no further work is planned (the delivery may still move by a provider report, e.g. delivered -> read).';

create function notify._rank(p_channel notify.channel, p_status notify.delivery_status)
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
        when 'failed' then case when p_channel = 'email' then 70 else 45 end
        when 'delivered' then 50
        when 'read' then 60
        when 'bounced' then 70
        when 'suppressed' then 70
        when 'cancelled' then 90
        when 'expired' then 90
    end
$$;
comment on function notify._rank(notify.channel, notify.delivery_status) is
    'Monotonic rank used to apply provider reports in any order: a report applies only if it ranks higher. For WhatsApp/SMS a failed loses to delivered; for e-mail a bounce or failure beats delivered.';

create function notify._transition_allowed(p_channel notify.channel, p_from notify.delivery_status, p_to notify.delivery_status)
    returns boolean
    language sql
    immutable
    -- inlinable: no SET clause (see docs/architecture.md, "Hot helpers are inlined")
as $$
    select case p_from
        when 'scheduled' then p_to in ('queued', 'sending', 'suppressed', 'cancelled', 'expired', 'failed')
        when 'queued' then p_to in ('sending', 'suppressed', 'cancelled', 'expired', 'failed')
        when 'sending' then p_to in ('queued', 'sent', 'delivered', 'read', 'failed', 'bounced', 'suppressed', 'unknown')
        when 'unknown' then p_to in ('queued', 'sent', 'delivered', 'read', 'failed', 'bounced')
        when 'sent' then p_to in ('delivered', 'read', 'failed', 'bounced', 'suppressed')
        when 'delivered' then p_to = 'read' or (p_to = 'bounced' and p_channel = 'email')
        when 'failed' then p_to in ('delivered', 'read') and p_channel <> 'email'
        else false
    end
$$;
comment on function notify._transition_allowed(notify.channel, notify.delivery_status, notify.delivery_status) is
    'The delivery state machine: the only legal status changes. Enforced by trigger _100_check_transition.';

create function notify._template_variables(p_content jsonb)
    returns text[]
    language sql
    immutable
    set search_path = ''
as $$
    select coalesce(array_agg(distinct v order by v), '{}')
    from (
        select m[1] as v
        from jsonb_path_query(p_content, 'strict $.**') as s(value)
        cross join lateral regexp_matches(s.value #>> '{}', '\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}', 'g') as m
        where jsonb_typeof(s.value) = 'string'
        union
        -- WhatsApp parameter mappings name variables directly (body, header, buttons).
        select jsonb_array_elements_text(p_content -> 'parameters')
        where jsonb_typeof(p_content -> 'parameters') = 'array'
        union
        select jsonb_array_elements_text(p_content -> 'header_parameters')
        where jsonb_typeof(p_content -> 'header_parameters') = 'array'
        union
        select b ->> 'parameter' from jsonb_array_elements(case when jsonb_typeof(p_content -> 'buttons') = 'array'
                                                              then p_content -> 'buttons' else '[]' end) b
        where b ->> 'parameter' is not null
    ) names(v)
$$;
comment on function notify._template_variables(jsonb) is
    'Variable names a template needs: every {{name}} placeholder in its strings plus the variables a WhatsApp template maps to its body, header and button parameters.';

create function notify._check_keys(p_object jsonb, p_allowed text[], p_path text)
    returns void
    language plpgsql
    immutable
    set search_path = ''
as $$
declare
    v_key text;
begin
    if p_object is null or jsonb_typeof(p_object) = 'null' then
        return;
    end if;
    if jsonb_typeof(p_object) <> 'object' then
        perform notify._raise('ND400', 'invalid_type', format('%s must be an object', coalesce(nullif(p_path, ''), 'body')), p_path);
    end if;
    select k into v_key from jsonb_object_keys(p_object) k where k <> all (p_allowed) limit 1;
    if v_key is not null then
        perform notify._raise('ND400', 'unknown_field', format('unknown field %s', ltrim(p_path || '.' || v_key, '.')),
                              ltrim(p_path || '.' || v_key, '.'));
    end if;
end
$$;
comment on function notify._check_keys(jsonb, text[], text) is 'Refuses a JSON object with a key outside p_allowed, naming the field.';

create function notify._text_field(p_object jsonb, p_key text, p_path text, p_required boolean default false, p_max integer default 1000)
    returns text
    language plpgsql
    immutable
    set search_path = ''
as $$
declare
    v jsonb := p_object -> p_key;
    v_path text := ltrim(p_path || '.' || p_key, '.');
begin
    if v is null or jsonb_typeof(v) = 'null' then
        if p_required then
            perform notify._raise('ND400', 'missing_field', format('%s is required', v_path), v_path);
        end if;
        return null;
    end if;
    if jsonb_typeof(v) <> 'string' then
        perform notify._raise('ND400', 'invalid_type', format('%s must be a string', v_path), v_path);
    end if;
    if length(v #>> '{}') > p_max or (p_required and length(v #>> '{}') = 0) then
        perform notify._raise('ND400', 'invalid_length', format('%s must be 1 to %s characters', v_path, p_max), v_path);
    end if;
    return v #>> '{}';
end
$$;
comment on function notify._text_field(jsonb, text, text, boolean, integer) is 'Reads a string member of a JSON object, refusing a wrong type or length with the field named.';

create function notify._time_field(p_object jsonb, p_key text, p_path text)
    returns timestamptz
    language plpgsql
    stable
    set search_path = ''
as $$
declare
    v text := notify._text_field(p_object, p_key, p_path, false, 64);
    v_path text := ltrim(p_path || '.' || p_key, '.');
begin
    if v is null then
        return null;
    end if;
    if v !~ '^\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}(:?\d{2})?)$' then
        perform notify._raise('ND400', 'invalid_format', format('%s must be an RFC 3339 time with an offset', v_path), v_path);
    end if;
    return v::timestamptz;
exception
    when datetime_field_overflow or invalid_datetime_format then
        perform notify._raise('ND400', 'invalid_format', format('%s is not a valid time', v_path), v_path);
end
$$;
comment on function notify._time_field(jsonb, text, text) is 'Reads an RFC 3339 timestamp member, refusing other formats with the field named.';

create function notify._channel_field(p_value jsonb, p_path text)
    returns notify.channel
    language plpgsql
    immutable
    set search_path = ''
as $$
begin
    if jsonb_typeof(p_value) is distinct from 'string'
       or (p_value #>> '{}') <> all (enum_range(null::notify.channel)::text[]) then
        perform notify._raise('ND400', 'invalid_channel',
            format('%s must be one of %s', p_path, array_to_string(enum_range(null::notify.channel)::text[], ', ')), p_path);
    end if;
    return (p_value #>> '{}')::notify.channel;
end
$$;
comment on function notify._channel_field(jsonb, text) is 'Reads a channel name, refusing unknown channels with the field named.';

create function notify._secret_refs_valid(p_secrets jsonb)
    returns boolean
    language sql
    immutable
    set search_path = ''
as $$
    select jsonb_typeof(p_secrets) = 'object'
       and not exists (select from jsonb_each(p_secrets) e
                        where jsonb_typeof(e.value) <> 'string' or e.value #>> '{}' !~ '^(env:[A-Za-z_][A-Za-z0-9_]*|file:/[^\s]+)$')
$$;
comment on function notify._secret_refs_valid(jsonb) is
    'True if every value is a secret reference (env:NAME or file:/absolute/path), so a secret itself can never be stored.';

-- ==== sql/020_tables.sql ====
-- Tables of notification-dispatcher: tenants, keys, recipients, consent, templates, requests, deliveries.
-- Written only through notify_api functions; every primary and unique key starts with tenant_id except where noted.

create table notify.tenants (
    id uuid primary key default gen_random_uuid(),
    slug text not null,
    name text not null,
    default_locale text not null default 'en',
    retry_max_attempts integer not null default 5,
    retry_base_ms integer not null default 30000,
    retry_max_ms integer not null default 3600000,
    api_rate_per_second double precision not null default 1000,
    created_at timestamptz not null default now(),
    constraint tenants_slug_key unique (slug),
    constraint tenants_slug_format check (slug ~ '^[a-z0-9][a-z0-9_-]{0,62}$'),
    constraint tenants_retry_sane check (retry_max_attempts between 1 and 100 and retry_base_ms > 0 and retry_max_ms >= retry_base_ms)
);
comment on table notify.tenants is 'A calling organisation. Everything else belongs to exactly one tenant.';
comment on column notify.tenants.default_locale is 'Last step of template locale fallback (es-ES -> es -> default_locale).';
comment on column notify.tenants.retry_max_attempts is 'Attempts per delivery before a transient failure becomes failed.';
comment on column notify.tenants.api_rate_per_second is 'Requests per second each API key of the tenant may make (burst: one second''s worth); over it, 429.';
comment on column notify.tenants.retry_base_ms is 'Backoff before retry n is min(retry_max_ms, retry_base_ms * 2^(n-1)) scaled by a random factor in [0.5, 1).';

create table notify.api_clients (
    tenant_id uuid not null references notify.tenants (id),
    id uuid not null default gen_random_uuid(),
    name text not null,
    prefix text not null,
    key_hash bytea not null,
    scopes text[] not null default '{submit,read,admin}',
    created_at timestamptz not null default now(),
    last_used_at timestamptz,
    expires_at timestamptz,
    revoked_at timestamptz,
    primary key (tenant_id, id),
    -- Global, not per tenant: a key is looked up before its tenant is known.
    constraint api_clients_key_hash_key unique (key_hash),
    constraint api_clients_hash_length check (octet_length(key_hash) = 32),
    constraint api_clients_scopes check (scopes <@ array['submit', 'read', 'admin'] and cardinality(scopes) > 0)
);
comment on table notify.api_clients is 'API keys. Only the SHA-256 of a key is stored; the key itself is shown once at creation.';
comment on column notify.api_clients.prefix is 'The first characters of the key, for people to tell keys apart. Not secret, not used to authenticate.';
comment on column notify.api_clients.scopes is 'submit: send and cancel notifications; read: read them, recipients and templates; admin: change templates, consent policies, providers.';
comment on column notify.api_clients.expires_at is 'Set when the key is rotated: it keeps working until then (the overlap window), then stops.';
comment on column notify.api_clients.last_used_at is 'Updated at most once a minute per key, to keep authentication read-mostly.';

create table notify.channel_policies (
    tenant_id uuid not null references notify.tenants (id),
    channel notify.channel not null,
    policy notify.consent_policy not null,
    updated_at timestamptz not null default now(),
    primary key (tenant_id, channel)
);
comment on table notify.channel_policies is
    'Per-tenant consent policy of a channel. Missing row: opt_in for whatsapp and sms, opt_out for email (notify._default_policy).';

create table notify.channel_providers (
    tenant_id uuid not null references notify.tenants (id),
    channel notify.channel not null,
    provider text not null,
    settings jsonb not null default '{}',
    secrets jsonb not null default '{}',
    updated_at timestamptz not null default now(),
    primary key (tenant_id, channel),
    constraint channel_providers_known check (
        (provider = 'mock') or (provider = 'whatsapp_cloud' and channel = 'whatsapp') or (provider = 'smtp' and channel = 'email')),
    constraint channel_providers_secret_refs check (notify._secret_refs_valid(secrets))
);
comment on table notify.channel_providers is
    'Which provider serves a tenant''s channel, its settings, and references to its secrets. No row: the built-in mock provider.';
comment on column notify.channel_providers.secrets is
    'Secret references only, {"name": "env:VAR" | "file:/path"}; resolved by the worker at send time, never stored.';

create table notify.whatsapp_windows (
    tenant_id uuid not null references notify.tenants (id),
    phone_number_id text not null,
    wa_id text not null,
    last_inbound_at timestamptz not null,
    primary key (tenant_id, phone_number_id, wa_id)
);
comment on table notify.whatsapp_windows is
    'Last inbound message per business number and user: free-form WhatsApp text is allowed only within 24 hours of it.';

create table notify.rate_buckets (
    key text primary key,
    tokens double precision not null,
    updated_at timestamptz not null
);
comment on table notify.rate_buckets is
    'Token buckets shared by every worker process (e.g. outbound pacing per WhatsApp phone number). Global, not per tenant: a provider''s limit is per sender, whoever uses it.';

create table notify.recipients (
    tenant_id uuid not null references notify.tenants (id),
    id uuid not null default gen_random_uuid(),
    ref text not null,
    locale text,
    timezone text,
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now(),
    primary key (tenant_id, id),
    constraint recipients_ref_key unique (tenant_id, ref),
    constraint recipients_ref_format check (length(ref) between 1 and 200)
);
comment on table notify.recipients is 'A generic contact known by the caller''s own reference (ref), e.g. "runner-42". No domain data.';

create table notify.recipient_addresses (
    tenant_id uuid not null,
    recipient_id uuid not null,
    channel notify.channel not null,
    address text not null,
    updated_at timestamptz not null default now(),
    primary key (tenant_id, recipient_id, channel),
    foreign key (tenant_id, recipient_id) references notify.recipients (tenant_id, id) on delete cascade,
    constraint recipient_addresses_format check (notify._address_valid(channel, address))
);
comment on table notify.recipient_addresses is 'The address of a recipient on each channel: E.164 phone for whatsapp/sms, an e-mail address for email.';

create table notify.recipient_consents (
    tenant_id uuid not null,
    id bigint generated always as identity,
    recipient_id uuid not null,
    channel notify.channel not null,
    category text,
    status notify.consent_status not null,
    source text not null,
    evidence jsonb,
    recorded_at timestamptz not null default now(),
    recorded_by text,
    primary key (tenant_id, id),
    foreign key (tenant_id, recipient_id) references notify.recipients (tenant_id, id) on delete cascade
);
comment on table notify.recipient_consents is
    'Append-only consent ledger. The current state for (channel, category) is the latest entry whose category is that category or null (all categories).';
comment on column notify.recipient_consents.category is 'null: the entry applies to every category of the channel.';
comment on column notify.recipient_consents.evidence is 'What proves the entry: a form id, an inbound message, an IP address. Free-form JSON.';
create index recipient_consents_lookup on notify.recipient_consents (tenant_id, recipient_id, channel, id desc);

create table notify.templates (
    tenant_id uuid not null references notify.tenants (id),
    key text not null,
    channel notify.channel not null,
    locale text not null,
    content jsonb not null,
    required_variables text[] not null default '{}',
    version integer not null default 1,
    updated_at timestamptz not null default now(),
    primary key (tenant_id, key, channel, locale),
    constraint templates_key_format check (key ~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$')
);
comment on table notify.templates is
    'Message content per template key, channel and locale. Resolved at submit time with fallback es-ES -> es -> tenant default locale.';
comment on column notify.templates.content is
    'email: {subject, text, html?}; whatsapp: {name, language, parameters[]} or {text}; sms: {text}. {{var}} placeholders.';
comment on column notify.templates.required_variables is 'Derived from the content by notify._template_variables; checked at submit.';

create table notify.notification_requests (
    tenant_id uuid not null references notify.tenants (id),
    id uuid not null default gen_random_uuid(),
    idempotency_key text,
    fingerprint bytea not null,
    recipient_id uuid,
    recipient_count integer not null default 1,
    template_key text not null,
    variables jsonb not null default '{}',
    category text,
    channels notify.channel[] not null,
    send_at timestamptz,
    expires_at timestamptz,
    metadata jsonb not null default '{}',
    response jsonb,
    created_at timestamptz not null default now(),
    primary key (tenant_id, id),
    foreign key (tenant_id, recipient_id) references notify.recipients (tenant_id, id),
    constraint notification_requests_idempotency_key unique (tenant_id, idempotency_key),
    constraint notification_requests_key_format check (idempotency_key ~ '^[\x21-\x7e]{1,255}$')
);
comment on table notify.notification_requests is
    'One accepted notification intent. Its idempotency key lives as long as the row.';
comment on column notify.notification_requests.fingerprint is 'SHA-256 of the canonical (jsonb) request body; a reused key with another body is refused.';
comment on column notify.notification_requests.recipient_id is 'The one recipient of a single intent; null for a fan-out (see recipient_count and the deliveries).';
comment on column notify.notification_requests.response is 'The response given at submission, replayed verbatim for a repeated idempotency key.';

create table notify.notification_deliveries (
    tenant_id uuid not null,
    id uuid not null default gen_random_uuid(),
    request_id uuid not null,
    recipient_id uuid not null,
    channel notify.channel not null,
    address text,
    template_locale text,
    variables jsonb,
    status notify.delivery_status not null,
    reason text,
    attempt integer not null default 0,
    seq integer not null default 1,
    due_at timestamptz not null default now(),
    expires_at timestamptz,
    lease_expires_at timestamptz,
    provider text,
    provider_message_id text,
    last_error_code text,
    last_error_message text,
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now(),
    sent_at timestamptz,
    delivered_at timestamptz,
    read_at timestamptz,
    finished_at timestamptz,
    opened_at timestamptz,
    complained_at timestamptz,
    primary key (tenant_id, id),
    foreign key (tenant_id, request_id) references notify.notification_requests (tenant_id, id),
    foreign key (tenant_id, recipient_id) references notify.recipients (tenant_id, id),
    constraint notification_deliveries_one_per_channel unique (tenant_id, request_id, recipient_id, channel)
);
comment on table notify.notification_deliveries is
    'One message to one recipient on one channel: the work list of the worker and the unit of status.';
comment on column notify.notification_deliveries.variables is 'Per-recipient variables of a fan-out, merged over the request''s variables at send time.';
comment on column notify.notification_deliveries.attempt is 'Claims so far. The fencing token: worker writes match on (id, attempt).';
comment on column notify.notification_deliveries.seq is 'Incremented on every status change; delivery_events.seq follows it.';
comment on column notify.notification_deliveries.due_at is 'When the delivery may be claimed: send_at, now, or the time of the next retry.';
comment on column notify.notification_deliveries.opened_at is 'E-mail open reported by the provider: a flag, never a status (image proxies prefetch).';
comment on column notify.notification_deliveries.complained_at is 'Spam complaint reported by the provider; e-mail consent is revoked at the same time.';
comment on column notify.notification_deliveries.lease_expires_at is 'Set at claim; past it, maintenance treats the send as crashed (crash policy per channel).';
-- The queue: only rows waiting to be claimed are indexed, so the hot set stays small however much history there is.
create index notification_deliveries_due on notify.notification_deliveries (channel, due_at)
    where status in ('queued', 'scheduled');
create index notification_deliveries_leases on notify.notification_deliveries (lease_expires_at)
    where status = 'sending';
-- Global, not per tenant: provider webhooks name only the provider's message id.
create unique index notification_deliveries_provider_message on notify.notification_deliveries (provider, provider_message_id)
    where provider_message_id is not null;
-- (Reads by request use the unique key notification_deliveries_one_per_channel, which starts with tenant_id, request_id.)

create table notify.delivery_attempts (
    tenant_id uuid not null,
    delivery_id uuid not null,
    attempt integer not null,
    started_at timestamptz not null default now(),
    finished_at timestamptz,
    outcome text,
    provider text,
    provider_message_id text,
    error_code text,
    error_message text,
    primary key (tenant_id, delivery_id, attempt),
    -- No foreign key to notification_deliveries: rows are written only by claim_deliveries_v1 for the rows it
    -- claims, and a per-row RI check costs more than the rest of the insert (docs/architecture.md).
    constraint delivery_attempts_outcome check (outcome in ('sent', 'retry', 'failed', 'unknown', 'suppressed', 'bounced', 'lease_expired'))
);
comment on table notify.delivery_attempts is 'One row per claim of a delivery; outcome null while the provider call is in flight.';

create table notify.delivery_events (
    tenant_id uuid not null,
    id bigint generated always as identity,
    delivery_id uuid not null,
    seq integer not null,
    from_status notify.delivery_status,
    to_status notify.delivery_status not null,
    source text not null,
    reason text,
    occurred_at timestamptz not null default now(),
    primary key (tenant_id, id)
    -- No foreign key to notification_deliveries: rows are written only by the deliveries' own trigger
    -- (_200_record_event_*), and a per-row RI check would double the cost of every status change.
);
comment on table notify.delivery_events is 'Status history of each delivery, appended by trigger on every status change.';
comment on column notify.delivery_events.source is 'Who changed it: submit, claim, worker, webhook, cancel, maintenance (transaction setting notify.source).';
create index delivery_events_delivery on notify.delivery_events (tenant_id, delivery_id, seq);

create table notify.webhook_events (
    id bigint generated always as identity primary key,
    provider text not null,
    event_key text not null,
    received_at timestamptz not null default now(),
    payload jsonb not null,
    outcomes jsonb not null default '[]',
    -- Global, not per tenant: a webhook is deduplicated before the tenant is known (it is found from the events).
    constraint webhook_events_dedup unique (provider, event_key)
);
comment on table notify.webhook_events is
    'Every verified provider webhook, stored once per provider event key, with what each of its status events did.';
comment on column notify.webhook_events.outcomes is 'Per status event: applied, stale (lower rank or illegal), or unmatched (no such delivery).';

create table notify.mock_messages (
    tenant_id uuid not null,
    id bigint generated always as identity,
    delivery_id uuid not null,
    attempt integer not null,
    channel notify.channel not null,
    address text not null,
    provider_message_id text not null,
    rendered jsonb not null,
    sent_at timestamptz not null default now(),
    primary key (tenant_id, id)
);
comment on table notify.mock_messages is
    'What the built-in mock provider would have sent, so a developer can look. One row per provider call.';
create index mock_messages_delivery on notify.mock_messages (tenant_id, delivery_id);

-- ==== sql/030_helpers.sql ====
-- Private helpers that read tables: consent, template resolution, backoff, worker wake-ups.
-- Called only by notify_api functions, inside the caller's transaction.

create function notify._consent(p_tenant_id uuid, p_recipient_id uuid, p_channel notify.channel, p_category text)
    returns table (allowed boolean)
    language sql
    stable
    -- inlinable: no SET clause, and a set-returning SQL function is inlined into the caller's FROM (with its
    -- subqueries), so a 10,000-recipient fan-out checks consent in one plan (see docs/architecture.md)
as $$
    select coalesce(
        (select c.status = 'granted'
           from notify.recipient_consents c
          where c.tenant_id = p_tenant_id and c.recipient_id = p_recipient_id and c.channel = p_channel
            and (c.category is null or c.category = p_category)
          order by c.id desc
          limit 1),
        coalesce((select p.policy from notify.channel_policies p where p.tenant_id = p_tenant_id and p.channel = p_channel),
                 notify._default_policy(p_channel)) = 'opt_out')
$$;
comment on function notify._consent(uuid, uuid, notify.channel, text) is
    'Whether the recipient may be messaged on the channel for the category: the latest applicable ledger entry decides; without one, the tenant''s channel policy. Use in FROM (cross join lateral) for set-based checks.';

create function notify._consent_allows(p_tenant_id uuid, p_recipient_id uuid, p_channel notify.channel, p_category text)
    returns boolean
    language sql
    stable
    set search_path = ''
as $$
    select allowed from notify._consent(p_tenant_id, p_recipient_id, p_channel, p_category)
$$;
comment on function notify._consent_allows(uuid, uuid, notify.channel, text) is
    'notify._consent as a scalar, for single checks.';

create function notify._resolve_template(p_tenant_id uuid, p_key text, p_channel notify.channel, p_locale text)
    returns notify.templates
    language sql
    stable
    set search_path = ''
as $$
    select t.*
      from notify.templates t
      join notify.tenants n on n.id = t.tenant_id
     where t.tenant_id = p_tenant_id and t.key = p_key and t.channel = p_channel
       and t.locale in (p_locale, split_part(p_locale, '-', 1), n.default_locale)
     order by case t.locale when p_locale then 0 when split_part(p_locale, '-', 1) then 1 else 2 end
     limit 1
$$;
comment on function notify._resolve_template(uuid, text, notify.channel, text) is
    'The template for a key, channel and locale, falling back es-ES -> es -> the tenant''s default locale. Null when none exists.';

create function notify._backoff(p_tenant_id uuid, p_attempt integer, p_retry_after double precision default null)
    returns interval
    language sql
    volatile
    set search_path = ''
as $$
    select greatest(
        make_interval(secs => coalesce(p_retry_after, 0)),
        make_interval(secs => least(t.retry_max_ms, t.retry_base_ms * power(2, greatest(p_attempt - 1, 0))) / 1000.0
                               * (0.5 + random() / 2)))
      from notify.tenants t where t.id = p_tenant_id
$$;
comment on function notify._backoff(uuid, integer, double precision) is
    'Delay before retry after attempt n: exponential with jitter (factor 0.5-1), capped by the tenant''s maximum, never less than a provider''s Retry-After.';

create function notify._wake(p_channel notify.channel, p_at timestamptz default null)
    returns void
    language plpgsql
    volatile
    -- procrastinate's trigger functions name their tables unqualified, so they need public on the path.
    set search_path = pg_catalog, public
as $$
declare
    v_bucket timestamptz;
begin
    -- One pending wake-up per channel (and per second for future work), however many deliveries ask for it.
    -- ON CONFLICT on procrastinate's queueing-lock index instead of procrastinate_defer_jobs_v1 inside an
    -- exception block: same row, same NOTIFY trigger, but no subtransaction per submission.
    if p_at is null or p_at <= now() then
        insert into public.procrastinate_jobs (queue_name, task_name, lock, queueing_lock, args, scheduled_at)
        values ('dispatch', 'dispatch', null, 'dispatch:' || p_channel, jsonb_build_object('channel', p_channel), null)
        on conflict (queueing_lock) where status = 'todo' do nothing;
    else
        v_bucket := to_timestamp(ceil(extract(epoch from p_at)));
        insert into public.procrastinate_jobs (queue_name, task_name, lock, queueing_lock, args, scheduled_at)
        values ('dispatch', 'dispatch', null, 'dispatch:' || p_channel || ':' || extract(epoch from v_bucket)::bigint,
                jsonb_build_object('channel', p_channel), v_bucket)
        on conflict (queueing_lock) where status = 'todo' do nothing;
    end if;
end
$$;
comment on function notify._wake(notify.channel, timestamptz) is
    'Defers a procrastinate "dispatch" job for the channel, coalesced by queueing lock: now, or at the second p_at falls in. Commits (and NOTIFYs) with the caller''s transaction.';

create function notify._set_source(p_source text)
    returns void
    language plpgsql
    volatile
    set search_path = ''
as $$
begin
    perform set_config('notify.source', p_source, true);
end
$$;
comment on function notify._set_source(text) is 'Names who changes statuses in this transaction; the history trigger records it.';

create function notify._replay(p_tenant_id uuid, p_idempotency_key text, p_fingerprint bytea)
    returns jsonb
    language plpgsql
    stable
    set search_path = ''
as $$
declare
    v notify.notification_requests;
begin
    -- Called after the key's insert lost the race: the winner has committed, so its row is visible.
    select * into v from notify.notification_requests r where r.tenant_id = p_tenant_id and r.idempotency_key = p_idempotency_key;
    if v.fingerprint <> p_fingerprint then
        perform notify._raise('ND422', 'idempotency_key_reused', 'this Idempotency-Key was used with a different request body',
                              'Idempotency-Key');
    end if;
    return v.response;
end
$$;
comment on function notify._replay(uuid, text, bytea) is
    'The stored response for a repeated Idempotency-Key with the same body fingerprint; ND422 for another body.';

create function notify._recipient_id(p_tenant_id uuid, p_ref text)
    returns uuid
    language plpgsql
    stable
    set search_path = ''
as $$
declare
    v_id uuid;
begin
    select id into v_id from notify.recipients where tenant_id = p_tenant_id and ref = p_ref;
    if v_id is null then
        perform notify._raise('ND404', 'not_found', 'no such recipient', 'ref');
    end if;
    return v_id;
end
$$;
comment on function notify._recipient_id(uuid, text) is 'A recipient''s id by ref; ND404 if the tenant has none.';

-- ==== sql/040_triggers.sql ====
-- Triggers on notification_deliveries: the state machine guard and the status history.
-- Fire on every write, whoever makes it; named _NNN_ so alphabetical order is firing order.

create function notify.tg_notification_deliveries__check_transition()
    returns trigger
    language plpgsql
    set search_path = ''
as $$
begin
    if new.status is distinct from old.status then
        if not notify._transition_allowed(new.channel, old.status, new.status) then
            perform notify._raise('ND409', 'illegal_transition',
                format('delivery %s cannot go from %s to %s', new.id, old.status, new.status), 'status');
        end if;
        new.seq := old.seq + 1;
        new.updated_at := now();
        if new.status in ('read', 'bounced', 'suppressed', 'cancelled', 'expired', 'failed', 'delivered') then
            new.finished_at := coalesce(new.finished_at, now());
        end if;
        if new.status <> 'sending' then
            new.lease_expires_at := null;
        end if;
    end if;
    return new;
end
$$;
comment on function notify.tg_notification_deliveries__check_transition() is
    'Refuses illegal status changes (notify._transition_allowed) and keeps seq, updated_at, finished_at and the lease consistent.';

create trigger _100_check_transition
    before update of status on notify.notification_deliveries
    for each row execute function notify.tg_notification_deliveries__check_transition();

create function notify.tg_notification_deliveries__record_event()
    returns trigger
    language plpgsql
    set search_path = ''
as $$
begin
    if tg_op = 'INSERT' then
        insert into notify.delivery_events (tenant_id, delivery_id, seq, from_status, to_status, source, reason)
        select n.tenant_id, n.id, n.seq, null, n.status, coalesce(nullif(current_setting('notify.source', true), ''), 'submit'), n.reason
          from new_rows n;
    else
        insert into notify.delivery_events (tenant_id, delivery_id, seq, from_status, to_status, source, reason)
        select n.tenant_id, n.id, n.seq, o.status, n.status,
               coalesce(nullif(current_setting('notify.source', true), ''), 'sql'),
               coalesce(n.reason, n.last_error_code)
          from new_rows n
          join old_rows o on o.tenant_id = n.tenant_id and o.id = n.id
         where n.status is distinct from o.status;
    end if;
    return null;
end
$$;
comment on function notify.tg_notification_deliveries__record_event() is
    'Appends one delivery_events row per status change (statement-level, set-based, so a 10,000-row claim is one insert).';

create trigger _200_record_event_insert
    after insert on notify.notification_deliveries
    referencing new table as new_rows
    for each statement execute function notify.tg_notification_deliveries__record_event();

create trigger _200_record_event_update
    after update on notify.notification_deliveries
    referencing old table as old_rows new table as new_rows
    for each statement execute function notify.tg_notification_deliveries__record_event();

-- ==== sql/050_api_admin.sql ====
-- notify_api: tenants, API keys and channel policies.
-- Called by the `dispatcher` CLI, the HTTP auth middleware (authenticate_api_key_v1) and operators over SQL.

create function notify_api.create_tenant_v1(p_slug text, p_name text default null, p_default_locale text default 'en')
    returns jsonb
    language plpgsql
    security definer
    set search_path = ''
as $$
declare
    v notify.tenants;
begin
    if p_slug is null or p_slug !~ '^[a-z0-9][a-z0-9_-]{0,62}$' then
        perform notify._raise('ND422', 'invalid_slug', 'slug must be 1-63 lowercase letters, digits, - or _', 'slug');
    end if;
    insert into notify.tenants (slug, name, default_locale)
    values (p_slug, coalesce(p_name, p_slug), coalesce(p_default_locale, 'en'))
    on conflict (slug) do nothing
    returning * into v;
    if v.id is null then
        perform notify._raise('ND409', 'tenant_exists', format('tenant %s already exists', p_slug), 'slug');
    end if;
    return jsonb_build_object('id', v.id, 'slug', v.slug, 'name', v.name, 'default_locale', v.default_locale, 'created_at', v.created_at);
end
$$;
comment on function notify_api.create_tenant_v1(text, text, text) is 'Creates a tenant. 409 if the slug is taken.';

create function notify_api.get_tenant_v1(p_slug text)
    returns jsonb
    language sql
    stable
    security definer
    set search_path = ''
as $$
    select jsonb_build_object('id', t.id, 'slug', t.slug, 'name', t.name, 'default_locale', t.default_locale,
                              'retry_max_attempts', t.retry_max_attempts, 'retry_base_ms', t.retry_base_ms,
                              'retry_max_ms', t.retry_max_ms, 'created_at', t.created_at)
      from notify.tenants t where t.slug = p_slug
$$;
comment on function notify_api.get_tenant_v1(text) is 'A tenant by slug, or null.';

create function notify_api.set_retry_policy_v1(p_tenant_id uuid, p_max_attempts integer, p_base_ms integer, p_max_ms integer)
    returns void
    language plpgsql
    security definer
    set search_path = ''
as $$
begin
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
comment on function notify_api.set_retry_policy_v1(uuid, integer, integer, integer) is 'Sets how often and how fast transient failures are retried for a tenant.';

create function notify_api.create_api_key_v1(p_tenant_id uuid, p_name text, p_prefix text, p_key_hash bytea,
                                             p_scopes text[] default '{submit,read,admin}')
    returns jsonb
    language plpgsql
    security definer
    set search_path = ''
as $$
declare
    v notify.api_clients;
begin
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
comment on function notify_api.create_api_key_v1(uuid, text, text, bytea, text[]) is
    'Registers an API key by its SHA-256. The caller generates the key and shows it once; the database never sees it.';

create function notify_api.revoke_api_key_v1(p_tenant_id uuid, p_key_id uuid)
    returns jsonb
    language plpgsql
    security definer
    set search_path = ''
as $$
declare
    v notify.api_clients;
begin
    update notify.api_clients set revoked_at = coalesce(revoked_at, now())
     where tenant_id = p_tenant_id and id = p_key_id
    returning * into v;
    if v.id is null then
        perform notify._raise('ND404', 'not_found', 'no such API key', 'key_id');
    end if;
    return jsonb_build_object('id', v.id, 'revoked_at', v.revoked_at);
end
$$;
comment on function notify_api.revoke_api_key_v1(uuid, uuid) is 'Revokes a key at once; later requests with it get 401.';

create function notify_api.list_api_keys_v1(p_tenant_id uuid)
    returns jsonb
    language sql
    stable
    security definer
    set search_path = ''
as $$
    select coalesce(jsonb_agg(jsonb_build_object('id', c.id, 'name', c.name, 'prefix', c.prefix, 'scopes', to_jsonb(c.scopes),
                                                 'created_at', c.created_at, 'last_used_at', c.last_used_at,
                                                 'expires_at', c.expires_at, 'revoked_at', c.revoked_at) order by c.created_at), '[]')
      from notify.api_clients c where c.tenant_id = p_tenant_id
$$;
comment on function notify_api.list_api_keys_v1(uuid) is 'A tenant''s keys (prefix only, never a hash).';

create function notify_api.authenticate_api_key_v1(p_key_hash bytea)
    returns table (tenant_id uuid, api_key_id uuid)
    language plpgsql
    security definer
    set search_path = ''
as $$
declare
    v notify.api_clients;
begin
    select * into v from notify.api_clients c
     where c.key_hash = p_key_hash and c.revoked_at is null and (c.expires_at is null or c.expires_at > now());
    if v.id is null then
        return;
    end if;
    if v.last_used_at is null or v.last_used_at < now() - interval '1 minute' then
        update notify.api_clients c set last_used_at = now()
         where c.tenant_id = v.tenant_id and c.id = v.id;
    end if;
    tenant_id := v.tenant_id;
    api_key_id := v.id;
    return next;
end
$$;
comment on function notify_api.authenticate_api_key_v1(bytea) is
    'The tenant and key id of an unrevoked, unexpired key with this SHA-256, or no row. Exact match on a 256-bit digest: nothing to time.';

create function notify_api.authorize_v1(p_key_hash bytea, p_scope text)
    returns table (tenant_id uuid, api_key_id uuid)
    language plpgsql
    security definer
    set search_path = ''
as $$
declare
    v notify.api_clients;
    v_rate double precision;
begin
    select * into v from notify.api_clients c
     where c.key_hash = p_key_hash and c.revoked_at is null and (c.expires_at is null or c.expires_at > now());
    if v.id is null then
        return;   -- 401
    end if;
    if not p_scope = any (v.scopes) then
        perform notify._raise('ND403', 'insufficient_scope', format('this API key lacks the %s scope', p_scope), 'Authorization');
    end if;
    select t.api_rate_per_second into v_rate from notify.tenants t where t.id = v.tenant_id;
    if notify_api.take_tokens_v1('api:' || v.id, v_rate, 1) < 1 then
        perform notify._raise('ND429', 'rate_limited', format('more than %s requests per second with this key', v_rate), 'Authorization');
    end if;
    if v.last_used_at is null or v.last_used_at < now() - interval '1 minute' then
        update notify.api_clients c set last_used_at = now() where c.tenant_id = v.tenant_id and c.id = v.id;
    end if;
    tenant_id := v.tenant_id;
    api_key_id := v.id;
    return next;
end
$$;
comment on function notify_api.authorize_v1(bytea, text) is
    'Authenticates a key (no row: 401), checks it has the scope (ND403) and is within its tenant''s rate (ND429, a token bucket per key shared by every API process).';

create function notify_api.rotate_api_key_v1(p_tenant_id uuid, p_key_id uuid, p_prefix text, p_key_hash bytea, p_overlap_seconds integer default 86400)
    returns jsonb
    language plpgsql
    security definer
    set search_path = ''
as $$
declare
    v notify.api_clients;
    v_new jsonb;
begin
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
comment on function notify_api.rotate_api_key_v1(uuid, uuid, text, bytea, integer) is
    'Replaces a key with a new one of the same name and scopes; the old one keeps working for the overlap window, then stops.';

create function notify_api.set_api_rate_v1(p_tenant_id uuid, p_rate_per_second double precision)
    returns void
    language plpgsql
    security definer
    set search_path = ''
as $$
begin
    if p_rate_per_second is null or p_rate_per_second <= 0 then
        perform notify._raise('ND422', 'invalid_value', 'rate must be a positive number of requests per second', 'rate_per_second');
    end if;
    update notify.tenants set api_rate_per_second = p_rate_per_second where id = p_tenant_id;
end
$$;
comment on function notify_api.set_api_rate_v1(uuid, double precision) is 'Sets how many requests per second each of a tenant''s keys may make.';

create function notify_api.set_channel_policy_v1(p_tenant_id uuid, p_channel notify.channel, p_policy notify.consent_policy)
    returns jsonb
    language sql
    security definer
    set search_path = ''
as $$
    insert into notify.channel_policies (tenant_id, channel, policy) values (p_tenant_id, p_channel, p_policy)
    on conflict (tenant_id, channel) do update set policy = excluded.policy, updated_at = now()
    returning jsonb_build_object('channel', channel, 'policy', policy, 'updated_at', updated_at)
$$;
comment on function notify_api.set_channel_policy_v1(uuid, notify.channel, notify.consent_policy) is
    'Sets whether a channel is opt_in or opt_out for a tenant.';

create function notify_api.list_channel_policies_v1(p_tenant_id uuid)
    returns jsonb
    language sql
    stable
    security definer
    set search_path = ''
as $$
    select jsonb_agg(jsonb_build_object('channel', c, 'policy', coalesce(p.policy, notify._default_policy(c)),
                                        'default', p.policy is null) order by c)
      from unnest(enum_range(null::notify.channel)) c
      left join notify.channel_policies p on p.tenant_id = p_tenant_id and p.channel = c
$$;
comment on function notify_api.list_channel_policies_v1(uuid) is 'The consent policy in force for each channel.';

-- ==== sql/060_api_recipients.sql ====
-- notify_api: recipients, the consent ledger and templates.
-- Called by the /internal/recipients and /internal/templates routes and by trusted SQL clients.

create function notify._upsert_recipient(p_tenant_id uuid, p_ref text, p_body jsonb, p_path text)
    returns notify.recipients
    language plpgsql
    set search_path = ''
as $$
declare
    v notify.recipients;
    v_locale text;
    v_timezone text;
    v_addresses jsonb;
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
    if v_timezone is not null and not exists (select from pg_catalog.pg_timezone_names where name = v_timezone) then
        perform notify._raise('ND400', 'invalid_timezone', format('timezone %s is not an IANA time zone', v_timezone),
                              ltrim(coalesce(v_prefix, '') || '.timezone', '.'));
    end if;

    insert into notify.recipients as r (tenant_id, ref, locale, timezone)
    values (p_tenant_id, p_ref, v_locale, v_timezone)
    on conflict (tenant_id, ref) do update
        set locale = coalesce(excluded.locale, r.locale),
            timezone = coalesce(excluded.timezone, r.timezone),
            updated_at = case when (excluded.locale, excluded.timezone) is distinct from (r.locale, r.timezone)
                              then now() else r.updated_at end
    returning * into v;

    v_addresses := p_body -> 'addresses';
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
            else
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
    set search_path = ''
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
    set search_path = ''
as $$
declare
    v notify.recipients;
begin
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
    set search_path = ''
as $$
begin
    return notify._recipient_json(p_tenant_id, notify._recipient_id(p_tenant_id, p_ref));
end
$$;
comment on function notify_api.get_recipient_v1(uuid, text) is 'A recipient by ref; 404 if it does not exist for this tenant.';

create function notify_api.record_consent_v1(p_tenant_id uuid, p_ref text, p_body jsonb, p_recorded_by text default null)
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
    set search_path = ''
as $$
declare
    v_id uuid := notify._recipient_id(p_tenant_id, p_ref);
begin
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
comment on function notify_api.list_consents_v1(uuid, text) is
    'The consent in force per channel (for messages without a category) and the full ledger of a recipient.';

create function notify_api.upsert_template_v1(p_tenant_id uuid, p_key text, p_body jsonb)
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
comment on function notify_api.upsert_template_v1(uuid, text, jsonb) is
    'Sets the content of a template key for one locale: {locale?, channels: {email: {subject, text, html?}, whatsapp: {name, language, parameters[], header_parameters[], buttons[{sub_type, index, parameter}]} | {text}, sms: {text}}}.';

create function notify_api.list_templates_v1(p_tenant_id uuid, p_key text default null)
    returns jsonb
    language sql
    stable
    security definer
    set search_path = ''
as $$
    select coalesce(jsonb_agg(jsonb_build_object('key', t.key, 'channel', t.channel, 'locale', t.locale, 'content', t.content,
                                                 'required_variables', to_jsonb(t.required_variables), 'version', t.version,
                                                 'updated_at', t.updated_at) order by t.key, t.channel, t.locale), '[]')
      from notify.templates t
     where t.tenant_id = p_tenant_id and (p_key is null or t.key = p_key)
$$;
comment on function notify_api.list_templates_v1(uuid, text) is 'A tenant''s templates, all or one key, with the variables each needs.';

-- ==== sql/070_api_notifications.sql ====
-- notify_api: submit, read and cancel notifications.
-- Called by POST/GET /internal/notifications and by trusted SQL clients inside their own transactions.

create function notify_api.submit_notification_v1(p_tenant_id uuid, p_request jsonb, p_idempotency_key text default null)
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
comment on function notify_api.submit_notification_v1(uuid, jsonb, text) is
    'Accepts a notification intent (the POST /internal/notifications body) in one transaction: idempotency, recipient upsert, template and variable checks, consent, one delivery per channel (per recipient for a fan-out), worker wake-up. Returns the response and whether it is a replay.';

create function notify._delivery_json(d notify.notification_deliveries, p_detail boolean)
    returns jsonb
    language sql
    stable
    set search_path = ''
as $$
    select jsonb_strip_nulls(jsonb_build_object(
        'id', d.id, 'channel', d.channel, 'status', d.status, 'reason', d.reason, 'attempts', d.attempt,
        'provider', d.provider, 'provider_message_id', d.provider_message_id,
        'error', case when d.last_error_code is not null or d.last_error_message is not null
                      then jsonb_build_object('code', d.last_error_code, 'message', d.last_error_message) end,
        'due_at', d.due_at, 'expires_at', d.expires_at, 'created_at', d.created_at, 'updated_at', d.updated_at,
        'sent_at', d.sent_at, 'delivered_at', d.delivered_at, 'read_at', d.read_at, 'finished_at', d.finished_at))
    || case when p_detail then jsonb_build_object(
        'events', coalesce((select jsonb_agg(jsonb_strip_nulls(jsonb_build_object(
                        'seq', e.seq, 'from', e.from_status, 'to', e.to_status, 'source', e.source, 'reason', e.reason,
                        'at', e.occurred_at)) order by e.seq, e.id)
                    from notify.delivery_events e where e.tenant_id = d.tenant_id and e.delivery_id = d.id), '[]'),
        'attempt_history', coalesce((select jsonb_agg(jsonb_strip_nulls(jsonb_build_object(
                        'attempt', a.attempt, 'started_at', a.started_at, 'finished_at', a.finished_at, 'outcome', a.outcome,
                        'provider', a.provider, 'provider_message_id', a.provider_message_id,
                        'error_code', a.error_code, 'error_message', a.error_message)) order by a.attempt)
                    from notify.delivery_attempts a where a.tenant_id = d.tenant_id and a.delivery_id = d.id), '[]'))
       else '{}' end
$$;
comment on function notify._delivery_json(notify.notification_deliveries, boolean) is 'The public JSON form of a delivery, with its history when p_detail.';

create function notify_api.get_notification_v1(p_tenant_id uuid, p_id uuid)
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
comment on function notify_api.get_notification_v1(uuid, uuid) is
    'A notification with every delivery''s status, attempts, provider message id, timestamps and event history. 404 for another tenant''s id.';

create function notify_api.cancel_notification_v1(p_tenant_id uuid, p_id uuid)
    returns jsonb
    language plpgsql
    security definer
    set search_path = ''
as $$
declare
    v_result jsonb;
begin
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
comment on function notify_api.cancel_notification_v1(uuid, uuid) is
    'Cancels the deliveries of a notification that no worker has claimed yet; says per delivery whether it was cancelled and, if not, why.';

-- ==== sql/072_api_fanout.sql ====
-- notify_api: volume — one intent to many recipients (fan-out) and many intents in one call (batch).
-- Called by POST /internal/notifications (with "recipients") and POST /internal/notifications/batch, and by SQL clients.

create function notify._submit_fanout(
    p_tenant_id uuid, p_request jsonb, p_idempotency_key text, p_channels notify.channel[], p_template text,
    p_variables jsonb, p_category text, p_send_at timestamptz, p_expires_at timestamptz, p_metadata jsonb)
    returns table (response jsonb, replayed boolean)
    language plpgsql
    set search_path = ''
as $$
declare
    v_items jsonb := p_request -> 'recipients';
    v_count integer;
    v_bad record;
    v_request_id uuid;
    v_default_locale text;
    v_now timestamptz := now();
    v_response jsonb;
    v_channel_names text[] := enum_range(null::notify.channel)::text[];
begin
    if jsonb_typeof(v_items) is distinct from 'array' or jsonb_array_length(v_items) not between 1 and 10000 then
        perform notify._raise('ND400', 'invalid_length', 'recipients must be a list of 1 to 10000 recipients', 'recipients');
    end if;
    v_count := jsonb_array_length(v_items);

    -- 1. Every recipient checked set-based; the first offender is named.
    select i - 1 as idx, r, k into v_bad
      from jsonb_array_elements(v_items) with ordinality e(r, i)
      left join lateral (select k from jsonb_object_keys(case when jsonb_typeof(r) = 'object' then r else '{}' end) k
                          where k not in ('ref', 'addresses', 'locale', 'timezone', 'variables') limit 1) x on true
     where jsonb_typeof(r) <> 'object' or x.k is not null
        or jsonb_typeof(r -> 'ref') is distinct from 'string' or length(r ->> 'ref') not between 1 and 200
        or (r ? 'addresses' and jsonb_typeof(r -> 'addresses') not in ('object', 'null'))
        or (r ? 'variables' and jsonb_typeof(r -> 'variables') not in ('object', 'null'))
        or (jsonb_typeof(r -> 'locale') = 'string' and r ->> 'locale' !~ '^[A-Za-z]{2,3}(-[A-Za-z0-9]{2,8})*$')
        or (r ? 'locale' and jsonb_typeof(r -> 'locale') not in ('string', 'null'))
        or (r ? 'timezone' and jsonb_typeof(r -> 'timezone') not in ('string', 'null'))
     order by i limit 1;
    if found then
        perform notify._raise('ND400', case when v_bad.k is not null then 'unknown_field' else 'invalid_value' end,
            format('recipients[%s] is not a valid recipient (ref 1-200 characters; addresses, locale, timezone, variables)', v_bad.idx)
            || coalesce(': unknown field ' || v_bad.k, ''),
            format('recipients[%s]', v_bad.idx) || coalesce('.' || v_bad.k, ''));
    end if;
    select i - 1 as idx, a.key into v_bad
      from jsonb_array_elements(v_items) with ordinality e(r, i)
     cross join lateral jsonb_each(case when jsonb_typeof(r -> 'addresses') = 'object' then r -> 'addresses' else '{}' end) a
     where a.key <> all (v_channel_names)
        or (jsonb_typeof(a.value) <> 'null'
            and (jsonb_typeof(a.value) <> 'string' or not notify._address_valid(a.key::notify.channel, a.value #>> '{}')))
     order by i limit 1;
    if found then
        perform notify._raise('ND400', 'invalid_address', format('recipients[%s].addresses.%s is not a valid %s address', v_bad.idx, v_bad.key, v_bad.key),
                              format('recipients[%s].addresses.%s', v_bad.idx, v_bad.key));
    end if;
    select i - 1 as idx into v_bad
      from jsonb_array_elements(v_items) with ordinality e(r, i)
     where jsonb_typeof(r -> 'timezone') = 'string'
       and not exists (select from pg_catalog.pg_timezone_names z where z.name = r ->> 'timezone')
     order by i limit 1;
    if found then
        perform notify._raise('ND400', 'invalid_timezone', format('recipients[%s].timezone is not an IANA time zone', v_bad.idx),
                              format('recipients[%s].timezone', v_bad.idx));
    end if;
    select min(i) - 1 as idx, r ->> 'ref' as ref into v_bad
      from jsonb_array_elements(v_items) with ordinality e(r, i)
     group by r ->> 'ref' having count(*) > 1 order by min(i) limit 1;
    if found then
        perform notify._raise('ND400', 'duplicate_recipient', format('recipient %s appears more than once', v_bad.ref), 'recipients');
    end if;

    -- 2. Claim the idempotency key before the heavy work: a replay of a 10,000-recipient intent is one lookup.
    insert into notify.notification_requests
        (tenant_id, idempotency_key, fingerprint, recipient_id, recipient_count, template_key, variables, category, channels,
         send_at, expires_at, metadata)
    values (p_tenant_id, p_idempotency_key, sha256(convert_to(p_request::text, 'UTF8')), null, v_count, p_template, p_variables,
            p_category, p_channels, p_send_at, p_expires_at, p_metadata)
    on conflict (tenant_id, idempotency_key) do nothing
    returning id into v_request_id;
    if v_request_id is null then
        response := notify._replay(p_tenant_id, p_idempotency_key, sha256(convert_to(p_request::text, 'UTF8')));
        replayed := true;
        return next;
        return;
    end if;

    -- 3. Recipients and their addresses, set-based. The input goes into an analyzed temporary table first, so
    --    the planner knows it has v_count rows (a function scan is estimated at 100) and joins accordingly.
    create temporary table if not exists _fanout_input (
        i integer, ref text, addresses jsonb, locale text, timezone text, variables jsonb, recipient_id uuid, effective_locale text
    ) on commit drop;
    truncate _fanout_input;
    insert into _fanout_input (i, ref, addresses, locale, timezone, variables)
    select i, r ->> 'ref', case when jsonb_typeof(r -> 'addresses') = 'object' then r -> 'addresses' end, r ->> 'locale',
           r ->> 'timezone', case when jsonb_typeof(r -> 'variables') = 'object' then r -> 'variables' end
      from jsonb_array_elements(v_items) with ordinality e(r, i);
    analyze _fanout_input;

    insert into notify.recipients as x (tenant_id, ref, locale, timezone)
    select p_tenant_id, f.ref, f.locale, f.timezone from _fanout_input f
    on conflict (tenant_id, ref) do update
        set locale = coalesce(excluded.locale, x.locale), timezone = coalesce(excluded.timezone, x.timezone),
            updated_at = now()
        where (excluded.locale is not null and excluded.locale is distinct from x.locale)
           or (excluded.timezone is not null and excluded.timezone is distinct from x.timezone);
    v_default_locale := (select default_locale from notify.tenants where id = p_tenant_id);
    update _fanout_input f set recipient_id = rec.id, effective_locale = coalesce(rec.locale, v_default_locale)
      from notify.recipients rec
     where rec.tenant_id = p_tenant_id and rec.ref = f.ref;
    analyze _fanout_input;

    insert into notify.recipient_addresses as a (tenant_id, recipient_id, channel, address)
    select p_tenant_id, f.recipient_id, kv.key::notify.channel, kv.value #>> '{}'
      from _fanout_input f cross join lateral jsonb_each(coalesce(f.addresses, '{}')) kv
     where jsonb_typeof(kv.value) = 'string'
    on conflict (tenant_id, recipient_id, channel) do update
        set address = excluded.address, updated_at = now()
        where a.address is distinct from excluded.address;
    delete from notify.recipient_addresses a
     using _fanout_input f, lateral jsonb_each(coalesce(f.addresses, '{}')) kv
     where jsonb_typeof(kv.value) = 'null'
       and a.tenant_id = p_tenant_id and a.recipient_id = f.recipient_id and a.channel = kv.key::notify.channel;

    -- 4. Templates per channel and distinct locale (resolved once each), and the variables every recipient needs.
    create temporary table if not exists _fanout_templates (
        channel notify.channel, locale text, template_locale text, required_variables text[]) on commit drop;
    truncate _fanout_templates;
    insert into _fanout_templates
    select c.channel, l.locale, t.locale, t.required_variables
      from unnest(p_channels) c(channel)
     cross join (select distinct f.effective_locale as locale from _fanout_input f) l
     cross join lateral notify._resolve_template(p_tenant_id, p_template, c.channel, l.locale) t;
    select channel, locale into v_bad from _fanout_templates where template_locale is null limit 1;
    if found then
        perform notify._raise('ND422', 'template_not_found',
            format('template %s has no %s content for locale %s or its fallbacks', p_template, v_bad.channel, v_bad.locale), 'template');
    end if;
    select f.i - 1 as idx, need.v into v_bad
      from _fanout_input f
      join _fanout_templates t on t.locale = f.effective_locale
     cross join lateral unnest(t.required_variables) need(v)
     where not (p_variables || coalesce(f.variables, '{}')) ? need.v
     order by f.i limit 1;
    if found then
        perform notify._raise('ND422', 'missing_variables', format('template %s needs variable %s for recipients[%s]', p_template, v_bad.v, v_bad.idx),
                              format('recipients[%s].variables.%s', v_bad.idx, v_bad.v));
    end if;

    -- 5. One delivery per recipient and channel, consent checked set-based.
    perform notify._set_source('submit');
    with rows as materialized (
        select f.recipient_id, c.channel, a.address, t.template_locale, f.variables, consent.allowed, f.i, c.ord
          from _fanout_input f
         cross join unnest(p_channels) with ordinality c(channel, ord)
          join _fanout_templates t on t.channel = c.channel and t.locale = f.effective_locale
          left join notify.recipient_addresses a on a.tenant_id = p_tenant_id and a.recipient_id = f.recipient_id and a.channel = c.channel
         cross join lateral notify._consent(p_tenant_id, f.recipient_id, c.channel, p_category) consent
    ), inserted as (
        insert into notify.notification_deliveries
            (tenant_id, request_id, recipient_id, channel, address, template_locale, variables, status, reason, due_at, expires_at)
        select p_tenant_id, v_request_id, recipient_id, channel, address, template_locale, variables,
               case when address is null or not allowed then 'suppressed'
                    when p_send_at > v_now then 'scheduled' else 'queued' end::notify.delivery_status,
               case when address is null then 'no_address' when not allowed then 'no_consent' end,
               greatest(coalesce(p_send_at, v_now), v_now), p_expires_at
          from rows order by i, ord
        returning channel, status, reason
    ), counted as (
        select channel, status, reason, count(*) as n from inserted group by channel, status, reason
    )
    select jsonb_build_object(
               'id', v_request_id, 'created_at', v_now, 'recipient_count', v_count,
               'status', case when bool_and(status = 'suppressed') then 'suppressed' else 'accepted' end,
               'summary', jsonb_agg(jsonb_strip_nulls(jsonb_build_object('channel', channel, 'status', status, 'reason', reason, 'count', n))
                                    order by channel, status, reason))
      into v_response
      from counted;

    update notify.notification_requests r set response = v_response
     where r.tenant_id = p_tenant_id and r.id = v_request_id;
    perform notify._wake(c, case when p_send_at > v_now then p_send_at end)
       from unnest(p_channels) c
      where exists (select from jsonb_array_elements(v_response -> 'summary') s
                     where s ->> 'channel' = c::text and s ->> 'status' in ('queued', 'scheduled'));
    response := v_response;
    replayed := false;
    return next;
end
$$;
comment on function notify._submit_fanout(uuid, jsonb, text, notify.channel[], text, jsonb, text, timestamptz, timestamptz, jsonb) is
    'The fan-out half of submit_notification_v1: up to 10,000 recipients, each with optional per-recipient variables; recipients, addresses, template checks, consent and deliveries are set-based statements, not per-row round trips. The response summarizes deliveries by channel, status and reason.';

create function notify_api.submit_notifications_v1(p_tenant_id uuid, p_items jsonb)
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
comment on function notify_api.submit_notifications_v1(uuid, jsonb) is
    'Batch: up to 1,000 independent intents [{idempotency_key?, notification}] in one call. Each item succeeds or fails alone (its own subtransaction); the answer reports each item''s outcome in order: accepted, replayed, or its error.';

-- ==== sql/075_api_providers.sql ====
-- notify_api: per-tenant provider configuration, shared send pacing, one-click unsubscribe.
-- Called by PUT/GET /internal/channels/*/provider, the `dispatcher provider` CLI, the worker and /public/unsubscribe.

create function notify._provider_defaults(p_provider text)
    returns jsonb
    language sql
    immutable
    set search_path = ''
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
    set search_path = ''
as $$
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
    set search_path = ''
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
    set search_path = ''
as $$
declare
    v record;
begin
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

-- ==== sql/080_api_worker.sql ====
-- notify_api: the worker's side — claim due deliveries, record provider outcomes, periodic maintenance.
-- Called by runner/ (procrastinate tasks) in batches; one call per batch, never per delivery.

create function notify_api.claim_deliveries_v1(p_channel notify.channel, p_limit integer, p_lease_seconds integer default 60)
    returns setof notify.claimed_delivery
    language plpgsql
    security definer
    set search_path = ''
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
                then jsonb_build_object('settings', cp.settings, 'secrets', cp.secrets, 'updated_at', cp.updated_at) end
      from updated u
      join notify.notification_requests r on r.tenant_id = u.tenant_id and r.id = u.request_id
      left join notify.templates t on t.tenant_id = u.tenant_id and t.key = r.template_key
                                  and t.channel = u.channel and t.locale = u.template_locale
      left join notify.channel_providers cp on cp.tenant_id = u.tenant_id and cp.channel = u.channel
     where u.status = 'sending';
end
$$;
comment on function notify_api.claim_deliveries_v1(notify.channel, integer, integer) is
    'Claims up to p_limit due deliveries of a channel (FOR UPDATE SKIP LOCKED): expired ones become expired, revoked ones suppressed, WhatsApp text outside the 24-hour window failed, the rest sending with attempt+1 and a lease. Returns what the worker needs to send them, with the tenant''s provider.';

create function notify_api.record_attempts_v1(p_results notify.attempt_result[])
    returns table (delivery_id uuid, status notify.delivery_status, applied boolean)
    language plpgsql
    security definer
    set search_path = ''
as $$
begin
    if exists (select from unnest(p_results) r where r.outcome not in ('sent', 'retry', 'failed', 'unknown', 'suppressed', 'bounced')) then
        perform notify._raise('ND400', 'invalid_value', 'outcome must be sent, retry, failed, unknown, suppressed or bounced', 'outcome');
    end if;
    perform notify._set_source('worker');

    -- The attempt rows first (fenced the same way), so the history is complete even when a webhook overtook us.
    update notify.delivery_attempts a
       set finished_at = now(), outcome = r.outcome, provider = r.provider, provider_message_id = r.provider_message_id,
           error_code = r.error_code, error_message = left(r.error_message, 1000)
      from unnest(p_results) r
     where a.tenant_id = r.tenant_id and a.delivery_id = r.delivery_id and a.attempt = r.attempt and a.finished_at is null;

    return query
    with input as (
        select r.*, t.retry_max_attempts
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
                   when i.outcome = 'failed' and d.status in ('sending', 'unknown') then 'provider_rejected'
                   when i.outcome = 'unknown' and d.status = 'sending' then 'outcome_unknown'
                   when i.outcome = 'suppressed' and d.status = 'sending' then 'provider_opt_out'
                   when i.outcome = 'bounced' and d.status in ('sending', 'unknown') then 'rejected_by_recipient_server'
                   else d.reason end,
               due_at = case when i.outcome = 'retry' and d.status = 'sending' and d.attempt < i.retry_max_attempts
                             then now() + notify._backoff(i.tenant_id, d.attempt, i.retry_after_seconds)
                             else d.due_at end,
               provider = coalesce(i.provider, d.provider),
               provider_message_id = coalesce(d.provider_message_id, i.provider_message_id),
               sent_at = case when i.outcome = 'sent' then coalesce(d.sent_at, now()) else d.sent_at end,
               last_error_code = case when i.outcome = 'sent' then d.last_error_code else coalesce(i.error_code, d.last_error_code) end,
               last_error_message = case when i.outcome = 'sent' then d.last_error_message
                                         else coalesce(left(i.error_message, 1000), d.last_error_message) end
          from input i
         where d.tenant_id = i.tenant_id and d.id = i.delivery_id and d.attempt = i.attempt
        returning d.id, d.channel, d.status, d.due_at
    ), woken as (
        select notify._wake(c.channel, min(c.due_at)) from changed c where c.status = 'queued' group by c.channel
    )
    select i.delivery_id, c.status, c.id is not null
      from input i
      left join changed c on c.id = i.delivery_id
      cross join (select count(*) from woken) w;
end
$$;
comment on function notify_api.record_attempts_v1(notify.attempt_result[]) is
    'Writes a batch of provider outcomes, each fenced by its attempt number (a stale worker changes nothing): sent, retry (backoff with jitter, or failed when attempts are used up), failed, unknown, suppressed, bounced. Wakes the worker for retries.';

create function notify_api.run_maintenance_v1()
    returns jsonb
    language plpgsql
    security definer
    set search_path = ''
as $$
declare
    v_requeued integer;
    v_unknown integer;
    v_expired integer;
    v_woken text[];
begin
    perform notify._set_source('maintenance');

    -- Crashed sends (lease past due): e-mail may be sent twice, so it goes back to the queue;
    -- WhatsApp and SMS must not be, so they become unknown until a provider report says what happened.
    with stale as (
        select d.tenant_id, d.id, d.attempt, d.channel
          from notify.notification_deliveries d
         where d.status = 'sending' and d.lease_expires_at < now()
           for update skip locked
    ), attempts as (
        update notify.delivery_attempts a set finished_at = now(), outcome = 'lease_expired'
          from stale s
         where a.tenant_id = s.tenant_id and a.delivery_id = s.id and a.attempt = s.attempt and a.finished_at is null
    ), moved as (
        update notify.notification_deliveries d
           set status = case when s.channel = 'email' then 'queued' else 'unknown' end::notify.delivery_status,
               reason = case when s.channel = 'email' then d.reason else 'lease_expired' end,
               due_at = case when s.channel = 'email' then now() else d.due_at end
          from stale s
         where d.tenant_id = s.tenant_id and d.id = s.id
        returning d.status
    )
    select count(*) filter (where status = 'queued'), count(*) filter (where status = 'unknown')
      into v_requeued, v_unknown from moved;

    -- Deadlines: anything still waiting past its expires_at is never sent.
    with gone as (
        update notify.notification_deliveries d set status = 'expired', reason = 'expired_before_send'
         where d.status in ('queued', 'scheduled') and d.expires_at <= now()
        returning 1
    )
    select count(*) into v_expired from gone;

    -- Safety net: a wake-up for every channel with due work (coalesced, so cheap when one is pending).
    select array_agg(c::text) into v_woken
      from unnest(enum_range(null::notify.channel)) c
     where exists (select from notify.notification_deliveries d
                    where d.channel = c and d.status in ('queued', 'scheduled') and d.due_at <= now());
    perform notify._wake(c::notify.channel) from unnest(v_woken) c;

    return jsonb_build_object('requeued', v_requeued, 'unknown', v_unknown, 'expired', v_expired,
                              'woken', coalesce(to_jsonb(v_woken), '[]'));
end
$$;
comment on function notify_api.run_maintenance_v1() is
    'Periodic upkeep: expired leases (email -> queued, whatsapp/sms -> unknown), deliveries past expires_at -> expired, a wake-up for every channel with due work.';

-- ==== sql/085_api_status.sql ====
-- notify_api: queue health for operators — backlog, lag, stuck leases, unknown outcomes.
-- Called by `dispatcher status` and the metrics endpoint; reads only the small partial indexes' hot set.

create function notify_api.queue_health_v1()
    returns table (tenant text, channel notify.channel, due bigint, scheduled bigint, oldest_due_seconds double precision,
                   sending bigint, leases_past_due bigint, unknown bigint)
    language sql
    stable
    security definer
    set search_path = ''
as $$
    with waiting as (
        select d.tenant_id, d.channel,
               count(*) filter (where d.due_at <= now()) as due,
               count(*) filter (where d.due_at > now()) as scheduled,
               extract(epoch from now() - min(d.due_at) filter (where d.due_at <= now())) as oldest_due_seconds
          from notify.notification_deliveries d
         where d.status in ('queued', 'scheduled')
         group by 1, 2
    ), in_flight as (
        select d.tenant_id, d.channel, count(*) as sending, count(*) filter (where d.lease_expires_at < now()) as leases_past_due
          from notify.notification_deliveries d where d.status = 'sending' group by 1, 2
    ), unresolved as (
        select d.tenant_id, d.channel, count(*) as unknown
          from notify.notification_deliveries d where d.status = 'unknown' group by 1, 2
    ), keys as (
        select tenant_id, channel from waiting union select tenant_id, channel from in_flight
        union select tenant_id, channel from unresolved
    )
    select t.slug, k.channel, coalesce(w.due, 0), coalesce(w.scheduled, 0), coalesce(w.oldest_due_seconds, 0),
           coalesce(f.sending, 0), coalesce(f.leases_past_due, 0), coalesce(u.unknown, 0)
      from keys k
      join notify.tenants t on t.id = k.tenant_id
      left join waiting w on w.tenant_id = k.tenant_id and w.channel = k.channel
      left join in_flight f on f.tenant_id = k.tenant_id and f.channel = k.channel
      left join unresolved u on u.tenant_id = k.tenant_id and u.channel = k.channel
     order by 1, 2
$$;
comment on function notify_api.queue_health_v1() is
    'Per tenant and channel: deliveries due now, scheduled for later, age of the oldest due one, in flight, leases past due (crashed sends), and unknown outcomes. Only tenants and channels with any of these appear.';

-- ==== sql/090_api_webhooks.sql ====
-- notify_api: provider webhook ingestion — store once, apply status reports by rank.
-- Called by POST /public/webhooks/{provider} after the signature over the raw body was verified.

create function notify._provider_family(p_webhook_provider text)
    returns text[]
    language sql
    immutable
    -- inlinable: no SET clause (see docs/architecture.md, "Hot helpers are inlined")
as $$
    -- E-mail service providers report on messages we handed to them over SMTP.
    select case when p_webhook_provider in ('sendgrid', 'mailgun') then array[p_webhook_provider, 'smtp']
                else array[p_webhook_provider] end
$$;
comment on function notify._provider_family(text) is 'The sending providers whose messages a webhook provider reports on.';

create function notify._apply_provider_status(p_provider text, e notify.status_event)
    returns text
    language plpgsql
    set search_path = ''
as $$
declare
    d notify.notification_deliveries;
    v_at timestamptz := coalesce(e.occurred_at, now());
begin
    if e.tenant_id is not null and e.delivery_id is not null then
        select * into d from notify.notification_deliveries x
         where x.tenant_id = e.tenant_id and x.id = e.delivery_id and (x.provider is null or x.provider = any (notify._provider_family(p_provider)))
           for update;
    end if;
    if d.id is null and e.provider_message_id is not null then
        select * into d from notify.notification_deliveries x
         where x.provider = any (notify._provider_family(p_provider)) and x.provider_message_id = e.provider_message_id
           for update;
    end if;
    if d.id is null then
        return 'unmatched';
    end if;

    if e.status is null then
        -- An engagement flag: never a status of its own, but it proves delivery, and a complaint is an opt-out.
        if e.flag is null or e.flag not in ('opened', 'clicked', 'complained', 'unsubscribed') then
            return 'ignored';
        end if;
        update notify.notification_deliveries x
           set opened_at = case when e.flag in ('opened', 'clicked') then least(x.opened_at, v_at) else x.opened_at end,
               complained_at = case when e.flag = 'complained' then least(x.complained_at, v_at) else x.complained_at end,
               status = case when notify._rank(x.channel, 'delivered') > notify._rank(x.channel, x.status)
                              and notify._transition_allowed(x.channel, x.status, 'delivered') then 'delivered' else x.status end,
               delivered_at = case when x.status in ('sending', 'sent', 'unknown') then least(x.delivered_at, v_at) else x.delivered_at end
         where x.tenant_id = d.tenant_id and x.id = d.id;
        if e.flag in ('complained', 'unsubscribed') and notify._consent_allows(d.tenant_id, d.recipient_id, d.channel, null) then
            insert into notify.recipient_consents (tenant_id, recipient_id, channel, status, source, evidence, recorded_by)
            values (d.tenant_id, d.recipient_id, d.channel, 'revoked', case e.flag when 'complained' then 'complaint' else 'provider_unsubscribe' end,
                    jsonb_build_object('delivery_id', d.id, 'provider', p_provider, 'reported_at', v_at), 'dispatcher');
        end if;
        return 'flagged';
    end if;

    if notify._rank(d.channel, e.status) > notify._rank(d.channel, d.status)
       and notify._transition_allowed(d.channel, d.status, e.status) then
        update notify.notification_deliveries x
           set status = e.status,
               reason = case when e.status in ('failed', 'bounced', 'suppressed') then 'provider_reported' else x.reason end,
               provider = coalesce(x.provider, p_provider),
               provider_message_id = coalesce(x.provider_message_id, e.provider_message_id),
               sent_at = case when e.status in ('sent', 'delivered', 'read') then least(x.sent_at, v_at) else x.sent_at end,
               delivered_at = case when e.status in ('delivered', 'read') then least(x.delivered_at, v_at) else x.delivered_at end,
               read_at = case when e.status = 'read' then least(x.read_at, v_at) else x.read_at end,
               last_error_code = case when e.status in ('failed', 'bounced') then coalesce(e.error_code, x.last_error_code) else x.last_error_code end,
               last_error_message = case when e.status in ('failed', 'bounced') then coalesce(left(e.error_message, 1000), x.last_error_message)
                                         else x.last_error_message end
         where x.tenant_id = d.tenant_id and x.id = d.id;
        return 'applied';
    end if;
    -- A late or lower-ranked report changes no status, but still fills the time it happened.
    update notify.notification_deliveries x
       set sent_at = case when e.status in ('sent', 'delivered', 'read') then least(x.sent_at, v_at) else x.sent_at end,
           delivered_at = case when e.status in ('delivered', 'read') and x.status in ('delivered', 'read')
                               then least(x.delivered_at, v_at) else x.delivered_at end
     where x.tenant_id = d.tenant_id and x.id = d.id
       and e.status in ('sent', 'delivered', 'read');
    return 'stale';
end
$$;
comment on function notify._apply_provider_status(text, notify.status_event) is
    'Applies one provider status report to its delivery if it ranks higher and the move is legal (applied); otherwise only fills timestamps (stale). Flags (opened, clicked, complained, unsubscribed) set their time, imply delivered, and a complaint or unsubscribe revokes consent (flagged). unmatched when no delivery is found.';

create function notify._record_inbound(p_provider text, m notify.inbound_message)
    returns text
    language plpgsql
    set search_path = ''
as $$
declare
    v_tenant record;
    v_outcome text := 'unmatched';
    v_address text := '+' || ltrim(m.sender, '+');
    v_revoked integer;
begin
    for v_tenant in
        select cp.tenant_id, cp.settings from notify.channel_providers cp
         where cp.provider = p_provider and cp.channel = 'whatsapp' and cp.settings ->> 'phone_number_id' = m.phone_number_id
    loop
        insert into notify.whatsapp_windows as w (tenant_id, phone_number_id, wa_id, last_inbound_at)
        values (v_tenant.tenant_id, m.phone_number_id, ltrim(m.sender, '+'), coalesce(m.received_at, now()))
        on conflict (tenant_id, phone_number_id, wa_id) do update
            set last_inbound_at = greatest(w.last_inbound_at, excluded.last_inbound_at);
        v_outcome := 'window_opened';
        if upper(btrim(coalesce(m.text, ''))) in (select upper(k) from jsonb_array_elements_text(coalesce(v_tenant.settings -> 'opt_out_keywords', '[]')) k) then
            insert into notify.recipient_consents (tenant_id, recipient_id, channel, status, source, evidence, recorded_by)
            select a.tenant_id, a.recipient_id, 'whatsapp', 'revoked', 'inbound_keyword',
                   jsonb_build_object('message_id', m.message_id, 'text', m.text, 'received_at', m.received_at,
                                      'phone_number_id', m.phone_number_id), 'dispatcher'
              from notify.recipient_addresses a
             where a.tenant_id = v_tenant.tenant_id and a.channel = 'whatsapp' and a.address = v_address
               and notify._consent_allows(a.tenant_id, a.recipient_id, 'whatsapp', null);
            get diagnostics v_revoked = row_count;
            v_outcome := case when v_revoked > 0 or v_outcome = 'opted_out' then 'opted_out' else 'opt_out_unknown_sender' end;
        end if;
    end loop;
    return v_outcome;
end
$$;
comment on function notify._record_inbound(text, notify.inbound_message) is
    'Records an inbound WhatsApp message for every tenant using that business number: opens the 24-hour window, and an opt-out keyword (settings.opt_out_keywords) revokes the sender''s WhatsApp consent with the message as evidence.';

create function notify_api.ingest_webhook_v1(p_provider text, p_event_key text, p_payload jsonb, p_events notify.status_event[],
                                            p_inbound notify.inbound_message[] default '{}')
    returns jsonb
    language plpgsql
    security definer
    set search_path = ''
as $$
declare
    v_id bigint;
    v_outcomes jsonb;
begin
    if p_provider is null or p_provider !~ '^[a-z0-9_-]{1,40}$' then
        perform notify._raise('ND400', 'invalid_value', 'provider must be a short lowercase name', 'provider');
    end if;
    if p_event_key is null or length(p_event_key) not between 1 and 500 then
        perform notify._raise('ND400', 'invalid_value', 'event_key must be 1 to 500 characters', 'event_key');
    end if;
    insert into notify.webhook_events (provider, event_key, payload)
    values (p_provider, p_event_key, coalesce(p_payload, 'null'))
    on conflict (provider, event_key) do nothing
    returning id into v_id;
    if v_id is null then
        return jsonb_build_object('stored', false, 'duplicate', true, 'outcomes', '[]'::jsonb);
    end if;

    perform notify._set_source('webhook');
    -- In the order given; ranks make the result the same in any order.
    select coalesce(jsonb_agg(jsonb_strip_nulls(jsonb_build_object(
               'delivery_id', (p_events[i]).delivery_id, 'provider_message_id', (p_events[i]).provider_message_id,
               'status', (p_events[i]).status, 'outcome', notify._apply_provider_status(p_provider, p_events[i])))
               order by i), '[]')
      into v_outcomes
      from generate_subscripts(p_events, 1) as i;
    select v_outcomes || coalesce(jsonb_agg(jsonb_build_object(
               'inbound', (p_inbound[i]).message_id, 'outcome', notify._record_inbound(p_provider, p_inbound[i])) order by i), '[]')
      into v_outcomes
      from generate_subscripts(p_inbound, 1) as i;
    update notify.webhook_events set outcomes = v_outcomes where id = v_id;
    return jsonb_build_object('stored', true, 'duplicate', false, 'id', v_id, 'outcomes', v_outcomes);
end
$$;
comment on function notify_api.ingest_webhook_v1(text, text, jsonb, notify.status_event[], notify.inbound_message[]) is
    'Stores a verified provider webhook once per (provider, event key), applies its normalized status events by rank and records its inbound messages. A duplicate changes nothing.';

-- ==== sql/100_api_mock.sql ====
-- notify_api: the built-in mock provider's outbox.
-- Written by providers/mock.py once per batch; read by GET /internal/mock/messages and the tests.

create function notify_api.record_mock_messages_v1(p_messages jsonb)
    returns integer
    language sql
    security definer
    set search_path = ''
as $$
    with ins as (
        insert into notify.mock_messages (tenant_id, delivery_id, attempt, channel, address, provider_message_id, rendered)
        select (m ->> 'tenant_id')::uuid, (m ->> 'delivery_id')::uuid, (m ->> 'attempt')::integer,
               (m ->> 'channel')::notify.channel, m ->> 'address', m ->> 'provider_message_id', m -> 'rendered'
          from jsonb_array_elements(p_messages) m
        returning 1
    )
    select count(*)::integer from ins
$$;
comment on function notify_api.record_mock_messages_v1(jsonb) is 'Appends what the mock provider "sent": [{tenant_id, delivery_id, attempt, channel, address, provider_message_id, rendered}].';

create function notify_api.list_mock_messages_v1(p_tenant_id uuid, p_delivery_id uuid default null, p_limit integer default 100)
    returns jsonb
    language sql
    stable
    security definer
    set search_path = ''
as $$
    select coalesce(jsonb_agg(x.j order by x.id desc), '[]')
      from (select m.id, jsonb_build_object('delivery_id', m.delivery_id, 'attempt', m.attempt, 'channel', m.channel,
                                            'address', m.address, 'provider_message_id', m.provider_message_id,
                                            'rendered', m.rendered, 'sent_at', m.sent_at) j
              from notify.mock_messages m
             where m.tenant_id = p_tenant_id and (p_delivery_id is null or m.delivery_id = p_delivery_id)
             order by m.id desc
             limit least(greatest(p_limit, 1), 1000)) x
$$;
comment on function notify_api.list_mock_messages_v1(uuid, uuid, integer) is 'The newest messages the mock provider "sent" for a tenant, optionally for one delivery.';

-- ==== sql/900_grants.sql ====
-- Privileges: nobody but the owner reaches notify tables; roles get EXECUTE on named notify_api functions.
-- Loaded last; a new function is granted here in the same change that adds it.

revoke all on schema notify from public;
revoke all on schema notify_api from public;
revoke execute on all functions in schema notify from public;
revoke execute on all functions in schema notify_api from public;

grant usage on schema notify_api to notify_service, notify_caller;

-- The API and the worker: every notify_api function.
grant execute on all functions in schema notify_api to notify_service;
grant usage on schema notify to notify_service;  -- composite and enum types in function signatures
grant usage on schema notify to notify_caller;

-- Trusted direct-SQL callers: the caller-facing functions only (no keys, no worker, no webhooks).
grant execute on function notify_api.submit_notification_v1(uuid, jsonb, text) to notify_caller;
grant execute on function notify_api.get_notification_v1(uuid, uuid) to notify_caller;
grant execute on function notify_api.cancel_notification_v1(uuid, uuid) to notify_caller;
grant execute on function notify_api.upsert_recipient_v1(uuid, text, jsonb) to notify_caller;
grant execute on function notify_api.get_recipient_v1(uuid, text) to notify_caller;
grant execute on function notify_api.record_consent_v1(uuid, text, jsonb, text) to notify_caller;
grant execute on function notify_api.list_consents_v1(uuid, text) to notify_caller;
grant execute on function notify_api.list_templates_v1(uuid, text) to notify_caller;
grant execute on function notify_api.get_tenant_v1(text) to notify_caller;

-- procrastinate's own tables and functions, for the worker running as notify_service.
grant select, insert, update, delete on all tables in schema public to notify_service;
grant usage, select on all sequences in schema public to notify_service;
grant execute on all functions in schema public to notify_service;
grant execute on function notify_api.submit_notifications_v1(uuid, jsonb) to notify_caller;
