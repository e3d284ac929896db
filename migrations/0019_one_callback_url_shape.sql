-- 0019: the callback URL's shape is stated once (notify._is_http_url), for the two columns' constraints and the two
-- functions that check it; the state machine's trigger asks notify._is_final instead of repeating its list.

create or replace function notify._is_http_url(p_url text)
    returns boolean
    language sql
    immutable
    parallel safe
    set search_path = pg_catalog, pg_temp
as $$
    select p_url ~ '^https?://[^\s/?#@]+(/[^\s#]*)?$' and length(p_url) <= 2000
$$;
comment on function notify._is_http_url(text) is
    'The one shape of a callback URL (a tenant''s and a request''s): http(s), a host, no credentials or fragment, at most 2,000 characters. Whether its address is public is decided when it is used (API and worker).';

alter table notify.callback_endpoints drop constraint callback_endpoints_url,
    add constraint callback_endpoints_url check (notify._is_http_url(url));
alter table notify.notification_requests drop constraint notification_requests_callback_url,
    add constraint notification_requests_callback_url check (notify._is_http_url(callback_url));

create or replace function notify_api.set_callbacks_v1(p_tenant_id uuid, p_body jsonb, p_new_secret text)
    returns jsonb
    language plpgsql
    security definer
    set search_path = pg_catalog, pg_temp
as $$
declare
    v notify.callback_endpoints;
    v_url text;
    v_schedule integer[];
    v_created boolean;
begin
    perform notify._enter(p_tenant_id);
    if p_body is null or jsonb_typeof(p_body) <> 'object' then
        perform notify._raise('ND400', 'invalid_type', 'body must be a JSON object', '');
    end if;
    perform notify._check_keys(p_body, array['url', 'retry_schedule_ms', 'enabled'], '');
    v_url := notify._text_field(p_body, 'url', '', false, 2000);
    if v_url is not null and not notify._is_http_url(v_url) then
        perform notify._raise('ND400', 'invalid_format', 'url must be an http(s) URL without credentials or fragment', 'url');
    end if;
    if p_body ? 'retry_schedule_ms' and jsonb_typeof(p_body -> 'retry_schedule_ms') <> 'null' then
        if jsonb_typeof(p_body -> 'retry_schedule_ms') <> 'array'
           or exists (select from jsonb_array_elements(p_body -> 'retry_schedule_ms') x where jsonb_typeof(x) <> 'number') then
            perform notify._raise('ND400', 'invalid_type', 'retry_schedule_ms must be a list of milliseconds', 'retry_schedule_ms');
        end if;
        v_schedule := array(select (x #>> '{}')::numeric::integer from jsonb_array_elements(p_body -> 'retry_schedule_ms') x);
    end if;
    if p_body ? 'enabled' and jsonb_typeof(p_body -> 'enabled') not in ('boolean', 'null') then
        perform notify._raise('ND400', 'invalid_type', 'enabled must be true or false', 'enabled');
    end if;
    v_created := not exists (select from notify.callback_endpoints x where x.tenant_id = p_tenant_id);
    insert into notify.callback_endpoints as e (tenant_id, url, secret, retry_schedule_ms, enabled)
    values (p_tenant_id, v_url, p_new_secret,
            coalesce(v_schedule, '{0,5000,300000,1800000,7200000,18000000,36000000,36000000}'),
            coalesce((p_body ->> 'enabled')::boolean, true))
    on conflict (tenant_id) do update
        set url = case when p_body ? 'url' then v_url else e.url end,
            retry_schedule_ms = coalesce(v_schedule, e.retry_schedule_ms),
            enabled = coalesce((p_body ->> 'enabled')::boolean, e.enabled),
            updated_at = now()
    returning * into v;
    return notify._callback_json(v, case when v_created then v.secret end);
exception
    when check_violation then
        perform notify._raise('ND422', 'invalid_callbacks',
            case when sqlerrm like '%secret%' then 'the signing secret must be a whsec_ secret'
                 else 'retry_schedule_ms must hold 1 to 20 delays of 0 to 86,400,000 ms' end,
            case when sqlerrm like '%secret%' then 'secret' else 'retry_schedule_ms' end);
end
$$;
comment on function notify_api.set_callbacks_v1(uuid, jsonb, text) is
    'Creates or updates a tenant''s callbacks {url?, retry_schedule_ms?, enabled?}. p_new_secret (whsec_…) is used only when creating; the answer shows the secret only then.';

create or replace function notify_api.submit_notification_v1(p_tenant_id uuid, p_request jsonb, p_idempotency_key text default null)
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

create or replace function notify.tg_notification_deliveries__check_transition()
    returns trigger
    language plpgsql
    set search_path = pg_catalog, pg_temp
as $$
begin
    if new.status is distinct from old.status then
        if not notify._transition_allowed(new.channel, old.status, new.status) then
            perform notify._raise('ND409', 'illegal_transition',
                format('delivery %s cannot go from %s to %s', new.id, old.status, new.status), 'status');
        end if;
        new.seq := old.seq + 1;
        new.updated_at := now();
        if notify._is_final(new.status) then
            new.finished_at := coalesce(new.finished_at, now());
        end if;
        if new.status <> 'sending' then
            new.lease_expires_at := null;
        end if;
    end if;
    return new;
end
$$;
comment on function notify.tg_notification_deliveries__check_transition() is
    'Refuses illegal status changes (notify._transition_allowed) and keeps seq, updated_at, finished_at and the lease consistent.';

revoke execute on function notify._is_http_url(text) from public;
grant execute on function notify._is_http_url(text) to notify_system;
select notify._settle_owners();
