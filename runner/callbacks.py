"""Status callbacks: claims due messages from the outbox (notify.callback_messages), signs each as a Standard
Webhooks message with the tenant's secret(s), posts it to the checked address, and records every attempt.
Delivery is at least once (receivers drop duplicates by webhook-id) and in sequence order per delivery."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from typing import Any
from urllib.parse import urlsplit

import httpx
import msgspec
from psycopg.types.json import Jsonb

from dispatcher import __version__, metrics
from dispatcher.callback_urls import UnsafeUrl, resolve
from dispatcher.settings import Settings
from providers import standard_webhooks

log = logging.getLogger("runner.callbacks")
CLAIM = "select * from notify_api.claim_callbacks_v1(%(limit)s, %(lease)s)"
RECORD = "select notify_api.record_callback_attempts_v1(%(results)s) as recorded"
TIMEOUT_SECONDS = 15.0  # Standard Webhooks: a receiver must answer within 15-30 s
_encode = msgspec.json.Encoder().encode


def _host(url: str) -> str | None:
    try:
        return urlsplit(url).hostname
    except ValueError:
        return None


class CallbackSender:
    def __init__(self, connector: Any, settings: Settings) -> None:
        self.connector = connector
        self.settings = settings
        self.client = httpx.AsyncClient(
            timeout=TIMEOUT_SECONDS, follow_redirects=False, headers={"user-agent": f"notification-dispatcher/{__version__}"}
        )

    async def post(self, row: dict[str, Any]) -> dict[str, Any]:
        started = dt.datetime.now(dt.UTC)
        result: dict[str, Any] = {
            "tenant_id": str(row["tenant_id"]),
            "id": str(row["id"]),
            "attempt": row["attempt"],
            "started_at": started.isoformat(),
        }
        # The outbox is partitioned by created_at: naming it lets the record find the message in its day's partition
        # alone instead of probing every day's.
        if row.get("created_at") is not None:
            result["created_at"] = row["created_at"].isoformat()
        body = _encode(row["payload"])
        msg_id = "msg_" + str(row["id"]).replace("-", "")
        timestamp = int(time.time())
        signature = " ".join(standard_webhooks.sign(secret, msg_id, timestamp, body) for secret in row["secrets"])
        try:
            target = await resolve(row["url"], allow_private=self.settings.dev_mode)
            response = await self.client.post(
                target.url,
                content=body,
                headers={
                    "host": target.host_header,
                    "content-type": "application/json",
                    "webhook-id": msg_id,
                    "webhook-timestamp": str(timestamp),
                    "webhook-signature": signature,
                },
                extensions={"sni_hostname": target.sni_hostname} if target.sni_hostname else None,
            )
        except UnsafeUrl as exc:
            result.update(outcome="refused", error=str(exc))
        except httpx.HTTPError as exc:
            result.update(outcome="retry", error=type(exc).__name__)
        except Exception as exc:  # noqa: BLE001 - one message's surprise is its own retry, not the whole claim's failure
            log.exception("callback post crashed", extra={"message_id": result["id"]})
            result.update(outcome="retry", error=type(exc).__name__)
        else:
            result["status_code"] = response.status_code
            # 2xx: delivered. 410 Gone: the receiver wants no more. Anything else (3xx included: redirects are not
            # followed) is retried on the tenant's schedule.
            result["outcome"] = (
                "delivered" if 200 <= response.status_code < 300 else "failed" if response.status_code == 410 else "retry"
            )
        metrics.CALLBACKS.labels(result["outcome"]).inc()
        log.info(
            "callback attempted",
            extra={
                "message_id": result["id"],
                "tenant_id": result["tenant_id"],
                "delivery_id": row["payload"]["data"]["delivery_id"],
                "sequence": row["payload"]["data"]["sequence"],
                "attempt": row["attempt"],
                "host": _host(row["url"]),
                "status_code": result.get("status_code"),
                "outcome": result["outcome"],
                "error": result.get("error"),
                "request_id": row["payload"]["data"].get("http_request_id"),
            },
        )
        return result

    async def drain(self, max_seconds: float = 10.0) -> dict[str, int]:
        """Claims and posts until nothing is due, for at most max_seconds (recording a batch wakes the task again, so
        a long backlog continues in the next job and a shutting-down worker is never held up for long)."""
        counts: dict[str, int] = {}
        deadline = time.monotonic() + max_seconds
        while time.monotonic() < deadline:
            rows = await self.connector.execute_query_all_async(
                CLAIM, limit=self.settings.callback_batch_size, lease=int(TIMEOUT_SECONDS * 2)
            )
            if not rows:
                return counts
            results = await asyncio.gather(*(self.post(dict(row)) for row in rows))
            await self.connector.execute_query_one_async(RECORD, results=Jsonb(results))
            for r in results:
                counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
        return counts

    async def aclose(self) -> None:
        await self.client.aclose()
