-- notify_api: the dry run of a submission — what it would do per delivery, and why, writing nothing.
-- Called by POST /internal/notifications/preview, `dispatcher notifications preview` and trusted SQL clients.

create function notify._preview_check_recipient(p_tenant_id uuid, p_ref text, p_body jsonb, p_path text)
    returns void
    language plpgsql
    stable
    set search_path = pg_catalog, pg_temp
as $$
declare
    v_prefix text := nullif(p_path, '');
    v_locale text;
    v_timezone text;
    v_addresses jsonb := p_body -> 'addresses';
    v_key text;
    v_value jsonb;
begin
    -- The checks notify._upsert_recipient makes, in its order and with its errors, without its writes.
    if p_ref is null or length(p_ref) not between 1 and 200 then
        perform notify._raise('ND400', 'invalid_length', 'ref must be 1 to 200 characters', ltrim(coalesce(v_prefix, '') || '.ref', '.'));
    end if;
    v_locale := notify._text_field(p_body, 'locale', p_path, false, 35);
    if v_locale is not null and v_locale !~ '^[A-Za-z]{2,3}(-[A-Za-z0-9]{2,8})*$' then
        perform notify._raise('ND400', 'invalid_format', 'locale must be a BCP 47 tag such as es-ES',
                              ltrim(coalesce(v_prefix, '') || '.locale', '.'));
    end if;
    v_timezone := notify._text_field(p_body, 'timezone', p_path, false, 64);
    if v_timezone is not null
       and not exists (select from notify.recipients r where r.tenant_id = p_tenant_id and r.ref = p_ref and r.timezone = v_timezone)
       and not exists (select from pg_catalog.pg_timezone_names where name = v_timezone) then
        perform notify._raise('ND400', 'invalid_timezone', format('timezone %s is not an IANA time zone', v_timezone),
                              ltrim(coalesce(v_prefix, '') || '.timezone', '.'));
    end if;
    if v_addresses is not null and jsonb_typeof(v_addresses) <> 'null' then
        perform notify._check_keys(v_addresses, enum_range(null::notify.channel)::text[], ltrim(coalesce(v_prefix, '') || '.addresses', '.'));
        for v_key, v_value in select * from jsonb_each(v_addresses) loop
            if jsonb_typeof(v_value) <> 'null'
               and (jsonb_typeof(v_value) <> 'string' or not notify._address_valid(v_key::notify.channel, v_value #>> '{}')) then
                perform notify._raise('ND400', 'invalid_address',
                    case v_key when 'email' then format('addresses.%s must be an e-mail address', v_key)
                               else format('addresses.%s must be an E.164 phone number such as +34600111222', v_key) end,
                    ltrim(coalesce(v_prefix, '') || '.addresses.' || v_key, '.'));
            end if;
        end loop;
    end if;
end
$$;
comment on function notify._preview_check_recipient(uuid, text, jsonb, text) is
    'The checks notify._upsert_recipient makes of one recipient body (ref, locale, timezone, addresses), with the same errors, writing nothing: the dry run''s (notify_api.preview_notification_v1).';

create function notify._preview_check_fanout(p_items jsonb)
    returns void
    language plpgsql
    stable
    set search_path = pg_catalog, pg_temp
as $$
declare
    v_bad record;
    v_channel_names text[] := enum_range(null::notify.channel)::text[];
begin
    -- The checks notify._submit_fanout makes of its recipients before it writes, with the same errors.
    if jsonb_typeof(p_items) is distinct from 'array' or jsonb_array_length(p_items) not between 1 and 10000 then
        perform notify._raise('ND400', 'invalid_length', 'recipients must be a list of 1 to 10000 recipients', 'recipients');
    end if;
    select i - 1 as idx, r, k into v_bad
      from jsonb_array_elements(p_items) with ordinality e(r, i)
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
      from jsonb_array_elements(p_items) with ordinality e(r, i)
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
      from jsonb_array_elements(p_items) with ordinality e(r, i)
     where jsonb_typeof(r -> 'timezone') = 'string'
       and not exists (select from pg_catalog.pg_timezone_names z where z.name = r ->> 'timezone')
     order by i limit 1;
    if found then
        perform notify._raise('ND400', 'invalid_timezone', format('recipients[%s].timezone is not an IANA time zone', v_bad.idx),
                              format('recipients[%s].timezone', v_bad.idx));
    end if;
    select min(i) - 1 as idx, r ->> 'ref' as ref into v_bad
      from jsonb_array_elements(p_items) with ordinality e(r, i)
     group by r ->> 'ref' having count(*) > 1 order by min(i) limit 1;
    if found then
        perform notify._raise('ND400', 'duplicate_recipient', format('recipient %s appears more than once', v_bad.ref), 'recipients');
    end if;
end
$$;
comment on function notify._preview_check_fanout(jsonb) is
    'The checks notify._submit_fanout makes of a fan-out''s recipients (1 to 10,000, each valid, no ref twice), with the same errors, writing nothing: the dry run''s (notify_api.preview_notification_v1).';

create function notify._preview_policy(p_tenant_id uuid, p_recipient_id uuid, p_channel notify.channel, p_category text,
                                       p_provider text, p_address text, p_expires_at timestamptz, p_at timestamptz,
                                       p_timezone text)
    returns jsonb
    language plpgsql
    stable
    set search_path = pg_catalog, pg_temp
as $$
declare
    v_at timestamptz := p_at;
    v record;
    v_window record;
    v_end timestamptz;
    v_holds jsonb := '[]';
    v_stored_timezone text;
begin
    -- What the claim's policy step (notify._policy_decision, sql/077_api_policies.sql) would decide when the delivery
    -- falls due, and again when each hold ends (at most three holds: quiet hours, then a cap, then the pair limit).
    -- p_timezone: the recipient's time zone as the submission would store it (the body's, else the stored one). Where it
    -- is not the one the policy step reads (a new recipient's, or one the body changes), quiet hours are decided here
    -- with it, by the same window and notify._quiet_hours_end.
    select coalesce(r.timezone, t.default_timezone, 'UTC') into v_stored_timezone
      from notify.tenants t left join notify.recipients r on r.tenant_id = t.id and r.id = p_recipient_id
     where t.id = p_tenant_id;
    for i in 1 .. 4 loop
        if p_timezone is not null and p_timezone is distinct from v_stored_timezone then
            select q.* into v_window
              from notify.quiet_hours q
             where q.tenant_id = p_tenant_id and q.category in ('', coalesce(p_category, ''))
             order by q.category desc
             limit 1;
            v_end := case when v_window.tenant_id is not null and not v_window.exempt
                          then notify._quiet_hours_end(v_window.starts_at, v_window.ends_at, p_timezone, v_at) end;
            if v_end is not null then
                select case when p_expires_at is not null and v_end > p_expires_at then 'expire' else 'hold' end as decision,
                       case when p_expires_at is not null and v_end > p_expires_at then 'quiet_hours_past_expiry'
                            else 'quiet_hours' end as reason,
                       v_end as until,
                       jsonb_build_object('quiet_hours', jsonb_build_object(
                           'start', to_char(v_window.starts_at, 'HH24:MI'), 'end', to_char(v_window.ends_at, 'HH24:MI'),
                           'timezone', p_timezone, 'category', nullif(v_window.category, ''))) as detail
                  into v;
            else
                select * into v from notify._policy_decision(p_tenant_id, p_recipient_id, p_channel, p_category, p_provider,
                                                             p_address, p_expires_at, v_at);
                if v.reason in ('quiet_hours', 'quiet_hours_past_expiry') then
                    -- the stored time zone's quiet hours, which the body's time zone replaces: not in force
                    select 'send' as decision, null::text as reason, null::timestamptz as until, '{}'::jsonb as detail into v;
                end if;
            end if;
        else
            select * into v from notify._policy_decision(p_tenant_id, p_recipient_id, p_channel, p_category, p_provider,
                                                         p_address, p_expires_at, v_at);
        end if;
        exit when v.decision <> 'hold' or i = 4;
        v_holds := v_holds || jsonb_build_array(jsonb_strip_nulls(jsonb_build_object(
            'reason', v.reason, 'from', v_at, 'until', v.until, 'detail', nullif(v.detail, '{}'))));
        v_at := v.until;
    end loop;
    return jsonb_strip_nulls(jsonb_build_object(
        'decision', case when v.decision = 'hold' then 'hold' when jsonb_array_length(v_holds) > 0 and v.decision = 'send'
                         then 'hold' else v.decision end,
        'reason', case when v.decision <> 'send' then v.reason end,
        'until', case when v.decision <> 'send' then v.until end,
        'detail', nullif(v.detail, '{}'),
        'holds', nullif(v_holds, '[]'),
        'sends_at', case when v.decision = 'send' then v_at end,
        'counts', case when p_recipient_id is null then 'none yet: a new recipient has no sends to count' end));
end
$$;
comment on function notify._preview_policy(uuid, uuid, notify.channel, text, text, text, timestamptz, timestamptz, text) is
    'The dry run''s view of the tenant policies for one delivery: notify._policy_decision when it falls due and again when each hold ends, with quiet hours in p_timezone (the body''s time zone overlaid on the stored one). {decision send|hold|suppress|expire, reason, until, detail (window or cap with its count), holds [{reason, from, until, detail}], sends_at, counts (a new recipient has none)}.';

create function notify_api.preview_notification_v1(p_tenant_id uuid, p_request jsonb)
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
          -- the primary (position 0): what the dry run names as the provider (a failover chain's fallbacks are not shown)
          left join notify.channel_providers cp on cp.tenant_id = p_tenant_id and cp.channel = c.channel and cp.position = 0
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
                         join notify.channel_providers x on x.tenant_id = p_tenant_id and x.channel = 'whatsapp' and x.position = 0
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
