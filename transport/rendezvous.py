"""A GLOO rendezvous store that relays keys over the agents' control channel instead of a TCP port.

``ProcessGroupGloo`` exchanges each rank's listening address through a store. torch's
``TCPStore`` is a server on an open port that anyone who can connect may read, write or
crash; this store has no socket at all: ``set`` hands the key to ``publish`` (the agent sends
it to the other members over MQTT, signed and encrypted when the cluster has a secret) and
``get`` waits until the key arrives, from this rank or through :meth:`RelayStore.deliver`.

GLOO calls the store from the thread that forms the group; ``publish`` must be thread-safe
and ``deliver`` may be called from any thread.
"""

from __future__ import annotations

import datetime
import threading
import time
from collections.abc import Callable

import torch.distributed as dist

from engine.errors import FailureReason, GroupError

MAX_KEYS = 1024
MAX_VALUE_BYTES = 16 * 1024


class RelayStore(dist.Store):  # type: ignore[misc,name-defined]
    """A store whose keys travel as messages (see the module docstring)."""

    def __init__(self, publish: Callable[[str, bytes], None], timeout_s: float) -> None:
        super().__init__()
        self._publish = publish
        self._timeout_s = timeout_s
        self._values: dict[str, bytes] = {}
        self._cond = threading.Condition()
        self._closed: str | None = None

    # -- fed by the agent ---------------------------------------------------------------
    def deliver(self, key: str, value: bytes) -> None:
        """A key another member set (ignored past the size limits: a member never sends those)."""
        if len(value) > MAX_VALUE_BYTES:
            return
        with self._cond:
            if key in self._values or len(self._values) >= MAX_KEYS:
                return  # first writer wins: a replayed or late copy cannot change an address
            self._values[key] = bytes(value)
            self._cond.notify_all()

    def close(self, reason: str) -> None:
        """Wake every waiter with an error (the group is being dropped)."""
        with self._cond:
            self._closed = reason
            self._cond.notify_all()

    # -- called by GLOO ---------------------------------------------------------------
    def set(self, key: str, value: bytes | str) -> None:
        data = value.encode() if isinstance(value, str) else bytes(value)
        with self._cond:
            self._values[key] = data
            self._cond.notify_all()
        self._publish(key, data)

    def get(self, key: str) -> bytes:
        deadline = time.monotonic() + self._timeout_s
        with self._cond:
            while key not in self._values:
                left = deadline - time.monotonic()
                if self._closed is not None:
                    raise GroupError(f"rendezvous closed: {self._closed}", reason=FailureReason.FORMATION_FAILED)
                if left <= 0:
                    raise GroupError(
                        f"rendezvous key {key!r} did not arrive in {self._timeout_s:g} s",
                        reason=FailureReason.FORMATION_FAILED,
                    )
                self._cond.wait(left)
            return self._values[key]

    def wait(self, keys: list[str], timeout: datetime.timedelta | None = None) -> None:
        for key in keys:
            self.get(key)

    def check(self, keys: list[str]) -> bool:
        with self._cond:
            return all(k in self._values for k in keys)

    def add(self, key: str, amount: int) -> int:
        with self._cond:
            value = int(self._values.get(key, b"0")) + amount
            self._values[key] = str(value).encode()
        return value

    def compare_set(self, key: str, expected: bytes | str, desired: bytes | str) -> bytes:
        raise GroupError("the relay store does not do compare_set", reason=FailureReason.FORMATION_FAILED)

    def delete_key(self, key: str) -> bool:
        with self._cond:
            return self._values.pop(key, None) is not None

    def num_keys(self) -> int:
        with self._cond:
            return len(self._values)

    def set_timeout(self, timeout: datetime.timedelta) -> None:
        self._timeout_s = timeout.total_seconds()
