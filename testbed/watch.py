"""Watching a bed's broker from inside host 0: results and health as they arrive."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from testbed.procs import TestbedError, need

if TYPE_CHECKING:
    from testbed.bed import Testbed


class Watch:
    """``mosquitto_sub -v`` on host 0 in a thread: the latest message per topic and every result by id."""

    def __init__(self, bed: Testbed, topics: Sequence[str]) -> None:
        self.bed = bed
        cmd = [need("mosquitto_sub"), "-h", bed.address(0), "-p", str(bed.broker_port), "-V", "mqttv5", "-q", "1", "-v"]
        for t in topics:
            cmd += ["-t", t]
        self._proc = subprocess.Popen(
            bed.run(0, *cmd), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL
        )
        self.latest: dict[str, tuple[float, Any]] = {}
        self.results: dict[str, list[dict[str, Any]]] = {}
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, name="watch", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for raw in self._proc.stdout:
            topic, _, payload = raw.rstrip(b"\n").partition(b" ")
            now = time.monotonic()
            try:
                value: Any = json.loads(payload)
            except (ValueError, RecursionError):  # hostile payloads on the watched topics too
                value = payload.decode(errors="replace")
            with self._cond:
                name = topic.decode(errors="replace")
                self.latest[name] = (now, value)
                if "/results/" in name and isinstance(value, dict):
                    self.results.setdefault(name.rsplit("/", 1)[1], []).append({**value, "_t": now})
                self._cond.notify_all()

    def wait(self, check: Callable[[], Any], timeout_s: float, what: str) -> Any:
        """Until ``check()`` (called under the lock) is truthy; returns it."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                value = check()
                if value:
                    return value
                left = deadline - time.monotonic()
                if left <= 0 or self._proc.poll() is not None:
                    raise TestbedError(f"timed out after {timeout_s} s waiting for {what}")
                self._cond.wait(min(left, 0.5))

    def result(self, job_id: str, timeout_s: float = 120.0) -> dict[str, Any]:
        """The (first) result of a job."""
        found: list[dict[str, Any]] = self.wait(lambda: self.results.get(job_id), timeout_s, f"result of {job_id}")
        return found[0]

    def health(self, node: str) -> dict[str, Any] | None:
        """The latest health document of ``node`` seen by this watch."""
        with self._cond:
            got = self.latest.get(self.bed.topic(f"nodes/{node}/health"))
        return got[1] if got and isinstance(got[1], dict) else None

    def wait_health(
        self, node: str, pred: Callable[[dict[str, Any]], bool], timeout_s: float = 60.0, after: float = 0.0
    ) -> dict[str, Any]:
        """Until a health document of ``node`` received after ``after`` (monotonic) satisfies ``pred``."""
        key = self.bed.topic(f"nodes/{node}/health")

        def check() -> dict[str, Any] | None:
            got = self.latest.get(key)
            if got and got[0] >= after and isinstance(got[1], dict) and pred(got[1]):
                return got[1]
            return None

        result: dict[str, Any] = self.wait(check, timeout_s, f"health of {node}")
        return result

    def close(self) -> None:
        """Stop the subscriber."""
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait(timeout=10)
        self._reader.join(timeout=5)

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
