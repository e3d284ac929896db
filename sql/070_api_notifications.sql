-- notify_api: submit, read and cancel notifications.
-- Called by POST/GET /internal/notifications and by trusted SQL clients inside their own transactions.

create function notify_api.submit_notification_v1(p_tenant_id uuid, p_request jsonb, p_idempotency_key text default null)
    returns table (response jsonb, replayed boolean)
    language plpgsql
    security definer
    set search_path = pg_catalog, pg_temp
as $$
declare
    v_fingerprint bytea;
    v_recipient notify.recipients;
    v_channels notify.channel[];
    v_template text;
    v_variables jsonb;
    v_category text;
    v_send_at timestamptz;
    v_expires_at timestamptz;
    v_metadata jsonb;
    v_request_id uuid;
    v_channel notify.channel;
    v_tpl notify.templates;
    v_missing text;
    v_locale text;
    v_now timestamptz := now();
    v_response jsonb;
    v_callback_url text;
begin
    perform notify._enter(p_tenant_id);
    -- 1. Validate the shape; every error names its field, nothing is written yet.
    if p_request is null or jsonb_typeof(p_request) <> 'object' then
        perform notify._raise('ND400', 'invalid_type', 'body must be a JSON object', '');
    end if;
    perform notify._check_keys(p_request,
        array['recipient', 'recipients', 'channels', 'template', 'variables', 'category', 'send_at', 'expires_at', 'metadata',
              'callback_url'], '');
    if (p_request ? 'recipient') = (p_request ? 'recipients') then
        perform notify._raise('ND400', 'missing_field', 'give either recipient (one) or recipients (a fan-out), not both', 'recipient');
    end if;
    if p_request ? 'recipient' then
        if jsonb_typeof(p_request -> 'recipient') is distinct from 'object' then
            perform notify._raise('ND400', 'missing_field', 'recipient is required and must be an object', 'recipient');
        end if;
        perform notify._check_keys(p_request -> 'recipient', array['ref', 'addresses', 'locale', 'timezone'], 'recipient');
    end if;
    if jsonb_typeof(p_request -> 'channels') is distinct from 'array' or jsonb_array_length(p_request -> 'channels') = 0 then
        perform notify._raise('ND400', 'missing_field', 'channels must be a non-empty list', 'channels');
    end if;
    select array_agg(notify._channel_field(c, 'channels[' || (i - 1) || ']') order by i)
      into v_channels
      from jsonb_array_elements(p_request -> 'channels') with ordinality as e(c, i);
    if cardinality(v_channels) <> (select count(distinct c) from unnest(v_channels) c) then
        perform notify._raise('ND400', 'duplicate_channel', 'channels must not repeat a channel', 'channels');
    end if;
    v_template := notify._text_field(p_request, 'template', '', true, 100);
    v_variables := coalesce(p_request -> 'variables', '{}');
    if jsonb_typeof(v_variables) = 'null' then v_variables := '{}'; end if;
    if jsonb_typeof(v_variables) <> 'object' then
        perform notify._raise('ND400', 'invalid_type', 'variables must be an object', 'variables');
    end if;
    v_category := notify._text_field(p_request, 'category', '', false, 100);
    v_send_at := notify._time_field(p_request, 'send_at', '');
    v_expires_at := notify._time_field(p_request, 'expires_at', '');
    if v_expires_at is not null and v_expires_at <= v_now then
        perform notify._raise('ND422', 'invalid_expiry', 'expires_at must be in the future', 'expires_at');
    end if;
    if v_expires_at is not null and v_send_at is not null and v_expires_at <= v_send_at then
        perform notify._raise('ND422', 'invalid_expiry', 'expires_at must be after send_at', 'expires_at');
    end if;
    v_metadata := coalesce(p_request -> 'metadata', '{}');
    if jsonb_typeof(v_metadata) = 'null' then v_metadata := '{}'; end if;
    if jsonb_typeof(v_metadata) <> 'object' then
        perform notify._raise('ND400', 'invalid_type', 'metadata must be an object', 'metadata');
    end if;
    if p_idempotency_key is not null and p_idempotency_key !~ '^[\x21-\x7e]{1,255}$' then
        perform notify._raise('ND400', 'invalid_idempotency_key', 'Idempotency-Key must be 1-255 printable ASCII characters', 'Idempotency-Key');
    end if;
    v_callback_url := notify._text_field(p_request, 'callback_url', '', false, 2000);
    if v_callback_url is not null then
        if not notify._is_http_url(v_callback_url) then
            perform notify._raise('ND400', 'invalid_format', 'callback_url must be an http(s) URL without credentials or fragment', 'callback_url');
        end if;
        if not exists (select from notify.callback_endpoints e where e.tenant_id = p_tenant_id and e.enabled) then
            perform notify._raise('ND422', 'callbacks_not_configured',
                'set up callbacks first (PUT /internal/callbacks): that gives the secret callbacks are signed with', 'callback_url');
        end if;
    end if;
    if p_request ? 'recipients' then
        return query select * from notify._submit_fanout(p_tenant_id, p_request, p_idempotency_key, v_channels, v_template,
                                                          v_variables, v_category, v_send_at, v_expires_at, v_metadata);
        return;
    end if;

    -- 2. The recipient and its addresses.
    v_recipient := notify._upsert_recipient(p_tenant_id, notify._text_field(p_request -> 'recipient', 'ref', 'recipient', true, 200),
                                            p_request -> 'recipient', 'recipient');

    -- 3. Claim the idempotency key. A concurrent twin waits here for our commit, then replays it.
    v_fingerprint := sha256(convert_to(p_request::text, 'UTF8'));
    insert into notify.notification_requests
        (tenant_id, idempotency_key, fingerprint, recipient_id, template_key, variables, category, channels,
         send_at, expires_at, metadata, callback_url)
    values (p_tenant_id, p_idempotency_key, v_fingerprint, v_recipient.id, v_template, v_variables, v_category, v_channels,
            v_send_at, v_expires_at, v_metadata, v_callback_url)
    on conflict (tenant_id, idempotency_key) do nothing
    returning id into v_request_id;
    if v_request_id is null then
        response := notify._replay(p_tenant_id, p_idempotency_key, v_fingerprint);
        replayed := true;
        return next;
        return;
    end if;

    -- 4. Templates and variables, checked now rather than at send time.
    v_locale := coalesce(v_recipient.locale, (select default_locale from notify.tenants where id = p_tenant_id));
    foreach v_channel in array v_channels loop
        v_tpl := notify._resolve_template(p_tenant_id, v_template, v_channel, v_locale);
        if v_tpl.key is null then
            perform notify._raise('ND422', 'template_not_found',
                format('template %s has no %s content for locale %s or its fallbacks', v_template, v_channel, v_locale), 'template');
        end if;
        select string_agg(r, ', ') into v_missing
          from unnest(v_tpl.required_variables) r where not v_variables ? r;
        if v_missing is not null then
            perform notify._raise('ND422', 'missing_variables',
                format('template %s (%s) needs variables: %s', v_template, v_channel, v_missing),
                'variables.' || split_part(v_missing, ', ', 1));
        end if;
    end loop;

    -- 5. One delivery per channel, suppressed ones with their reason; consent checked now and again at claim.
    perform notify._set_source('submit');
    with inserted as (
        insert into notify.notification_deliveries
            (tenant_id, request_id, recipient_id, channel, address, template_locale, status, reason, due_at, expires_at)
        select p_tenant_id, v_request_id, v_recipient.id, c.channel, a.address,
               (notify._resolve_template(p_tenant_id, v_template, c.channel, v_locale)).locale,
               case when a.address is null or not notify._consent_allows(p_tenant_id, v_recipient.id, c.channel, v_category)
                        then 'suppressed'
                    when v_send_at > v_now then 'scheduled'
                    else 'queued' end::notify.delivery_status,
               case when a.address is null then 'no_address'
                    when not notify._consent_allows(p_tenant_id, v_recipient.id, c.channel, v_category) then 'no_consent' end,
               greatest(coalesce(v_send_at, v_now), v_now), v_expires_at
          from unnest(v_channels) with ordinality as c(channel, ord)
          left join notify.recipient_addresses a
                 on a.tenant_id = p_tenant_id and a.recipient_id = v_recipient.id and a.channel = c.channel
         order by c.ord
        returning *
    )
    select jsonb_build_object(
               'id', v_request_id, 'created_at', v_now,
               'status', case when bool_and(i.status = 'suppressed') then 'suppressed' else 'accepted' end,
               'deliveries', jsonb_agg(jsonb_strip_nulls(jsonb_build_object(
                    'id', i.id, 'channel', i.channel, 'status', i.status, 'reason', i.reason))
                    order by array_position(v_channels, i.channel)))
      into v_response
      from inserted i;

    update notify.notification_requests r set response = v_response
     where r.tenant_id = p_tenant_id and r.id = v_request_id;

    -- 6. Wake the worker, with the caller's commit: now, or when the scheduled work falls due.
    perform notify._wake(d.channel, d.due_at)
       from (select distinct channel, due_at from notify.notification_deliveries
              where tenant_id = p_tenant_id and request_id = v_request_id and status in ('queued', 'scheduled')) d;

    response := v_response;
    replayed := false;
    return next;
