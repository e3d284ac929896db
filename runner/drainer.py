"""The worker's delivery drain: claims due deliveries of one channel in batches, renders them, sends them through the
tenants' providers and records the outcomes (docs/architecture.md, "Data flow", step 2). One DeliveryDrainer per
procrastinate App and process (runner/context.py); the `dispatch` task (runner/tasks.py) runs its `drain`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from procrastinate.exceptions import UniqueViolation
from psycopg.types.json import Jsonb

from dispatcher import metrics, tracing
from dispatcher.settings import Settings
from providers.base import Message, Provider, ProviderContext, ProviderSettings, SendResult
from providers.registry import provider_for
from runner.render_pool import RenderPool

log = logging.getLogger("runner")

CLAIM = "select * from notify_api.claim_deliveries_v1(%(channel)s::notify.channel, %(limit)s, %(lease)s)"
RECORD = (
    "select delivery_id, status::text, applied from notify_api.record_attempts_v1("
    "array(select r from jsonb_populate_recordset(null::notify.attempt_result, %(results)s) r))"
)
RECORD_MOCK = "select notify_api.record_mock_messages_v1(%(messages)s)"
TAKE_TOKENS = "select notify_api.take_tokens_v1(%(key)s, %(rate)s, %(wanted)s) as granted"
CHANNEL_RULES = "select notify_api.channel_rules_v1() as rules"
RECORD_HEALTH = "select notify_api.record_provider_health_v1(%(health)s, %(errors)s, %(window)s, %(demote)s) as demoted"

_to_builtins = msgspec.to_builtins


class _PrepareFailed(Exception):
    """A delivery's render failed in the render pool; the message names the error's class."""


PROVIDER_IDLE_SECONDS = 600.0


def _by_step(
    items: list[tuple[Message, dict[str, Any], list[tuple[str, dict[str, Any] | None, int | None]]]],
    step: int,
    *,
    per_tenant: bool,
) -> dict[str, tuple[tuple[str, dict[str, Any] | None], list[Any]]]:
    """Groups messages by the step-th provider of their chains (and by tenant: one call per tenant and configuration)."""
    groups: dict[str, tuple[tuple[str, dict[str, Any] | None], list[Any]]] = {}
    for item in items:
        name, config, _ = item[2][step]
        tenant = item[1]["tenant_id"] if per_tenant else ""
        key = f"{tenant}:{name}:{json.dumps(config, sort_keys=True, default=str) if config else ''}"
        groups.setdefault(key, ((name, config), []))[1].append(item)
    return groups


def _lease_covers(step: tuple[str, dict[str, Any] | None, int | None], deadline: float) -> bool:
    """Whether the claim's lease, ending at `deadline` (time.monotonic()), still covers a provider of the chain: its
    configured timeout_seconds (the settings hold the kind's default), at least a second for one without."""
    settings = (step[1] or {}).get("settings") or {}
    try:
        budget = float(settings.get("timeout_seconds") or 1.0)
    except (TypeError, ValueError):
        budget = 1.0
    return time.monotonic() + budget < deadline


class DeliveryDrainer:
    """Drains a channel's due deliveries; keeps per process the settings, the render pool and one provider instance
    per tenant configuration."""

    def __init__(self, connector: Any, settings: Settings) -> None:
        self.connector = connector
        self.settings = settings
        self.providers: dict[tuple[str, str, str], Provider] = {}
        self._used: dict[tuple[str, str, str], float] = {}
        self._pruned_at = time.monotonic()
        self._closing: set[asyncio.Task[None]] = set()
        self.renderer = RenderPool(settings)
        self.ctx = ProviderContext(
            take_tokens=self._take_tokens, record_mock=self._record_mock, settings=ProviderSettings.of(settings)
        )

    async def _record_mock(self, rows: list[dict[str, Any]]) -> None:
        await self.connector.execute_query_one_async(RECORD_MOCK, messages=Jsonb(rows))

    async def _take_tokens(self, key: str, rate: float, wanted: int) -> int:
        row = await self.connector.execute_query_one_async(TAKE_TOKENS, key=key, rate=rate, wanted=wanted)
        return int(row["granted"])

    def provider(self, name: str, config: dict[str, Any] | None) -> Provider:
        """One instance per provider and configuration version (a changed configuration gets a new instance). An
        instance no batch has used for PROVIDER_IDLE_SECONDS is closed and dropped (a tenant that keeps changing its
        settings would otherwise grow the cache, and its connection pools, for the worker's life)."""
        key = (name, json.dumps(config, sort_keys=True, default=str) if config else "", "")
        now = time.monotonic()
        if now - self._pruned_at > PROVIDER_IDLE_SECONDS / 4:
            self._prune(now)
        if key not in self.providers:
            self.providers[key] = provider_for(name, config, self.ctx)
        self._used[key] = now
        return self.providers[key]

    def _prune(self, now: float) -> None:
        self._pruned_at = now
        for key in [k for k, used in self._used.items() if now - used > PROVIDER_IDLE_SECONDS]:
            stale = self.providers.pop(key, None)
            self._used.pop(key, None)
            if stale is not None:
                task = asyncio.get_running_loop().create_task(stale.aclose())
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)

    async def send_batch(self, channel: str, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Every outcome of a claimed batch, once all its provider calls answered (send_waves gives them as they come)."""
        results: list[dict[str, Any]] = []
        async for wave in self.send_waves(channel, rows):
            results.extend(wave)
        return results

    async def send_waves(
        self, channel: str, rows: list[dict[str, Any]], claimed_at: float | None = None
    ) -> AsyncIterator[list[dict[str, Any]]]:
        """Sends a claimed batch and yields its outcomes in waves, as its provider calls answer: one call per tenant and
        provider configuration, so one tenant's slow provider (or the mock's slow address) holds up only its own
        deliveries' outcomes, never another tenant's (docs/architecture.md, "Provider failover"). `claimed_at`
        (time.monotonic() before the claim) starts the claim's lease: a failover never starts a provider the rest of
        the lease would not cover (maintenance requeues an e-mail whose lease expired: it would be sent twice)."""
        deadline = (time.monotonic() if claimed_at is None else claimed_at) + self.settings.lease_seconds
        failed: list[dict[str, Any]] = []
        # Each delivery with its provider chain (the claim's provider, then its fallbacks in order: docs/architecture.md,
        # "Provider failover"): (name, config, position) per step.
        pending: list[tuple[Message, dict[str, Any], list[tuple[str, dict[str, Any] | None, int | None]]]] = []
        # Off the event loop, bounded in time and memory; any failure preparing one delivery fails that delivery alone.
        try:
            # A claim returns one content per (tenant, template, locale): that is its key.
            prepared = await self.renderer.render(
                channel,
                [
                    ((row["tenant_id"], row["template_key"], row["locale"]), row["content"], row["variables"] or {})
                    for row in rows
                ],
            )
        except Exception as exc:  # noqa: BLE001 - the render pool itself broke: these deliveries fail, the batch is recorded
            log.exception("render pool failed", extra={"channel": channel})
            prepared = [(False, f"RenderCrashed: {type(exc).__name__}")] * len(rows)
        for row, (ok, rendered) in zip(rows, prepared, strict=True):
            # The ids as text once per delivery (str(UUID) is slow enough to show in a profile); the result reuses them.
            base = {"tenant_id": str(row["tenant_id"]), "delivery_id": str(row["delivery_id"]), "attempt": row["attempt"]}
            try:
                if not ok:
                    raise _PrepareFailed(rendered)
                message = Message(
                    tenant_id=row["tenant_id"],
                    delivery_id=row["delivery_id"],
                    attempt=row["attempt"],
                    channel=channel,
                    address=row["address"],
                    rendered=rendered,
                    category=row["category"],
                )
                chain = [(row.get("provider") or "mock", row.get("provider_config"), row.get("provider_position"))]
                chain += [(f["provider"], f.get("provider_config"), f.get("position")) for f in row.get("fallbacks") or ()]
            except Exception as exc:  # noqa: BLE001
                message_text = str(exc) if isinstance(exc, _PrepareFailed) else type(exc).__name__
                failed.append(
                    {**base, "outcome": "failed", "provider": None, "error_code": "render_failed", "error_message": message_text}
                )
                continue
            pending.append((message, base, chain))
        if failed:
            yield failed
        # (tenant, position) -> [failures, successes, last error code, provider name]
        health: dict[tuple[str, int], list[Any]] = {}
        earlier: dict[str, list[str]] = {}  # delivery id -> the providers that refused it before, in order
        tasks = {
            asyncio.get_running_loop().create_task(self._deliver(channel, name, config, items, 0, health, earlier, deadline))
            for (name, config), items in _by_step(pending, 0, per_tenant=True).values()
        }
        try:
            while tasks:
                done, tasks = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                yield [r for task in done for r in task.result()]
        finally:
            for task in tasks:  # the consumer stopped early (it failed): nothing is left running behind it
                task.cancel()
        if health:
            await self._record_health(channel, health)

    async def _deliver(
        self,
        channel: str,
        name: str,
        config: dict[str, Any] | None,
        items: list[tuple[Message, dict[str, Any], list[tuple[str, dict[str, Any] | None, int | None]]]],
        step: int,
        health: dict[tuple[str, int], list[Any]],
        earlier: dict[str, list[str]],
        deadline: float,
    ) -> list[dict[str, Any]]:
        """One provider call for `items` (the step-th provider of their chains); a message it is known not to have
        accepted moves to the next provider of its chain at once, in the same attempt, while the claim's lease (it ends
        at `deadline`, time.monotonic()) still covers that provider's timeout. Returns every final outcome."""
        sent = await self._send_group(channel, name, config, [m for m, _, _ in items], [b for _, b, _ in items])
        results: list[dict[str, Any]] = []
        again: list[tuple[Message, dict[str, Any], list[tuple[str, dict[str, Any] | None, int | None]]]] = []
        for (message, base, chain), result in zip(items, sent, strict=True):
            _, _, position = chain[step]
            not_sent = bool(result.pop("not_sent", False))
            if len(chain) > 1 and position is not None:
                counts = health.setdefault((base["tenant_id"], position), [0, 0, None, name])
                if not_sent:
                    counts[0] += 1
                    counts[2] = result.get("error_code")
                elif result["outcome"] == "sent":
                    counts[1] += 1
            if not_sent and step + 1 < len(chain) and not _lease_covers(chain[step + 1], deadline):
                # Past (or too near) the lease's end, maintenance may already have requeued the message (e-mail) and
                # another claim be sending it: this attempt ends with its "not sent" (a retry), the next starts afresh.
                result["error_message"] = (
                    f"{result.get('error_message') or 'not sent'}; not failed over: the claim's lease would not cover "
                    "the next provider (DISPATCHER_LEASE_SECONDS)"
                )
            elif not_sent and step + 1 < len(chain):
                # Known not accepted: the next provider of the chain, now, in the same attempt. The history keeps what
                # the earlier providers answered (docs/architecture.md, "Provider failover").
                earlier.setdefault(base["delivery_id"], []).append(
                    f"{name} (position {position}): {result.get('error_code') or 'not sent'}"
                )
                metrics.FAILOVERS.labels(channel, name).inc()
                again.append((message, base, chain))
                continue
            before = earlier.get(base["delivery_id"])
            if before:
                note = "failed over from " + "; ".join(before)
                result["error_message"] = f"{note}; then: {result['error_message']}" if result.get("error_message") else note
            results.append(result)
        if again:
            for more in await asyncio.gather(
                *(
                    self._deliver(channel, n, c, its, step + 1, health, earlier, deadline)
                    for (n, c), its in _by_step(again, step + 1, per_tenant=False).values()
                )
            ):
                results.extend(more)
        return results

    async def _record_health(self, channel: str, health: dict[tuple[str, int], list[Any]]) -> None:
        """One call per batch, for chained providers only: a failure here never loses the batch's outcomes."""
        rows = [
            {"tenant_id": tenant, "channel": channel, "position": position, "failures": f, "successes": ok, "error_code": code}
            for (tenant, position), (f, ok, code, _) in sorted(health.items())
        ]
        try:
            row = await self.connector.execute_query_one_async(
                RECORD_HEALTH,
                health=Jsonb(rows),
                errors=self.settings.failover_demote_errors,
                window=self.settings.failover_window_seconds,
                demote=self.settings.failover_demote_seconds,
            )
        except Exception:  # noqa: BLE001 - health is advice for the next claims; the sends are recorded regardless
            log.exception("provider health not recorded", extra={"channel": channel})
            return
        for demoted in row["demoted"] or []:
            name = health.get((demoted["tenant_id"], demoted["position"]), [None, None, None, "unknown"])[3]
            log.warning(
                "provider demoted",
                extra={
                    "channel": channel,
                    "tenant_id": demoted["tenant_id"],
                    "provider": name,
                    "position": demoted["position"],
                    "until": demoted["demoted_until"],
                },
            )
            metrics.DEMOTIONS.labels(channel, name).inc()

    async def _send_group(
        self, channel: str, name: str, config: dict[str, Any] | None, messages: list[Message], bases: list[dict[str, Any]]
    ) -> list[dict[str, Any]]:
        """Sends one provider's messages; `bases` holds each message's ids as text and its attempt, in the same order."""
        provider = self.provider(name, config)
        started = time.perf_counter()
        try:
            with tracing.span(
                "provider.send", **{"notify.channel": channel, "notify.provider": provider.name, "notify.messages": len(messages)}
            ):
                sent = await provider.send_many(messages)
        except Exception as exc:  # the provider itself broke: we cannot know what left us
            log.exception("provider crashed", extra={"channel": channel, "provider": provider.name})
            # Resent only where a duplicate is acceptable (the channel's rules: e-mail); elsewhere unknown, never resent.
            outcome = "retry" if self.ctx.channel_rules.get(channel, {}).get("resend_after_ambiguous") else "unknown"
            sent = [
                SendResult(
                    outcome=outcome, provider=provider.name, error_code="provider_exception", error_message=type(exc).__name__
                )
                for _ in messages
            ]
        metrics.PROVIDER_SECONDS.labels(channel, provider.name).observe(time.perf_counter() - started)
        counted: dict[tuple[str, str], int] = {}
        for r in sent:
            counted[(r.outcome, r.error_code or "")] = counted.get((r.outcome, r.error_code or ""), 0) + 1
        test = "true" if getattr(provider, "test", False) else "false"
        for (outcome, error_code), n in counted.items():  # one labelled increment per outcome, not per delivery
            metrics.DELIVERIES.labels(channel, provider.name, outcome, error_code, test).inc(n)
        return [{**base, **_to_builtins(r)} for base, r in zip(bases, sent, strict=True)]

    async def _record(self, results: list[dict[str, Any]]) -> None:
        """One call for the batch. record_attempts_v1 leaves out a provider message id another delivery already has;
        only a concurrent batch committing the same id in between can still hit the unique index: then the call is
        simply made again (it sees that row now), rather than the whole batch staying `sending`."""
        for attempt in range(3):
            try:
                await self.connector.execute_query_all_async(RECORD, results=Jsonb(results))
                return
            except UniqueViolation as exc:
                if exc.constraint_name != "notification_deliveries_provider_message" or attempt == 2:
                    raise
                log.warning("provider message id raced another batch; recording again", extra={"results": len(results)})

    def _observe(
        self,
        channel: str,
        results: list[dict[str, Any]],
        started_ns: int,
        parents: dict[str, Any],
        request_ids: dict[str, Any],
        outcomes: dict[str, int],
        counts: dict[str, int],
    ) -> None:
        """A recorded wave's traces (one span per delivery, in the trace of the request that submitted it), counts and
        per-attempt log lines (with the submitting request's X-Request-ID; no address, no content)."""
        if tracing.enabled:
            ended = time.time_ns()
            for r in results:
                tracing.record(
                    "notification.deliver",
                    parent=parents.get(r["delivery_id"]),
                    start_ns=started_ns,
                    end_ns=ended,
                    **{
                        "notify.delivery_id": r["delivery_id"],
                        "notify.channel": channel,
                        "notify.attempt": r["attempt"],
                        "notify.outcome": r["outcome"],
                        "notify.provider": r.get("provider"),
                        "notify.error_code": r.get("error_code"),
                    },
                )
        for r in results:
            outcomes[r["outcome"]] = outcomes.get(r["outcome"], 0) + 1
            counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
            if self.settings.log_deliveries:
                log.info(
                    "delivery attempted",
                    extra={
                        "channel": channel,
                        "delivery_id": r["delivery_id"],
                        "tenant_id": r["tenant_id"],
                        "attempt": r["attempt"],
                        "outcome": r["outcome"],
                        "provider": r.get("provider"),
                        "error_code": r.get("error_code"),
                        "request_id": request_ids.get(r["delivery_id"]),
                    },
                )

    async def drain(self, channel: str) -> dict[str, int]:
        """Keeps up to max_in_flight provider calls going: claims a batch whenever that many slots are free,
        sends it, frees its slots as soon as the provider answers, then records the outcomes. Claims and records
        overlap other batches' provider calls, so a slow provider is bounded by in-flight / latency, not by our
        round trips. Ends when nothing has been due for dispatch_linger_ms (a steady trickle of submissions
        stays in one job instead of one procrastinate job per delivery)."""
        limit = max(1, self.settings.max_in_flight)
        batch = max(1, min(self.settings.batch_size, limit))
        linger = self.settings.dispatch_linger_ms / 1000.0
        free = limit
        slots = asyncio.Condition()
        running: set[asyncio.Task[None]] = set()
        counts: dict[str, int] = {}
        idle_since: float | None = None
        if not self.ctx.channel_rules:  # once per process: the rules change only with a migration
            row = await self.connector.execute_query_one_async(CHANNEL_RULES)
            self.ctx.channel_rules.update(row["rules"])

        async def run(rows: list[dict[str, Any]], claimed_at: float) -> None:
            nonlocal free
            started = time.perf_counter()
            started_ns = time.time_ns()
            unanswered = len(rows)
            outcomes: dict[str, int] = {}
            parents = {str(row["delivery_id"]): row.get("trace_parent") for row in rows} if tracing.enabled else {}
            request_ids = {str(row["delivery_id"]): row.get("http_request_id") for row in rows}
            try:
                # Each wave of outcomes (one tenant's provider call, or several that answered together) frees its slots
                # and is recorded at once: a slow provider holds up only its own tenant's deliveries.
                with tracing.span("dispatch.batch", channel=channel, claimed=len(rows)):
                    waves = self.send_waves(channel, rows, claimed_at)
                    async for results in waves:
                        async with slots:
                            free += len(results)
                            unanswered -= len(results)
                            slots.notify_all()
                        with tracing.span("dispatch.record", channel=channel, results=len(results)):
                            await self._record(results)
                        self._observe(channel, results, started_ns, parents, request_ids, outcomes, counts)
            finally:
                if unanswered:
                    async with slots:
                        free += unanswered
                        slots.notify_all()
            log.info(
                "batch dispatched",
                extra={
                    "channel": channel,
                    "claimed": len(rows),
                    "outcomes": outcomes,
                    "ms": round((time.perf_counter() - started) * 1000, 1),
                },
            )

        def done(task: asyncio.Task[None]) -> None:
            running.discard(task)
            if not task.cancelled() and task.exception() is not None:
                # The claimed rows keep their lease; maintenance applies the crash policy when it expires.
                log.error("dispatch batch failed", exc_info=task.exception(), extra={"channel": channel})

        while True:
            async with slots:
                # A quarter of a batch free is enough to claim again: the in-flight count stays near the limit.
                await slots.wait_for(lambda: free >= max(1, batch // 4))  # noqa: B023 - the current count, by design
                want = min(batch, free)
            claimed_at = time.monotonic()  # the lease starts at the claim (no earlier than this)
            rows = await self.connector.execute_query_all_async(
                CLAIM, channel=channel, limit=want, lease=self.settings.lease_seconds
            )
            if rows:
                idle_since = None
                async with slots:
                    free -= len(rows)
                task = asyncio.get_running_loop().create_task(run(rows, claimed_at))
                running.add(task)
                task.add_done_callback(done)
                if len(rows) == want:
                    continue
            now = time.perf_counter()
            idle_since = idle_since or now
            if now - idle_since >= linger and not running:
                break
            await asyncio.sleep(0.01)
        return counts

    async def aclose(self) -> None:
        self.renderer.close()
        await asyncio.gather(*(p.aclose() for p in self.providers.values()), return_exceptions=True)
