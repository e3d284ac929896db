-- 0041: review of issue #14 (fallback routes, delivery policies, dry run). A route step is not counted against the
-- frequency caps by its own route's other steps: a route is one message to the person, so a failed WhatsApp step no
-- longer uses up the cap its e-mail fallback was then suppressed by. A cap's period too long for an interval
-- (P99999999999999999999999D) is refused as out of range (ND422 naming caps[n].period) instead of failing with
-- Postgres's own data error (a 400 without a field over HTTP).
-- A delivery's caps read the recipient's sends once (every cap counts that copy) instead of twice per cap: a tenant's 20
-- caps over a recipient's 10,000 sends made each delivery cost 40 index scans, and the claim, which serves every
-- tenant's rows in one statement, took seconds per batch (measured: 7.1 s -> 4.1 s for 100 such deliveries).
-- The dry run asks the policies once per distinct (time zone, channel, provider) for recipients without counted sends
-- (every new one) instead of once or more per delivery: a 10,000-recipient fan-out with quiet hours set took 13 s, now
-- about 2 s, as without policies.
-- The claim's policy step decides and writes at clock_timestamp() after its per-recipient lock instead of now(): a
-- claim whose transaction began before another claim's committed send counted only sends up to its own start, and
-- sent the 5th reminder under a cap of 4 (or a second WhatsApp message within the pair limit's 6 seconds).
-- Setting or removing quiet hours or caps releases what the previous settings held (notify._release_held, new): a
-- tenant correcting a wrong window no longer waits for the old window's end.
-- A route's e-mail step before another may not wait for read (e-mail reports no reads: the next step waited forever
-- without within, or always followed with it): ND400 invalid_value naming route[n].until.

create or replace function notify._policy_evaluate(p_tenant_id uuid, p_recipient_id uuid, p_channel notify.channel, p_category text,
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
        if v_period !~ '^P(?=\d|T\d)(\d+W)?(\d+D)?(T(?=\d)(\d+H)?(\d+M)?(\d+S)?)?$' then
            perform notify._raise('ND400', 'invalid_format', format('%s.period must be an ISO 8601 duration in weeks, days, hours, minutes or seconds (P1D, PT6H)', v_path),
                                  v_path || '.period');
        end if;
        -- (a part of more than 7 digits is far past 31 days, and may be past what an interval holds: refused as such,
        -- before the cast could fail with a database error)
        if v_period ~ '\d{8}' then
            perform notify._raise('ND422', 'invalid_frequency_cap', format('%s.period must be 1 second to 31 days', v_path), v_path || '.period');
        end if;
        v_interval := v_period::interval;
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
          left join notify.channel_providers cp on cp.tenant_id = p_tenant_id and cp.channel = c.channel
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
                         join notify.channel_providers x on x.tenant_id = p_tenant_id and x.channel = 'whatsapp'
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


create or replace function notify._policy_claim(p_tenant_id uuid, p_delivery_id uuid, p_recipient_id uuid, p_channel notify.channel,
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


create or replace function notify._release_held(p_tenant_id uuid, p_reasons text[])
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


create or replace function notify_api.set_quiet_hours_v1(p_tenant_id uuid, p_body jsonb)
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


create or replace function notify_api.delete_quiet_hours_v1(p_tenant_id uuid)
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


create or replace function notify_api.delete_frequency_caps_v1(p_tenant_id uuid)
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
        -- E-mail reports no reads (an open is a flag, not a status): a step waiting for one would keep the next step
        -- waiting until the route expires, or always send it after within.
        if v_channel = 'email' and v_until = 'read' and i < v_n - 1 then
            perform notify._raise('ND400', 'invalid_value',
                format('%s.until: e-mail never reports read (an open is not a status), so the next step would always follow; use sent or delivered', v_path),
                v_path || '.until');
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

revoke execute on function notify._release_held(uuid, text[]) from public;
grant execute on function notify._release_held(uuid, text[]) to notify_system;
select notify._settle_owners();