end
$$;
comment on function notify_api.submit_notification_v1(uuid, jsonb, text) is
    'Accepts a notification intent (the POST /internal/notifications body) in one transaction: idempotency, recipient upsert, template and variable checks, consent, one delivery per channel (per recipient for a fan-out), worker wake-up. Returns the response and whether it is a replay.';

create function notify._delivery_json(d notify.notification_deliveries, p_detail boolean)
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

create function notify_api.get_notification_v1(p_tenant_id uuid, p_id uuid)
    returns jsonb
    language plpgsql
    stable
    security definer
    set search_path = pg_catalog, pg_temp
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
        'send_at', v.send_at, 'expires_at', v.expires_at, 'metadata', v.metadata, 'http_request_id', v.http_request_id,
        'callback_url', v.callback_url))
        || jsonb_build_object('deliveries', coalesce(v_deliveries, '[]'));
end
$$;
comment on function notify_api.get_notification_v1(uuid, uuid) is
    'A notification with every delivery''s status, attempts, provider message id, timestamps and event history. 404 for another tenant''s id.';

create function notify_api.cancel_notification_v1(p_tenant_id uuid, p_id uuid)
    returns jsonb
    language plpgsql
    security definer
    set search_path = pg_catalog, pg_temp
as $$
declare
    v_result jsonb;
