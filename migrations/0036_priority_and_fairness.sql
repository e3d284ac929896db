-- 0036: priority and tenant fairness in the claim (issue #14, part 4).
-- The queue's index leads with (channel, priority, tenant_id) before due_at, so a claim can walk the (priority, tenant)
-- pairs that have due work with a loose index scan, one probe per pair (notify._claim_shares), and take each pair's
-- share oldest first: every due high delivery before any normal one, normal before bulk, and within a priority an even
-- share per tenant, so one tenant's bulk backlog does not hold back another tenant's message queued after it.

drop index notify.notification_deliveries_due;
create index notification_deliveries_due on notify.notification_deliveries (channel, priority, tenant_id, due_at)
    where status in ('queued', 'scheduled', 'held', 'waiting');

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
                                                     when 'failed' then 'outside_customer_service_window' else d.reason end end,
               due_at = case when (x.policy).decision = 'hold' then (x.policy).until else d.due_at end
          from final x
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
    'Claims up to p_limit due deliveries of a channel (FOR UPDATE SKIP LOCKED), higher priority first and within a priority each tenant its share (notify._claim_shares): expired ones become expired, revoked ones (and marketing templates without marketing consent) suppressed, WhatsApp text outside the 24-hour window failed, those the tenant''s policies stop (notify._policy_claim: quiet hours, frequency caps, WhatsApp''s pair rate limit) held until due_at, suppressed or expired with the policy''s reason, the rest sending with attempt+1 and a lease. Returns what the worker needs to send them, with the tenant''s provider and its operator grant (checked again at send time); for a test delivery always the mock provider, with config {"test": true}.';


revoke execute on function notify._claim_shares(notify.channel, integer) from public;
grant execute on function notify._claim_shares(notify.channel, integer) to notify_system;

select notify._settle_owners();
