"""The job journal: what a node took, durably, so a crash loses no job and answers none twice.

A job is written here (SQLite, WAL) before the broker gets its acknowledgement; its result
replaces it once answered and is kept after the broker acknowledged it, within a byte
budget, so a redelivered copy gets the same answer instead of a second run. After a crash
the node finds the jobs it had taken and not answered (it runs them again) and the results
it had not sent (it sends them). A job that was in flight during two crashes in a row is
answered with an error instead of being run a third time: it may be what kills the node.

All SQLite work runs on one thread of its own; the event loop only awaits it. An index of
keys and states stays in memory, so telling a duplicate costs no disk access.

A write the disk refuses (full, failing) raises :class:`JournalError`. A job whose
:meth:`Journal.take` failed is not in the index, so the same job sent again is taken afresh;
the intake (agent/jobs/intake.py) answers it ``journal_unavailable`` at once.
"""

from __future__ import annotations

import asyncio
import enum
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from engine.errors import PrismError

T = TypeVar("T")

#: Runs of one job interrupted by a crash before it is answered with an error instead.
MAX_ATTEMPTS = 2
#: Keys of sent jobs remembered (their results may be pruned before).
MAX_KEYS = 200_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    key BLOB PRIMARY KEY,
    id TEXT,
    payload BLOB,
    topic TEXT,
    corr BLOB,
    state INTEGER NOT NULL,
    result BLOB,
    size INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    t REAL NOT NULL
)
"""


class JournalError(PrismError):
    """The journal could not be read or written (a full disk, an I/O error)."""

    code = "journal_unavailable"


class State(enum.IntEnum):
    """Where a job is."""

    TAKEN = 0  # acknowledged to the broker, not answered
    ANSWERED = 1  # result stored, not yet acknowledged by the broker
    SENT = 2  # the broker has the result


@dataclass(frozen=True, slots=True)
class Entry:
    """A journalled job: its key, id, where its answer goes, and (when taken) its payload."""

    key: bytes
    job_id: str | None
    topic: str | None
    correlation: bytes | None
    payload: bytes | None = None
    attempts: int = 0


@dataclass(frozen=True, slots=True)
class Recovery:
    """What a restarted node owes: jobs to run again, results to send, jobs given up on."""

    rerun: list[Entry]
    resend: list[Entry]
    given_up: list[Entry]


class Journal:
    """See the module docstring. Open with :meth:`open`, close with :meth:`close`."""

    def __init__(self, path: Path, *, sync: str = "normal", max_bytes: int = 256 << 20) -> None:
        self.path = path
        self.sync = sync
        self.max_bytes = max_bytes
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="journal")
        self._db: sqlite3.Connection | None = None
        self.index: dict[bytes, State] = {}
        self._sent_bytes = 0

    async def _do(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        except (sqlite3.Error, OSError) as exc:
            raise JournalError(f"the job journal {self.path} failed: {exc}") from exc

    # -- lifecycle --------------------------------------------------------------------
    async def open(self) -> Recovery:
        """Open (or create) the journal and say what a previous run left unfinished."""
        return await self._do(self._open)

    def _open(self) -> Recovery:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={'FULL' if self.sync == 'full' else 'NORMAL'}")
        db.execute(_SCHEMA)
        self._db = db
        rerun: list[Entry] = []
        resend: list[Entry] = []
        given_up: list[Entry] = []
        with db:
            db.execute("UPDATE jobs SET attempts = attempts + 1 WHERE state = ?", (State.TAKEN,))
            rows = db.execute("SELECT key, id, topic, corr, payload, state, attempts, size FROM jobs ORDER BY t")
            for key, job_id, topic, corr, payload, state, attempts, size in rows.fetchall():
                self.index[key] = State(state)
                entry = Entry(key, job_id, topic, corr, payload, attempts)
                if state == State.TAKEN:
                    (given_up if attempts >= MAX_ATTEMPTS else rerun).append(entry)
                elif state == State.ANSWERED:
                    resend.append(entry)
                else:
                    self._sent_bytes += size
        return Recovery(rerun, resend, given_up)

    async def close(self) -> None:
        """Close the database (pending writes finish first)."""
        await self._do(self._close)
        self._executor.shutdown(wait=True)

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    # -- one job's life ---------------------------------------------------------------
    def state(self, key: bytes) -> State | None:
        """Where job ``key`` is, if this node ever took it."""
        return self.index.get(key)

    async def take(self, entry: Entry) -> None:
        """Record a job before acknowledging it to the broker (:class:`JournalError`: not recorded)."""
        self.index[entry.key] = State.TAKEN  # before the write: a copy arriving meanwhile is a duplicate
        try:
            await self._do(self._take, entry)
        except JournalError:
            self.index.pop(entry.key, None)  # not taken: the same job sent again is taken afresh
            raise

    def _take(self, e: Entry) -> None:
        assert self._db is not None
        with self._db:
            self._db.execute(
                "INSERT OR REPLACE INTO jobs (key, id, payload, topic, corr, state, t) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (e.key, e.job_id, e.payload, e.topic, e.correlation, State.TAKEN, time.time()),
            )

    async def answer(self, key: bytes, result: bytes) -> None:
        """Store a job's encoded result (the payload is no longer needed)."""
        self.index[key] = State.ANSWERED
        await self._do(self._answer, key, result)

    def _answer(self, key: bytes, result: bytes) -> None:
        assert self._db is not None
        with self._db:
            self._db.execute(
                "UPDATE jobs SET state = ?, result = ?, size = ?, payload = NULL WHERE key = ?",
                (State.ANSWERED, result, len(result), key),
            )

    async def result(self, key: bytes) -> bytes | None:
        """A stored result (None when pruned or unknown)."""
        return await self._do(self._result, key)

    def _result(self, key: bytes) -> bytes | None:
        assert self._db is not None
        row = self._db.execute("SELECT result FROM jobs WHERE key = ?", (key,)).fetchone()
        return None if row is None or row[0] is None else bytes(row[0])

    async def sent(self, key: bytes, *, forget: bool = False) -> None:
        """The broker acknowledged the result. ``forget`` (a ``busy`` answer, say) drops the
        job entirely, so the same job sent again runs instead of getting that answer again."""
        if forget:
            self.index.pop(key, None)
        else:
            self.index[key] = State.SENT
        await self._do(self._sent, key, forget)

    def _sent(self, key: bytes, forget: bool) -> None:
        assert self._db is not None
        with self._db:
            if forget:
                self._db.execute("DELETE FROM jobs WHERE key = ?", (key,))
                return
            row = self._db.execute("SELECT size FROM jobs WHERE key = ?", (key,)).fetchone()
            self._db.execute("UPDATE jobs SET state = ? WHERE key = ?", (State.SENT, key))
            self._sent_bytes += row[0] if row else 0
            if self._sent_bytes > self.max_bytes:
                self._prune()

    def _prune(self) -> None:
        """Drop the oldest sent results until under the budget (their keys stay a while longer)."""
        assert self._db is not None
        rows = self._db.execute(
            "SELECT key, size FROM jobs WHERE state = ? AND result IS NOT NULL ORDER BY t", (State.SENT,)
        ).fetchall()
        drop = []
        for key, size in rows:
            if self._sent_bytes <= self.max_bytes // 2:
                break
            drop.append((key,))
            self._sent_bytes -= size
        self._db.executemany("UPDATE jobs SET result = NULL, size = 0 WHERE key = ?", drop)
        count = self._db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]
        if count > MAX_KEYS:
            old = self._db.execute(
                "SELECT key FROM jobs WHERE state = ? ORDER BY t LIMIT ?", (State.SENT, count - MAX_KEYS // 2)
            ).fetchall()
            self._db.executemany("DELETE FROM jobs WHERE key = ?", old)
            for (key,) in old:
                self.index.pop(bytes(key), None)
