-- Tenant delivery policies (issue #14): quiet hours in the recipient's time zone, frequency caps per recipient, and
-- WhatsApp's pair rate limit. Set by /internal/quiet-hours, /internal/frequency-caps, `dispatcher policies`; applied by
-- notify_api.claim_deliveries_v1 (sql/080_api_worker.sql) through notify._policy_claim, previewed by notify._policy_decision.

-- Defaults (nothing set): no quiet hours, no caps; nothing changes. The time zone of a recipient without one is the
-- tenant's notify.tenants.default_timezone, else UTC. The pair rate limit (one message per 6 seconds to the same WhatsApp
-- user, Cloud API error 131056) is not a setting: the claim applies it to every delivery sent by provider whatsapp_cloud.

create table notify.quiet_hours (
    tenant_id uuid not null references notify.tenants (id),
    category text not null,
    starts_at time,
    ends_at time,
    exempt boolean not null default false,
    updated_at timestamptz not null default now(),
    primary key (tenant_id, category),
    constraint quiet_hours_window check (
        (exempt and starts_at is null and ends_at is null)
        or (not exempt and starts_at is not null and ends_at is not null and starts_at <> ends_at)),
    constraint quiet_hours_default_not_exempt check (category <> '' or not exempt)
);
comment on table notify.quiet_hours is
    'A tenant''s quiet hours, local time of the recipient: category '''' is the default window, any other row a category''s own window (or exempt: never held). A window with starts_at > ends_at crosses midnight (21:00-08:00). No row: no quiet hours. Checked by set_quiet_hours_v1.';
comment on column notify.quiet_hours.exempt is 'A category sent at once, quiet hours or not (a password reset).';

create table notify.frequency_caps (
    tenant_id uuid not null references notify.tenants (id),
    id uuid not null default gen_random_uuid(),
    max_count integer not null,
    period interval not null,
    channel notify.channel,
    category text,
    action text not null default 'suppress',
    position smallint not null default 0,
    updated_at timestamptz not null default now(),
    primary key (tenant_id, id),
    constraint frequency_caps_sane check (max_count between 1 and 10000 and period between interval '1 second' and interval '31 days'),
    constraint frequency_caps_action check (action in ('suppress', 'hold'))
);
comment on column notify.frequency_caps.position is 'Its place in the list the tenant set (get returns them in that order).';
comment on table notify.frequency_caps is
    'At most max_count messages per recipient in any sliding period, counting only messages on channel (null: any) of category (null: any); over it a delivery is suppressed (action suppress) or held until the cap frees (hold). No row: no caps. Checked by set_frequency_caps_v1.';

-- The ledger the caps and the pair rate limit count: one row per delivery claimed for sending, written by the claim
-- only for tenants with a cap and for provider whatsapp_cloud. Pruned by notify._prune_policy_sends (run_maintenance_v1):
-- a row older than its tenant's longest cap period (and than a minute) is deleted, so it holds about one period of sends.
create table notify.policy_sends (
    tenant_id uuid not null,
    delivery_id uuid not null,
    recipient_id uuid not null,
    channel notify.channel not null,
    category text,
    first_sent_at timestamptz not null,
    last_sent_at timestamptz not null,
    -- recipient_id second: every lookup is by recipient, and no other index may look like a way to do it (the ledger
    -- grows faster than its statistics; a cached plan walking a tenant's whole ledger per delivery would be quadratic).
    primary key (tenant_id, recipient_id, delivery_id)
);
comment on table notify.policy_sends is
    'Messages claimed for sending, per recipient, for the frequency caps (first_sent_at: a retry is the same message) and WhatsApp''s pair rate limit (last_sent_at: the latest attempt). Written only for tenants with caps and for whatsapp_cloud; pruned past the longest cap period by run_maintenance_v1.';
create index policy_sends_pruning on notify.policy_sends (last_sent_at);

create type notify.policy_outcome as (decision text, reason text, until timestamptz, detail jsonb);
comment on type notify.policy_outcome is
    'What the tenant''s policies say of a delivery about to be sent: decision send | hold | suppress | expire, the reason (quiet_hours, quiet_hours_past_expiry, frequency_cap, frequency_cap_past_expiry, pair_rate_limit, pair_rate_limit_past_expiry; null when sent), until (when a hold ends), detail (the window or cap in force).';

create function notify._pair_interval()
    returns interval
    language sql
    immutable
    set search_path = pg_catalog, pg_temp
as $$
    select interval '6 seconds'
$$;
comment on function notify._pair_interval() is
    'WhatsApp''s pair rate limit: the shortest gap between two messages from one business number to one user (about one per 6 s; Cloud API error 131056).';

create function notify._quiet_hours_end(p_start time, p_end time, p_timezone text, p_at timestamptz)
    returns timestamptz
    language sql
    stable
    set search_path = pg_catalog, pg_temp
as $$
    -- The local date and time of p_at; the window's end on that date (or the next, for a window crossing midnight that
    -- p_at is in before midnight), as an instant. Daylight saving is the time zone database's: 08:00 on the day clocks
    -- change is 08:00 of that day's offset. An end the time zone makes no later than p_at (a window ending in the hour
    -- that repeats when clocks go back) is no window.
    select e.ends
      from (select case when p_start < p_end and l.t >= p_start and l.t < p_end then (l.d + p_end) at time zone p_timezone
                        when p_start > p_end and l.t >= p_start then (l.d + 1 + p_end) at time zone p_timezone
                        when p_start > p_end and l.t < p_end then (l.d + p_end) at time zone p_timezone end as ends
              from (select (p_at at time zone p_timezone)::date as d, (p_at at time zone p_timezone)::time as t) l) e
     where e.ends > p_at
$$;
comment on function notify._quiet_hours_end(time, time, text, timestamptz) is
    'When the quiet hours [p_start, p_end) of local time in p_timezone that contain p_at end (a timestamptz), or null if p_at is outside them. p_start > p_end crosses midnight. A pure function of its arguments: tests pass any instant.';

create function notify._iso_duration(p_value interval)
    returns text
    language sql
    immutable
    set search_path = pg_catalog, pg_temp
as $$
    select 'P' || case when s.d > 0 then s.d || 'D' else '' end
           || case when s.r > 0 then 'T' || case when s.r / 3600 > 0 then (s.r / 3600) || 'H' else '' end
                                          || case when s.r % 3600 / 60 > 0 then (s.r % 3600 / 60) || 'M' else '' end
                                          || case when s.r % 60 > 0 then (s.r % 60) || 'S' else '' end
                   else '' end
      from (select e / 86400 as d, e % 86400 as r from (select extract(epoch from p_value)::bigint as e) x) s
$$;
comment on function notify._iso_duration(interval) is 'An interval of whole seconds as an ISO 8601 duration (P1D, PT6H, P1DT30M).';

create function notify._policy_evaluate(p_tenant_id uuid, p_recipient_id uuid, p_channel notify.channel, p_category text,
                                        p_provider text, p_expires_at timestamptz, p_at timestamptz, p_delivery_id uuid)
    returns notify.policy_outcome
    language plpgsql
    stable
    set search_path = pg_catalog, pg_temp
    -- Its lookups are by key (a recipient's sends: policy_sends' primary key). The ledger grows from nothing in a
    -- burst (a tenant's first capped bulk send), faster than its statistics: a plan cached while it looked empty would
    -- scan it whole for every delivery, so a sequential scan is never chosen here.
    set enable_seqscan = off
as $$
declare
    v_out notify.policy_outcome := row('send', null, null, '{}'::jsonb)::notify.policy_outcome;
    v_window notify.quiet_hours;
    v_timezone text;
    v_end timestamptz;
    v_cap record;
    v_last timestamptz;
    -- The sends not counted against this delivery: its own first send (a retry is the same message) and, for a route
    -- step, its route's other steps (found below, only where the tenant has caps).
    v_own uuid[] := case when p_delivery_id is null then '{}'::uuid[] else array[p_delivery_id] end;
begin
    -- 1. Quiet hours: the category's own row (a window, or exempt), else the default window.
    select q.* into v_window
      from notify.quiet_hours q
     where q.tenant_id = p_tenant_id and q.category in ('', coalesce(p_category, ''))
     order by q.category desc
     limit 1;
    if v_window.tenant_id is not null and not v_window.exempt then
        select coalesce(r.timezone, t.default_timezone, 'UTC') into v_timezone
          from notify.tenants t
          left join notify.recipients r on r.tenant_id = t.id and r.id = p_recipient_id
         where t.id = p_tenant_id;
        v_end := notify._quiet_hours_end(v_window.starts_at, v_window.ends_at, coalesce(v_timezone, 'UTC'), p_at);
        if v_end is not null then
            v_out.detail := jsonb_build_object('quiet_hours', jsonb_build_object(
                'start', to_char(v_window.starts_at, 'HH24:MI'), 'end', to_char(v_window.ends_at, 'HH24:MI'),
                'timezone', coalesce(v_timezone, 'UTC'), 'category', nullif(v_window.category, '')));
            v_out.until := v_end;
            if p_expires_at is not null and v_end > p_expires_at then
                v_out.decision := 'expire';
                v_out.reason := 'quiet_hours_past_expiry';
            else
                v_out.decision := 'hold';
                v_out.reason := 'quiet_hours';
            end if;
            return v_out;
        end if;
    end if;

    -- 2. Frequency caps: the messages already claimed for sending to the recipient in each matching cap's period (a
    -- retry does not count its own first send, nor a route step its route's other steps). A suppressing cap over its
    -- count wins; else the latest time a holding cap frees (when its max_count-th newest send leaves the period).
    -- The recipient's sends are read once (within the longest matching period) and every cap counts that copy: a
    -- tenant's 20 caps over a recipient's 10,000 sends cost one index scan per delivery, not 40 (the claim serves every
    -- tenant's rows in one statement: one tenant's caps must not hold up another's). When a cap frees is looked for
    -- only where a holding cap is over its count.
    -- A route step's other steps: one message to the person (a failed WhatsApp step does not use up the cap that its
    -- e-mail fallback would then be suppressed by). Two lookups by key.
    if p_delivery_id is not null and exists (select from notify.frequency_caps c where c.tenant_id = p_tenant_id) then
        v_own := v_own || array(
            select s.id from notify.notification_deliveries d
              join notify.notification_deliveries s
                on s.request_id = d.request_id and s.tenant_id = d.tenant_id and s.recipient_id = d.recipient_id
               and s.route_step is not null and s.id <> d.id
             where d.tenant_id = p_tenant_id and d.id = p_delivery_id and d.route_step is not null);
    end if;
    for v_cap in
        with caps as (
            select c.*
              from notify.frequency_caps c
             where c.tenant_id = p_tenant_id
               and (c.channel is null or c.channel = p_channel)
               and (c.category is null or c.category = p_category)
        ), sends as materialized (
            select l.first_sent_at, l.channel, l.category
              from notify.policy_sends l
             where l.tenant_id = p_tenant_id and l.recipient_id = p_recipient_id
               and l.first_sent_at > p_at - (select max(c.period) from caps c) and l.first_sent_at <= p_at
               and l.delivery_id <> all (v_own)
        ), counted as (
            select c.*,
                   (select count(*) from sends l
                     where l.first_sent_at > p_at - c.period
                       and (c.channel is null or l.channel = c.channel)
                       and (c.category is null or l.category = c.category)) as count
              from caps c
        )
        select c.*, f.frees
          from counted c
          left join lateral (select l.first_sent_at + c.period as frees from sends l
                              where c.action = 'hold'
                                and l.first_sent_at > p_at - c.period
                                and (c.channel is null or l.channel = c.channel)
                                and (c.category is null or l.category = c.category)
                              order by l.first_sent_at desc offset c.max_count - 1 limit 1) f on true
         where c.count >= c.max_count
         order by c.action desc, f.frees desc, c.id
    loop
        -- (only caps with at least max_count sends in their period, i.e. over them, get here; suppress sorts before
        -- hold, and the holding cap that frees last first.)
        v_out.detail := jsonb_build_object('cap', jsonb_build_object(
            'max', v_cap.max_count, 'period', notify._iso_duration(v_cap.period), 'count', v_cap.count,
            'channel', v_cap.channel, 'category', v_cap.category, 'action', v_cap.action));
        v_out.reason := 'frequency_cap';
        if v_cap.action = 'suppress' then
            v_out.decision := 'suppress';
        elsif p_expires_at is not null and v_cap.frees > p_expires_at then
            v_out.decision := 'expire';
            v_out.reason := 'frequency_cap_past_expiry';
            v_out.until := v_cap.frees;
        else
            v_out.decision := 'hold';
            v_out.until := v_cap.frees;
        end if;
        return v_out;
    end loop;

    -- 3. WhatsApp's pair rate limit: at most one message per _pair_interval() to the same user (the recipient on the
    -- tenant's one WhatsApp number), so the Cloud API's error 131056 is avoided rather than retried.
    if p_provider = 'whatsapp_cloud' and p_channel = 'whatsapp' then
        -- (the time bound as a filter, not an index condition: only the primary key finds a recipient's rows)
        select max(l.last_sent_at) filter (where l.last_sent_at <= p_at) into v_last
          from notify.policy_sends l
         where l.tenant_id = p_tenant_id and l.recipient_id = p_recipient_id and l.channel = 'whatsapp';
        if v_last + notify._pair_interval() > p_at then
            v_out.until := v_last + notify._pair_interval();
            v_out.detail := jsonb_build_object('pair_rate_limit', jsonb_build_object(
                'last_sent_at', v_last, 'interval', notify._iso_duration(notify._pair_interval())));
            if p_expires_at is not null and v_out.until > p_expires_at then
                v_out.decision := 'expire';
                v_out.reason := 'pair_rate_limit_past_expiry';
            else
                v_out.decision := 'hold';
                v_out.reason := 'pair_rate_limit';
            end if;
        end if;
    end if;
    return v_out;
end
$$;
comment on function notify._policy_evaluate(uuid, uuid, notify.channel, text, text, timestamptz, timestamptz, uuid) is
    'The tenant policies'' decision for a delivery about to be sent at p_at, in order: quiet hours (hold until they end, or expire when that is past p_expires_at; exempt categories pass), frequency caps (suppress, or hold until the cap frees), WhatsApp''s pair rate limit (hold until 6 s after the last send). p_delivery_id (or null) is not counted against its own caps, nor are its route''s other steps (a route is one message). Reads only; row security applies.';

create function notify._policy_decision(p_tenant_id uuid, p_recipient_id uuid, p_channel notify.channel, p_category text,
                                        p_provider text, p_address text, p_expires_at timestamptz, p_at timestamptz)
    returns table (decision text, reason text, until timestamptz, detail jsonb)
    language sql
    stable
    set search_path = pg_catalog, pg_temp
as $$
    select o.decision, o.reason, o.until, o.detail
      from notify._policy_evaluate(p_tenant_id, p_recipient_id, p_channel, p_category, p_provider, p_expires_at, p_at, null) o
$$;
comment on function notify._policy_decision(uuid, uuid, notify.channel, text, text, text, timestamptz, timestamptz) is
    'Would a delivery be sent at p_at, as the claim decides it (notify._policy_evaluate): decision send | hold | suppress | expire, reason, until (a hold''s end), detail {"quiet_hours": {start, end, timezone, category}} | {"cap": {max, period, count, channel, category, action}} | {"pair_rate_limit": {last_sent_at, interval}}. Stable, writes nothing, takes no locks: for the dry run. p_address is not used (the pair is the recipient on the tenant''s WhatsApp number).';

create function notify._policy_claim(p_tenant_id uuid, p_delivery_id uuid, p_recipient_id uuid, p_channel notify.channel,
                                     p_category text, p_provider text, p_expires_at timestamptz)
    returns notify.policy_outcome
    language plpgsql
    volatile
    set search_path = pg_catalog, pg_temp
as $$
declare
    v_counted boolean := p_provider = 'whatsapp_cloud'
                         or exists (select from notify.frequency_caps c where c.tenant_id = p_tenant_id);
    v_out notify.policy_outcome;
    v_at timestamptz;
begin
    if v_counted then
        -- Caps hold across concurrent claims: one recipient's sends are counted and written one transaction at a time.
        -- The claim calls this in (tenant_id, recipient_id) order, so two claims take these locks in the same order.
        perform pg_advisory_xact_lock(hashtextextended('notify.policy_sends:' || p_tenant_id::text || ':' || p_recipient_id::text, 0));
    end if;
    -- A new statement after the lock: a volatile function's statements each take a new snapshot, so this one sees the
    -- sends another claim committed while we waited (and, within one claim, the ones written for earlier rows).
    -- Decided and written at the clock's time after the lock, not at now() (the transaction's start): a claim whose
    -- transaction began before another's committed send would otherwise count only sends up to its own start, and
    -- send the 5th reminder under a cap of 4 (or a second WhatsApp message to the user within 6 seconds).
    v_at := clock_timestamp();
    v_out := notify._policy_evaluate(p_tenant_id, p_recipient_id, p_channel, p_category, p_provider, p_expires_at, v_at, p_delivery_id);
    if v_counted and v_out.decision = 'send' then
        insert into notify.policy_sends (tenant_id, delivery_id, recipient_id, channel, category, first_sent_at, last_sent_at)
        values (p_tenant_id, p_delivery_id, p_recipient_id, p_channel, p_category, v_at, v_at)
        on conflict (tenant_id, recipient_id, delivery_id) do update set last_sent_at = excluded.last_sent_at;
    elsif v_out.decision = 'hold' then
        -- Claimed again when the hold ends: a wake-up at that second (coalesced with any other for the same second).
        perform notify._wake(p_channel, v_out.until);
    end if;
    return v_out;
end
$$;
comment on function notify._policy_claim(uuid, uuid, uuid, notify.channel, text, text, timestamptz) is
    'The claim''s policy step for one delivery about to be sent (claim_deliveries_v1 calls it only for tenants with a policy and for whatsapp_cloud): serialized per recipient (a transaction advisory lock) where sends are counted, decided by notify._policy_evaluate at clock_timestamp() after the lock (so a send another claim committed meanwhile counts, even when this transaction began first), a send written to notify.policy_sends, a hold''s end given a wake-up (notify._wake).';

create function notify._prune_policy_sends()
    returns integer
    language sql
    volatile
    set search_path = pg_catalog, pg_temp
as $$
    with gone as (
        delete from notify.policy_sends l
         where l.last_sent_at < now() - interval '1 minute'
           and l.last_sent_at < now() - coalesce((select max(c.period) from notify.frequency_caps c where c.tenant_id = l.tenant_id),
                                                 interval '0')
        returning 1
    )
    select count(*)::integer from gone
$$;
comment on function notify._prune_policy_sends() is
    'Deletes the policy_sends rows no cap or pair limit can count any more (older than the tenant''s longest cap period and than a minute). Run by run_maintenance_v1.';

create function notify._release_held(p_tenant_id uuid, p_reasons text[])
    returns integer
    language plpgsql
    volatile
    set search_path = pg_catalog, pg_temp
as $$
declare
    v_released integer;
    -- How far ahead such a hold can end: quiet hours within a day (two, for a daylight-saving day and a window's
    -- length), a cap within its period (31 days at most). The queue index is read over that range only, not over every
    -- tenant's scheduled deliveries.
    v_horizon interval := case when 'frequency_cap' = any (p_reasons) then interval '32 days' else interval '2 days' end;
begin
    -- What the tenant's previous settings held (reason in p_reasons) is due now: the claim decides again under the new
    -- ones (held again, until the new end, if they still say so). Found through the queue index (a due time in the
    -- future, within the horizon); the status does not change, so no history row: the next claim writes one.
    -- Locked by id, as cancel does (a route's steps are in id order, so the route trigger agrees).
    with held as (
        select d.tenant_id, d.id
          from notify.notification_deliveries d
         where d.channel = any (enum_range(null::notify.channel))
           and d.due_at > now() and d.due_at <= now() + v_horizon
           and d.status = 'held' and d.tenant_id = p_tenant_id and d.reason = any (p_reasons)
         order by d.id
           for update
    ), released as (
        update notify.notification_deliveries d set due_at = now()
          from held h
         where d.tenant_id = h.tenant_id and d.id = h.id and d.status = 'held' and d.reason = any (p_reasons)
        returning d.channel
    ), woken as (
        select notify._wake(r.channel) from (select distinct channel from released order by 1) r
    )
    select (select count(*) from released)::integer into v_released from (select count(*) from woken) w;
    return v_released;
end
$$;
comment on function notify._release_held(uuid, text[]) is
    'Makes a tenant''s deliveries held for one of p_reasons (quiet_hours, frequency_cap) due now and wakes their channels, so that the claim decides again under the settings just changed. Called by set/delete_quiet_hours_v1 and set/delete_frequency_caps_v1.';

-- Admin: set (replaces), get, delete. Errors name the field.

create function notify._clock_field(p_object jsonb, p_key text, p_path text)
    returns time
    language plpgsql
    immutable
    set search_path = pg_catalog, pg_temp
as $$
declare
    v text := notify._text_field(p_object, p_key, p_path, true, 5);
    v_path text := ltrim(p_path || '.' || p_key, '.');
begin
    if v !~ '^([01][0-9]|2[0-3]):[0-5][0-9]$' then
        perform notify._raise('ND400', 'invalid_format', format('%s must be a local time HH:MM (00:00 to 23:59)', v_path), v_path);
    end if;
    return v::time;
end
$$;
comment on function notify._clock_field(jsonb, text, text) is 'Reads a local time of day, HH:MM, naming the field in its error.';

create function notify._quiet_hours_json(p_tenant_id uuid)
    returns jsonb
    language sql
    stable
    set search_path = pg_catalog, pg_temp
as $$
    select jsonb_build_object(
        'timezone', t.default_timezone,
        'start', (select to_char(q.starts_at, 'HH24:MI') from notify.quiet_hours q where q.tenant_id = t.id and q.category = ''),
        'end', (select to_char(q.ends_at, 'HH24:MI') from notify.quiet_hours q where q.tenant_id = t.id and q.category = ''),
        'categories', coalesce((select jsonb_object_agg(q.category, case when q.exempt then jsonb_build_object('exempt', true)
                                                                    else jsonb_build_object('start', to_char(q.starts_at, 'HH24:MI'),
                                                                                            'end', to_char(q.ends_at, 'HH24:MI')) end)
                                  from notify.quiet_hours q where q.tenant_id = t.id and q.category <> ''), '{}'),
        'default', t.default_timezone is null and not exists (select from notify.quiet_hours q where q.tenant_id = t.id),
        'defaults', jsonb_build_object('timezone', 'UTC', 'start', null, 'end', null, 'categories', '{}'::jsonb),
        'updated_at', (select max(q.updated_at) from notify.quiet_hours q where q.tenant_id = t.id))
      from notify.tenants t
     where t.id = p_tenant_id
$$;
comment on function notify._quiet_hours_json(uuid) is 'The public JSON form of a tenant''s quiet hours and default time zone, with the defaults.';

create function notify_api.set_quiet_hours_v1(p_tenant_id uuid, p_body jsonb)
    returns jsonb
    language plpgsql
    security definer
    set search_path = pg_catalog, pg_temp
as $$
declare
    v_timezone text;
    v_start time;
    v_end time;
    v_key text;
    v_value jsonb;
    v_rows notify.quiet_hours[] := '{}';
begin
    perform notify._enter(p_tenant_id);
    if p_body is null or jsonb_typeof(p_body) <> 'object' then
        perform notify._raise('ND400', 'invalid_type', 'body must be an object', '');
    end if;
    perform notify._check_keys(p_body, array['timezone', 'start', 'end', 'categories'], '');
    v_timezone := notify._text_field(p_body, 'timezone', '', false, 64);
    -- Checked here, once (pg_timezone_names reads the whole time zone database): never per delivery.
    if v_timezone is not null and not exists (select from pg_catalog.pg_timezone_names where name = v_timezone) then
        perform notify._raise('ND400', 'invalid_timezone', format('timezone %s is not an IANA time zone', v_timezone), 'timezone');
    end if;
    if p_body ? 'start' or p_body ? 'end' then
        v_start := notify._clock_field(p_body, 'start', '');
        v_end := notify._clock_field(p_body, 'end', '');
        if v_start = v_end then
            perform notify._raise('ND422', 'invalid_quiet_hours', 'end must differ from start', 'end');
        end if;
        v_rows := v_rows || row(p_tenant_id, '', v_start, v_end, false, now())::notify.quiet_hours;
    end if;
    if p_body ? 'categories' and jsonb_typeof(p_body -> 'categories') <> 'null' then
        if jsonb_typeof(p_body -> 'categories') <> 'object' then
            perform notify._raise('ND400', 'invalid_type', 'categories must be an object', 'categories');
        end if;
        for v_key, v_value in select * from jsonb_each(p_body -> 'categories') order by 1 loop
            if length(v_key) not between 1 and 100 then
                perform notify._raise('ND400', 'invalid_length', 'a category must be 1 to 100 characters', 'categories');
            end if;
            if jsonb_typeof(v_value) <> 'object' then
                perform notify._raise('ND400', 'invalid_type', format('categories.%s must be an object', v_key), 'categories.' || v_key);
            end if;
            perform notify._check_keys(v_value, array['start', 'end', 'exempt'], 'categories.' || v_key);
            if v_value ? 'exempt' and jsonb_typeof(v_value -> 'exempt') <> 'boolean' then
                perform notify._raise('ND400', 'invalid_type', format('categories.%s.exempt must be true or false', v_key),
                                      format('categories.%s.exempt', v_key));
            end if;
            if coalesce((v_value ->> 'exempt')::boolean, false) then
                if v_value ? 'start' or v_value ? 'end' then
                    perform notify._raise('ND422', 'invalid_quiet_hours', format('categories.%s is exempt: it has no start or end', v_key),
                                          format('categories.%s.exempt', v_key));
                end if;
                v_rows := v_rows || row(p_tenant_id, v_key, null, null, true, now())::notify.quiet_hours;
            else
                v_start := notify._clock_field(v_value, 'start', 'categories.' || v_key);
                v_end := notify._clock_field(v_value, 'end', 'categories.' || v_key);
                if v_start = v_end then
                    perform notify._raise('ND422', 'invalid_quiet_hours', format('categories.%s.end must differ from its start', v_key),
                                          format('categories.%s.end', v_key));
                end if;
                v_rows := v_rows || row(p_tenant_id, v_key, v_start, v_end, false, now())::notify.quiet_hours;
            end if;
        end loop;
    end if;
    if cardinality(v_rows) > 100 then
        perform notify._raise('ND422', 'invalid_quiet_hours', 'at most 100 categories', 'categories');
    end if;
    update notify.tenants set default_timezone = v_timezone where id = p_tenant_id;
    if not found then
        perform notify._raise('ND404', 'not_found', 'no such tenant', 'tenant_id');
    end if;
    delete from notify.quiet_hours where tenant_id = p_tenant_id;
    insert into notify.quiet_hours select * from unnest(v_rows);
    perform notify._release_held(p_tenant_id, array['quiet_hours']);
    return notify._quiet_hours_json(p_tenant_id);
end
$$;
comment on function notify_api.set_quiet_hours_v1(uuid, jsonb) is
    'Sets a tenant''s quiet hours, {timezone?, start?, end?, categories?: {name: {start, end} | {exempt: true}}} (HH:MM local time of the recipient; start > end crosses midnight; timezone: the tenant''s default for recipients without one, checked against the time zone database). Replaces the previous settings; what is left out is not set; what the previous ones held is due again at once (notify._release_held). Errors name the field.';

create function notify_api.get_quiet_hours_v1(p_tenant_id uuid)
    returns jsonb
    language plpgsql
    stable
    security definer
    set search_path = pg_catalog, pg_temp
as $$
begin
    perform notify._enter(p_tenant_id);
    return notify._quiet_hours_json(p_tenant_id);
end
$$;
comment on function notify_api.get_quiet_hours_v1(uuid) is 'A tenant''s quiet hours and default time zone, with the defaults (none, UTC).';

create function notify_api.delete_quiet_hours_v1(p_tenant_id uuid)
    returns jsonb
    language plpgsql
    security definer
    set search_path = pg_catalog, pg_temp
as $$
begin
    perform notify._enter(p_tenant_id);
    update notify.tenants set default_timezone = null where id = p_tenant_id;
    delete from notify.quiet_hours where tenant_id = p_tenant_id;
    perform notify._release_held(p_tenant_id, array['quiet_hours']);
    return notify._quiet_hours_json(p_tenant_id);
end
$$;
comment on function notify_api.delete_quiet_hours_v1(uuid) is 'Removes a tenant''s quiet hours and default time zone (back to the defaults: none, UTC); what they held is due at once.';

create function notify._frequency_caps_json(p_tenant_id uuid)
    returns jsonb
    language sql
    stable
    set search_path = pg_catalog, pg_temp
as $$
    select jsonb_build_object(
        'caps', coalesce(jsonb_agg(jsonb_build_object('max', c.max_count, 'period', notify._iso_duration(c.period),
                                                      'channel', c.channel, 'category', c.category, 'action', c.action)
                                   order by c.position) filter (where c.id is not null), '[]'),
        'default', count(c.id) = 0,
        'defaults', jsonb_build_object('caps', '[]'::jsonb, 'action', 'suppress'),
        'updated_at', max(c.updated_at))
      from (select p_tenant_id as tenant_id) t
      left join notify.frequency_caps c on c.tenant_id = t.tenant_id
$$;
comment on function notify._frequency_caps_json(uuid) is 'The public JSON form of a tenant''s frequency caps, with the defaults (none).';

create function notify_api.set_frequency_caps_v1(p_tenant_id uuid, p_body jsonb)
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

create function notify_api.get_frequency_caps_v1(p_tenant_id uuid)
    returns jsonb
    language plpgsql
    stable
    security definer
    set search_path = pg_catalog, pg_temp
as $$
begin
    perform notify._enter(p_tenant_id);
    return notify._frequency_caps_json(p_tenant_id);
end
$$;
comment on function notify_api.get_frequency_caps_v1(uuid) is 'A tenant''s frequency caps, with the defaults (none).';

create function notify_api.delete_frequency_caps_v1(p_tenant_id uuid)
    returns jsonb
    language plpgsql
    security definer
    set search_path = pg_catalog, pg_temp
as $$
begin
    perform notify._enter(p_tenant_id);
    delete from notify.frequency_caps where tenant_id = p_tenant_id;
    perform notify._release_held(p_tenant_id, array['frequency_cap']);
    return notify._frequency_caps_json(p_tenant_id);
end
$$;
comment on function notify_api.delete_frequency_caps_v1(uuid) is 'Removes a tenant''s frequency caps (back to the default: none); what a holding cap held is due at once.';
