-- Tables of notification-dispatcher: tenants, keys, recipients, consent, templates, requests, deliveries.
-- Written only through notify_api functions; every primary and unique key starts with tenant_id except where noted.
-- Columns added after a table first landed stand at its end, in the order migrations added them (same column order as a migrated database).
-- Each table is written whole here (columns, constraints, indexes, comments); provider_grants (sql/075) and the callback
-- outbox tables (sql/095) stand with the functions of their feature. Triggers: sql/040_triggers.sql.

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
    -- Added by migration 0035 (quiet hours, sql/077_api_policies.sql).
    default_timezone text,
    constraint tenants_slug_key unique (slug),
    constraint tenants_slug_format check (slug ~ '^[a-z0-9][a-z0-9_-]{0,62}$'),
    constraint tenants_retry_sane check (retry_max_attempts between 1 and 100 and retry_base_ms > 0 and retry_max_ms >= retry_base_ms)
);
comment on table notify.tenants is 'A calling organisation. Everything else belongs to exactly one tenant.';
comment on column notify.tenants.default_locale is 'Last step of template locale fallback (es-ES -> es -> default_locale).';
comment on column notify.tenants.retry_max_attempts is 'Attempts per delivery before a transient failure becomes failed.';
comment on column notify.tenants.api_rate_per_second is 'Requests per second each API key of the tenant may make (burst: one second''s worth); over it, 429.';
comment on column notify.tenants.default_timezone is
    'The time zone of the tenant''s recipients that have none, for quiet hours (null: UTC); an IANA name checked by set_quiet_hours_v1 when set, never per delivery.';
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
    -- Added by migration 0027 (test keys).
    test boolean not null default false,
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
comment on column notify.api_clients.test is
    'A test key: everything it submits goes through the whole path but is sent by the mock provider only, whatever provider the tenant configured (notify.notification_deliveries.test).';

create table notify.channel_policies (
    tenant_id uuid not null references notify.tenants (id),
    channel notify.channel not null,
    policy notify.consent_policy not null,
    updated_at timestamptz not null default now(),
    primary key (tenant_id, channel)
);
comment on table notify.channel_policies is
    'Per-tenant consent policy of a channel. Missing row: opt_in for whatsapp and sms, opt_out for email (notify._default_policy).';

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

create table notify.channel_providers (
    tenant_id uuid not null references notify.tenants (id),
    channel notify.channel not null,
    provider text not null,
    settings jsonb not null default '{}',
    secrets jsonb not null default '{}',
    updated_at timestamptz not null default now(),
    -- Its place in the channel's failover chain: 0 the primary (set_channel_provider_v1), then the fallbacks in order.
    position smallint not null default 0,
    primary key (tenant_id, channel, position),
    constraint channel_providers_position check (position between 0 and 4),
    constraint channel_providers_kind foreign key (provider, channel) references notify.provider_kinds (name, channel),
    constraint channel_providers_secret_refs check (notify._secret_refs_valid(secrets))
);
comment on table notify.channel_providers is
    'Which provider serves a tenant''s channel, its settings, and references to its secrets. No row: the built-in mock provider.';
comment on column notify.channel_providers.secrets is
    'Secret references only, {"name": "env:VAR" | "file:/path"}; resolved by the worker at send time, never stored.';
comment on column notify.channel_providers.position is
    'The provider''s place in the channel''s failover chain: 0 the primary, 1.. the fallbacks tried in order when a send is known not to have been accepted (notify_api.set_channel_providers_v1). Every reader that wants one provider per channel takes position 0 on purpose.';
-- A business number belongs to one tenant: inbound messages (the 24-hour window, opt-out keywords) are routed by it.
-- (Global, not per tenant, like api_clients.key_hash: a webhook names the number before its tenant is known.)
create unique index channel_providers_phone_number_id_key on notify.channel_providers ((settings ->> 'phone_number_id'))
    where provider = 'whatsapp_cloud';
-- A Twilio number belongs to one tenant too: inbound SMS (STOP, START, HELP) are routed by the number they were sent to.
create unique index channel_providers_twilio_number_key on notify.channel_providers ((settings ->> 'from_number'))
    where provider = 'twilio';
