-- notify_api: the worker's side — claim due deliveries, record provider outcomes, periodic maintenance.
-- Called by runner/ (procrastinate tasks) in batches; one call per batch, never per delivery.

create function notify._claim_shares(p_channel notify.channel, p_limit integer)
    returns table (priority notify.priority, tenant_id uuid, n integer, oldest timestamptz)
    language plpgsql
    stable
    set search_path = pg_catalog, pg_temp
as $$
begin
    -- How many of a claim's p_limit rows each (priority, tenant) pair with due work gets (docs/architecture.md,
    -- "Priority and fairness"): every higher priority first, and within a priority the same share per tenant, a tenant
    -- with fewer due rows than its share leaving the rest to the others (water-filling).
    return query
    with recursive pairs as (
        -- A loose scan of the queue's index (channel, priority, tenant_id, due_at): one probe per pair, each landing on
        -- the pair's oldest row, so a pair whose rows are all in the future costs one probe, not a walk through them.
        (select d.priority, d.tenant_id, d.due_at
           from notify.notification_deliveries d
          where d.channel = p_channel and d.status in ('queued', 'scheduled', 'held', 'waiting')
          order by d.priority, d.tenant_id, d.due_at
          limit 1)
        union all
        select x.priority, x.tenant_id, x.due_at
          from pairs p
         cross join lateral (
                select d.priority, d.tenant_id, d.due_at
                  from notify.notification_deliveries d
                 where d.channel = p_channel and d.status in ('queued', 'scheduled', 'held', 'waiting')
                   and (d.priority, d.tenant_id) > (p.priority, p.tenant_id)
                 order by d.priority, d.tenant_id, d.due_at
                 limit 1) x
    ), due as (
        select p.priority, p.tenant_id, p.due_at as oldest, (count(*) over (partition by p.priority))::integer as m,
               p.priority = max(p.priority) over () as last_level
          from pairs p
         where p.due_at <= now()
    ), counted as materialized (  -- materialized: its count is read by several window functions, made once
        -- Each pair's due rows, counted up to its even share of p_limit (so a level reads at most about p_limit
        -- entries); one that has its share or more counts as p_limit ("has enough"). The lowest priority with due
        -- work, when it is one tenant's (today's usual queue), takes what is left without counting. From the pair's
        -- oldest row on: the entries before it are the rows claims took since the last vacuum, already walked once.
        select u.priority, u.tenant_id, u.oldest, u.m,
               case when u.last_level and u.m = 1 then p_limit
                    else (select case when count(*) < c.cap then count(*)::integer else p_limit end
                            from (select from notify.notification_deliveries d
                                   where d.channel = p_channel and d.priority = u.priority and d.tenant_id = u.tenant_id
                                     and d.status in ('queued', 'scheduled', 'held', 'waiting')
                                     and d.due_at >= u.oldest and d.due_at <= now()
                                   limit c.cap) y) end as e
          from due u
         cross join lateral (select (p_limit + u.m - 1) / u.m as cap) c
    ), budgeted as (
        -- A priority's budget: what the higher ones leave. Within it the pairs by count, smallest first.
        select c.priority, c.tenant_id, c.oldest, c.m, c.e,
               greatest(0, p_limit - (sum(c.e) over (order by c.priority) - sum(c.e) over (partition by c.priority))) as budget,
               row_number() over w as r,
               coalesce(sum(c.e) over (w rows between unbounded preceding and 1 preceding), 0) as before
          from counted c
        window w as (partition by c.priority order by c.e, c.oldest, c.tenant_id)
    ), filled as (
        -- below: the pair gets all its rows, since an even split of what is left among it and the larger ones is more.
        select b.*, b.e * (b.m - b.r + 1) <= b.budget - b.before as below from budgeted b
    ), rest as (
        -- The others split what the pairs below left evenly. The remainder's extra rows (with more pairs than rows, the
        -- only ones) go to pairs in an order drawn afresh by each claim, a hash of the tenant and the transaction's time:
        -- all of a fan-out's rows are due at the same instant, so "longest waiting first" would pick the same tenants
        -- claim after claim until they were drained.
        select f.*, min(f.r) filter (where not f.below) over (partition by f.priority) as first_rest,
               min(f.before) filter (where not f.below) over (partition by f.priority) as used,
               row_number() over (partition by f.priority, f.below order by md5(f.tenant_id::text || now()::text)) as k
          from filled f
    )
    select s.priority, s.tenant_id, s.n::integer, s.oldest
      from (select x.priority, x.tenant_id, x.oldest,
                   case when x.below then x.e
                        else (x.budget - x.used) / (x.m - x.first_rest + 1)
                             + (x.k <= (x.budget - x.used) % (x.m - x.first_rest + 1))::integer end as n
              from rest x) s
     where s.n > 0;
end
$$;
comment on function notify._claim_shares(notify.channel, integer) is
    'The claim''s shares: for each (priority, tenant) pair with deliveries due on the channel, how many of p_limit rows it gets, and the due_at of its oldest row (where the claim''s scan of the pair starts). Strict priority (high, then normal, then bulk get what is left), and within a priority an even share per tenant, a tenant with fewer due rows leaving the rest to the others. Pairs are found by a loose scan of notification_deliveries_due, one index probe each; reads at most about p_limit entries per priority to count. Used by claim_deliveries_v1.';

