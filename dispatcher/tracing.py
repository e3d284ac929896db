"""OpenTelemetry tracing, behind the optional `otel` extra (`pip install "notification-dispatcher[otel]"`).

Off unless OTEL_EXPORTER_OTLP_ENDPOINT (or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) is set. Then the API traces each
HTTP request (Litestar's OpenTelemetry plugin), every SQL statement (psycopg instrumentation) and every outbound
HTTP call (httpx: WhatsApp, callbacks); the worker traces each dispatched batch, each provider call and, per
delivery, a `notification.deliver` span that continues the submitting request's trace (its W3C traceparent is
stored with the notification). Spans go to the OTLP/HTTP endpoint; the standard OTEL_* variables apply
(OTEL_SERVICE_NAME, OTEL_EXPORTER_OTLP_HEADERS, OTEL_BSP_SCHEDULE_DELAY, ...).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

log = logging.getLogger("dispatcher.tracing")
enabled = False


def setup(service_name: str) -> bool:
    """Installs the tracer provider and the psycopg and httpx instrumentation, once per process."""
    global enabled
    if enabled:
        return True
    if not (os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")):
        return False
    try:
        from opentelemetry import trace
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
        from opentelemetry.instrumentation.psycopg import PsycopgInstrumentor
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        log.warning("OTEL_EXPORTER_OTLP_ENDPOINT is set but the otel extra is not installed: tracing stays off")
        return False
    provider = TracerProvider(resource=Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", service_name)}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    PsycopgInstrumentor().instrument(skip_dep_check=True)
    HTTPXClientInstrumentor().instrument()
    atexit.register(provider.shutdown)  # flushes what is buffered
    enabled = True
    log.info("tracing on", extra={"service": service_name})
    return True


@contextlib.contextmanager
def span(name: str, *, parent: str | None = None, **attributes: Any) -> Iterator[Any]:
    """A span when tracing is on (a child of `parent`, a W3C traceparent, if given); nothing otherwise."""
    if not enabled:
        yield None
        return
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    context = TraceContextTextMapPropagator().extract({"traceparent": parent}) if parent else None
    with trace.get_tracer("dispatcher").start_as_current_span(
        name, context=context, attributes={k: v for k, v in attributes.items() if v is not None}
    ) as current:
        yield current


def current_traceparent() -> str | None:
    """The W3C traceparent of the current span, to store with a notification; None when tracing is off."""
    if not enabled:
        return None
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier)
    return carrier.get("traceparent")


def record(name: str, *, parent: str | None, start_ns: int, end_ns: int, **attributes: Any) -> None:
    """A finished span from start_ns to end_ns (e.g. one delivery inside a batched provider call)."""
    if not enabled:
        return
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    context = TraceContextTextMapPropagator().extract({"traceparent": parent}) if parent else None
    recorded = trace.get_tracer("dispatcher").start_span(
        name, context=context, start_time=start_ns, attributes={k: v for k, v in attributes.items() if v is not None}
    )
    recorded.end(end_time=end_ns)
