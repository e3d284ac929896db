-- 0018: answers that match the docs.
--
-- 1. A delivery's JSON (GET /internal/notifications/{id}, notify_api.get_notification_v1) includes opened_at, the
--    first e-mail open or click a provider reported: it was stored and documented but never returned.
-- 2. list_consents_v1 (GET /internal/recipients/{ref}/consents) showed only the channel-wide state, so e-mail looked
--    allowed after a category-level revoke. Each channel now lists, under categories, the state in force for every
--    category its ledger names, as the submit and claim checks (notify._consent) decide it.

create or replace function notify._delivery_json(d notify.notification_deliveries, p_detail boolean)
    returns jsonb
    language sql
    stable
    set search_path = pg_catalog, pg_temp
as $$
    select jsonb_strip_nulls(jsonb_build_object(
        'id', d.id, 'channel', d.channel, 'status', d.status, 'reason', d.reason, 'attempts', d.attempt,
        'provider', d.provider, 'provider_message_id', d.provider_message_id,
        'error', case when d.last_error_code is not null or d.last_error_message is not null
                      then jsonb_build_object('code', d.last_error_code, 'message', d.last_error_message) end,
        'due_at', d.due_at, 'expires_at', d.expires_at, 'created_at', d.created_at, 'updated_at', d.updated_at,
        'sent_at', d.sent_at, 'delivered_at', d.delivered_at, 'read_at', d.read_at, 'opened_at', d.opened_at,
        'finished_at', d.finished_at))
    || case when p_detail then jsonb_build_object(
        'events', coalesce((select jsonb_agg(jsonb_strip_nulls(jsonb_build_object(
                        'seq', e.seq, 'from', e.from_status, 'to', e.to_status, 'source', e.source, 'reason', e.reason,
                        'at', e.occurred_at)) order by e.seq, e.id)
                    from notify.delivery_events e where e.tenant_id = d.tenant_id and e.delivery_id = d.id), '[]'),
        'attempt_history', coalesce((select jsonb_agg(jsonb_strip_nulls(jsonb_build_object(
                        'attempt', a.attempt, 'started_at', a.started_at, 'finished_at', a.finished_at, 'outcome', a.outcome,
                        'provider', a.provider, 'provider_message_id', a.provider_message_id,
                        'error_code', a.error_code, 'error_message', a.error_message)) order by a.attempt)
                    from notify.delivery_attempts a where a.tenant_id = d.tenant_id and a.delivery_id = d.id), '[]'))
       else '{}' end
$$;
comment on function notify._delivery_json(notify.notification_deliveries, boolean) is
    'The public JSON form of a delivery (timestamps include opened_at, the first e-mail open or click reported), with its history when p_detail.';

create or replace function notify_api.list_consents_v1(p_tenant_id uuid, p_ref text)
    returns jsonb
    language plpgsql
    stable
    security definer
    set search_path = pg_catalog, pg_temp
as $$
declare
    v_id uuid;
begin
    perform notify._enter(p_tenant_id);
    v_id := notify._recipient_id(p_tenant_id, p_ref);
    -- the state in force is what submit and claim decide (notify._consent): per channel for messages without a
    -- category (and any category the ledger never names), and per category the ledger names for that channel
    return jsonb_build_object(
        'ref', p_ref,
        'current', (select jsonb_agg(jsonb_build_object(
                        'channel', c, 'allowed', notify._consent_allows(p_tenant_id, v_id, c, null),
                        'policy', coalesce(p.policy, notify._default_policy(c)),
                        'categories', coalesce((select jsonb_agg(jsonb_build_object(
                                           'category', k.category,
                                           'allowed', notify._consent_allows(p_tenant_id, v_id, c, k.category))
                                           order by k.category)
                                         from (select distinct e.category from notify.recipient_consents e
                                                where e.tenant_id = p_tenant_id and e.recipient_id = v_id
                                                  and e.channel = c and e.category is not null) k), '[]')) order by c)
                      from pg_catalog.unnest(pg_catalog.enum_range(null::notify.channel)) c
                      left join notify.channel_policies p on p.tenant_id = p_tenant_id and p.channel = c),
        'history', coalesce((select jsonb_agg(jsonb_build_object(
                        'id', e.id, 'channel', e.channel, 'category', e.category, 'status', e.status, 'source', e.source,
                        'evidence', e.evidence, 'recorded_at', e.recorded_at, 'recorded_by', e.recorded_by) order by e.id)
                      from notify.recipient_consents e where e.tenant_id = p_tenant_id and e.recipient_id = v_id), '[]'));
end
$$;
comment on function notify_api.list_consents_v1(uuid, text) is
    'A recipient''s consent in force, as submit and claim decide it: per channel (allowed for messages without a category, and for categories the ledger never names) with the policy and, under categories, each category the ledger names for that channel; and the full ledger.';
