"""Prometheus metrics shared by the API and the worker (prometheus_client's default registry).

HTTP requests by route and status come from Litestar's Prometheus middleware (dispatcher_http_*); queue
health is read from Postgres at scrape time (notify_api.queue_health_v1), so any API replica reports it.
They show every tenant's slug and queue sizes, so they are served on a listener of their own
(DISPATCHER_METRICS_PORT/HOST for the API, DISPATCHER_WORKER_METRICS_PORT/HOST for the worker; loopback by
default), never on the API's public listener.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import psycopg
from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric

log = logging.getLogger("dispatcher.metrics")

SUBMISSIONS = Counter(
    "dispatcher_submissions_total",
    "Notification intents by outcome (accepted, replayed) and test (a test key's)",
    ["outcome", "test"],
)
DELIVERIES = Counter(
    "dispatcher_deliveries_total",
    "Provider call outcomes by channel, provider, outcome and test (a test key's delivery, always through the mock)",
    ["channel", "provider", "outcome", "error_code", "test"],
)
PROVIDER_SECONDS = Histogram(
    "dispatcher_provider_call_seconds",
    "Time a provider took for one claimed batch",
    ["channel", "provider"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
CALLBACKS = Counter(
    "dispatcher_callbacks_total",
    "Status callback attempts to callers by outcome (delivered, retry, failed, refused)",
    ["outcome"],
)
PRICED_MESSAGES = Counter(
    "dispatcher_priced_messages_total",
    "Messages a provider reported a price for (WhatsApp status pricing), once per delivery",
    ["provider", "pricing_model", "category", "billable"],
)
WEBHOOKS = Counter(
    "dispatcher_webhook_events_total",
    "Provider webhook events by provider and outcome (applied, stale, unmatched, flagged, duplicate, rejected)",
    ["provider", "outcome"],
)

FAILOVERS = Counter(
    "dispatcher_provider_failovers_total",
    'Sends moved to the next provider of their chain after a known "not sent", by channel and the provider that refused',
    ["channel", "provider"],
)
DEMOTIONS = Counter(
    "dispatcher_provider_demotions_total",
    'Chained providers demoted after repeated "not sent" errors (notify.provider_health), by channel and provider',
    ["channel", "provider"],
)

_QUEUE = {
    "due": "Deliveries due now and not yet claimed",
    "scheduled": "Deliveries waiting for send_at or a retry",
    "oldest_due_seconds": "Age of the oldest due delivery (the dispatch lag)",
    "sending": "Deliveries claimed and in flight",
    "leases_past_due": "In-flight deliveries whose lease expired (a worker died mid-send)",
    "unknown": "Deliveries whose outcome is unknown (awaiting a provider report)",
}


class QueueHealth:
    """Collects notify_api.queue_health_v1() on every scrape."""

    def __init__(self, database_url: str) -> None:
        self.database_url = database_url

    def describe(self) -> Iterator[Metric]:
        for name, doc in _QUEUE.items():
            yield GaugeMetricFamily(f"dispatcher_queue_{name}", doc, labels=["tenant", "channel"])
        yield GaugeMetricFamily("dispatcher_providers_demoted", "Chained providers demoted now", labels=["tenant", "channel"])

    def collect(self) -> Iterator[Metric]:
        families = {
            name: GaugeMetricFamily(f"dispatcher_queue_{name}", doc, labels=["tenant", "channel"]) for name, doc in _QUEUE.items()
        }
        up = GaugeMetricFamily("dispatcher_queue_health_up", "1 if queue health could be read from Postgres")
        demoted = GaugeMetricFamily(
            "dispatcher_providers_demoted", "Chained providers demoted now (notify.provider_health)", labels=["tenant", "channel"]
        )
        try:
            with psycopg.connect(self.database_url, autocommit=True, connect_timeout=2) as conn:
                for tenant, channel, due, scheduled, oldest, sending, past_due, unknown in conn.execute(
                    "select * from notify_api.queue_health_v1()"
                ):
                    values = {
                        "due": due,
                        "scheduled": scheduled,
                        "oldest_due_seconds": oldest,
                        "sending": sending,
                        "leases_past_due": past_due,
                        "unknown": unknown,
                    }
                    for name, value in values.items():
                        families[name].add_metric([tenant, str(channel)], float(value))
                counts: dict[tuple[str, str], int] = {}
                for tenant, channel, is_demoted in conn.execute(
                    "select tenant, channel::text, demoted from notify_api.provider_health_v1()"
                ):
                    counts[(tenant, channel)] = counts.get((tenant, channel), 0) + int(bool(is_demoted))
                for (tenant, channel), n in sorted(counts.items()):
                    demoted.add_metric([tenant, channel], float(n))
            up.add_metric([], 1.0)
        except psycopg.Error as exc:
            log.warning("queue health unavailable", extra={"error": type(exc).__name__})
            up.add_metric([], 0.0)
        yield from families.values()
        yield demoted
        yield up


def serve(host: str, port: int) -> Any:
    """Starts the operator's /metrics listener (a thread); returns the server, or None if the port is taken (with
    several uvicorn workers in one container, the first one serves it)."""
    from prometheus_client import start_http_server

    try:
        server, _ = start_http_server(port, addr=host)
    except OSError as exc:
        log.warning("metrics listener not started", extra={"port": port, "error": type(exc).__name__})
        return None
    return server


_collector: QueueHealth | None = None


def register_queue_health(database_url: str) -> None:
    """Registers (or re-points) the queue-health collector once per process."""
    global _collector
    if _collector is None:
        _collector = QueueHealth(database_url)
        REGISTRY.register(_collector)
    else:
        _collector.database_url = database_url