-- And a Messaging Service (a sender pool): inbound SMS to any number of its pool are routed by the service they name.
create unique index channel_providers_twilio_service_key on notify.channel_providers ((settings ->> 'messaging_service_sid'))
    where provider = 'twilio';

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

create table notify.whatsapp_windows (
    tenant_id uuid not null references notify.tenants (id),
    phone_number_id text not null,
    wa_id text not null,
    last_inbound_at timestamptz not null,
    primary key (tenant_id, phone_number_id, wa_id)
);
comment on table notify.whatsapp_windows is
    'Last inbound message per business number and user: free-form WhatsApp text is allowed only within 24 hours of it.';

create table notify.whatsapp_users (
    tenant_id uuid not null references notify.tenants (id),
    user_id text not null,
    wa_id text,
    parent_user_id text,
    updated_at timestamptz not null default now(),
    primary key (tenant_id, user_id),
    constraint whatsapp_users_user_id_format check (notify._is_bsuid(user_id)),
    constraint whatsapp_users_wa_id_format check (wa_id ~ '^[1-9][0-9]{6,14}$')
);
comment on table notify.whatsapp_users is
    'WhatsApp business-scoped user ids (BSUIDs) and the phone number each stands for when Meta has told us (statuses, inbound messages, user_id_update): a recipient addressed by either, and the 24-hour window and opt-out keywords of either, are the same user.';
comment on column notify.whatsapp_users.wa_id is 'The phone number, digits only (as Meta writes wa_id); null while only the BSUID is known.';
create index whatsapp_users_wa_id on notify.whatsapp_users (tenant_id, wa_id) where wa_id is not null;

create table notify.whatsapp_business_limits (
    tenant_id uuid not null references notify.tenants (id),
    waba_id text not null,
    messaging_tier text,
    payload jsonb not null default '{}',
    reported_at timestamptz not null default now(),
    primary key (tenant_id, waba_id)
);
comment on table notify.whatsapp_business_limits is
    'The messaging limit tier of a tenant''s WhatsApp business portfolio as Meta last reported it (business_capability_update): shared by every number of the portfolio; shown by dispatcher status.';

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
    -- Added by migrations 0005 (request ids), 0006 (status callbacks) and 0008 (tracing), in that order. The two ids
    -- default to transaction settings, so no notify_api signature carries them (docs/architecture.md).
    http_request_id text default nullif(current_setting('notify.request_id', true), '')
        -- (lengths apart: a counted repetition such as {1,200} costs a regular expression about 20 us a row)
        constraint notification_requests_http_request_id check (http_request_id ~ '^[\x21-\x7e]+$' and length(http_request_id) <= 200),
    callback_url text
        constraint notification_requests_callback_url check (notify._is_http_url(callback_url)),
    trace_parent text default nullif(current_setting('notify.traceparent', true), '')
        constraint notification_requests_trace_parent check (trace_parent ~ '^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$'),
    -- Added by migration 0027 (test keys): defaults to the transaction setting notify.test, like the two ids above.
    test boolean not null default coalesce(nullif(current_setting('notify.test', true), '')::boolean, false),
    -- Added by migration 0033 (issue #14): the route as the caller gave it, normalized (null: channels, every one sent);
    -- the request's priority.
    route jsonb,
    priority notify.priority not null default 'normal',
    primary key (tenant_id, id),
    foreign key (tenant_id, recipient_id) references notify.recipients (tenant_id, id),
    -- The key leads, not tenant_id: an index starting (tenant_id) could be picked for a primary-key lookup (see
    -- docs/architecture.md, "Indexes that tie with the primary key"). test is part of the key (migration 0047): a
    -- tenant's test and live submissions are two idempotency scopes, so neither ever replays the other.
    constraint notification_requests_idempotency_key unique (idempotency_key, tenant_id, test),
    constraint notification_requests_key_format check (idempotency_key ~ '^[\x21-\x7e]+$' and length(idempotency_key) <= 255)
);
comment on table notify.notification_requests is
    'One accepted notification intent. Its idempotency key lives as long as the row.';
