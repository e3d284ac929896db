"""Renders a batch's deliveries off the event loop, in a small pool of child processes: the worker's (runner/drainer.py)
and the API's dry run (POST /internal/notifications/preview, dispatcher/preview.py) use the same pool, limits and renderer.

Each child has an address-space limit (RLIMIT_AS, DISPATCHER_RENDER_MEMORY_MB: a huge string is a MemoryError there,
not the worker's memory) and a time budget per delivery (ITIMER_REAL + SIGALRM, DISPATCHER_RENDER_TIMEOUT_MS: a slow
loop is interrupted between bytecodes). One call per batch keeps IPC cheap. Content that cannot be slow or large
(WhatsApp template parameters, texts of bare `{{ name }}` placeholders: dispatcher.render.needs_isolation) skips the
children and renders in the worker at once. If a call does not come back in time
(something stuck inside one C call) or its process dies, the pool is killed and replaced, and that call's deliveries
are rendered again one by one so that only the poison fails.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from dispatcher.render import Limits, RenderError, needs_isolation, render
from dispatcher.settings import Settings

log = logging.getLogger("runner.render")
Item = tuple[Any, dict[str, Any] | None, dict[str, Any]]  # (content key, content, variables)
Outcome = tuple[bool, Any]  # (True, rendered) or (False, "ErrorClass: message")
GRACE_SECONDS = 2.0


class RenderTimeout(Exception):
    """The delivery's render passed its time budget."""


def _alarm(signum: int, frame: Any) -> None:
    raise RenderTimeout("render time budget exceeded")


def _child_init(memory_bytes: int) -> None:
    import resource
    import signal

    if memory_bytes > 0:
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, hard))
    signal.signal(signal.SIGALRM, _alarm)


def _ping() -> int:
    return os.getpid()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, RenderError) and str(exc).split(":", 1)[0].isidentifier() and ":" in str(exc):
        return str(exc)[:500]
    if isinstance(exc, RenderError):
        return f"RenderError: {exc}"[:500]
    try:
        detail = str(exc)[:300]
    except Exception:  # noqa: BLE001 - even the message may be hostile (e.g. a 5,000-digit number)
        detail = ""
    return f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__


def _pack(items: list[Item]) -> tuple[list[Any], list[tuple[int, dict[str, Any]]]]:
    """Each distinct content crosses the process boundary once per call, not once per delivery."""
    index: dict[Any, int] = {}
    contents: list[Any] = []
    refs = []
    for key, content, variables in items:
        if key not in index:
            index[key] = len(contents)
            contents.append(content)
        refs.append((index[key], variables))
    return contents, refs


def render_many(
    channel: str, contents: list[Any], refs: list[tuple[int, dict[str, Any]]], limits: Limits, budget_seconds: float
) -> list[Outcome]:
    """Runs in a child: renders each delivery within its own time budget; every failure is that delivery's alone."""
    import signal

    out: list[Outcome] = []
    for ref, variables in refs:
        content = contents[ref]
        try:
            signal.setitimer(signal.ITIMER_REAL, budget_seconds)
            try:
                out.append((True, render(channel, content, variables, limits)))
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        except (Exception, MemoryError, RecursionError) as exc:  # noqa: BLE001 - a template's failure is data
            out.append((False, _describe(exc)))
    return out


def render_inline(channel: str, items: list[Item], limits: Limits) -> list[Outcome]:
    """In the worker itself: for content that needs no isolation, and for everything with DISPATCHER_RENDER_PROCESSES=0
    (debugging only: same outcomes, no time or memory bound)."""
    out: list[Outcome] = []
    for _, content, variables in items:
        try:
            out.append((True, render(channel, content, variables, limits)))
        except (Exception, MemoryError, RecursionError) as exc:  # noqa: BLE001
            out.append((False, _describe(exc)))
    return out


