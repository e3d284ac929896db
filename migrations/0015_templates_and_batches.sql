-- 0015: templates and batches (issue #11 items 3-5): a lease expiry counts as an attempt, a provider message id
-- another delivery has no longer fails a batch's record or a webhook, render failures get their own reason, and
-- template texts over their render size are refused as 422 template_too_large when saved.

create function notify._template_text(p_object jsonb, p_key text, p_path text, p_required boolean, p_max integer)
    returns text
    language plpgsql
    immutable
    set search_path = pg_catalog, pg_temp
as $$
declare
    v text := notify._text_field(p_object, p_key, p_path, p_required, 2147483647);
    v_path text := ltrim(p_path || '.' || p_key, '.');
begin
    if length(v) > p_max then
        perform notify._raise('ND422', 'template_too_large', format('%s must be at most %s characters', v_path, p_max), v_path);
    end if;
    return v;
end
$$;
comment on function notify._template_text(jsonb, text, text, boolean, integer) is
    'Reads a template text member like _text_field, but one over its size limit is refused as 422 template_too_large (the render limits are the same sizes).';

create or replace function notify_api.upsert_template_v1(p_tenant_id uuid, p_key text, p_body jsonb)
    returns jsonb
    language plpgsql
    security definer
    set search_path = pg_catalog, pg_temp
as $$
declare
    v_locale text;
    v_channels jsonb;
    v_key text;
    v_content jsonb;
    v_channel notify.channel;
begin
    perform notify._enter(p_tenant_id);
    perform notify._check_keys(p_body, array['locale', 'channels'], '');
    if p_key is null or p_key !~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$' then
        perform notify._raise('ND400', 'invalid_format', 'template key must be 1-100 letters, digits, _ . or -', 'key');
    end if;
    v_locale := coalesce(notify._text_field(p_body, 'locale', '', false, 35),
                         (select default_locale from notify.tenants where id = p_tenant_id));
    if v_locale !~ '^[A-Za-z]{2,3}(-[A-Za-z0-9]{2,8})*$' then
        perform notify._raise('ND400', 'invalid_format', 'locale must be a BCP 47 tag such as es-ES', 'locale');
    end if;
    v_channels := p_body -> 'channels';
    if v_channels is null or jsonb_typeof(v_channels) <> 'object' or v_channels = '{}' then
        perform notify._raise('ND400', 'missing_field', 'channels must map at least one channel to its content', 'channels');
    end if;
    perform notify._check_keys(v_channels, enum_range(null::notify.channel)::text[], 'channels');
    for v_key, v_content in select * from jsonb_each(v_channels) loop
        v_channel := v_key::notify.channel;
        if jsonb_typeof(v_content) <> 'object' then
            perform notify._raise('ND400', 'invalid_type', format('channels.%s must be an object', v_key), 'channels.' || v_key);
        end if;
        case v_channel
            when 'email' then
                perform notify._check_keys(v_content, array['subject', 'text', 'html'], 'channels.email');
                -- Sizes match the render limits (DISPATCHER_RENDER_MAX_*): a template that passes here fits when rendered
                -- unless its variables or loops make it grow.
                perform notify._template_text(v_content, 'subject', 'channels.email', true, 998);
                perform notify._template_text(v_content, 'text', 'channels.email', true, 65536);
                perform notify._template_text(v_content, 'html', 'channels.email', false, 262144);
            when 'whatsapp' then
                perform notify._check_keys(v_content, array['name', 'language', 'parameters', 'header_parameters', 'buttons', 'text'],
                                           'channels.whatsapp');
                if (v_content ? 'text') = (v_content ? 'name') then
                    perform notify._raise('ND400', 'invalid_template',
                        'channels.whatsapp needs either name (an approved template) or text (free-form)', 'channels.whatsapp');
                end if;
                perform notify._text_field(v_content, 'name', 'channels.whatsapp', false, 512);
                perform notify._text_field(v_content, 'language', 'channels.whatsapp', false, 16);
                perform notify._template_text(v_content, 'text', 'channels.whatsapp', false, 4096);
                foreach v_key in array array['parameters', 'header_parameters'] loop
                    if v_content ? v_key and (jsonb_typeof(v_content -> v_key) <> 'array'
                         or exists (select from jsonb_array_elements(v_content -> v_key) e
                                     where jsonb_typeof(e) <> 'string' or e #>> '{}' !~ '^[A-Za-z_][A-Za-z0-9_]*$')) then
                        perform notify._raise('ND400', 'invalid_type', format('channels.whatsapp.%s must be a list of variable names', v_key),
                                              'channels.whatsapp.' || v_key);
                    end if;
                end loop;
                if v_content ? 'buttons' and (jsonb_typeof(v_content -> 'buttons') <> 'array'
                     or exists (select from jsonb_array_elements(v_content -> 'buttons') b
                                 where jsonb_typeof(b) <> 'object'
                                    or (select count(*) from jsonb_object_keys(b) k where k not in ('sub_type', 'index', 'parameter')) > 0
                                    or b ->> 'sub_type' not in ('quick_reply', 'url')
                                    or jsonb_typeof(b -> 'index') <> 'number'
                                    or coalesce(b ->> 'parameter', '') !~ '^[A-Za-z_][A-Za-z0-9_]*$')) then
                    perform notify._raise('ND400', 'invalid_type',
                        'channels.whatsapp.buttons must be a list of {sub_type: quick_reply|url, index, parameter: variable name}',
                        'channels.whatsapp.buttons');
                end if;
            else
                perform notify._check_keys(v_content, array['text'], 'channels.' || v_key);
                perform notify._template_text(v_content, 'text', 'channels.' || v_key, true, 1600);
        end case;
        insert into notify.templates as t (tenant_id, key, channel, locale, content, required_variables)
        values (p_tenant_id, p_key, v_channel, v_locale, v_content, notify._template_variables(v_content))
        on conflict (tenant_id, key, channel, locale) do update
            set content = excluded.content, required_variables = excluded.required_variables,
                version = t.version + 1, updated_at = now()
            where t.content is distinct from excluded.content;
    end loop;
    return notify_api.list_templates_v1(p_tenant_id, p_key);
end
$$;
comment on function notify_api.upsert_template_v1(uuid, text, jsonb) is
    'Sets the content of a template key for one locale: {locale?, channels: {email: {subject, text, html?}, whatsapp: {name, language, parameters[], header_parameters[], buttons[{sub_type, index, parameter}]} | {text}, sms: {text}}}. Texts over their size (subject 998, e-mail text 65,536, HTML 262,144, WhatsApp text 4,096, SMS 1,600 characters) are 422 template_too_large.';

create or replace function notify_api.record_attempts_v1(p_results notify.attempt_result[])
    returns table (delivery_id uuid, status notify.delivery_status, applied boolean)
    language plpgsql
    security definer
    set search_path = pg_catalog, pg_temp
as $$
declare
    -- Rows whose provider message id another delivery already has (in the table, or earlier in this batch): each
    -- keeps its own outcome with the id left null, so one provider's reused ids cannot fail the whole batch's record.
    v_duplicates uuid[];
begin
    if exists (select from unnest(p_results) r where r.outcome not in ('sent', 'retry', 'failed', 'unknown', 'suppressed', 'bounced')) then
        perform notify._raise('ND400', 'invalid_value', 'outcome must be sent, retry, failed, unknown, suppressed or bounced', 'outcome');
    end if;
    perform notify._set_source('worker');

    select coalesce(array_agg(q.delivery_id), '{}') into v_duplicates
      from (select r.tenant_id, r.delivery_id, r.provider, r.provider_message_id,
                   row_number() over (partition by r.provider, r.provider_message_id order by r.tenant_id, r.delivery_id) as n
              from unnest(p_results) r
             where r.provider_message_id is not null) q
     where q.n > 1
        or exists (select from notify.notification_deliveries x
                    where x.provider = q.provider and x.provider_message_id = q.provider_message_id
                      and not (x.tenant_id = q.tenant_id and x.id = q.delivery_id));

    -- The attempt rows first (fenced the same way), so the history is complete even when a webhook overtook us.
    update notify.delivery_attempts a
       set finished_at = now(), outcome = r.outcome, provider = r.provider, provider_message_id = r.provider_message_id,
           error_code = case when r.delivery_id = any (v_duplicates) then 'duplicate_provider_message_id' else r.error_code end,
           error_message = case when r.delivery_id = any (v_duplicates) then 'the provider returned a message id another delivery already has'
                                else left(r.error_message, 1000) end
      from unnest(p_results) r
     where a.tenant_id = r.tenant_id and a.delivery_id = r.delivery_id and a.attempt = r.attempt and a.finished_at is null;

    return query
    with input as (
        select r.*, t.retry_max_attempts, r.delivery_id = any (v_duplicates) as duplicate
          from unnest(p_results) r
          join notify.tenants t on t.id = r.tenant_id
    ), changed as (
        update notify.notification_deliveries d
           set status = case
                   when i.outcome = 'sent' and d.status in ('sending', 'unknown') then 'sent'
                   when i.outcome = 'retry' and d.status = 'sending' and d.attempt >= i.retry_max_attempts then 'failed'
                   when i.outcome = 'retry' and d.status = 'sending' then 'queued'
                   when i.outcome = 'failed' and d.status in ('sending', 'unknown') then 'failed'
                   when i.outcome = 'unknown' and d.status = 'sending' then 'unknown'
                   when i.outcome = 'suppressed' and d.status = 'sending' then 'suppressed'
                   when i.outcome = 'bounced' and d.status in ('sending', 'unknown') then 'bounced'
                   else d.status end::notify.delivery_status,
               reason = case
                   when i.outcome = 'retry' and d.status = 'sending' and d.attempt >= i.retry_max_attempts then 'retries_exhausted'
                   when i.outcome = 'failed' and d.status in ('sending', 'unknown') and i.error_code = 'render_failed' then 'render_failed'
                   when i.outcome = 'failed' and d.status in ('sending', 'unknown') then 'provider_rejected'
                   when i.outcome = 'unknown' and d.status = 'sending' then 'outcome_unknown'
                   when i.outcome = 'suppressed' and d.status = 'sending' then 'provider_opt_out'
                   when i.outcome = 'bounced' and d.status in ('sending', 'unknown') then 'rejected_by_recipient_server'
                   else d.reason end,
               due_at = case when i.outcome = 'retry' and d.status = 'sending' and d.attempt < i.retry_max_attempts
                             then now() + notify._backoff(i.tenant_id, d.attempt, i.retry_after_seconds)
                             else d.due_at end,
               provider = coalesce(i.provider, d.provider),
               provider_message_id = coalesce(d.provider_message_id, case when not i.duplicate then i.provider_message_id end),
               sent_at = case when i.outcome = 'sent' then coalesce(d.sent_at, now()) else d.sent_at end,
               last_error_code = case when i.duplicate then 'duplicate_provider_message_id'
                                      when i.outcome = 'sent' then d.last_error_code else coalesce(i.error_code, d.last_error_code) end,
               last_error_message = case when i.duplicate then 'the provider returned a message id another delivery already has'
                                         when i.outcome = 'sent' then d.last_error_message
                                         else coalesce(left(i.error_message, 1000), d.last_error_message) end
          from input i
         where d.tenant_id = i.tenant_id and d.id = i.delivery_id and d.attempt = i.attempt
        returning d.id, d.channel, d.status, d.due_at
    ), woken as (
        select notify._wake(c.channel, min(c.due_at)) from changed c where c.status = 'queued' group by c.channel
    )
    select i.delivery_id, c.status, c.id is not null
      from input i
      left join changed c on c.id = i.delivery_id
      cross join (select count(*) from woken) w;
end
$$;
comment on function notify_api.record_attempts_v1(notify.attempt_result[]) is
    'Writes a batch of provider outcomes, each fenced by its attempt number (a stale worker changes nothing): sent, retry (backoff with jitter, or failed when attempts are used up), failed (reason render_failed for a template that could not be rendered, else provider_rejected), unknown, suppressed, bounced. A provider message id another delivery already has (in the table or earlier in the batch) is not stored: that row keeps its outcome with error code duplicate_provider_message_id. Wakes the worker for retries.';

create or replace function notify_api.run_maintenance_v1()
    returns jsonb
    language plpgsql
    security definer
    set search_path = pg_catalog, pg_temp
as $$
declare
    v_requeued integer;
    v_unknown integer;
    v_exhausted integer;
    v_expired integer;
    v_woken text[];
begin
    perform notify._set_source('maintenance');

    -- Crashed sends (lease past due): e-mail may be sent twice, so it goes back to the queue;
    -- WhatsApp and SMS must not be, so they become unknown until a provider report says what happened.
    -- An expired lease was an attempt: e-mail whose attempts are used up fails instead of being requeued forever.
    with stale as (
        select d.tenant_id, d.id, d.attempt, d.channel, d.attempt >= t.retry_max_attempts as exhausted
          from notify.notification_deliveries d
          join notify.tenants t on t.id = d.tenant_id
         where d.status = 'sending' and d.lease_expires_at < now()
           for update of d skip locked
    ), attempts as (
        update notify.delivery_attempts a set finished_at = now(), outcome = 'lease_expired'
          from stale s
         where a.tenant_id = s.tenant_id and a.delivery_id = s.id and a.attempt = s.attempt and a.finished_at is null
    ), moved as (
        update notify.notification_deliveries d
           set status = case when s.channel <> 'email' then 'unknown' when s.exhausted then 'failed' else 'queued' end::notify.delivery_status,
               reason = case when s.channel <> 'email' then 'lease_expired' when s.exhausted then 'retries_exhausted' else d.reason end,
               last_error_code = case when s.channel = 'email' then 'lease_expired' else d.last_error_code end,
               last_error_message = case when s.channel = 'email' then format('attempt %s: the worker''s lease expired before it recorded an outcome', s.attempt)
                                         else d.last_error_message end,
               due_at = case when s.channel = 'email' and not s.exhausted then now() else d.due_at end
          from stale s
         where d.tenant_id = s.tenant_id and d.id = s.id
        returning d.status
    )
    select count(*) filter (where status = 'queued'), count(*) filter (where status = 'unknown'),
           count(*) filter (where status = 'failed')
      into v_requeued, v_unknown, v_exhausted from moved;

    -- Deadlines: anything still waiting past its expires_at is never sent.
    with gone as (
        update notify.notification_deliveries d set status = 'expired', reason = 'expired_before_send'
         where d.status in ('queued', 'scheduled') and d.expires_at <= now()
        returning 1
    )
    select count(*) into v_expired from gone;

    -- Safety net: a wake-up for every channel with due work (coalesced, so cheap when one is pending).
    select array_agg(c::text) into v_woken
      from unnest(enum_range(null::notify.channel)) c
     where exists (select from notify.notification_deliveries d
                    where d.channel = c and d.status in ('queued', 'scheduled') and d.due_at <= now());
    perform notify._wake(c::notify.channel) from unnest(v_woken) c;

    return jsonb_build_object('requeued', v_requeued, 'unknown', v_unknown, 'exhausted', v_exhausted, 'expired', v_expired,
                              'woken', coalesce(to_jsonb(v_woken), '[]'));
end
$$;
comment on function notify_api.run_maintenance_v1() is
    'Periodic upkeep: expired leases, each counted as an attempt (email -> queued, or failed/retries_exhausted when the tenant''s retry_max_attempts are used up; whatsapp/sms -> unknown), deliveries past expires_at -> expired, a wake-up for every channel with due work.';

create or replace function notify._apply_provider_status(p_provider text, e notify.status_event)
    returns text
    language plpgsql
    set search_path = pg_catalog, pg_temp
as $$
declare
    d notify.notification_deliveries;
    v_at timestamptz := coalesce(e.occurred_at, now());
    v_matches integer;
begin
    if e.tenant_id is not null and e.delivery_id is not null then
        select * into d from notify.notification_deliveries x
         where x.tenant_id = e.tenant_id and x.id = e.delivery_id and (x.provider is null or x.provider = any (notify._provider_family(p_provider)))
           for update;
    end if;
    if d.id is null and e.provider_message_id is not null then
        -- Two deliveries may carry the id (an ESP reporting on its own and on SMTP-relayed mail, or ids a provider
        -- reused): the report cannot be attributed, so it changes nothing rather than pick one.
        select count(*) into v_matches from notify.notification_deliveries x
         where x.provider = any (notify._provider_family(p_provider)) and x.provider_message_id = e.provider_message_id;
        if v_matches > 1 then
            return 'ambiguous';
        end if;
        select * into d from notify.notification_deliveries x
         where x.provider = any (notify._provider_family(p_provider)) and x.provider_message_id = e.provider_message_id
           for update;
    end if;
    if d.id is null then
        return 'unmatched';
    end if;

    if e.status is null then
        -- An engagement flag: never a status of its own, but it proves delivery, and a complaint is an opt-out.
        if e.flag is null or e.flag not in ('opened', 'clicked', 'complained', 'unsubscribed') then
            return 'ignored';
        end if;
        update notify.notification_deliveries x
           set opened_at = case when e.flag in ('opened', 'clicked') then least(x.opened_at, v_at) else x.opened_at end,
               complained_at = case when e.flag = 'complained' then least(x.complained_at, v_at) else x.complained_at end,
               status = case when notify._rank(x.channel, 'delivered') > notify._rank(x.channel, x.status)
                              and notify._transition_allowed(x.channel, x.status, 'delivered') then 'delivered' else x.status end,
               delivered_at = case when x.status in ('sending', 'sent', 'unknown') then least(x.delivered_at, v_at) else x.delivered_at end
         where x.tenant_id = d.tenant_id and x.id = d.id;
        if e.flag in ('complained', 'unsubscribed') and notify._consent_allows(d.tenant_id, d.recipient_id, d.channel, null) then
            insert into notify.recipient_consents (tenant_id, recipient_id, channel, status, source, evidence, recorded_by)
            values (d.tenant_id, d.recipient_id, d.channel, 'revoked', case e.flag when 'complained' then 'complaint' else 'provider_unsubscribe' end,
                    jsonb_build_object('delivery_id', d.id, 'provider', p_provider, 'reported_at', v_at), 'dispatcher');
        end if;
        return 'flagged';
    end if;

    if notify._rank(d.channel, e.status) > notify._rank(d.channel, d.status)
       and notify._transition_allowed(d.channel, d.status, e.status) then
        update notify.notification_deliveries x
           set status = e.status,
               reason = case when e.status in ('failed', 'bounced', 'suppressed') then 'provider_reported' else x.reason end,
               provider = coalesce(x.provider, p_provider),
               -- The report's id is taken only if no other delivery has it (the unique index would fail the webhook).
               provider_message_id = case
                   when x.provider_message_id is null and e.provider_message_id is not null
                        and not exists (select from notify.notification_deliveries y
                                         where y.provider = coalesce(x.provider, p_provider) and y.provider_message_id = e.provider_message_id
                                           and not (y.tenant_id = x.tenant_id and y.id = x.id))
                   then e.provider_message_id else x.provider_message_id end,
               sent_at = case when e.status in ('sent', 'delivered', 'read') then least(x.sent_at, v_at) else x.sent_at end,
               delivered_at = case when e.status in ('delivered', 'read') then least(x.delivered_at, v_at) else x.delivered_at end,
               read_at = case when e.status = 'read' then least(x.read_at, v_at) else x.read_at end,
               last_error_code = case when e.status in ('failed', 'bounced') then coalesce(e.error_code, x.last_error_code) else x.last_error_code end,
               last_error_message = case when e.status in ('failed', 'bounced') then coalesce(left(e.error_message, 1000), x.last_error_message)
                                         else x.last_error_message end
         where x.tenant_id = d.tenant_id and x.id = d.id;
        return 'applied';
    end if;
    -- A late or lower-ranked report changes no status, but still fills the time it happened.
    update notify.notification_deliveries x
       set sent_at = case when e.status in ('sent', 'delivered', 'read') then least(x.sent_at, v_at) else x.sent_at end,
           delivered_at = case when e.status in ('delivered', 'read') and x.status in ('delivered', 'read')
                               then least(x.delivered_at, v_at) else x.delivered_at end
     where x.tenant_id = d.tenant_id and x.id = d.id
       and e.status in ('sent', 'delivered', 'read');
    return 'stale';
end
$$;
comment on function notify._apply_provider_status(text, notify.status_event) is
    'Applies one provider status report to its delivery if it ranks higher and the move is legal (applied); otherwise only fills timestamps (stale). A provider message id that two deliveries carry matches neither (ambiguous), and a report never gives its delivery an id another delivery has. Flags (opened, clicked, complained, unsubscribed) set their time, imply delivered, and a complaint or unsubscribe revokes consent (flagged). unmatched when no delivery is found.';

comment on column notify.webhook_events.outcomes is 'Per status event: applied, stale (lower rank or illegal), unmatched (no such delivery) or ambiguous (two deliveries carry its provider message id).';

revoke execute on all functions in schema notify from public;
grant execute on all functions in schema notify to notify_system;
select notify._settle_owners();