comment on column notify.notification_requests.fingerprint is 'SHA-256 of the canonical (jsonb) request body; a reused key with another body is refused.';
comment on column notify.notification_requests.recipient_id is 'The one recipient of a single intent; null for a fan-out (see recipient_count and the deliveries).';
comment on column notify.notification_requests.response is 'The response given at submission, replayed verbatim for a repeated idempotency key.';
comment on column notify.notification_requests.http_request_id is
    'The X-Request-ID of the submitting HTTP request (or a direct caller''s transaction setting notify.request_id): ties the API''s, the worker''s and the caller''s log lines together.';
comment on column notify.notification_requests.callback_url is 'Where this request''s status callbacks go, instead of the tenant''s callback URL.';
comment on column notify.notification_requests.test is
    'Submitted with a test key (transaction setting notify.test, set from the key by notify._enter_key): its deliveries are test deliveries.';
comment on column notify.notification_requests.route is
    'The ordered fallback route of a request submitted with route instead of channels: [{channel, until, within}, ...] (until: sent | delivered | read, within: an ISO 8601 duration), normalized. Null for channels (every channel sent).';
comment on column notify.notification_requests.priority is 'The priority its deliveries are claimed with (notify.priority).';
comment on column notify.notification_requests.trace_parent is
    'The W3C traceparent of the submitting request''s span (transaction setting notify.traceparent), when tracing is on: the worker''s delivery spans continue that trace.';
-- Partial: only the requests that name their own callback URL (status callbacks, sql/095_callbacks.sql).
create index notification_requests_with_callback on notify.notification_requests (tenant_id, id) where callback_url is not null;
-- Lookup (notify_api.find_notifications_v1, sql/065_api_lookup.sql): a tenant's requests newest first, keyset by (created_at, id).
-- Partial on a predicate every row meets but that only the lookup states: an index starting (tenant_id) would otherwise tie
-- with the keys for a key lookup on a new database (docs/architecture.md, "Indexes that tie with the primary key").
create index notification_requests_created on notify.notification_requests (tenant_id, created_at, id)
    where created_at > '-infinity';

