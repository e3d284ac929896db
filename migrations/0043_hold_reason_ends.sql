-- 0043: a delivery a policy held (quiet hours, a frequency cap, the pair rate limit) loses the hold's reason when it is
-- claimed for sending: the reason said why it waited, which is over (its history keeps the held event and its reason).

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
                                                     when 'failed' then 'outside_customer_service_window'
                                                     -- the hold is over: its reason no longer says why (the history does)
                                                     else case when d.status = 'held' then null else d.reason end end end,
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

