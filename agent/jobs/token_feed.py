"""A generation's tokens, from the engine thread to partial results on the event loop (§3.8).

The decode calls :meth:`Feed.on_token` on the engine thread for every token. The feed
detokenises there (with a tokenizer copy only the engine thread uses), keeps the token and
its text delta under a lock, and wakes the loop at most once per batch of tokens
(``call_soon_threadsafe`` only while no wake-up is pending), so a fast decode does not flood
the loop's queue. On the loop, :meth:`Feed.flush` hands partials to the job's :class:`Sink`
in order: one per token while fewer than :data:`MAX_WAITING` of this job's partials wait
for the broker, else the tokens that came meanwhile coalesced into one partial, so a slow
broker holds at most that many partials per job (and the rest as plain token ids, bounded
by the job's ``max_new_tokens``). :meth:`Feed.close` sends whatever is held, before the
final result.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from transport.schema import SCHEMA_VERSION

#: Partials of one job that may wait for the broker before new tokens are coalesced.
MAX_WAITING = 16


@dataclass(frozen=True, slots=True)
class Partial:
    """One streamed message of a generate job: ``tokens`` (usually one; several when
    coalesced) and their text (None for a model without a tokenizer)."""

    job_id: str
    seq: int
    tokens: tuple[int, ...]
    text: str | None

    def to_dict(self) -> dict[str, Any]:
        """The wire form (JSON-compatible)."""
        return {
            "v": SCHEMA_VERSION,
            "id": self.job_id,
            "seq": self.seq,
            "final": False,
            "token": self.tokens[-1],
            "tokens": list(self.tokens),
            "text": self.text,
        }


class Sink(Protocol):
    """Where partials go (the intake publishes them on the job's reply topic)."""

    def put(self, partial: Partial) -> None:
        """Queue ``partial`` for the broker (called on the event loop, in seq order)."""

    def waiting(self) -> int:
        """This job's partials queued and not yet acknowledged by the broker."""


class Feed:
    """One generation's token stream (see the module docstring)."""

    def __init__(
        self,
        job_id: str,
        sink: Sink | None,
        loop: asyncio.AbstractEventLoop,
        detok: Callable[[list[int]], str] | None = None,
    ) -> None:
        self.job_id = job_id
        self.sink = sink
        self.loop = loop
        self.detok = detok
        self.seq = 0  # partials handed to the sink
        self.first_at: float | None = None  # time.monotonic() of the first token
        self._lock = threading.Lock()
        self._made: list[int] = []  # every token so far (engine thread)
        self._said = ""  # their text so far (engine thread)
        self._pending: list[tuple[int, str]] = []  # (token, text delta) not yet on the loop
        self._woken = False
        self._held: list[tuple[int, str]] = []  # on the loop, waiting for room at the broker

    def on_token(self, token: int) -> None:
        """A new token (engine thread)."""
        if self.first_at is None:
            self.first_at = time.monotonic()
        self._made.append(token)
        delta = ""
        if self.detok is not None:
            text = self.detok(self._made)
            # A token can end inside a character (byte-level BPE): hold the text back until it is whole.
            if not text.endswith("\ufffd") and text.startswith(self._said):
                delta, self._said = text[len(self._said) :], text
        with self._lock:
            self._pending.append((token, delta))
            wake = not self._woken
            self._woken = True
        if wake and self.sink is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closing: close() is not coming either
                self.loop.call_soon_threadsafe(self.flush)

    def _take(self) -> None:
        with self._lock:
            self._held.extend(self._pending)
            self._pending.clear()
            self._woken = False

    def flush(self, force: bool = False) -> None:
        """Hand held tokens to the sink as partials (on the loop); ``force``: all of them now."""
        self._take()
        if self.sink is None or not self._held:
            return
        room = MAX_WAITING - self.sink.waiting()
        if room <= 0 and not force:
            return  # the next token or close() tries again
        if len(self._held) <= room:
            for token, delta in self._held:
                self._put((token,), delta)
        else:
            self._put(tuple(t for t, _ in self._held), "".join(d for _, d in self._held))
        self._held.clear()

    def _put(self, tokens: tuple[int, ...], text: str) -> None:
        assert self.sink is not None
        self.sink.put(Partial(self.job_id, self.seq, tokens, text if self.detok is not None else None))
        self.seq += 1

    def close(self) -> None:
        """The decode is over: send everything held (before the final result)."""
        self.flush(force=True)
