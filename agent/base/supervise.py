"""Supervised background loops: a crash is logged with its traceback and the loop restarts.

A node runs a handful of long-lived loops (the broker connection, health, link probes, the
watchdog, group upkeep). None of them may stop the node: :func:`supervise` runs one, and
when it raises anything but cancellation (or an exception the caller lets through, such as
a fatal login refusal), logs ``loop_crashed`` and starts it again after a capped,
full-jitter backoff that resets once the loop has run well for a while. A one-off task (a
job, a group duty) runs under :func:`guarded`: its exception is logged, never raised.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import structlog

from transport.mqtt import backoff_s

log = structlog.get_logger("prism.supervise")

#: Restarts per loop name since start (health reports them).
RESTARTS: Counter[str] = Counter()


async def supervise(
    name: str,
    body: Callable[[], Awaitable[None]],
    *,
    passthrough: tuple[type[BaseException], ...] = (),
    min_s: float = 0.2,
    max_s: float = 30.0,
    healthy_s: float = 60.0,
    restarts: Counter[str] | None = None,
) -> None:
    """Run ``body()`` until it returns; restart it after unexpected errors (see the module)."""
    counter = RESTARTS if restarts is None else restarts
    attempt = 0
    while True:
        started = time.monotonic()
        try:
            await body()
            return
        except passthrough:
            raise
        except Exception:
            if time.monotonic() - started > healthy_s:
                attempt = 0
            delay = backoff_s(attempt, min_s, max_s)
            attempt += 1
            counter[name] += 1
            log.exception("loop_crashed", loop=name, restart_in_s=round(delay, 3), restarts=counter[name])
        await asyncio.sleep(delay)


async def guarded(coro: Coroutine[Any, Any, None], name: str) -> None:
    """Run a one-off task; its exception is logged (``task_crashed``), never raised."""
    try:
        await coro
    except Exception:
        log.exception("task_crashed", task=name)
