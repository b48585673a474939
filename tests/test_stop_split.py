"""A coordinator stopped (SIGTERM) right after a split, or during one: real mosquitto, two real
agents, real mDNS on 127.0.0.1, real GLOO, and a NOTIFY_SOCKET bound here as systemd would.

The stop must tear its groups down while it still runs (the peer is told), answer a split in
flight first, then say ``STOPPING=1``, log ``stopped`` and exit 0 (issue 22: it exited 70 with
"the node is not running" when an idle group was left to tear down).
"""

from __future__ import annotations

import json
import signal
import socket
import sqlite3
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.mqtt_env import Agent, agents, ask_node, mosquitto, pub, sub, wait_peer

pytestmark = [pytest.mark.mqtt, pytest.mark.gloo, pytest.mark.timeout(240)]

CLUSTER = "stoptest"
FAST = {"PRISM_HEALTH_INTERVAL_S": "0.5", "PRISM_PROBE_INTERVAL_S": "0.5"}
SPLIT = {"model": "bert", "inputs": {"text": ["hello world", "two"]}, "mode": "distributed", "method": "codes"}


class Notifications:
    """What an agent sends to its NOTIFY_SOCKET, read as it comes (as systemd would: a socket
    nobody reads fills up, and a sender blocking on it is not what is under test here)."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.seen: list[str] = []
        self._changed = threading.Condition()
        self._done = threading.Event()
        self._reader = threading.Thread(target=self._read, name="notify-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while not self._done.is_set():
            try:
                data = self.sock.recv(256)
            except TimeoutError:
                continue
            with self._changed:
                self.seen.append(data.decode())
                self._changed.notify_all()

    def wait_for(self, what: str, timeout_s: float = 30.0) -> None:
        """Until ``what`` was sent (now or before)."""
        with self._changed:
            if not self._changed.wait_for(lambda: what in self.seen, timeout_s):
                raise AssertionError(f"never notified {what} in {timeout_s} s (got {sorted(set(self.seen))})")

    def close(self) -> None:
        self._done.set()
        self._reader.join(timeout=5)
        self.sock.close()


@dataclass
class Pair:
    """A coordinator ``c1`` (its systemd socket and journal directory here) and its peer ``p1``."""

    port: int
    coordinator: subprocess.Popen[str]
    peer: subprocess.Popen[str]
    notify: Notifications
    state_dir: Path

    def log(self, proc: subprocess.Popen[str]) -> list[dict[str, object]]:
        text = Path(proc.log_path).read_text()  # type: ignore[attr-defined]
        return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


@pytest.fixture
def pair() -> Iterator[Pair]:
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        notify = Notifications(tmp / "notify")
        stack.callback(notify.close)
        port = stack.enter_context(mosquitto())
        env = {**FAST, "NOTIFY_SOCKET": str(tmp / "notify"), "PRISM_STATE_DIR": str(tmp / "state")}
        coordinator, peer = stack.enter_context(agents(port, CLUSTER, Agent("c1", env=env), Agent("p1", env=FAST)))
        wait_peer(port, CLUSTER, "c1", "p1")
        yield Pair(port, coordinator, peer, notify, tmp / "state")
        if peer.poll() is None:
            peer.send_signal(signal.SIGCONT)  # a failed test may leave it stopped


def split(pair: Pair, job_id: str) -> None:
    """One split job through the coordinator, run over the peer (so a group is formed)."""
    got = ask_node(pair.port, CLUSTER, "c1", [{"id": job_id, **SPLIT}])[job_id]
    assert got["ok"] is True, got
    assert got["mode"] == "distributed", got
    assert got["peers"] == ["p1"]


def assert_clean_stop(pair: Pair) -> None:
    """Exit 0, ``STOPPING=1``, a ``stopped`` line, and the peer told of the teardown."""
    code = pair.coordinator.wait(timeout=60)
    assert code == 0, Path(pair.coordinator.log_path).read_text()[-2000:]  # type: ignore[attr-defined]
    pair.notify.wait_for("STOPPING=1")
    events = [line["event"] for line in pair.log(pair.coordinator)]
    assert "stopped" in events
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        reasons = [str(line.get("reason")) for line in pair.log(pair.peer) if line["event"] == "group_dropped"]
        if "the coordinator tore it down" in reasons:
            return
        time.sleep(0.1)
    raise AssertionError(f"the peer was never told of the teardown (it dropped its group for: {reasons})")


def taken(state_dir: Path, job_id: str) -> bool:
    """Whether the coordinator's journal holds ``job_id`` (it took the job and runs it)."""
    for path in state_dir.glob("journal-*.sqlite3"):
        with sqlite3.connect(path, timeout=5) as db:
            # A job is journalled before it is parsed: its id is in its payload until it is answered.
            row = db.execute(
                "SELECT 1 FROM jobs WHERE id = ? OR instr(payload, ?) > 0", (job_id, f'"{job_id}"'.encode())
            ).fetchone()
            if row:
                return True
    return False


def test_sigterm_right_after_a_split_tears_the_group_down_and_exits_zero(pair: Pair) -> None:
    pair.notify.wait_for("READY=1")
    split(pair, "before-stop")
    pair.coordinator.send_signal(signal.SIGTERM)  # the group is idle, well within group_idle_s
    assert_clean_stop(pair)
    assert pair.peer.poll() is None  # the peer serves on


def test_sigterm_during_a_split_answers_it_then_exits_zero(pair: Pair) -> None:
    pair.notify.wait_for("READY=1")
    split(pair, "warm")  # the group exists: the next split goes straight to its run
    waiter = sub(pair.port, f"prism/v1/{CLUSTER}/results/in-flight", 1, timeout_s=60)
    pair.peer.send_signal(signal.SIGSTOP)  # the split cannot finish until the peer resumes
    try:
        pub(pair.port, f"prism/v1/{CLUSTER}/nodes/c1/jobs", json.dumps({"id": "in-flight", **SPLIT}))
        deadline = time.monotonic() + 30
        while not taken(pair.state_dir, "in-flight"):
            assert time.monotonic() < deadline, "the coordinator never took the job"
            time.sleep(0.05)
        pair.coordinator.send_signal(signal.SIGTERM)
    finally:
        pair.peer.send_signal(signal.SIGCONT)
    out, err = waiter.communicate(timeout=60)
    assert out.strip(), err
    result = json.loads(out)
    assert result["ok"] is True, result  # answered before the coordinator left
    assert_clean_stop(pair)
    assert "draining" in [line["event"] for line in pair.log(pair.coordinator)]  # it was in flight at the stop