create table notify.notification_deliveries (
    tenant_id uuid not null,
    id uuid not null default notify._uuidv7(),  -- time-ordered: see the comment on notify._uuidv7
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
    -- Added by migration 0027 (test keys): set at insert from the same transaction setting as its request's.
    test boolean not null default coalesce(nullif(current_setting('notify.test', true), '')::boolean, false),
    pricing jsonb,
    -- Added by migration 0033 (issue #14): the delivery's place in its request's route (null: not routed), the status
    -- that makes later steps not needed, and how long after being sent it may take to reach it; its priority.
    route_step smallint,
    route_until notify.delivery_status,
    route_within interval,
    priority notify.priority not null default 'normal',
    primary key (tenant_id, id),
    foreign key (tenant_id, request_id) references notify.notification_requests (tenant_id, id),
    foreign key (tenant_id, recipient_id) references notify.recipients (tenant_id, id),
    constraint notification_deliveries_one_per_channel unique (request_id, tenant_id, recipient_id, channel)  -- request_id leads, as above
);
comment on table notify.notification_deliveries is
    'One message to one recipient on one channel: the work list of the worker and the unit of status.';
comment on column notify.notification_deliveries.variables is 'Per-recipient variables of a fan-out, merged over the request''s variables at send time.';
comment on column notify.notification_deliveries.attempt is 'Claims so far. The fencing token: worker writes match on (id, attempt).';
comment on column notify.notification_deliveries.seq is 'Incremented on every status change; delivery_events.seq follows it.';
comment on column notify.notification_deliveries.due_at is 'When the delivery may be claimed: send_at, now, or the time of the next retry.';
comment on column notify.notification_deliveries.opened_at is 'E-mail open reported by the provider: a flag, never a status (image proxies prefetch).';
comment on column notify.notification_deliveries.complained_at is 'Spam complaint reported by the provider; e-mail consent is revoked at the same time.';
comment on column notify.notification_deliveries.test is
    'A test delivery (submitted with a test key): the claim hands it to the mock provider whatever the tenant configured, so it never reaches a real provider.';
comment on column notify.notification_deliveries.pricing is
    'What the provider says the message cost, from its status reports (WhatsApp: {pricing_model, category, billable, type}); the first report that carries it.';
comment on column notify.notification_deliveries.route_step is
    'Its position (1, 2, ...) in its request''s route for its recipient; null when the request named channels. Step n+1 waits (status waiting) until step n cannot succeed or has not reached route_until within route_within of being sent.';
comment on column notify.notification_deliveries.route_until is 'A route step''s goal (sent, delivered or read): reached in time, the later steps are not_needed.';
comment on column notify.notification_deliveries.route_within is 'How long after this step is sent it may take to reach route_until before the next step falls due (null: no time limit; the next step waits for an outcome).';
comment on column notify.notification_deliveries.priority is 'Copied from the request: a claim serves high before normal before bulk.';
comment on column notify.notification_deliveries.lease_expires_at is 'Set at claim; past it, maintenance treats the send as crashed (crash policy per channel).';
-- The queue: only rows waiting to be claimed are indexed, so the hot set stays small however much history there is.
-- (waiting: a route's later step, due_at 'infinity' until its timer runs; held: by quiet hours or a cap until due_at.)
-- By priority and tenant, then due time: a claim walks the (priority, tenant) pairs with a loose index scan, one probe
-- each, and takes each pair's share oldest first (notify._claim_shares, docs/architecture.md "Priority and fairness").
create index notification_deliveries_due on notify.notification_deliveries (channel, priority, tenant_id, due_at)
    where status in ('queued', 'scheduled', 'held', 'waiting');
create index notification_deliveries_leases on notify.notification_deliveries (lease_expires_at)
    where status = 'sending';
-- Global, not per tenant: provider webhooks name only the provider's message id.
create unique index notification_deliveries_provider_message on notify.notification_deliveries (provider, provider_message_id)
    where provider_message_id is not null;
-- (Reads by request use the unique key notification_deliveries_one_per_channel, which starts with request_id, tenant_id.)
-- Lookup by recipient (find_notifications_v1, and erasure and export, sql/066_api_erasure.sql): its deliveries newest first.
-- (Partial for the same reason as notification_requests_created.)
create index notification_deliveries_recipient on notify.notification_deliveries (tenant_id, recipient_id, created_at, request_id)
    where created_at > '-infinity';
-- Retention (sql/105_retention.sql): deliveries done with that still hold personal data, by tenant, channel and age.
-- Partial, so a claim (to sending) adds no entry, and a scrubbed row leaves it.
create index notification_deliveries_content_held on notify.notification_deliveries (tenant_id, channel, created_at)
    where status not in ('scheduled', 'queued', 'sending', 'held', 'waiting') and (address is not null or variables is not null or last_error_message is not null);

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
    -- started_at is in the key because the table is partitioned by it (a partitioned table's keys include its
    -- partition column); (tenant_id, delivery_id, attempt) still leads, so lookups by attempt use it.
    primary key (tenant_id, delivery_id, attempt, started_at),
    -- No foreign key to notification_deliveries: rows are written only by claim_deliveries_v1 for the rows it
    -- claims, and a per-row RI check costs more than the rest of the insert (docs/architecture.md).
    constraint delivery_attempts_outcome check (outcome in ('sent', 'retry', 'failed', 'unknown', 'suppressed', 'bounced', 'lease_expired'))
) partition by range (started_at);
-- Each row is inserted at claim and updated once when the outcome is recorded: room on its page lets that update be HOT
-- (no new index entry, no other page written). A partitioned table has no storage of its own, so each daily partition is
-- made with fillfactor 35 (notify._partition_storage, sql/105_retention.sql); at 35% a batch's rows all find room for
-- their outcome (docs/benchmarks.md).
comment on table notify.delivery_attempts is 'One row per claim of a delivery; outcome null while the provider call is in flight.';
-- Daily partitions (<table>_pYYYYMMDD, UTC) are made ahead and dropped past retention (sql/105_retention.sql); the
-- default partition takes a row no daily partition covers, so an insert never fails.
create table notify.delivery_attempts_default partition of notify.delivery_attempts default with (fillfactor = 35);
comment on table notify.delivery_attempts_default is 'Rows of notify.delivery_attempts outside every daily partition (moved out when their day''s partition is made).';

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
    primary key (tenant_id, id, occurred_at)  -- occurred_at: the partition column (as in delivery_attempts)
    -- No foreign key to notification_deliveries: rows are written only by the deliveries' own trigger
    -- (_200_record_event_*), and a per-row RI check would double the cost of every status change.
) partition by range (occurred_at);
comment on table notify.delivery_events is 'Status history of each delivery, appended by trigger on every status change.';
comment on column notify.delivery_events.source is 'Who changed it: submit, claim, worker, webhook, cancel, maintenance (transaction setting notify.source).';
create table notify.delivery_events_default partition of notify.delivery_events default;
comment on table notify.delivery_events_default is 'Rows of notify.delivery_events outside every daily partition (moved out when their day''s partition is made).';
create index delivery_events_delivery on notify.delivery_events (tenant_id, delivery_id, seq);

