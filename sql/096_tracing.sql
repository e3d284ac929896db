-- Tracing (optional, docs/operations.md): the submitting request's W3C traceparent travels with the notification,
-- so the worker's delivery spans continue the caller's trace. Set like the request id, as a transaction setting.

alter table notify.notification_requests add column trace_parent text default nullif(current_setting('notify.traceparent', true), '')
    constraint notification_requests_trace_parent check (trace_parent ~ '^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$');
comment on column notify.notification_requests.trace_parent is
    'The W3C traceparent of the submitting request''s span (transaction setting notify.traceparent), when tracing is on: the worker''s delivery spans continue that trace.';
