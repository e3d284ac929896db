"""OpenTelemetry (the `otel` extra): with OTEL_EXPORTER_OTLP_ENDPOINT set, the API and the worker export spans over
OTLP/HTTP to a collector (here a local one that decodes the protobuf): the HTTP request, its SQL, and the worker's
delivery span in the same trace, with the provider call and the worker's SQL."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psycopg
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from tests.conftest import REMINDER, intent, start_service, stop_service, url_of

pytestmark = pytest.mark.slow


class Collector:
    """Accepts OTLP/HTTP protobuf exports on /v1/traces and keeps every span with its service name."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802
                request = ExportTraceServiceRequest()
                request.ParseFromString(self.rfile.read(int(self.headers["content-length"])))
                for resource_spans in request.resource_spans:
                    service = next(
                        (a.value.string_value for a in resource_spans.resource.attributes if a.key == "service.name"), ""
                    )
                    for scope_spans in resource_spans.scope_spans:
                        for s in scope_spans.spans:
                            attributes = {a.key: a.value.string_value or a.value.int_value for a in s.attributes}
                            collector.spans.append(
                                {
                                    "service": service,
                                    "name": s.name,
                                    "trace": s.trace_id.hex(),
                                    "id": s.span_id.hex(),
                                    "parent": s.parent_span_id.hex(),
                                    "attributes": attributes,
                                }
                            )
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"


@pytest.fixture
def collector() -> Iterator[Collector]:
    c = Collector()
    yield c
    c.server.shutdown()
    c.server.server_close()


def test_spans_go_from_the_http_request_through_sql_to_the_provider_call(
    db: psycopg.Connection, tmp_path: Path, collector: Collector
) -> None:
    svc = start_service(
        url_of(db),
        tmp_path,
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint,
            "OTEL_BSP_SCHEDULE_DELAY": "100",
            "DISPATCHER_MOCK_STATUS_DELAY_MS": "20",
        },
    )
    try:
        with svc.client() as c:
            assert c.put("/internal/templates/event_reminder", json=REMINDER).status_code == 200
            nid = c.post("/internal/notifications", json=intent(channels=["email"])).json()["id"]
        svc.wait_for(nid, lambda b: b["deliveries"][0]["status"] == "delivered")
        delivery_id = svc.wait_for(nid, lambda b: True)["deliveries"][0]["id"]
        deadline = time.monotonic() + 15
        while not any(s["name"] == "notification.deliver" for s in collector.spans):
            assert time.monotonic() < deadline, sorted({s["name"] for s in collector.spans})
            time.sleep(0.1)
    finally:
        stop_service(svc)
    spans = collector.spans
    http = next(s for s in spans if s["service"] == "dispatcher-api" and s["name"].startswith("POST /internal/notifications"))
    trace = [s for s in spans if s["trace"] == http["trace"]]
    sql = [
        s
        for s in trace
        if s["service"] == "dispatcher-api" and "submit_notification_http_v1" in str(s["attributes"].get("db.statement", ""))
    ]
    assert sql, "the submission's SQL span is in the request's trace"
    deliver = next(s for s in spans if s["name"] == "notification.deliver")
    assert deliver["trace"] == http["trace"] and deliver["service"] == "dispatcher-worker"  # the worker continues the trace
    assert deliver["attributes"]["notify.delivery_id"] == delivery_id and deliver["attributes"]["notify.outcome"] == "sent"
    worker = {s["name"] for s in spans if s["service"] == "dispatcher-worker"}
    assert {"dispatch.batch", "provider.send", "dispatch.record"} <= worker
    assert any(
        "claim_deliveries_v1" in str(s["attributes"].get("db.statement", ""))
        for s in spans
        if s["service"] == "dispatcher-worker"
    )
    assert "ana@example.com" not in str(spans) and "+34600111222" not in str(spans)  # no personal data in span attributes
