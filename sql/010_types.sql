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
    'expired',     -- expires_at passed before claim (final)
    -- Added by migration 0032 (issue #14: routes, quiet hours, caps), at the end as ALTER TYPE ... ADD VALUE puts them.
    'waiting',     -- a later step of a route, waiting for the earlier steps' outcome (due_at 'infinity' until a timer runs)
                   --                               -> queued | scheduled | held | sending | suppressed | cancelled | expired | failed | not_needed
    'held',        -- due, but held by a tenant policy (quiet hours, a frequency cap) until due_at; the reason says which
                   --                               -> queued | sending | suppressed | cancelled | expired | failed | not_needed
    'not_needed'   -- never sent: an earlier step of its route reached its goal (final)
);
comment on type notify.delivery_status is
    'Status of one delivery. Legal transitions are listed beside each value and enforced by notify._transition_allowed.';

create type notify.consent_status as enum ('granted', 'revoked');
create type notify.priority as enum ('high', 'normal', 'bulk');
comment on type notify.priority is
    'How soon a claim serves a delivery: every due high delivery before any normal one, normal before bulk (and, within a priority, tenants in turn). Declared in that order, so it sorts that way.';

comment on type notify.consent_status is 'One consent ledger entry either grants or revokes.';

create type notify.consent_policy as enum ('opt_in', 'opt_out');
comment on type notify.consent_policy is
    'opt_in: suppressed unless granted (WhatsApp, SMS default). opt_out: allowed unless revoked (e-mail default).';

-- What is special about a channel, in one place: notify._channel_rules (sql/015_pure_helpers.sql) gives each channel's
-- row, and every rule that differs by channel reads it there (docs/architecture.md, "One place per channel").
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

create type notify.attempt_result as (
    tenant_id uuid,
    delivery_id uuid,
    attempt integer,
    outcome text,               -- sent | retry | failed | unknown | suppressed | bounced
    provider text,
    provider_message_id text,
    error_code text,
    error_message text,
    retry_after_seconds double precision,
    pricing jsonb               -- added by migration 0039: what the message costs as sent (SMS: {encoding, segments, units})
);
comment on type notify.attempt_result is
    'One provider call''s outcome, as the worker reports it to notify_api.record_attempts_v1. attempt is the fencing token returned by the claim; pricing, what the provider knows at send time of what the message costs (SMS: its encoding and segments), is kept on the delivery.';

create type notify.status_event as (
    tenant_id uuid,
    delivery_id uuid,
    provider_message_id text,
    status notify.delivery_status,
    occurred_at timestamptz,
    error_code text,
    error_message text,
    flag text,                  -- opened | clicked | complained: engagement, never a status
    -- Added by migration 0027 (WhatsApp 2026): the recipient's business-scoped user id and phone number as the report
    -- names them (either may be missing), and what Meta says the message cost ({pricing_model, category, billable, type}).
    user_id text,
    recipient_phone text,
    pricing jsonb
);
comment on type notify.status_event is
    'A provider status report normalized by its adapter: a status, or an engagement flag (status null). The delivery is found by (tenant_id, delivery_id) when the provider echoes our correlation id, else by provider_message_id.';

create type notify.inbound_message as (
    phone_number_id text,
    sender text,
    message_id text,
    text text,
    received_at timestamptz,
    user_id text,               -- added by migration 0027: the sender's business-scoped user id (sender, the phone, may be null)
    messaging_service_sid text  -- added by migration 0048: SMS, the Twilio Messaging Service whose pool number received it
);
comment on type notify.inbound_message is
    'A message a recipient sent to a business number: WhatsApp (phone_number_id, the Graph id of the number): it opens the 24-hour window, and an opt-out keyword revokes consent; the sender is known by its phone number (sender), its business-scoped user id (user_id), or both. SMS through Twilio (phone_number_id: the E.164 number it was sent to, sender: the E.164 sender, messaging_service_sid: the Messaging Service the number belongs to, if any): STOP and START keywords revoke and restore SMS consent.';

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
    provider_config jsonb,
    http_request_id text,
    trace_parent text,
    provider_position smallint,
    fallbacks jsonb
);
comment on type notify.claimed_delivery is
    'What the worker needs to send one claimed delivery: where to, the template content, the variables, and the tenant''s provider for the channel (settings and secret references, never secrets). provider_position: the place of that provider in the tenant''s chain (notify.channel_providers.position; null for the built-in mock); fallbacks: the rest of the chain in the order to try them, [{provider, position, provider_config}], null when there is none (docs/architecture.md, "Provider failover").';