def _context() -> Any:
    """forkserver, preloading only this module: children fork from a small clean process (no event loop, no
    connections, no threads of the worker) and the worker's __main__ is never imported again."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["dispatcher.render_pool"])
    return ctx


class RenderPool:
    def __init__(self, settings: Settings) -> None:
        self.limits = Limits.from_settings(settings)
        self.processes = settings.render_processes
        self.budget = settings.render_timeout_ms / 1000.0
        self.memory_bytes = settings.render_memory_mb * 1024 * 1024
        self._pool: ProcessPoolExecutor | None = None
        self._ready: asyncio.Future[None] | None = None

    async def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                max_workers=self.processes, mp_context=_context(), initializer=_child_init, initargs=(self.memory_bytes,)
            )
            pool, loop = self._pool, asyncio.get_running_loop()
            # Start the children before the first timed call: a cold start is not a stuck template.
            self._ready = asyncio.ensure_future(
                asyncio.gather(*(loop.run_in_executor(pool, _ping) for _ in range(self.processes)))
            )
        pool, ready = self._pool, self._ready
        if ready is not None:
            try:
                await asyncio.shield(ready)
            except BrokenProcessPool:
                self._discard(pool)
                raise
        return pool

    def _discard(self, pool: ProcessPoolExecutor, kill: bool = False) -> None:
        if self._pool is not pool:
            return
        self._pool, self._ready = None, None
        if kill:
            for process in list((getattr(pool, "_processes", None) or {}).values()):
                try:
                    process.kill()
                except Exception:  # noqa: BLE001 - already gone
                    pass
        # Not cancel_futures: other batches' calls queued on this pool would end cancelled (a BaseException nobody
        # records). With the children killed, the executor fails them with BrokenProcessPool instead, and each of those
        # batches renders again in a fresh pool.
        pool.shutdown(wait=False, cancel_futures=False)

    async def _call(self, channel: str, items: list[Item]) -> list[Outcome]:
        pool = await self._executor()
        contents, refs = _pack(items)
        future = asyncio.get_running_loop().run_in_executor(pool, render_many, channel, contents, refs, self.limits, self.budget)
        try:
            return await asyncio.wait_for(future, timeout=self.budget * len(items) + GRACE_SECONDS)
        except TimeoutError:
            log.warning("render call stuck; replacing the render processes", extra={"deliveries": len(items)})
            self._discard(pool, kill=True)
            raise
        except BrokenProcessPool:
            self._discard(pool)
            raise

    async def _one(self, channel: str, item: Item) -> Outcome:
        for _ in range(3):
            try:
                [outcome] = await self._call(channel, [item])
                return outcome
            except TimeoutError:
                return (False, "RenderTimeout: render time budget exceeded")
            except BrokenProcessPool:
                continue  # this item's process died, or another call's kill took it down: try again in a fresh one
        return (False, "RenderCrashed: the render process died")

    async def render(self, channel: str, items: list[Item]) -> list[Outcome]:
        """Content that cannot be made slow or large (dispatcher.render.needs_isolation) renders here at once; the rest
        in the child processes. Outcomes come back in the order of items."""
        if not items:
            return []
        if self.processes <= 0:
            return render_inline(channel, items, self.limits)
        isolated = [i for i, (_, content, _) in enumerate(items) if needs_isolation(channel, content)]
        if len(isolated) < len(items):
            outcomes: list[Outcome | None] = [None] * len(items)
            chosen = set(isolated)
            inline = [i for i in range(len(items)) if i not in chosen]
            for i, outcome in zip(inline, render_inline(channel, [items[i] for i in inline], self.limits), strict=True):
                outcomes[i] = outcome
            if isolated:
                for i, outcome in zip(isolated, await self._isolated(channel, [items[i] for i in isolated]), strict=True):
                    outcomes[i] = outcome
            return outcomes  # type: ignore[return-value]
        return await self._isolated(channel, items)

    async def _isolated(self, channel: str, items: list[Item]) -> list[Outcome]:
        try:
            return await self._call(channel, items)
        except TimeoutError:
            if len(items) == 1:
                return [(False, "RenderTimeout: render time budget exceeded")]
        except BrokenProcessPool:
            pass
        # Find the poison: each delivery of the failed call again, alone, in a fresh process.
        return [await self._one(channel, item) for item in items]

    def close(self) -> None:
        if self._pool is not None:
            self._discard(self._pool, kill=True)
