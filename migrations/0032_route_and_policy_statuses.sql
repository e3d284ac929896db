-- 0032: the delivery statuses and the priority type of issue #14 (fallback routes, quiet hours, frequency caps,
-- priority). An enum value added here can be used only once this migration has committed, so the columns, the state
-- machine and the functions that name them come in 0033.
--   waiting     a later step of a route, waiting for the earlier steps' outcome
--   held        due, but held by a tenant policy (quiet hours, a frequency cap) until due_at
--   not_needed  never sent: an earlier step of its route reached its goal (final)

alter type notify.delivery_status add value 'waiting';
alter type notify.delivery_status add value 'held';
alter type notify.delivery_status add value 'not_needed';

create type notify.priority as enum ('high', 'normal', 'bulk');
comment on type notify.priority is
    'How soon a claim serves a delivery: every due high delivery before any normal one, normal before bulk (and, within a priority, tenants in turn). Declared in that order, so it sorts that way.';
