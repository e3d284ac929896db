-- notify_api: queue health for operators — backlog, lag, stuck leases, unknown outcomes.
-- Called by `dispatcher status` and the metrics endpoint; reads only the small partial indexes' hot set.

create function notify_api.queue_health_v1()
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

create function notify_api.whatsapp_limits_v1()
    returns table (tenant text, waba_id text, messaging_tier text, reported_at timestamptz)
    language sql
    stable
    security definer
    set search_path = pg_catalog, pg_temp
as $$
    select t.slug, l.waba_id, l.messaging_tier, l.reported_at
      from notify.whatsapp_business_limits l join notify.tenants t on t.id = l.tenant_id
     order by t.slug, l.waba_id
$$;
comment on function notify_api.whatsapp_limits_v1() is
    'Per tenant and WhatsApp business account: the portfolio''s messaging limit tier as Meta last reported it (business_capability_update), for dispatcher status.';
