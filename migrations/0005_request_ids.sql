-- 0005: X-Request-ID carried into the notification (notification_requests.http_request_id, from the transaction
-- setting notify.request_id) and handed to the worker with each claimed delivery.

alter table notify.notification_requests add column http_request_id text default nullif(current_setting('notify.request_id', true), '')
    constraint notification_requests_http_request_id check (http_request_id ~ '^[\x21-\x7e]{1,200}$');
comment on column notify.notification_requests.http_request_id is
    'The X-Request-ID of the submitting HTTP request (or a direct caller''s transaction setting notify.request_id): ties the API''s, the worker''s and the caller''s log lines together.';
alter type notify.claimed_delivery add attribute http_request_id text;

create or replace function notify_api.get_notification_v1(p_tenant_id uuid, p_id uuid)
    returns jsonb
    language plpgsql
    stable
    security definer
    set search_path = ''
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
           bool_or(d.status in ('scheduled', 'queued', 'sending', 'unknown'))
      into v_deliveries, v_open
      from notify.notification_deliveries d where d.tenant_id = p_tenant_id and d.request_id = p_id;
    return jsonb_strip_nulls(jsonb_build_object(
        'id', v.id, 'status', case when v_open then 'in_progress' else 'completed' end,
        'created_at', v.created_at, 'idempotency_key', v.idempotency_key,
        'recipient', (select r.ref from notify.recipients r where r.tenant_id = v.tenant_id and r.id = v.recipient_id),
        'recipient_count', case when v.recipient_id is null then v.recipient_count end,
        'template', v.template_key, 'category', v.category, 'channels', to_jsonb(v.channels),
        'send_at', v.send_at, 'expires_at', v.expires_at, 'metadata', v.metadata, 'http_request_id', v.http_request_id))
        || jsonb_build_object('deliveries', coalesce(v_deliveries, '[]'));
end
$$;

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
           r.http_request_id
      from updated u
      join notify.notification_requests r on r.tenant_id = u.tenant_id and r.id = u.request_id
      left join notify.templates t on t.tenant_id = u.tenant_id and t.key = r.template_key
                                  and t.channel = u.channel and t.locale = u.template_locale
      left join notify.channel_providers cp on cp.tenant_id = u.tenant_id and cp.channel = u.channel
     where u.status = 'sending';
end
$$;