begin
    perform notify._enter(p_tenant_id);
    if not exists (select from notify.notification_requests r where r.tenant_id = p_tenant_id and r.id = p_id) then
        perform notify._raise('ND404', 'not_found', 'no such notification', 'id');
    end if;
    perform notify._set_source('cancel');
    -- Lock every delivery (waiting for a claim in progress), then cancel only what no worker has claimed.
    with locked as (
        -- FOR UPDATE returns each row's latest committed version, so a claim that won the race shows as sending.
        select d.id, d.channel, d.status from notify.notification_deliveries d
         where d.tenant_id = p_tenant_id and d.request_id = p_id
         order by d.id
           for update
    ), cancelled as (
        update notify.notification_deliveries d set status = 'cancelled', reason = 'cancelled_by_caller'
          from locked l
         where d.tenant_id = p_tenant_id and d.id = l.id and l.status in ('scheduled', 'queued')
           and d.status in ('scheduled', 'queued')
        returning d.id
    )
    select jsonb_build_object('id', p_id, 'deliveries', jsonb_agg(jsonb_build_object(
               'id', l.id, 'channel', l.channel,
               'status', case when c.id is not null then 'cancelled' else l.status::text end,
               'cancelled', c.id is not null,
               'reason', case when c.id is not null then 'cancelled'
                              when l.status = 'sending' then 'already_sending'
                              else 'already_' || l.status end) order by l.channel))
      into v_result
      from locked l
      left join cancelled c on c.id = l.id;
    return v_result;
end
$$;
comment on function notify_api.cancel_notification_v1(uuid, uuid) is
    'Cancels the deliveries of a notification that no worker has claimed yet; says per delivery whether it was cancelled and, if not, why.';
