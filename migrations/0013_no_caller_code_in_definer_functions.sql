-- 0013: definer functions no longer run a caller's code, and database logins can be bound to tenants.
--
-- 1. Postgres resolves relation and type names in the session's temporary schema first unless the path lists pg_temp
--    (even with search_path = ''), and every role could create temporary objects. A login's temporary table named
--    like one a function created "if not exists" (the fan-out's, the callback results'), a temporary domain named
--    like a built-in type, or a temporary table named like one of procrastinate's (its triggers name their tables
--    unqualified) ran the login's code as notify_owner or notify_system. Now, at every level:
--    - PUBLIC loses TEMPORARY on the database (and CREATE on schema public, kept by databases upgraded from
--      Postgres 14); notify_owner and notify_system get TEMPORARY (notify._restrict_public, also run by every
--      `dispatcher migrate`, because a database's privileges do not survive CREATE DATABASE ... TEMPLATE);
--    - every function with a search_path gets pg_temp explicitly last: pg_catalog, pg_temp (pg_catalog, public,
--      pg_temp for notify._wake_task), and every procrastinate function in public pg_catalog, public, pg_temp;
--    - the fan-out's and the callback recording's temporary tables are created as pg_temp.<name> without
--      "if not exists" (a planted one makes the call fail) and dropped before the function returns.
-- 2. notify.login_tenants binds a database login (session_user) to tenants: notify._enter refuses any other (ND403
--    tenant_not_allowed), get_tenant_v1 does not show them. A login without a binding is unrestricted, as before.

-- Not a tenant table: read before any tenant is entered (notify._enter), keyed by the database login.
create table notify.login_tenants (
    login text primary key,
    tenant_ids uuid[] not null,
    updated_at timestamptz not null default now(),
    constraint login_tenants_some check (cardinality(tenant_ids) > 0)
);
comment on table notify.login_tenants is
    'Database logins bound to the tenants they serve: a login listed here enters only these tenants (notify._enter, ND403) and looks up only these (get_tenant_v1); a login not listed enters any tenant. Managed with notify.bind_login_v1 / unbind_login_v1 (dispatcher login bind).';
comment on column notify.login_tenants.login is 'The login role''s name, as session_user reports it (not current_user, which is a function''s owner inside security definer functions).';


do $$
declare
    r record;
begin
    for r in select p.oid::regprocedure as fn from pg_proc p
              where p.pronamespace in ('notify'::regnamespace, 'notify_api'::regnamespace)
                and 'search_path=""' = any (p.proconfig) loop
        execute format('alter function %s set search_path = pg_catalog, pg_temp', r.fn);
    end loop;
end
$$;
alter function notify._wake_task(text, text, jsonb, timestamptz) set search_path = pg_catalog, public, pg_temp;

create or replace function notify._enter(p_tenant_id uuid)
    returns void
    language plpgsql
    volatile
    set search_path = pg_catalog, pg_temp
as $$
declare
    v_current uuid := notify._tenant();
    v_allowed boolean;
begin
    if p_tenant_id is null then
        perform notify._raise('ND404', 'not_found', 'no such tenant', 'tenant_id');
    end if;
    -- A login bound to tenants enters only those; one without a binding (null) any. session_user is the login that
    -- connected; current_user here is the function's owner.
    select p_tenant_id = any (l.tenant_ids) into v_allowed from notify.login_tenants l where l.login = session_user::text;
    if not v_allowed then
        perform notify._raise('ND403', 'tenant_not_allowed', 'this database login is not bound to the tenant', 'tenant_id');
    end if;
    if v_current is null then
        perform set_config('notify.tenant_id', p_tenant_id::text, true);
    elsif v_current <> p_tenant_id then
        -- A transaction belongs to one tenant: the one a caller set, or the first a function entered.
        perform notify._raise('ND404', 'not_found', 'no such tenant in this transaction', 'tenant_id');
    end if;
end
$$;
comment on function notify._enter(uuid) is
    'Binds this transaction to a tenant (transaction-local notify.tenant_id) so row security shows only its rows; ND403 if the session''s login is bound to other tenants only (notify.login_tenants), ND404 if the transaction is already bound to another tenant. First statement of every tenant-scoped notify_api function.';

create or replace function notify_api.get_tenant_v1(p_slug text)
    returns jsonb
    language sql
    stable
    security definer
    set search_path = pg_catalog, pg_temp
as $$
    select jsonb_build_object('id', t.id, 'slug', t.slug, 'name', t.name, 'default_locale', t.default_locale,
                              'retry_max_attempts', t.retry_max_attempts, 'retry_base_ms', t.retry_base_ms,
                              'retry_max_ms', t.retry_max_ms, 'created_at', t.created_at)
      from notify.tenants t
     where t.slug = p_slug
       -- a login bound to tenants (notify.login_tenants) sees only those; one without a binding, any
       and coalesce((select t.id = any (l.tenant_ids) from notify.login_tenants l where l.login = session_user::text), true)
$$;
comment on function notify_api.get_tenant_v1(text) is
    'A tenant by slug, or null (also for a tenant the session''s login is not bound to, when it is bound to some).';

-- Logins bound to tenants: for the operator (`dispatcher login bind|unbind|list`), run as the migrating role. Security
-- invoker on purpose: only a role with privileges on notify.login_tenants (its owner notify_owner, notify_system, their
-- members, superusers) can run them, whatever EXECUTE grants say; application roles have no table privileges.

create function notify.bind_login_v1(p_login text, p_tenant_slug text)
    returns jsonb
    language plpgsql
    volatile
    set search_path = pg_catalog, pg_temp
as $$
declare
    v_tenant_id uuid;
    v notify.login_tenants;
begin
    if not exists (select from pg_catalog.pg_roles r where r.rolname = p_login) then
        perform notify._raise('ND404', 'not_found', 'no such database login', 'login');
    end if;
    select t.id into v_tenant_id from notify.tenants t where t.slug = p_tenant_slug;
    if v_tenant_id is null then
        perform notify._raise('ND404', 'not_found', 'no such tenant', 'tenant');
    end if;
    insert into notify.login_tenants as l (login, tenant_ids) values (p_login, array[v_tenant_id])
    on conflict (login) do update
        set tenant_ids = l.tenant_ids || excluded.tenant_ids, updated_at = now()
        where not excluded.tenant_ids <@ l.tenant_ids;
    select * into v from notify.login_tenants l where l.login = p_login;
    return notify._login_json(v);
end
$$;
comment on function notify.bind_login_v1(text, text) is
    'Binds a database login to one more tenant (by slug): from then on it enters only its bound tenants. Idempotent. ND404 for an unknown login or tenant. Operator only (security invoker).';

create function notify.unbind_login_v1(p_login text, p_tenant_slug text)
    returns jsonb
    language plpgsql
    volatile
    set search_path = pg_catalog, pg_temp
as $$
declare
    v_tenant_id uuid;
    v notify.login_tenants;
begin
    select t.id into v_tenant_id from notify.tenants t where t.slug = p_tenant_slug;
    select * into v from notify.login_tenants l where l.login = p_login and v_tenant_id = any (l.tenant_ids) for update;
    if v.login is null then
        perform notify._raise('ND404', 'not_found', 'this login is not bound to this tenant', 'tenant');
    end if;
    if cardinality(v.tenant_ids) = 1 then
        -- The last binding gone, the login enters any tenant again (as before it was ever bound).
        delete from notify.login_tenants l where l.login = p_login;
        return jsonb_build_object('login', p_login, 'tenants', '[]'::jsonb);
    end if;
    update notify.login_tenants l set tenant_ids = array_remove(l.tenant_ids, v_tenant_id), updated_at = now()
     where l.login = p_login
    returning * into v;
    return notify._login_json(v);
end
$$;
comment on function notify.unbind_login_v1(text, text) is
    'Removes one tenant from a login''s binding; with the last one removed the login is unbound (enters any tenant). ND404 if it was not bound to it. Operator only (security invoker).';

create function notify._login_json(v notify.login_tenants)
    returns jsonb
    language sql
    stable
    set search_path = pg_catalog, pg_temp
as $$
    select case when v.login is not null and cardinality(v.tenant_ids) > 0 then jsonb_build_object(
        'login', v.login,
        'tenants', (select coalesce(jsonb_agg(jsonb_build_object('id', b.id, 'slug', t.slug) order by t.slug, b.id), '[]')
                      from unnest(v.tenant_ids) b(id) left join notify.tenants t on t.id = b.id),
        'updated_at', v.updated_at) end
$$;
comment on function notify._login_json(notify.login_tenants) is 'A login binding as JSON: the login and its tenants (id, slug); null when it has none.';

create function notify.list_login_bindings_v1(p_login text default null)
    returns jsonb
    language sql
    stable
    set search_path = pg_catalog, pg_temp
as $$
    select coalesce(jsonb_agg(notify._login_json(l) order by l.login), '[]')
      from notify.login_tenants l where p_login is null or l.login = p_login
$$;
comment on function notify.list_login_bindings_v1(text) is
    'Every login binding (or one login''s): the logins that enter only the tenants listed. Operator only (security invoker).';

create or replace function notify._submit_fanout(
    p_tenant_id uuid, p_request jsonb, p_idempotency_key text, p_channels notify.channel[], p_template text,
    p_variables jsonb, p_category text, p_send_at timestamptz, p_expires_at timestamptz, p_metadata jsonb)
    returns table (response jsonb, replayed boolean)
    language plpgsql
    set search_path = pg_catalog, pg_temp
as $$
declare
    v_items jsonb := p_request -> 'recipients';
    v_count integer;
    v_bad record;
    v_request_id uuid;
    v_default_locale text;
    v_now timestamptz := now();
    v_response jsonb;
    v_channel_names text[] := enum_range(null::notify.channel)::text[];
begin
    if jsonb_typeof(v_items) is distinct from 'array' or jsonb_array_length(v_items) not between 1 and 10000 then
        perform notify._raise('ND400', 'invalid_length', 'recipients must be a list of 1 to 10000 recipients', 'recipients');
    end if;
    v_count := jsonb_array_length(v_items);

    -- 1. Every recipient checked set-based; the first offender is named.
    select i - 1 as idx, r, k into v_bad
      from jsonb_array_elements(v_items) with ordinality e(r, i)
      left join lateral (select k from jsonb_object_keys(case when jsonb_typeof(r) = 'object' then r else '{}' end) k
                          where k not in ('ref', 'addresses', 'locale', 'timezone', 'variables') limit 1) x on true
     where jsonb_typeof(r) <> 'object' or x.k is not null
        or jsonb_typeof(r -> 'ref') is distinct from 'string' or length(r ->> 'ref') not between 1 and 200
        or (r ? 'addresses' and jsonb_typeof(r -> 'addresses') not in ('object', 'null'))
        or (r ? 'variables' and jsonb_typeof(r -> 'variables') not in ('object', 'null'))
        or (jsonb_typeof(r -> 'locale') = 'string' and r ->> 'locale' !~ '^[A-Za-z]{2,3}(-[A-Za-z0-9]{2,8})*$')
        or (r ? 'locale' and jsonb_typeof(r -> 'locale') not in ('string', 'null'))
        or (r ? 'timezone' and jsonb_typeof(r -> 'timezone') not in ('string', 'null'))
     order by i limit 1;
    if found then
        perform notify._raise('ND400', case when v_bad.k is not null then 'unknown_field' else 'invalid_value' end,
            format('recipients[%s] is not a valid recipient (ref 1-200 characters; addresses, locale, timezone, variables)', v_bad.idx)
            || coalesce(': unknown field ' || v_bad.k, ''),
            format('recipients[%s]', v_bad.idx) || coalesce('.' || v_bad.k, ''));
    end if;
    select i - 1 as idx, a.key into v_bad
      from jsonb_array_elements(v_items) with ordinality e(r, i)
     cross join lateral jsonb_each(case when jsonb_typeof(r -> 'addresses') = 'object' then r -> 'addresses' else '{}' end) a
     where a.key <> all (v_channel_names)
        or (jsonb_typeof(a.value) <> 'null'
            and (jsonb_typeof(a.value) <> 'string' or not notify._address_valid(a.key::notify.channel, a.value #>> '{}')))
     order by i limit 1;
    if found then
        perform notify._raise('ND400', 'invalid_address', format('recipients[%s].addresses.%s is not a valid %s address', v_bad.idx, v_bad.key, v_bad.key),
                              format('recipients[%s].addresses.%s', v_bad.idx, v_bad.key));
    end if;
    select i - 1 as idx into v_bad
      from jsonb_array_elements(v_items) with ordinality e(r, i)
     where jsonb_typeof(r -> 'timezone') = 'string'
       and not exists (select from pg_catalog.pg_timezone_names z where z.name = r ->> 'timezone')
     order by i limit 1;
    if found then
        perform notify._raise('ND400', 'invalid_timezone', format('recipients[%s].timezone is not an IANA time zone', v_bad.idx),
                              format('recipients[%s].timezone', v_bad.idx));
    end if;
    select min(i) - 1 as idx, r ->> 'ref' as ref into v_bad
      from jsonb_array_elements(v_items) with ordinality e(r, i)
     group by r ->> 'ref' having count(*) > 1 order by min(i) limit 1;
    if found then
        perform notify._raise('ND400', 'duplicate_recipient', format('recipient %s appears more than once', v_bad.ref), 'recipients');
    end if;

    -- 2. Claim the idempotency key before the heavy work: a replay of a 10,000-recipient intent is one lookup.
    insert into notify.notification_requests
        (tenant_id, idempotency_key, fingerprint, recipient_id, recipient_count, template_key, variables, category, channels,
         send_at, expires_at, metadata, callback_url)
    values (p_tenant_id, p_idempotency_key, sha256(convert_to(p_request::text, 'UTF8')), null, v_count, p_template, p_variables,
            p_category, p_channels, p_send_at, p_expires_at, p_metadata, p_request ->> 'callback_url')
    on conflict (tenant_id, idempotency_key) do nothing
    returning id into v_request_id;
    if v_request_id is null then
        response := notify._replay(p_tenant_id, p_idempotency_key, sha256(convert_to(p_request::text, 'UTF8')));
        replayed := true;
        return next;
        return;
    end if;

    -- 3. Recipients and their addresses, set-based. The input goes into an analyzed temporary table first, so
    --    the planner knows it has v_count rows (a function scan is estimated at 100) and joins accordingly.
    --    Our temporary tables are always new: a table of that name the caller planted in pg_temp (its triggers would
    --    run as this function's owner) makes the create fail. They are dropped before returning, because a batch
    --    fans out many times in one transaction; an error rolls their creation back with everything else.
    create temporary table pg_temp._fanout_input (
        i integer, ref text, addresses jsonb, locale text, timezone text, variables jsonb, recipient_id uuid, effective_locale text
    ) on commit drop;
    insert into pg_temp._fanout_input (i, ref, addresses, locale, timezone, variables)
    select i, r ->> 'ref', case when jsonb_typeof(r -> 'addresses') = 'object' then r -> 'addresses' end, r ->> 'locale',
           r ->> 'timezone', case when jsonb_typeof(r -> 'variables') = 'object' then r -> 'variables' end
      from jsonb_array_elements(v_items) with ordinality e(r, i);
    analyze pg_temp._fanout_input;

    insert into notify.recipients as x (tenant_id, ref, locale, timezone)
    select p_tenant_id, f.ref, f.locale, f.timezone from pg_temp._fanout_input f
    on conflict (tenant_id, ref) do update
        set locale = coalesce(excluded.locale, x.locale), timezone = coalesce(excluded.timezone, x.timezone),
            updated_at = now()
        where (excluded.locale is not null and excluded.locale is distinct from x.locale)
           or (excluded.timezone is not null and excluded.timezone is distinct from x.timezone);
    v_default_locale := (select default_locale from notify.tenants where id = p_tenant_id);
    update pg_temp._fanout_input f set recipient_id = rec.id, effective_locale = coalesce(rec.locale, v_default_locale)
      from notify.recipients rec
     where rec.tenant_id = p_tenant_id and rec.ref = f.ref;
    analyze pg_temp._fanout_input;

    insert into notify.recipient_addresses as a (tenant_id, recipient_id, channel, address)
    select p_tenant_id, f.recipient_id, kv.key::notify.channel, kv.value #>> '{}'
      from pg_temp._fanout_input f cross join lateral jsonb_each(coalesce(f.addresses, '{}')) kv
     where jsonb_typeof(kv.value) = 'string'
    on conflict (tenant_id, recipient_id, channel) do update
        set address = excluded.address, updated_at = now()
        where a.address is distinct from excluded.address;
    delete from notify.recipient_addresses a
     using pg_temp._fanout_input f, lateral jsonb_each(coalesce(f.addresses, '{}')) kv
     where jsonb_typeof(kv.value) = 'null'
       and a.tenant_id = p_tenant_id and a.recipient_id = f.recipient_id and a.channel = kv.key::notify.channel;

    -- 4. Templates per channel and distinct locale (resolved once each), and the variables every recipient needs.
    create temporary table pg_temp._fanout_templates (
        channel notify.channel, locale text, template_locale text, required_variables text[]) on commit drop;
    insert into pg_temp._fanout_templates
    select c.channel, l.locale, t.locale, t.required_variables
      from unnest(p_channels) c(channel)
     cross join (select distinct f.effective_locale as locale from pg_temp._fanout_input f) l
     cross join lateral notify._resolve_template(p_tenant_id, p_template, c.channel, l.locale) t;
    select channel, locale into v_bad from pg_temp._fanout_templates where template_locale is null limit 1;
    if found then
        perform notify._raise('ND422', 'template_not_found',
            format('template %s has no %s content for locale %s or its fallbacks', p_template, v_bad.channel, v_bad.locale), 'template');
    end if;
    select f.i - 1 as idx, need.v into v_bad
      from pg_temp._fanout_input f
      join pg_temp._fanout_templates t on t.locale = f.effective_locale
     cross join lateral unnest(t.required_variables) need(v)
     where not (p_variables || coalesce(f.variables, '{}')) ? need.v
     order by f.i limit 1;
    if found then
        perform notify._raise('ND422', 'missing_variables', format('template %s needs variable %s for recipients[%s]', p_template, v_bad.v, v_bad.idx),
                              format('recipients[%s].variables.%s', v_bad.idx, v_bad.v));
    end if;

    -- 5. One delivery per recipient and channel, consent checked set-based.
    perform notify._set_source('submit');
    with rows as materialized (
        select f.recipient_id, c.channel, a.address, t.template_locale, f.variables, consent.allowed, f.i, c.ord
          from pg_temp._fanout_input f
         cross join unnest(p_channels) with ordinality c(channel, ord)
          join pg_temp._fanout_templates t on t.channel = c.channel and t.locale = f.effective_locale
          left join notify.recipient_addresses a on a.tenant_id = p_tenant_id and a.recipient_id = f.recipient_id and a.channel = c.channel
         cross join lateral notify._consent(p_tenant_id, f.recipient_id, c.channel, p_category) consent
    ), inserted as (
        insert into notify.notification_deliveries
            (tenant_id, request_id, recipient_id, channel, address, template_locale, variables, status, reason, due_at, expires_at)
        select p_tenant_id, v_request_id, recipient_id, channel, address, template_locale, variables,
               case when address is null or not allowed then 'suppressed'
                    when p_send_at > v_now then 'scheduled' else 'queued' end::notify.delivery_status,
               case when address is null then 'no_address' when not allowed then 'no_consent' end,
               greatest(coalesce(p_send_at, v_now), v_now), p_expires_at
          from rows order by i, ord
        returning channel, status, reason
    ), counted as (
        select channel, status, reason, count(*) as n from inserted group by channel, status, reason
    )
    select jsonb_build_object(
               'id', v_request_id, 'created_at', v_now, 'recipient_count', v_count,
               'status', case when bool_and(status = 'suppressed') then 'suppressed' else 'accepted' end,
               'summary', jsonb_agg(jsonb_strip_nulls(jsonb_build_object('channel', channel, 'status', status, 'reason', reason, 'count', n))
                                    order by channel, status, reason))
      into v_response
      from counted;

    update notify.notification_requests r set response = v_response
     where r.tenant_id = p_tenant_id and r.id = v_request_id;
    perform notify._wake(c, case when p_send_at > v_now then p_send_at end)
       from unnest(p_channels) c
      where exists (select from jsonb_array_elements(v_response -> 'summary') s
                     where s ->> 'channel' = c::text and s ->> 'status' in ('queued', 'scheduled'));
    drop table pg_temp._fanout_input, pg_temp._fanout_templates;
    response := v_response;
    replayed := false;
    return next;
end
$$;
comment on function notify._submit_fanout(uuid, jsonb, text, notify.channel[], text, jsonb, text, timestamptz, timestamptz, jsonb) is
    'The fan-out half of submit_notification_v1: up to 10,000 recipients, each with optional per-recipient variables; recipients, addresses, template checks, consent and deliveries are set-based statements, not per-row round trips. The response summarizes deliveries by channel, status and reason.';

create or replace function notify_api.record_callback_attempts_v1(p_results jsonb)
    returns integer
    language plpgsql
    security definer
    set search_path = pg_catalog, pg_temp
as $$
declare
    v_next timestamptz;
    v_count integer;
begin
    -- p_results: [{tenant_id, id, attempt, started_at, status_code?, error?, outcome: delivered|retry|failed|refused}]
    -- Always a new table (a planted pg_temp._callback_results makes this fail instead of running its triggers as
    -- notify_system), dropped before returning so the worker may record twice in one transaction.
    create temporary table pg_temp._callback_results (
        tenant_id uuid, id uuid, attempt integer, started_at timestamptz, status_code integer, error text, outcome text
    ) on commit drop;
    insert into pg_temp._callback_results
    select * from jsonb_to_recordset(p_results) as x(tenant_id uuid, id uuid, attempt integer, started_at timestamptz,
                                                     status_code integer, error text, outcome text);
    insert into notify.callback_attempts (tenant_id, message_id, attempt, started_at, status_code, error, outcome)
    select r.tenant_id, r.id, r.attempt, r.started_at, r.status_code, left(r.error, 500), r.outcome
      from pg_temp._callback_results r
      join notify.callback_messages m on m.tenant_id = r.tenant_id and m.id = r.id and m.attempts = r.attempt
    on conflict do nothing;
    with updated as (
        update notify.callback_messages m
           set status = case when r.outcome = 'delivered' then 'delivered'
                             when r.outcome in ('failed', 'refused') or m.attempts > cardinality(e.retry_schedule_ms) then 'failed'
                             else 'pending' end,
               next_attempt_at = case when r.outcome = 'retry' and m.attempts <= cardinality(e.retry_schedule_ms)
                                      then now() + make_interval(secs => e.retry_schedule_ms[m.attempts] / 1000.0 * (0.9 + random() * 0.2))
                                      else m.next_attempt_at end,
               lease_expires_at = null,
               finished_at = case when r.outcome <> 'retry' or m.attempts > cardinality(e.retry_schedule_ms) then now() end,
               last_error = case when r.outcome = 'delivered' then null
                                 else coalesce(r.error, 'HTTP ' || r.status_code) end
          from pg_temp._callback_results r, notify.callback_endpoints e
         where m.tenant_id = r.tenant_id and m.id = r.id and m.attempts = r.attempt and m.status = 'sending'
           and e.tenant_id = m.tenant_id
        returning m.status, m.next_attempt_at
    )
    select min(u.next_attempt_at) filter (where u.status = 'pending') into v_next from updated u;
    -- The next retry, and the next message of a delivery whose earlier one just finished.
    perform notify._wake_callbacks();
    if v_next is not null and v_next > now() then
        perform notify._wake_callbacks(v_next);
    end if;
    select count(*) into v_count from pg_temp._callback_results;
    drop table pg_temp._callback_results;
    return v_count;
end
$$;
comment on function notify_api.record_callback_attempts_v1(jsonb) is
    'Records callback attempts: delivered (2xx), retried per the tenant''s schedule (failed once it is used up), or failed at once (410 Gone, or a refused URL). A stale attempt (lease taken over) changes nothing.';

-- Nothing but the owning roles may create temporary objects: Postgres resolves relation and type names in the
-- session's temporary schema (before pg_catalog, unless a path lists pg_temp), so a login's temporary table or domain
-- could run its code inside a definer function (docs/security.md, "Database roles and temporary objects").
create function notify._restrict_public()
    returns void
    language plpgsql
    volatile
    set search_path = pg_catalog, pg_temp
as $$
declare
    v_db text := current_database();
begin
    -- A database's privileges are not copied by CREATE DATABASE ... TEMPLATE nor restored by pg_restore into an
    -- existing database, so `dispatcher migrate` runs this on every run, not only in its migration.
    if exists (select from pg_database d, aclexplode(coalesce(d.datacl, acldefault('d', d.datdba))) a
                where d.datname = v_db and a.grantee = 0 and a.privilege_type = 'TEMPORARY') then
        execute format('revoke temporary on database %I from public', v_db);
    end if;
    if not (has_database_privilege('notify_owner', v_db, 'TEMPORARY') and has_database_privilege('notify_system', v_db, 'TEMPORARY')) then
        execute format('grant temporary on database %I to notify_owner, notify_system', v_db);
    end if;
    -- Postgres 15 and later create schema public without CREATE for PUBLIC; a database upgraded from older ones kept it.
    if exists (select from pg_namespace n, aclexplode(coalesce(n.nspacl, acldefault('n', n.nspowner))) a
                where n.nspname = 'public' and a.grantee = 0 and a.privilege_type = 'CREATE') then
        revoke create on schema public from public;
    end if;
    -- A role without the grant option only gets a warning from REVOKE and GRANT: check what they did.
    if exists (select from pg_database d, aclexplode(coalesce(d.datacl, acldefault('d', d.datdba))) a
                where d.datname = v_db and a.grantee = 0 and a.privilege_type = 'TEMPORARY')
       or has_schema_privilege('public', 'public', 'CREATE')
       or not (has_database_privilege('notify_owner', v_db, 'TEMPORARY') and has_database_privilege('notify_system', v_db, 'TEMPORARY')) then
        raise exception 'could not take TEMPORARY on database % (and CREATE on schema public) from PUBLIC, or grant TEMPORARY to notify_owner and notify_system', v_db
            using hint = 'Run dispatcher migrate as the database''s owner (or a superuser); see docs/security.md.';
    end if;
end
$$;
comment on function notify._restrict_public() is
    'Takes TEMPORARY on the current database and CREATE on schema public from PUBLIC and grants TEMPORARY to notify_owner and notify_system (their functions use temporary tables); raises if the running role could not. Idempotent; run by the sql/ build, migration 0013 and every dispatcher migrate.';

-- procrastinate's functions name their tables unqualified; its trigger functions run inside our definer functions.
create function notify._pin_procrastinate_search_paths()
    returns void
    language plpgsql
    volatile
    set search_path = pg_catalog, pg_temp
as $$
declare
    r record;
begin
    for r in select p.oid::regprocedure as fn from pg_proc p
              where p.pronamespace = 'public'::regnamespace and p.proname like 'procrastinate%'
                and not exists (select from unnest(coalesce(p.proconfig, '{}')) c where c like 'search_path=%') loop
        execute format('alter function %s set search_path = pg_catalog, public, pg_temp', r.fn);
    end loop;
end
$$;
comment on function notify._pin_procrastinate_search_paths() is
    'Pins search_path = pg_catalog, public, pg_temp on every procrastinate function in public that has none. Run by the sql/ build, migration 0013, and any later migration that upgrades procrastinate''s schema.';


select notify._restrict_public();
select notify._pin_procrastinate_search_paths();
grant select, insert, update, delete on notify.login_tenants to notify_system;
revoke execute on all functions in schema notify from public;
revoke execute on all functions in schema notify_api from public;
grant execute on all functions in schema notify to notify_system;
select notify._settle_owners();