-- Provider webhooks are deduplicated by (provider, event_key), globally, not per tenant: a webhook is deduplicated
-- before the tenant is known (it is found from the events). The keys live in a small table of their own, so that the
-- payloads (the big part, personal data) can be partitioned by day: a partitioned table's unique keys must include its
-- partition column, which a duplicate delivered on another day would not share.
create table notify.webhook_event_keys (
    provider text not null,
    event_key text not null,
    received_at timestamptz not null default now(),
    primary key (provider, event_key)
);
comment on table notify.webhook_event_keys is
    'The deduplication keys of provider webhooks, claimed by ingest_webhook_v1 before it stores a payload (a key already here: a duplicate). Deleted past the raw payloads'' retention in bounded batches (scrub_expired_v1).';
create index webhook_event_keys_received on notify.webhook_event_keys (received_at);

create table notify.webhook_events (
    id bigint generated always as identity,
    provider text not null,
    event_key text not null,
    received_at timestamptz not null default now(),
    payload jsonb not null,
    outcomes jsonb not null default '[]',
    primary key (id, received_at)  -- received_at: the partition column; (provider, event_key) is unique in webhook_event_keys
) partition by range (received_at);
comment on table notify.webhook_events is
    'Every verified provider webhook, stored once per provider event key (notify.webhook_event_keys), with what each of its status events did.';
comment on column notify.webhook_events.outcomes is 'Per status event: applied, stale (lower rank or illegal), unmatched (no such delivery) or ambiguous (two deliveries carry its provider message id); per inbound message its outcome; kept (with a reason) for what the adapter could not apply.';
-- A delivery's provider reports, for its timeline (get_notification_timeline_v1): the outcomes name its delivery id or
-- provider message id.
create index webhook_events_outcomes on notify.webhook_events using gin (outcomes jsonb_path_ops);
create table notify.webhook_events_default partition of notify.webhook_events default;
comment on table notify.webhook_events_default is 'Rows of notify.webhook_events outside every daily partition (moved out when their day''s partition is made).';

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
    primary key (tenant_id, id, sent_at)  -- sent_at: the partition column (as in delivery_attempts)
) partition by range (sent_at);
comment on table notify.mock_messages is
    'What the built-in mock provider would have sent, so a developer can look. One row per provider call.';
create table notify.mock_messages_default partition of notify.mock_messages default;
comment on table notify.mock_messages_default is 'Rows of notify.mock_messages outside every daily partition (moved out when their day''s partition is made).';
create index mock_messages_delivery on notify.mock_messages (tenant_id, delivery_id);

-- Not a tenant table: read before any tenant is entered (notify._enter), keyed by the database login.
create table notify.login_tenants (
    login text primary key,
    tenant_ids uuid[] not null,
    updated_at timestamptz not null default now(),
    constraint login_tenants_some check (cardinality(tenant_ids) > 0)
);
comment on table notify.login_tenants is
    'Database logins bound to the tenants they serve: a login listed here enters only these tenants (notify._enter, ND403) and looks up only these (get_tenant_v1); a login not listed enters any tenant. Managed with notify.bind_login_v1 / unbind_login_v1 (dispatcher login bind).';
