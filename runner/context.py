"""What a worker process keeps per procrastinate App (tests derive apps for other databases): one DeliveryDrainer
and one CallbackSender, made on the first job and kept for the worker's life; `close_all` closes them on shutdown
(runner.app.WorkerApp.run_worker_async)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from procrastinate import JobContext

from dispatcher.settings import Settings
from runner.callbacks import CallbackSender
from runner.drainer import DeliveryDrainer

log = logging.getLogger("runner")

_drainers: dict[int, DeliveryDrainer] = {}
_senders: dict[int, CallbackSender] = {}
T = TypeVar("T")


def _per_app(registry: dict[int, T], context: JobContext, make: Callable[[Any, Settings], T]) -> T:
    assert context.app is not None
    key = id(context.app)
    if key not in registry:
        settings = (context.additional_context or {}).get("settings") or Settings.from_env()
        registry[key] = make(context.app.connector, settings)
    return registry[key]


def drainer_for(context: JobContext) -> DeliveryDrainer:
    return _per_app(_drainers, context, DeliveryDrainer)


def sender_for(context: JobContext) -> CallbackSender:
    return _per_app(_senders, context, CallbackSender)


async def close_all() -> None:
    """Pending mock status reports get a few seconds; a supervisor must see the exit promptly."""
    for d in [*_drainers.values(), *_senders.values()]:
        try:
            await asyncio.wait_for(d.aclose(), timeout=10)
        except (TimeoutError, Exception):  # noqa: BLE001
            log.warning("provider did not close in time")
