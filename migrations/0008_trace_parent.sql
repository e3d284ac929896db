-- 0008: the submitting request's W3C traceparent is kept with the notification and handed to the worker (tracing).

alter table notify.notification_requests add column trace_parent text default nullif(current_setting('notify.traceparent', true), '')
    constraint notification_requests_trace_parent check (trace_parent ~ '^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$');
comment on column notify.notification_requests.trace_parent is
    'The W3C traceparent of the submitting request''s span (transaction setting notify.traceparent), when tracing is on: the worker''s delivery spans continue that trace.';
alter type notify.claimed_delivery add attribute trace_parent text;

create or replace function notify_api.claim_deliveries_v1(p_channel notify.channel, p_limit integer, p_lease_seconds integer default 60)
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
                then jsonb_build_object('settings', cp.settings, 'secrets', cp.secrets, 'updated_at', cp.updated_at) end,
           r.http_request_id, r.trace_parent
      from updated u
      join notify.notification_requests r on r.tenant_id = u.tenant_id and r.id = u.request_id
      left join notify.templates t on t.tenant_id = u.tenant_id and t.key = r.template_key
                                  and t.channel = u.channel and t.locale = u.template_locale
      left join notify.channel_providers cp on cp.tenant_id = u.tenant_id and cp.channel = u.channel
     where u.status = 'sending';
end
$$;

select notify._settle_owners();
