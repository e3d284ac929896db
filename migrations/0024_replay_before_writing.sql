-- 0024: a replayed submission (same key, same body) answers before anything is written: it used to upsert the
-- original body's recipients first, undoing a later change of their addresses or locale.

create or replace function notify_api.submit_notification_v1(p_tenant_id uuid, p_request jsonb, p_idempotency_key text default null)
    returns table (response jsonb, replayed boolean)
    language plpgsql
    security definer
    set search_path = pg_catalog, pg_temp
as $$
declare
    s notify.submission;
    v_recipient notify.recipients;
    v_claim record;
    v_channel notify.channel;
    v_tpl notify.templates;
    v_template_locales text[] := '{}';
    v_missing text;
    v_locale text;
    v_now timestamptz := now();
    v_response jsonb;
    v_open notify.channel[];
begin
    perform notify._enter(p_tenant_id);
    -- 1. The body, read and checked once; every error names its field, nothing is written yet.
    s := notify._parse_submission(p_tenant_id, p_request, p_idempotency_key);
    -- A key already used: its stored answer (ND422 for another body) before anything is written, so a replay never
    -- writes the recipients of the original body over what changed since. (A concurrent twin that gets past this
    -- still meets the key's unique index in _claim_submission, and replays there.)
    if s.idempotency_key is not null
       and exists (select from notify.notification_requests r where r.tenant_id = p_tenant_id and r.idempotency_key = s.idempotency_key) then
        response := notify._replay(p_tenant_id, s.idempotency_key, s.fingerprint);
        replayed := true;
        return next;
        return;
    end if;
    if s.recipient is null then
        return query select * from notify._submit_fanout(p_tenant_id, s);
        return;
    end if;

    -- 2. The recipient and its addresses.
    v_recipient := notify._upsert_recipient(p_tenant_id, notify._text_field(s.recipient, 'ref', 'recipient', true, 200),
                                            s.recipient, 'recipient');

    -- 3. Claim the idempotency key, or replay the request that holds it.
    v_claim := notify._claim_submission(p_tenant_id, s, v_recipient.id, 1);
    if v_claim.request_id is null then
        response := v_claim.replay;
        replayed := true;
        return next;
        return;
    end if;

    -- 4. Templates and variables, checked now rather than at send time, channel by channel.
    v_locale := coalesce(v_recipient.locale, (select default_locale from notify.tenants where id = p_tenant_id));
    foreach v_channel in array s.channels loop
        v_tpl := notify._resolve_template(p_tenant_id, s.template, v_channel, v_locale);
        if v_tpl.key is null then
            perform notify._raise('ND422', 'template_not_found',
                format('template %s has no %s content for locale %s or its fallbacks', s.template, v_channel, v_locale), 'template');
        end if;
        select string_agg(r, ', ') into v_missing
          from unnest(v_tpl.required_variables) r where not s.variables ? r;
        if v_missing is not null then
            perform notify._raise('ND422', 'missing_variables',
                format('template %s (%s) needs variables: %s', s.template, v_channel, v_missing),
                'variables.' || split_part(v_missing, ', ', 1));
        end if;
        v_template_locales := v_template_locales || v_tpl.locale;   -- resolved once: the deliveries below reuse it
    end loop;

    -- 5. One delivery per channel, suppressed ones with their reason; consent checked now and again at claim.
    perform notify._set_source('submit');
    with inserted as (
        insert into notify.notification_deliveries
            (tenant_id, request_id, recipient_id, channel, address, template_locale, status, reason, due_at, expires_at)
        select p_tenant_id, v_claim.request_id, v_recipient.id, c.channel, a.address, v_template_locales[c.ord],
               case when a.address is null or not c.allowed then 'suppressed'
                    when s.send_at > v_now then 'scheduled'
                    else 'queued' end::notify.delivery_status,
               case when a.address is null then 'no_address'
                    when not c.allowed then 'no_consent' end,
               greatest(coalesce(s.send_at, v_now), v_now), s.expires_at
          from (select u.channel, u.ord, notify._consent_allows(p_tenant_id, v_recipient.id, u.channel, s.category) as allowed
                  from unnest(s.channels) with ordinality as u(channel, ord) offset 0) c
          left join notify.recipient_addresses a
                 on a.tenant_id = p_tenant_id and a.recipient_id = v_recipient.id and a.channel = c.channel
         order by c.ord
        returning *
    )
    select jsonb_build_object(
               'id', v_claim.request_id, 'created_at', v_now,
               'status', case when bool_and(i.status = 'suppressed') then 'suppressed' else 'accepted' end,
               'deliveries', jsonb_agg(jsonb_strip_nulls(jsonb_build_object(
                    'id', i.id, 'channel', i.channel, 'status', i.status, 'reason', i.reason))
                    order by array_position(s.channels, i.channel))),
           array_agg(i.channel) filter (where i.status in ('queued', 'scheduled'))
      into v_response, v_open
      from inserted i;

    update notify.notification_requests r set response = v_response
     where r.tenant_id = p_tenant_id and r.id = v_claim.request_id;

    -- 6. Wake the worker, with the caller's commit: now, or when the scheduled work falls due.
    perform notify._wake_submission(s, v_open);

    response := v_response;
    replayed := false;
    return next;
end
$$;
comment on function notify_api.submit_notification_v1(uuid, jsonb, text) is
    'Accepts a notification intent (the POST /internal/notifications body) in one transaction: idempotency, recipient upsert, template and variable checks, consent, one delivery per channel (per recipient for a fan-out), worker wake-up. Returns the response and whether it is a replay.';

select notify._settle_owners();
