-- 0033: the columns, state machine and queue of issue #14, for the statuses 0032 added.
-- Requests keep their route (null: channels, every one sent) and priority; each delivery its route step, the step's
-- goal (route_until) and time limit (route_within), and its priority. A route's later step waits (status waiting,
-- due_at 'infinity' until a timer runs); a delivery a tenant policy holds (quiet hours, a cap) is held until due_at;
-- a step an earlier one made unnecessary ends not_needed. The queue's index, the claim, maintenance, cancel, erasure,
-- retention, lookup and queue health count waiting and held as pending, like queued and scheduled.

alter table notify.notification_requests
    add column route jsonb,
    add column priority notify.priority not null default 'normal';
comment on column notify.notification_requests.route is
    'The ordered fallback route of a request submitted with route instead of channels: [{channel, until, within}, ...] (until: sent | delivered | read, within: an ISO 8601 duration), normalized. Null for channels (every channel sent).';
comment on column notify.notification_requests.priority is 'The priority its deliveries are claimed with (notify.priority).';

alter table notify.notification_deliveries
    add column route_step smallint,
    add column route_until notify.delivery_status,
    add column route_within interval,
    add column priority notify.priority not null default 'normal';
comment on column notify.notification_deliveries.route_step is
    'Its position (1, 2, ...) in its request''s route for its recipient; null when the request named channels. Step n+1 waits (status waiting) until step n cannot succeed or has not reached route_until within route_within of being sent.';
comment on column notify.notification_deliveries.route_until is 'A route step''s goal (sent, delivered or read): reached in time, the later steps are not_needed.';
comment on column notify.notification_deliveries.route_within is 'How long after this step is sent it may take to reach route_until before the next step falls due (null: no time limit; the next step waits for an outcome).';
comment on column notify.notification_deliveries.priority is 'Copied from the request: a claim serves high before normal before bulk.';

drop index notify.notification_deliveries_due;
create index notification_deliveries_due on notify.notification_deliveries (channel, due_at)
    where status in ('queued', 'scheduled', 'held', 'waiting');
drop index notify.notification_deliveries_content_held;
create index notification_deliveries_content_held on notify.notification_deliveries (tenant_id, channel, created_at)
    where status not in ('scheduled', 'queued', 'sending', 'held', 'waiting') and (address is not null or variables is not null or last_error_message is not null);

create or replace function notify._is_final(p_status notify.delivery_status)
    returns boolean
    language sql
    immutable
    -- inlinable: no SET clause (see docs/architecture.md, "Hot helpers are inlined")
as $$
    select p_status in ('read', 'bounced', 'suppressed', 'cancelled', 'expired', 'failed', 'delivered', 'not_needed')
$$;
comment on function notify._is_final(notify.delivery_status) is
    'True where no further work is planned (the delivery may still move by a provider report, e.g. delivered -> read).';

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
        when 'failed' then case when p_channel = 'email' then 70 else 45 end
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
    'Monotonic rank used to apply provider reports in any order: a report applies only if it ranks higher. For WhatsApp/SMS a failed loses to delivered; for e-mail a bounce or failure beats delivered.';

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
        when 'delivered' then p_to = 'read' or (p_to = 'bounced' and p_channel = 'email')
        when 'failed' then p_to in ('delivered', 'read') and p_channel <> 'email'
        else false
    end
$$;
comment on function notify._transition_allowed(notify.channel, notify.delivery_status, notify.delivery_status) is
    'The delivery state machine: the only legal status changes. Enforced by trigger _100_check_transition.';

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
          from notify.notification_deliveries d
         where d.channel = p_channel and d.status in ('queued', 'scheduled', 'held', 'waiting') and d.due_at <= now()
         order by d.due_at
         limit p_limit
           for update skip locked
    ), decided as materialized (
        -- Expiry and consent are checked again here: a revoke or a deadline between submit and send wins.
        -- Free-form WhatsApp text outside the 24-hour customer-service window is refused, not sent to fail.
        select d.tenant_id, d.id, d.address, d.template_locale, r.template_key, t.content,
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
          left join notify.channel_providers cp on cp.tenant_id = d.tenant_id and cp.channel = d.channel
          left join notify.templates t on t.tenant_id = d.tenant_id and t.key = r.template_key
                                      and t.channel = d.channel and t.locale = d.template_locale
    ), updated as (
        update notify.notification_deliveries d
           set status = x.next_status,
               attempt = d.attempt + (x.next_status = 'sending')::integer,
               lease_expires_at = case when x.next_status = 'sending' then now() + make_interval(secs => p_lease_seconds) end,
               reason = case x.next_status when 'expired' then 'expired_before_send' when 'suppressed' then 'no_consent'
                                           when 'failed' then 'outside_customer_service_window' else d.reason end
          from decided x
         where d.tenant_id = x.tenant_id and d.id = x.id
        returning d.tenant_id, d.id, d.attempt, d.channel, d.status, x.address, x.template_key, x.template_locale,
                  x.content, x.variables, x.category, x.request_id, x.provider, x.provider_config, x.http_request_id,
                  x.trace_parent
    ), attempts as (
        insert into notify.delivery_attempts (tenant_id, delivery_id, attempt)
        select u.tenant_id, u.id, u.attempt from updated u where u.status = 'sending'
    )
    select u.tenant_id, u.id, u.attempt, u.channel, u.address, u.template_key, u.template_locale, u.content,
           u.variables, u.category, u.request_id, coalesce(u.provider, 'mock'), u.provider_config,
           u.http_request_id, u.trace_parent
      from updated u
     where u.status = 'sending';