create function notify_api.claim_deliveries_v1(p_channel notify.channel, p_limit integer, p_lease_seconds integer default 60)
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
          from notify._claim_shares(p_channel, p_limit) s
         cross join lateral (
                -- Each (priority, tenant) pair's share, oldest first; SKIP LOCKED within each, so concurrent claims
                -- take disjoint rows and still fill their batches from the rows behind the locked ones. The scan
                -- starts at the pair's oldest row, which _claim_shares found: the index entries before it (rows
                -- claimed since the last vacuum) are stepped over once per claim, not twice.
                select d.tenant_id, d.id, d.request_id, d.recipient_id, d.channel, d.address, d.template_locale, d.variables,
                       d.expires_at, d.test
                  from notify.notification_deliveries d
                 where d.channel = p_channel and d.priority = s.priority and d.tenant_id = s.tenant_id
                   and d.status in ('queued', 'scheduled', 'held', 'waiting') and d.due_at >= s.oldest and d.due_at <= now()
                 order by d.due_at
                 limit s.n
                   for update skip locked) d
         limit p_limit  -- the shares add up to p_limit at most: this tells the planner how many rows come (a nested loop)
    ), chain as materialized (
        -- The claimed tenants' provider chains of this channel (notify.channel_providers, position 0 the primary), the
        -- demoted providers (notify.provider_health) after the healthy ones, each group in position order: rank 1 is the
        -- provider to try first, the others its fallbacks (docs/architecture.md, "Provider failover"). One index probe
        -- per claimed tenant, not per row.
        select cp.tenant_id, cp.position, cp.provider, cp.settings, cp.secrets, cp.updated_at,
               row_number() over (partition by cp.tenant_id order by coalesce(h.demoted_until > now(), false), cp.position) as rank
          from notify.channel_providers cp
          left join notify.provider_health h on h.tenant_id = cp.tenant_id and h.channel = cp.channel and h.position = cp.position
         where cp.channel = p_channel and cp.tenant_id in (select distinct u.tenant_id from due u)
    ), fallbacks as materialized (
        select f.tenant_id,
               jsonb_agg(jsonb_build_object(
                   'provider', f.provider, 'position', f.position,
                   'provider_config', jsonb_build_object('settings', f.settings, 'secrets', f.secrets, 'updated_at', f.updated_at,
                                                         'grants', (select jsonb_build_object('env_prefix', g.env_prefix, 'file_dir', g.file_dir,
                                                                                              'private_endpoints', g.private_endpoints)
                                                                      from notify.provider_grants g where g.tenant_id = f.tenant_id)))
                   order by f.rank) as fallbacks
          from chain f
         where f.rank > 1
         group by f.tenant_id
    ), decided as materialized (
        -- Expiry and consent are checked again here: a revoke or a deadline between submit and send wins.
        -- Free-form WhatsApp text outside the 24-hour customer-service window is refused, not sent to fail.
        select d.tenant_id, d.id, d.recipient_id, d.expires_at, d.address, d.template_locale, r.template_key, t.content,
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
               case when not (d.test or r.test) then cp.position end as provider_position,
               -- Free-form WhatsApp text goes only through a number whose 24-hour window is open (checked above for the
               -- provider tried first): a fallback number the recipient has not written to is left out of its chain.
               case when d.test or r.test then null
                    when not (t.content ? 'text' and fb.fallbacks @> '[{"provider": "whatsapp_cloud"}]') then fb.fallbacks
                    else (select jsonb_agg(x.f order by x.n)
                            from jsonb_array_elements(fb.fallbacks) with ordinality as x (f, n)
                           where x.f ->> 'provider' <> 'whatsapp_cloud'
                              or (x.f ->> 'position')::integer is distinct from wa.position  -- the number tried first instead
                                 and exists (select from notify.whatsapp_windows w
                                              where w.tenant_id = d.tenant_id
                                                and w.phone_number_id = x.f #>> '{provider_config,settings,phone_number_id}'
                                                and w.wa_id = ltrim(d.address, '+') and w.last_inbound_at > now() - interval '24 hours'))
               end as fallbacks,
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
          left join chain c1 on c1.tenant_id = d.tenant_id and c1.rank = 1
          left join fallbacks fb on fb.tenant_id = d.tenant_id
          left join notify.templates t on t.tenant_id = d.tenant_id and t.key = r.template_key
                                      and t.channel = d.channel and t.locale = d.template_locale
          -- Free-form WhatsApp text whose first number has no open window with the recipient (the window is per number):
          -- the first of the chain's numbers that has one (a demoted number the recipient wrote to rather than fail the
          -- text outside the window). Only for such rows: the others take the chain's first provider.
          left join lateral (
                select c.position, c.provider, c.settings, c.secrets, c.updated_at
                  from chain c
                 where c1.provider = 'whatsapp_cloud' and t.content ? 'text' and fb.fallbacks is not null
                   and not exists (select from notify.whatsapp_windows w
                                    where w.tenant_id = d.tenant_id and w.phone_number_id = c1.settings ->> 'phone_number_id'
                                      and w.wa_id = ltrim(d.address, '+') and w.last_inbound_at > now() - interval '24 hours')
                   and c.tenant_id = d.tenant_id and c.rank > 1 and c.provider = 'whatsapp_cloud'
                   and exists (select from notify.whatsapp_windows w
                                where w.tenant_id = d.tenant_id and w.phone_number_id = c.settings ->> 'phone_number_id'
                                  and w.wa_id = ltrim(d.address, '+') and w.last_inbound_at > now() - interval '24 hours')
                 order by c.rank
                 limit 1) wa on true
         cross join lateral (
                select case when wa.position is null then c1.position else wa.position end as position,
                       case when wa.position is null then c1.provider else wa.provider end as provider,
                       case when wa.position is null then c1.settings else wa.settings end as settings,
                       case when wa.position is null then c1.secrets else wa.secrets end as secrets,
                       case when wa.position is null then c1.updated_at else wa.updated_at end as updated_at) cp
    ), policed as materialized (
        -- Tenant policies (sql/077_api_policies.sql), only for rows about to be sent whose tenant has quiet hours or caps
        -- (one hashed probe per claim, so a tenant that sets nothing pays almost nothing) or whose provider is
        -- whatsapp_cloud (the pair rate limit): quiet hours hold them, a cap suppresses or holds them.
        -- notify._policy_claim is volatile, so it runs after the sort, once per row in (tenant, recipient) order: its
        -- per-recipient locks are taken in the same order by every claim.
        select x.tenant_id, x.id,
               notify._policy_claim(x.tenant_id, x.id, x.recipient_id, p_channel, x.category, x.provider, x.expires_at) as policy
          from decided x
         where x.next_status = 'sending'
           and (x.provider = 'whatsapp_cloud'
                or x.tenant_id in (select q.tenant_id from notify.quiet_hours q union all select c.tenant_id from notify.frequency_caps c))
         order by x.tenant_id, x.recipient_id
    ), final as (
        select x.*, p.policy,
               case (p.policy).decision when 'hold' then 'held' when 'suppress' then 'suppressed' when 'expire' then 'expired'
                                        else x.next_status::text end::notify.delivery_status as final_status
          from decided x
          left join policed p on p.tenant_id = x.tenant_id and p.id = x.id
    ), updated as (
        update notify.notification_deliveries d
           set status = x.final_status,
               attempt = d.attempt + (x.final_status = 'sending')::integer,
               lease_expires_at = case when x.final_status = 'sending' then now() + make_interval(secs => p_lease_seconds) end,
               reason = case when (x.policy).decision <> 'send' then (x.policy).reason
                             else case x.next_status when 'expired' then 'expired_before_send' when 'suppressed' then 'no_consent'
                                                     when 'failed' then 'outside_customer_service_window'
                                                     -- the hold is over: its reason no longer says why (the history does)
                                                     else case when d.status = 'held' then null else d.reason end end end,
               due_at = case when (x.policy).decision = 'hold' then (x.policy).until else d.due_at end
          from final x
         where d.tenant_id = x.tenant_id and d.id = x.id
        returning d.tenant_id, d.id, d.attempt, d.channel, d.status, x.address, x.template_key, x.template_locale,
                  x.content, x.variables, x.category, x.request_id, x.provider, x.provider_config, x.http_request_id,
                  x.trace_parent, x.provider_position, x.fallbacks
    ), attempts as (
        insert into notify.delivery_attempts (tenant_id, delivery_id, attempt)
        select u.tenant_id, u.id, u.attempt from updated u where u.status = 'sending'
    )
    select u.tenant_id, u.id, u.attempt, u.channel, u.address, u.template_key, u.template_locale, u.content,
           u.variables, u.category, u.request_id, coalesce(u.provider, 'mock'), u.provider_config,
           u.http_request_id, u.trace_parent, u.provider_position, u.fallbacks
      from updated u
     where u.status = 'sending';
end
$$;
comment on function notify_api.claim_deliveries_v1(notify.channel, integer, integer) is
    'Claims up to p_limit due deliveries of a channel (FOR UPDATE SKIP LOCKED), higher priority first and within a priority each tenant its share (notify._claim_shares): expired ones become expired, revoked ones (and marketing templates without marketing consent) suppressed, WhatsApp text outside the 24-hour window failed, those the tenant''s policies stop (notify._policy_claim: quiet hours, frequency caps, WhatsApp''s pair rate limit) held until due_at, suppressed or expired with the policy''s reason, the rest sending with attempt+1 and a lease. Returns what the worker needs to send them, with the tenant''s provider and its operator grant (checked again at send time) and, for a failover chain, its place (provider_position) and the fallbacks in order, demoted providers (notify.provider_health) after the healthy ones; for a test delivery always the mock provider, with config {"test": true}.';

create function notify_api.record_attempts_v1(p_results notify.attempt_result[])
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

create function notify_api.run_maintenance_v1()
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
