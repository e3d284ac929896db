-- 0012: two causes of slow submissions on a new database.
--
-- 1. With no statistics yet (a new database, before autovacuum's first ANALYZE), the planner costs an index that
--    starts with tenant_id the same as the primary key (tenant_id, id), and picked the idempotency-key index for
--    the foreign-key check of every delivery insert ("Index Cond: tenant_id = $1, Filter: id = $2"): each
--    submission read every request of its tenant. The check's plan is kept for the connection's life, so ingest
--    slowed down as the table grew (3 ms per submission after 3,000, 11.6 ms after 15,000). The two unique keys
--    that started with tenant_id now start with their own column, so only the primary key serves a key lookup.
-- 2. A known recipient was upserted on every submission (a new row version, and a row lock held until commit);
--    it is now read, and written only when something changed. The same for its addresses.

alter table notify.notification_requests
    drop constraint notification_requests_idempotency_key,
    add constraint notification_requests_idempotency_key unique (idempotency_key, tenant_id);
alter table notify.notification_deliveries
    drop constraint notification_deliveries_one_per_channel,
    add constraint notification_deliveries_one_per_channel unique (request_id, tenant_id, recipient_id, channel);

create or replace function notify._upsert_recipient(p_tenant_id uuid, p_ref text, p_body jsonb, p_path text)
    returns notify.recipients
    language plpgsql
    set search_path = ''
as $$
declare
    v notify.recipients;
    v_locale text;
    v_timezone text;
    v_addresses jsonb;
    v_channel notify.channel;
    v_key text;
    v_value jsonb;
    v_prefix text := nullif(p_path, '');
begin
    if p_ref is null or length(p_ref) not between 1 and 200 then
        perform notify._raise('ND400', 'invalid_length', 'ref must be 1 to 200 characters', ltrim(coalesce(v_prefix, '') || '.ref', '.'));
    end if;
    v_locale := notify._text_field(p_body, 'locale', p_path, false, 35);
    if v_locale is not null and v_locale !~ '^[A-Za-z]{2,3}(-[A-Za-z0-9]{2,8})*$' then
        perform notify._raise('ND400', 'invalid_format', 'locale must be a BCP 47 tag such as es-ES',
                              ltrim(coalesce(v_prefix, '') || '.locale', '.'));
    end if;
    v_timezone := notify._text_field(p_body, 'timezone', p_path, false, 64);
    if v_timezone is not null and not exists (select from pg_catalog.pg_timezone_names where name = v_timezone) then
        perform notify._raise('ND400', 'invalid_timezone', format('timezone %s is not an IANA time zone', v_timezone),
                              ltrim(coalesce(v_prefix, '') || '.timezone', '.'));
    end if;

    -- Known and unchanged (the usual case) is only read: no new row version, and no row lock held until commit
    -- that would queue every other submission to the same recipient behind this one.
    select * into v from notify.recipients r where r.tenant_id = p_tenant_id and r.ref = p_ref;
    if v.id is null or (v_locale is not null and v_locale is distinct from v.locale)
       or (v_timezone is not null and v_timezone is distinct from v.timezone) then
        insert into notify.recipients as r (tenant_id, ref, locale, timezone)
        values (p_tenant_id, p_ref, v_locale, v_timezone)
        on conflict (tenant_id, ref) do update
            set locale = coalesce(excluded.locale, r.locale),
                timezone = coalesce(excluded.timezone, r.timezone),
                updated_at = case when (excluded.locale, excluded.timezone) is distinct from (r.locale, r.timezone)
                                  then now() else r.updated_at end
        returning * into v;
    end if;

    v_addresses := p_body -> 'addresses';
    if v_addresses is not null and jsonb_typeof(v_addresses) <> 'null' then
        perform notify._check_keys(v_addresses, enum_range(null::notify.channel)::text[], ltrim(coalesce(v_prefix, '') || '.addresses', '.'));
        for v_key, v_value in select * from jsonb_each(v_addresses) loop
            v_channel := v_key::notify.channel;
            if jsonb_typeof(v_value) = 'null' then
                delete from notify.recipient_addresses a
                 where a.tenant_id = p_tenant_id and a.recipient_id = v.id and a.channel = v_channel;
            elsif jsonb_typeof(v_value) <> 'string' or not notify._address_valid(v_channel, v_value #>> '{}') then
                perform notify._raise('ND400', 'invalid_address',
                    case v_channel when 'email' then format('addresses.%s must be an e-mail address', v_key)
                                   else format('addresses.%s must be an E.164 phone number such as +34600111222', v_key) end,
                    ltrim(coalesce(v_prefix, '') || '.addresses.' || v_key, '.'));
            elsif not exists (select from notify.recipient_addresses a
                               where a.tenant_id = p_tenant_id and a.recipient_id = v.id and a.channel = v_channel
                                 and a.address = v_value #>> '{}') then
                -- (an unchanged address is only read: ON CONFLICT DO UPDATE would lock its row even when it writes nothing)
                insert into notify.recipient_addresses as a (tenant_id, recipient_id, channel, address)
                values (p_tenant_id, v.id, v_channel, v_value #>> '{}')
                on conflict (tenant_id, recipient_id, channel) do update
                    set address = excluded.address, updated_at = now()
                    where a.address is distinct from excluded.address;
            end if;
        end loop;
    end if;
    return v;
end
$$;

select notify._settle_owners();