end
$$;
comment on function notify_api.claim_deliveries_v1(notify.channel, integer, integer) is
    'Claims up to p_limit due deliveries of a channel (FOR UPDATE SKIP LOCKED): expired ones become expired, revoked ones (and marketing templates without marketing consent) suppressed, WhatsApp text outside the 24-hour window failed, the rest sending with attempt+1 and a lease. Returns what the worker needs to send them, with the tenant''s provider and its operator grant (checked again at send time); for a test delivery always the mock provider, with config {"test": true}.';

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
begin
    perform notify._set_source('maintenance');

    -- Crashed sends (lease past due): e-mail may be sent twice, so it goes back to the queue;
    -- WhatsApp and SMS must not be, so they become unknown until a provider report says what happened.
    -- An expired lease was an attempt: e-mail whose attempts are used up fails instead of being requeued forever.
    with stale as (
        select d.tenant_id, d.id, d.attempt, d.channel, d.attempt >= t.retry_max_attempts as exhausted
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
           set status = case when s.channel <> 'email' then 'unknown' when s.exhausted then 'failed' else 'queued' end::notify.delivery_status,
               reason = case when s.channel <> 'email' then 'lease_expired' when s.exhausted then 'retries_exhausted' else d.reason end,
               last_error_code = case when s.channel = 'email' then 'lease_expired' else d.last_error_code end,
               last_error_message = case when s.channel = 'email' then format('attempt %s: the worker''s lease expired before it recorded an outcome', s.attempt)
                                         else d.last_error_message end,
               due_at = case when s.channel = 'email' and not s.exhausted then now() else d.due_at end
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

    -- Safety net: a wake-up for every channel with due work (coalesced, so cheap when one is pending).
    select array_agg(c::text) into v_woken
      from unnest(enum_range(null::notify.channel)) c
     where exists (select from notify.notification_deliveries d
                    where d.channel = c and d.status in ('queued', 'scheduled', 'held', 'waiting') and d.due_at <= now());
    perform notify._wake(c::notify.channel) from unnest(v_woken) c;

    return jsonb_build_object('requeued', v_requeued, 'unknown', v_unknown, 'exhausted', v_exhausted, 'expired', v_expired,
                              'unknown_finalized', v_unknown_final, 'woken', coalesce(to_jsonb(v_woken), '[]'));
end
$$;
comment on function notify_api.run_maintenance_v1() is
    'Periodic upkeep: expired leases, each counted as an attempt (email -> queued, or failed/retries_exhausted when the tenant''s retry_max_attempts are used up; whatsapp/sms -> unknown), deliveries past expires_at -> expired, unknown outcomes past their channel''s deadline -> failed (outcome_unknown_deadline; notify._finish_unknown_deliveries), a wake-up for every channel with due work.';

create or replace function notify_api.queue_health_v1()
    returns table (tenant text, channel notify.channel, due bigint, scheduled bigint, oldest_due_seconds double precision,
                   sending bigint, leases_past_due bigint, unknown bigint)
    language sql
    stable
    security definer
    set search_path = pg_catalog, pg_temp
as $$
    with waiting as (
        select d.tenant_id, d.channel,
               count(*) filter (where d.due_at <= now()) as due,
               count(*) filter (where d.due_at > now()) as scheduled,
               extract(epoch from now() - min(d.due_at) filter (where d.due_at <= now())) as oldest_due_seconds
          from notify.notification_deliveries d
         where d.status in ('queued', 'scheduled', 'held', 'waiting')
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

create or replace function notify_api.get_notification_v1(p_tenant_id uuid, p_id uuid)
    returns jsonb
    language plpgsql
    stable
    security definer
    set search_path = pg_catalog, pg_temp
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
           bool_or(d.status in ('scheduled', 'queued', 'sending', 'unknown', 'held', 'waiting'))
      into v_deliveries, v_open
      from notify.notification_deliveries d where d.tenant_id = p_tenant_id and d.request_id = p_id;
    return jsonb_strip_nulls(jsonb_build_object(
        'id', v.id, 'status', case when v_open then 'in_progress' else 'completed' end,
        'created_at', v.created_at, 'idempotency_key', v.idempotency_key,
        'recipient', (select r.ref from notify.recipients r where r.tenant_id = v.tenant_id and r.id = v.recipient_id),
        'recipient_count', case when v.recipient_id is null then v.recipient_count end,
        'template', v.template_key, 'category', v.category, 'channels', to_jsonb(v.channels),
        'send_at', v.send_at, 'expires_at', v.expires_at, 'metadata', v.metadata, 'http_request_id', v.http_request_id,
        'callback_url', v.callback_url, 'test', case when v.test then true end))
        || jsonb_build_object('deliveries', coalesce(v_deliveries, '[]'));
end
$$;
comment on function notify_api.get_notification_v1(uuid, uuid) is
    'A notification with every delivery''s status, attempts, provider message id, timestamps and event history ("test": true for a test key''s). 404 for another tenant''s id.';

create or replace function notify_api.cancel_notification_v1(p_tenant_id uuid, p_id uuid)
    returns jsonb
    language plpgsql
    security definer
    set search_path = pg_catalog, pg_temp
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
         where d.tenant_id = p_tenant_id and d.id = l.id and l.status in ('scheduled', 'queued', 'held', 'waiting')
           and d.status in ('scheduled', 'queued', 'held', 'waiting')
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

create or replace function notify_api.get_notification_v2(p_tenant_id uuid, p_id uuid)
    returns jsonb
    language plpgsql
    stable
    security definer
    set search_path = pg_catalog, pg_temp
as $$
declare
    v notify.notification_requests;
    v_inline constant integer := 100;  -- deliveries shown inline at most (docs/sql-api.md)
    v_summary jsonb;
    v_total bigint;
    v_open boolean;
    v_deliveries jsonb;
begin
    perform notify._enter(p_tenant_id);
    select * into v from notify.notification_requests r where r.tenant_id = p_tenant_id and r.id = p_id;
    if v.id is null then
        perform notify._raise('ND404', 'not_found', 'no such notification', 'id');
    end if;
    select coalesce(jsonb_agg(jsonb_strip_nulls(jsonb_build_object('channel', s.channel, 'status', s.status, 'reason', s.reason,
                                                                   'count', s.n))
                              order by array_position(v.channels, s.channel), s.status, s.reason), '[]'),
           coalesce(sum(s.n), 0), coalesce(bool_or(s.status in ('scheduled', 'queued', 'sending', 'unknown', 'held', 'waiting')), false)
      into v_summary, v_total, v_open
      from (select d.channel, d.status, d.reason, count(*) as n from notify.notification_deliveries d
             where d.request_id = p_id and d.tenant_id = p_tenant_id group by 1, 2, 3) s;
    if v_total <= v_inline then
        select jsonb_agg(notify._delivery_json(d, true) || jsonb_build_object('recipient', r.ref)
                         order by array_position(v.channels, d.channel), d.id)
          into v_deliveries
          from notify.notification_deliveries d
          join notify.recipients r on r.tenant_id = d.tenant_id and r.id = d.recipient_id
         where d.request_id = p_id and d.tenant_id = p_tenant_id;
    end if;
    return notify._notification_head(v)
        || jsonb_build_object('status', case when v_open then 'in_progress' else 'completed' end,
                              'delivery_count', v_total, 'summary', v_summary)
        || case when v_total <= v_inline then jsonb_build_object('deliveries', coalesce(v_deliveries, '[]'))
                else jsonb_build_object('deliveries_omitted', true) end;
end
$$;
comment on function notify_api.get_notification_v2(uuid, uuid) is
    'A notification with a summary of its deliveries by channel, status and reason; up to 100 deliveries also inline with their history (as get_notification_v1, plus each one''s recipient). A larger fan-out answers deliveries_omitted: its deliveries are read page by page with list_deliveries_v1. 404 for another tenant''s id.';

create or replace function notify_api.erase_recipient_v1(p_tenant_id uuid, p_ref text, p_erased_by text default null)
    returns jsonb
    language plpgsql
    security definer
    set search_path = pg_catalog, pg_temp
as $$
declare
    v_recipient notify.recipients;
    v_erasure uuid := gen_random_uuid();
    v_addresses text[];          -- every address the recipient had (current, and those its deliveries were sent to)
    v_needles text[];            -- how those appear in provider payloads: as given, lower-cased, phones without '+'
    v_wa_ids text[];             -- its WhatsApp identifiers (phones' digits, BSUIDs) and what notify.whatsapp_users maps them to
    v_deliveries uuid[];
    v_message_ids text[];
    v_numbers text[];            -- the tenant's WhatsApp business numbers (inbound webhooks name them)
    v_inbound text[];            -- inbound message ids its consent ledger cites (an opt-out keyword's evidence)
    v_counts jsonb := '{}';
    v_n bigint;
    v_in_flight integer;
    v_suppressed jsonb;
begin
    perform notify._enter(p_tenant_id);
    -- Locked for the transaction: a submission to this recipient waits (its deliveries' foreign-key check) until we commit.
    select * into v_recipient from notify.recipients r where r.tenant_id = p_tenant_id and r.ref = p_ref for update;
    if v_recipient.id is null then
        perform notify._raise('ND404', 'not_found', 'no such recipient', 'ref');
    end if;
    select array_agg(distinct x.channel::text || ':' || x.address) into v_addresses
      from (select a.channel, a.address from notify.recipient_addresses a
             where a.tenant_id = p_tenant_id and a.recipient_id = v_recipient.id
            union
            select d.channel, d.address from notify.notification_deliveries d
             where d.tenant_id = p_tenant_id and d.recipient_id = v_recipient.id and d.created_at > '-infinity'
               and d.address is not null) x;
    -- Since 2026 Meta may name a user by its business-scoped user id alone: the ids mapped to its addresses are its too,
    -- its WhatsApp addresses under either form (so an opt-out stays out under both, and both forms' copies go).
    select array_agg(distinct x) into v_addresses
      from (select unnest(coalesce(v_addresses, '{}'))
            union all
            select 'whatsapp:' || w
              from unnest(notify._whatsapp_aliases(p_tenant_id, array(select ltrim(substr(a, 10), '+')
                                                                         from unnest(coalesce(v_addresses, '{}')) a
                                                                        where a like 'whatsapp:%'))) i,
                   lateral (select case when i ~ '^[0-9]+$' then '+' || i else i end) v(w)
             where notify._address_valid('whatsapp', w)) s(x);
    v_wa_ids := notify._whatsapp_aliases(p_tenant_id, array(select ltrim(substr(x, strpos(x, ':') + 1), '+')
                                                            from unnest(coalesce(v_addresses, '{}')) x));
    select array_agg(distinct n) into v_needles
      from (select v.n
              from unnest(coalesce(v_addresses, '{}')) a,
                   lateral (values (split_part(a, ':', 2)), (lower(split_part(a, ':', 2))), (ltrim(split_part(a, ':', 2), '+'))) v(n)
            union all
            select unnest(v_wa_ids)) x(n)
     where length(n) >= 6;
    select coalesce(array_agg(d.id), '{}'), coalesce(array_agg(d.provider_message_id) filter (where d.provider_message_id is not null), '{}')
      into v_deliveries, v_message_ids
      from notify.notification_deliveries d
     where d.tenant_id = p_tenant_id and d.recipient_id = v_recipient.id and d.created_at > '-infinity';
    select coalesce(array_agg(c.evidence ->> 'message_id') filter (where c.evidence ? 'message_id'), '{}') into v_inbound
      from notify.recipient_consents c where c.tenant_id = p_tenant_id and c.recipient_id = v_recipient.id;
    select coalesce(array_agg(cp.settings ->> 'phone_number_id'), '{}') into v_numbers
      from notify.channel_providers cp where cp.tenant_id = p_tenant_id and cp.provider = 'whatsapp_cloud';

    -- 1. What it had opted out of stays opted out, by keyed hash: per channel address, every category (or the whole
    --    channel, category '') whose latest ledger entry is a revoke.
    with states as (
        select a.channel, a.address, k.category,
               (select c.status from notify.recipient_consents c
                 where c.tenant_id = p_tenant_id and c.recipient_id = v_recipient.id and c.channel = a.channel
                   and (c.category is null or c.category = k.category)
                 order by c.id desc limit 1) as status
          from (select split_part(x, ':', 1)::notify.channel as channel, substr(x, strpos(x, ':') + 1) as address
                  from unnest(coalesce(v_addresses, '{}')) x) a
          cross join lateral (select null::text as category
                              union
                              select distinct c.category from notify.recipient_consents c
                               where c.tenant_id = p_tenant_id and c.recipient_id = v_recipient.id and c.channel = a.channel
                                 and c.category is not null) k
    ), ins as (
        insert into notify.address_suppressions (tenant_id, channel, address_hash, category, erasure_id)
        select distinct p_tenant_id, s.channel, notify._address_hash(s.channel, s.address), coalesce(s.category, ''), v_erasure
          from states s where s.status = 'revoked'
        on conflict do nothing
        returning channel, category
    )
    select coalesce(jsonb_agg(distinct jsonb_strip_nulls(jsonb_build_object('channel', channel, 'category', nullif(category, '')))), '[]')
      into v_suppressed from ins;

    -- 2. Pending deliveries are cancelled (recorded in their history, source erasure); one being sent cannot be.
    perform notify._set_source('erasure');
    update notify.notification_deliveries d set status = 'cancelled', reason = 'recipient_erased'
     where d.tenant_id = p_tenant_id and d.id = any (v_deliveries) and d.status in ('scheduled', 'queued', 'held', 'waiting');
    get diagnostics v_n = row_count;
    v_counts := v_counts || jsonb_build_object('cancelled_deliveries', v_n);
    select count(*) into v_in_flight from notify.notification_deliveries d
     where d.tenant_id = p_tenant_id and d.id = any (v_deliveries) and d.status = 'sending';

    -- 3. Every copy of its personal data, table by table; content-free history (statuses, times, counts) stays.
    update notify.notification_deliveries d set address = null, variables = null, last_error_message = null
     where d.tenant_id = p_tenant_id and d.id = any (v_deliveries)
       and (d.address is not null or d.variables is not null or d.last_error_message is not null);
    get diagnostics v_n = row_count;
    v_counts := v_counts || jsonb_build_object('notification_deliveries', v_n);

    update notify.delivery_attempts a set error_message = null
     where a.tenant_id = p_tenant_id and a.delivery_id = any (v_deliveries) and a.error_message is not null;
    get diagnostics v_n = row_count;
    v_counts := v_counts || jsonb_build_object('delivery_attempts', v_n);

    update notify.notification_requests r set variables = '{}'
     where r.tenant_id = p_tenant_id and r.recipient_id = v_recipient.id and r.variables <> '{}';
    get diagnostics v_n = row_count;
    v_counts := v_counts || jsonb_build_object('notification_requests', v_n);

    update notify.recipient_consents c set evidence = null
     where c.tenant_id = p_tenant_id and c.recipient_id = v_recipient.id and c.evidence is not null;
    get diagnostics v_n = row_count;
    v_counts := v_counts || jsonb_build_object('recipient_consents', v_n);

    delete from notify.mock_messages m
     where m.tenant_id = p_tenant_id
       and (m.delivery_id = any (v_deliveries) or m.channel::text || ':' || m.address = any (coalesce(v_addresses, '{}')));
    get diagnostics v_n = row_count;
    v_counts := v_counts || jsonb_build_object('mock_messages', v_n);

    -- Callback bodies carry no address, but the request's metadata: gone from this recipient's.
    update notify.callback_messages c set payload = c.payload #- '{data,metadata}'
     where c.tenant_id = p_tenant_id and c.delivery_id = any (v_deliveries) and c.payload #> '{data,metadata}' is not null;
    get diagnostics v_n = row_count;
    v_counts := v_counts || jsonb_build_object('callback_messages', v_n);

    -- WhatsApp windows and the BSUID <-> phone mapping (since 2026 a webhook may name either): by the phone's digits or
    -- by the business-scoped user id, and by whatever the mapping links them to (a window is kept under both).
    delete from notify.whatsapp_windows w
     where w.tenant_id = p_tenant_id and w.wa_id = any (v_wa_ids);
    get diagnostics v_n = row_count;
    v_counts := v_counts || jsonb_build_object('whatsapp_windows', v_n);
    delete from notify.whatsapp_users u
     where u.tenant_id = p_tenant_id and (u.wa_id = any (v_wa_ids) or u.user_id = any (v_wa_ids));
    get diagnostics v_n = row_count;
    v_counts := v_counts || jsonb_build_object('whatsapp_users', v_n);

    -- Provider webhooks are stored before their tenant is known: a payload is this recipient's when it mentions one of
    -- its addresses and names one of its deliveries (or their provider message ids), an inbound message its ledger
    -- cites, or one of the tenant's business numbers. (This reads every stored webhook: they are kept only as long as retention allows.)
    update notify.webhook_events e set payload = jsonb_build_object('erased', true)
     where v_needles is not null
       and exists (select from unnest(v_needles) n where strpos(lower(e.payload::text), lower(n)) > 0)
       and (exists (select from jsonb_array_elements(e.outcomes) o
                     where o ->> 'delivery_id' = any (v_deliveries::text[]) or o ->> 'provider_message_id' = any (v_message_ids)
                        or o ->> 'inbound' = any (v_inbound))
            -- exactly (as a value, a business number as a phone_number_id): a substring would let another tenant's
            -- erasure rewrite ours (phone_number_id is any 5-20 digits, the digits of a phone for one)
            or jsonb_path_exists(e.payload, 'lax $.** ? (@ == $ids[*])', jsonb_build_object('ids', to_jsonb(v_message_ids)))
            or jsonb_path_exists(e.payload, 'lax $.**.phone_number_id ? (@ == $ids[*])', jsonb_build_object('ids', to_jsonb(v_numbers))));
    get diagnostics v_n = row_count;
    v_counts := v_counts || jsonb_build_object('webhook_events', v_n);

    delete from notify.recipient_addresses a where a.tenant_id = p_tenant_id and a.recipient_id = v_recipient.id;
    get diagnostics v_n = row_count;
    v_counts := v_counts || jsonb_build_object('recipient_addresses', v_n);

    update notify.recipients r set locale = null, timezone = null, updated_at = now()
     where r.tenant_id = p_tenant_id and r.id = v_recipient.id;

    insert into notify.recipient_erasures (tenant_id, id, recipient_id, erased_by, rows_changed, in_flight)
    values (p_tenant_id, v_erasure, v_recipient.id, p_erased_by, v_counts, v_in_flight);
    return jsonb_build_object('id', v_erasure, 'ref', v_recipient.ref, 'erased_at', now(), 'erased_by', p_erased_by,
                              'rows_changed', v_counts, 'in_flight', v_in_flight, 'suppressed', v_suppressed);
end
$$;
comment on function notify_api.erase_recipient_v1(uuid, text, text) is
    'Erases a recipient''s personal data on request: cancels its pending deliveries, puts what it had opted out of on the suppression list (keyed hashes), removes its addresses and every copy of them and of its content (deliveries'' addresses, variables and errors, its requests'' variables, consent evidence, the mock outbox, webhook payloads that mention it, callback bodies'' metadata, WhatsApp windows), keeps the content-free history and its ref, and records the erasure. Returns the receipt {id, ref, erased_at, erased_by, rows_changed per table, in_flight, suppressed}. 404 for an unknown ref.';

create or replace function notify._apply_whatsapp_update(p_provider text, u jsonb)
    returns text
    language plpgsql
    set search_path = pg_catalog, pg_temp
as $$
declare
    v_tenant uuid;
    v_outcome text := 'no_tenant';
    v_count integer;
    v_old text := u ->> 'previous_user_id';
    v_new text := u ->> 'user_id';
begin
    case u ->> 'kind'
    when 'user_id_update' then
        -- A user's BSUID changed (e.g. a new phone number): the mapping, the recipients addressed by the old one and its
        -- open windows move to the new one; consent belongs to the recipient, so it stays.
        if not coalesce(notify._is_bsuid(v_new), false) then
            return 'ignored';
        end if;
        for v_tenant in select t from notify._whatsapp_tenants(p_provider, u) t loop
            perform notify._learn_whatsapp_user(v_tenant, v_new,
                coalesce(nullif(ltrim(u ->> 'wa_id', '+'), ''),
                         (select x.wa_id from notify.whatsapp_users x where x.tenant_id = v_tenant and x.user_id = v_old)),
                u ->> 'parent_user_id');
            v_outcome := 'user_id_recorded';
            if notify._is_bsuid(v_old) and v_old <> v_new then
                update notify.recipient_addresses a set address = v_new, updated_at = now()
                 where a.tenant_id = v_tenant and a.channel = 'whatsapp' and a.address = v_old;
                get diagnostics v_count = row_count;
                -- Deliveries still waiting to be sent go to the new id too (a rare event: a scan of the waiting WhatsApp rows).
                update notify.notification_deliveries x set address = v_new
                 where x.channel = 'whatsapp' and x.status in ('queued', 'scheduled', 'held', 'waiting') and x.tenant_id = v_tenant and x.address = v_old;
                insert into notify.whatsapp_windows as w (tenant_id, phone_number_id, wa_id, last_inbound_at)
                select w0.tenant_id, w0.phone_number_id, v_new, w0.last_inbound_at from notify.whatsapp_windows w0
                 where w0.tenant_id = v_tenant and w0.wa_id = v_old
                on conflict (tenant_id, phone_number_id, wa_id) do update
                    set last_inbound_at = greatest(w.last_inbound_at, excluded.last_inbound_at);
                delete from notify.whatsapp_users x where x.tenant_id = v_tenant and x.user_id = v_old;
                v_outcome := case when v_count > 0 then 'user_id_updated' else 'user_id_recorded' end;
            end if;
        end loop;
    when 'template_category_update' then
        -- Meta moved an approved template to another category. Only the completed change (previous_category) is followed;
        -- an impending one (correct_category) is kept as its outcome, never routed on (whatsapp-2026.md §6).
        if u ->> 'previous_category' is null or lower(u ->> 'new_category') not in ('marketing', 'utility', 'authentication') then
            return case when u ->> 'correct_category' is not null then 'category_update_impending' else 'ignored' end;
        end if;
        for v_tenant in select t from notify._whatsapp_tenants(p_provider, u) t loop
            update notify.templates t
               set content = t.content || jsonb_build_object('category', lower(u ->> 'new_category')), version = t.version + 1, updated_at = now()
             where t.tenant_id = v_tenant and t.channel = 'whatsapp' and t.content ->> 'name' = u ->> 'name'
               and (u ->> 'language' is null or t.content ->> 'language' = u ->> 'language')
               and t.content ->> 'category' is distinct from lower(u ->> 'new_category');
            get diagnostics v_count = row_count;
            v_outcome := case when v_count > 0 or v_outcome = 'category_updated' then 'category_updated' else 'no_such_template' end;
        end loop;
    when 'messaging_tier' then
        for v_tenant in select t from notify._whatsapp_tenants(p_provider, u) t loop
            insert into notify.whatsapp_business_limits as l (tenant_id, waba_id, messaging_tier, payload, reported_at)
            values (v_tenant, coalesce(u ->> 'waba_id', ''), u ->> 'tier', coalesce(u -> 'payload', '{}'), coalesce((u ->> 'reported_at')::timestamptz, now()))
            on conflict (tenant_id, waba_id) do update
                set messaging_tier = coalesce(excluded.messaging_tier, l.messaging_tier), payload = excluded.payload, reported_at = excluded.reported_at
                where excluded.reported_at >= l.reported_at;
            v_outcome := 'tier_recorded';
        end loop;
    else
        v_outcome := 'ignored';
    end case;
    return v_outcome;
end
$$;
comment on function notify._apply_whatsapp_update(text, jsonb) is
    'Applies one WhatsApp account-level change, as the adapter normalized it ({kind, phone_number_id?, waba_id?, ...}): user_id_update (a BSUID replaced: mapping, addresses, waiting deliveries and windows follow), template_category_update (completed: the templates of that name and language get the new category; impending: kept only), messaging_tier (the portfolio''s tier, for dispatcher status).';

create or replace function notify_api.scrub_expired_v1(p_limit integer default 1000)
    returns jsonb
    language plpgsql
    security definer
    set search_path = pg_catalog, pg_temp
as $$
declare
    r record;
    v_deliveries integer := 0;
    v_requests integer := 0;
    v_callbacks integer := 0;
    v_mock integer := 0;
    v_webhooks integer := 0;
    v_n integer;
    v_m integer;
    v_shortest integer;
begin
    if p_limit is null or p_limit < 1 or p_limit > 10000 then
        perform notify._raise('ND400', 'invalid_value', 'limit must be 1 to 10000', 'limit');
    end if;
    -- At most p_limit rows of each kind per call, locked with SKIP LOCKED (a row the worker or a webhook holds waits for
    -- the next call): the caller commits after each call and calls again while any count reached p_limit.
    for r in select p.tenant_id, p.channel, now() - make_interval(days => p.content_days) as cutoff
               from notify._retention_periods() p order by 1, 2 loop
        exit when v_deliveries >= p_limit and v_mock >= p_limit;
        -- Deliveries done with (no longer waiting or sending) and submitted before the cutoff lose their address,
        -- variables and provider error text; their attempts' error texts go too, and their request's variables once
        -- none of its deliveries holds content any more. Status, timestamps, counts and ids stay.
        with batch as (
            select d.tenant_id, d.id, d.request_id
              from notify.notification_deliveries d
             where d.tenant_id = r.tenant_id and d.channel = r.channel and d.created_at < r.cutoff
               and d.status not in ('scheduled', 'queued', 'sending', 'held', 'waiting')
               and (d.address is not null or d.variables is not null or d.last_error_message is not null)
             order by d.created_at
             limit greatest(p_limit - v_deliveries, 0)
               for update skip locked
        ), scrubbed as (
            update notify.notification_deliveries d
               set address = null, variables = null, last_error_message = null
              from batch b
             where d.tenant_id = b.tenant_id and d.id = b.id
            returning d.tenant_id, d.id, d.request_id
        ), attempts as (
            update notify.delivery_attempts a set error_message = null
              from scrubbed s
             where a.tenant_id = s.tenant_id and a.delivery_id = s.id and a.error_message is not null
        ), requests as (
            update notify.notification_requests q set variables = '{}'
              from (select distinct s.tenant_id, s.request_id from scrubbed s) s
             where q.tenant_id = s.tenant_id and q.id = s.request_id and q.variables <> '{}'
               and not exists (select from notify.notification_deliveries x
                                where x.request_id = q.id and x.tenant_id = q.tenant_id
                                  and (x.address is not null or x.variables is not null or x.status in ('scheduled', 'queued', 'sending', 'held', 'waiting'))
                                  and x.id not in (select s2.id from scrubbed s2))
            returning 1
        )
        select (select count(*) from scrubbed), (select count(*) from requests) into v_n, v_m;
        v_deliveries := v_deliveries + v_n;
        v_requests := v_requests + v_m;
        -- The mock outbox (rendered messages and addresses): rows of a tenant whose content period ends before the
        -- longest one (when the whole day's partition is dropped).
        with gone as (
            delete from notify.mock_messages m
             where (m.tenant_id, m.id, m.sent_at) in (
                       select x.tenant_id, x.id, x.sent_at from notify.mock_messages x
                        where x.tenant_id = r.tenant_id and x.channel = r.channel and x.sent_at < r.cutoff
                        limit greatest(p_limit - v_mock, 0))
            returning 1
        )
        select count(*) into v_n from gone;
        v_mock := v_mock + v_n;
    end loop;
    -- Callback messages (the outbox; its attempts stay, as history): finished ones past the tenant's shortest content
    -- period are deleted, in one batch across tenants.
    with due as (
        select m.tenant_id, m.id, m.created_at
          from notify.callback_messages m
          join (select p.tenant_id, min(p.content_days) as days from notify._retention_periods() p group by 1) p
            on p.tenant_id = m.tenant_id
         where m.status in ('delivered', 'failed') and m.created_at < now() - make_interval(days => p.days)
         limit p_limit
           for update of m skip locked
    ), gone as (
        delete from notify.callback_messages m using due
         where m.tenant_id = due.tenant_id and m.id = due.id and m.created_at = due.created_at returning 1
    )
    select count(*) into v_callbacks from gone;
    -- Raw provider webhooks are not a tenant's until parsed (they carry addresses of any tenant): kept for the shortest
    -- content period of any tenant. Their payloads go by whole days (run_retention_v1); their deduplication keys (a
    -- duplicate is refused while its key is kept) here, oldest first.
    select coalesce(min(p.content_days), (select content_days from notify._retention_defaults())) into v_shortest
      from notify._retention_periods() p;
    with gone as (
        delete from notify.webhook_event_keys k
         where (k.provider, k.event_key) in (
                   select x.provider, x.event_key from notify.webhook_event_keys x
                    where x.received_at < now() - make_interval(days => v_shortest)
                    order by x.received_at limit p_limit
                      for update skip locked)
        returning 1
    )
    select count(*) into v_webhooks from gone;
    return jsonb_build_object('deliveries', v_deliveries, 'requests', v_requests, 'callback_messages', v_callbacks,
                              'mock_messages', v_mock, 'webhook_event_keys', v_webhooks,
                              'more', greatest(v_deliveries, v_callbacks, v_mock, v_webhooks) >= p_limit);
end
$$;
comment on function notify_api.scrub_expired_v1(integer) is
    'Worker (the "retention" task) and operators: one bounded batch (p_limit rows of each kind) of retention scrubbing, per tenant and channel content period: deliveries done with lose address, variables and error texts (and their attempts'' error texts; their request its variables once none holds content), the mock outbox and finished callback messages past the period are deleted, webhook deduplication keys past the shortest content period of any tenant are deleted (their payloads go by whole days, run_retention_v1). Call again (a transaction each) while "more" is true.';

select notify._settle_owners();