comment on column notify.login_tenants.login is 'The login role''s name, as session_user reports it (not current_user, which is a function''s owner inside security definer functions).';

-- Erasure on request (sql/066_api_erasure.sql).
-- Not a tenant table: one server-side key, readable only by the owning roles (no application role has any table grant).
create table notify.address_hash_key (
    id integer primary key default 1,
    inner_pad bytea not null,
    outer_pad bytea not null,
    created_at timestamptz not null default now(),
    constraint address_hash_key_one check (id = 1),
    constraint address_hash_key_pads check (octet_length(inner_pad) = 64 and octet_length(outer_pad) = 64)
);
comment on table notify.address_hash_key is
    'The HMAC-SHA256 key of notify._address_hash, stored as its two 64-byte pads (key XOR 0x36, key XOR 0x5c). Made once, when the schema is created; never leaves the database.';
insert into notify.address_hash_key (inner_pad, outer_pad)
select decode(string_agg(lpad(to_hex(get_byte(k.k, i) # 54), 2, '0'), '' order by i), 'hex'),
       decode(string_agg(lpad(to_hex(get_byte(k.k, i) # 92), 2, '0'), '' order by i), 'hex')
  from (select sha256(convert_to(gen_random_uuid()::text || gen_random_uuid()::text || gen_random_uuid()::text, 'UTF8'))
               || decode(repeat('00', 32), 'hex') as k) k,
       generate_series(0, 63) i
 group by k.k;

create table notify.address_suppressions (
    tenant_id uuid not null references notify.tenants (id),
    channel notify.channel not null,
    address_hash bytea not null,
    category text not null default '',
    created_at timestamptz not null default now(),
    erasure_id uuid not null,
    -- address_hash leads (see docs/architecture.md, "Indexes that tie with the primary key"); a lookup names all four.
    primary key (address_hash, tenant_id, channel, category)
);
-- Whether a tenant has suppressed addresses on a channel at all (notify._consent asks before hashing an address).
-- Partial on a predicate no key lookup names, so it never ties with the primary key (as notification_requests_created).
create index address_suppressions_tenant on notify.address_suppressions (tenant_id, channel) where created_at > '-infinity';
comment on table notify.address_suppressions is
    'Addresses an erased recipient had opted out of (per channel, and category; '''' = every category), as keyed hashes (notify._address_hash), never in clear: consent (notify._consent) refuses them until a grant recorded later for the recipient now using the address.';

create table notify.recipient_erasures (
    tenant_id uuid not null references notify.tenants (id),
    id uuid not null default gen_random_uuid(),
    recipient_id uuid not null,
    erased_at timestamptz not null default now(),
    erased_by text,
    rows_changed jsonb not null,
    in_flight integer not null default 0,
    primary key (tenant_id, id),
    foreign key (tenant_id, recipient_id) references notify.recipients (tenant_id, id)
);
comment on table notify.recipient_erasures is
    'One erasure of a recipient''s personal data on request: when, by which API key (or login), and how many rows of each table it changed. Content-free.';
comment on column notify.recipient_erasures.in_flight is 'Deliveries being sent at the time (not cancellable): their outcome may still write; erase again after they finish.';

-- Unknown outcomes get an end (sql/086_api_unknown.sql).
create table notify.unknown_deadlines (
    tenant_id uuid not null references notify.tenants (id),
    channel notify.channel not null,
    after_seconds integer not null,
    updated_at timestamptz not null default now(),
    primary key (tenant_id, channel),
    constraint unknown_deadlines_range check (after_seconds between 60 and 31536000)
);
comment on table notify.unknown_deadlines is
    'Per tenant and channel: how long a delivery may stay unknown (no provider report after a crashed or timed-out send) before maintenance makes it final (failed, reason outcome_unknown_deadline). No row: notify._unknown_deadline_default (7 days for WhatsApp and SMS, 1 day for e-mail).';
-- The unresolved unknowns, oldest first: a small hot set however much history there is.
create index notification_deliveries_unknown on notify.notification_deliveries (updated_at) where status = 'unknown';
