-- 0009: one wake-up helper (notify._wake_task) for the dispatch and callbacks tasks.

create function notify._wake_task(p_task text, p_lock text, p_args jsonb, p_at timestamptz default null)
    returns void
    language plpgsql
    volatile
    -- procrastinate's trigger functions name their tables unqualified, so they need public on the path.
    set search_path = pg_catalog, public
as $$
declare
    v_bucket timestamptz;
begin
    -- One pending wake-up per lock (and per second for future work), however many changes ask for it.
    -- ON CONFLICT on procrastinate's queueing-lock index instead of procrastinate_defer_jobs_v1 inside an
    -- exception block: same row, same NOTIFY trigger, but no subtransaction per submission.
    if p_at is null or p_at <= now() then
        insert into public.procrastinate_jobs (queue_name, task_name, lock, queueing_lock, args, scheduled_at)
        values (p_task, p_task, null, p_lock, p_args, null)
        on conflict (queueing_lock) where status = 'todo' do nothing;
    else
        v_bucket := to_timestamp(ceil(extract(epoch from p_at)));
        insert into public.procrastinate_jobs (queue_name, task_name, lock, queueing_lock, args, scheduled_at)
        values (p_task, p_task, null, p_lock || ':' || extract(epoch from v_bucket)::bigint, p_args, v_bucket)
        on conflict (queueing_lock) where status = 'todo' do nothing;
    end if;
end
$$;
comment on function notify._wake_task(text, text, jsonb, timestamptz) is
    'Defers a procrastinate job of task (and queue) p_task, coalesced by queueing lock p_lock: now, or at the second p_at falls in (lock p_lock:<epoch>). Commits (and NOTIFYs) with the caller''s transaction.';

create or replace function notify._wake(p_channel notify.channel, p_at timestamptz default null)
    returns void
    language sql
    volatile
    set search_path = ''
as $$
    select notify._wake_task('dispatch', 'dispatch:' || p_channel, jsonb_build_object('channel', p_channel), p_at)
$$;

create or replace function notify._wake_callbacks(p_at timestamptz default null)
    returns void
    language sql
    volatile
    set search_path = ''
as $$
    select notify._wake_task('callbacks', 'callbacks', '{}', p_at)
$$;

revoke execute on all functions in schema notify from public;
grant execute on all functions in schema notify to notify_system;
select notify._settle_owners();
