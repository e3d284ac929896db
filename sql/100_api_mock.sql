-- notify_api: the built-in mock provider's outbox.
-- Written by providers/mock.py once per batch; read by GET /internal/mock/messages and the tests.

create function notify_api.record_mock_messages_v1(p_messages jsonb)
    returns integer
    language sql
    security definer
    set search_path = pg_catalog, pg_temp
as $$
    with ins as (
        insert into notify.mock_messages (tenant_id, delivery_id, attempt, channel, address, provider_message_id, rendered)
        select (m ->> 'tenant_id')::uuid, (m ->> 'delivery_id')::uuid, (m ->> 'attempt')::integer,
               (m ->> 'channel')::notify.channel, m ->> 'address', m ->> 'provider_message_id', m -> 'rendered'
          from jsonb_array_elements(p_messages) m
        returning 1
    )
    select count(*)::integer from ins
$$;
comment on function notify_api.record_mock_messages_v1(jsonb) is 'Appends what the mock provider "sent": [{tenant_id, delivery_id, attempt, channel, address, provider_message_id, rendered}].';

create function notify_api.list_mock_messages_v1(p_tenant_id uuid, p_delivery_id uuid default null, p_limit integer default 100)
    returns jsonb
    language sql
    stable
    security definer
    set search_path = pg_catalog, pg_temp
as $$
    select notify._enter(p_tenant_id);
    select coalesce(jsonb_agg(x.j order by x.id desc), '[]')
      from (select m.id, jsonb_build_object('delivery_id', m.delivery_id, 'attempt', m.attempt, 'channel', m.channel,
                                            'address', m.address, 'provider_message_id', m.provider_message_id,
                                            'rendered', m.rendered, 'sent_at', m.sent_at) j
              from notify.mock_messages m
             where m.tenant_id = p_tenant_id and (p_delivery_id is null or m.delivery_id = p_delivery_id)
             order by m.id desc
             limit least(greatest(p_limit, 1), 1000)) x
$$;
comment on function notify_api.list_mock_messages_v1(uuid, uuid, integer) is 'The newest messages the mock provider "sent" for a tenant, optionally for one delivery.';
