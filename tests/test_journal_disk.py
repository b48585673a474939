"""A full or failing journal disk: real ENOSPC on a small tmpfs, real EIO from a FUSE
filesystem (tests/failing_fs.py), real agents, mosquitto at its default limits.

The broker here keeps mosquitto's defaults (20 QoS 1 messages in flight per client, no
persistence), as a user's broker does. Needs root (it mounts filesystems); skipped otherwise.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.disks import Disk, failing_disk, fuse_available, small_disk
from tests.mqtt_env import REPO, agent, logged, mosquitto, pub, sub, wait_logged, wait_peer

pytestmark = [
    pytest.mark.mqtt,
    pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs (needs root)"),
]

CLUSTER = "disk"
#: More than mosquitto's default max_inflight_messages (20): unacknowledged jobs would fill it.
FLOOD = 25


def job(job_id: str, text: str = "a full disk") -> str:
    return json.dumps({"id": job_id, "model": "bert", "inputs": {"text": [text]}, "mode": "local"})


def collect(port: int, payloads: dict[str, str], node: str, timeout_s: float = 60) -> list[dict[str, object]]:
    """Publish each payload to ``node``, then one more job, a marker; collect results until
    every job's and the marker's came. Results leave a node in the order they are ready, and
    a copy would be ready with its first, so a job answered twice shows twice."""
    marker = f"marker-{len(payloads)}-{os.urandom(3).hex()}"
    waiter = sub(port, f"prism/v1/{CLUSTER}/results/#", 10_000, timeout_s=timeout_s)
    try:
        for payload in [*payloads.values(), job(marker)]:
            pub(port, f"prism/v1/{CLUSTER}/nodes/{node}/jobs", payload)
        got: list[dict[str, object]] = []
        while not {*payloads, marker} <= {str(r["id"]) for r in got}:
            got.append(json.loads(waiter.next(timeout_s)))
    finally:
        waiter.close()
    return [r for r in got if r["id"] != marker]


def error_code(result: dict[str, object]) -> object:
    error = result.get("error")
    return error.get("code") if isinstance(error, dict) else None


NO_FUSE = "needs /dev/fuse, libfuse3 (fuse3) and mfusepy: scripts/setup.sh dev installs them"


@pytest.mark.parametrize(
    ("make_disk", "sqlite_says"),
    [
        pytest.param(small_disk, "database or disk is full", id="ENOSPC"),
        pytest.param(
            failing_disk, "disk I/O error", id="EIO", marks=pytest.mark.skipif(not fuse_available(), reason=NO_FUSE)
        ),
    ],
)
def test_jobs_on_a_full_or_failing_disk_are_answered_at_once_and_run_once_the_disk_recovers(
    make_disk: Callable[[], contextlib.AbstractContextManager[Disk]], sqlite_says: str
) -> None:
    with (
        make_disk() as disk,
        mosquitto() as port,
        agent(port, CLUSTER, "f1", "bert=tiny-bert", env={"PRISM_STATE_DIR": str(disk.path)}) as proc,
    ):
        disk.fail()
        jobs = {f"full-{i}": job(f"full-{i}") for i in range(FLOOD)}
        full = collect(port, jobs, "f1")
        # Every job answered once, at once, with an error the client can retry on:
        assert sorted(str(r["id"]) for r in full) == sorted(jobs)
        assert {error_code(r) for r in full} == {"journal_unavailable"}
        disk.recover()
        again = {k: jobs[k] for k in list(jobs)[:6]}  # the client retries with the same bytes
        later = collect(port, again, "f1")
        assert sorted(str(r["id"]) for r in later) == sorted(again)
        assert all(r["ok"] is True for r in later), later
        log = proc.log_path.read_text()  # type: ignore[attr-defined]
    refusals = [json.loads(line) for line in log.splitlines() if '"event": "journal_unavailable"' in line]
    assert refusals
    assert all(sqlite_says in r["error"] for r in refusals), refusals[:2]  # the disk's own error, logged


def test_a_node_on_a_full_disk_keeps_getting_control_and_serves_its_peers_splits() -> None:
    fast = {"PRISM_HEALTH_INTERVAL_S": "0.5", "PRISM_PROBE_INTERVAL_S": "0.5"}
    with (
        small_disk() as disk,
        mosquitto() as port,
        agent(port, CLUSTER, "c1", "bert=tiny-bert", env=fast),
        agent(port, CLUSTER, "c2", "bert=tiny-bert", env={**fast, "PRISM_STATE_DIR": str(disk.path)}),
    ):
        wait_peer(port, CLUSTER, "c1", "c2")
        disk.fill()
        jobs = {f"c2-{i}": job(f"c2-{i}") for i in range(FLOOD)}
        assert {error_code(r) for r in collect(port, jobs, "c2")} == {"journal_unavailable"}
        # c2's disk is still full: a split c1 coordinates reaches it over control messages.
        split = json.dumps({"id": "split", "model": "bert", "inputs": {"text": ["one", "two"]}, "mode": "distributed"})
        (result,) = collect(port, {"split": split}, "c1")
        assert result["ok"] is True, result
        assert result["peers"] == ["c2"]
        assert result["fallback"] is False, result


def test_a_peer_whose_journal_is_held_up_still_serves_splits(tmp_path: Path) -> None:
    """A slow disk (here the journal's database locked by another process, so each write waits
    out SQLite's 5 s busy timeout) holds up the node's jobs, never its control messages."""
    fast = {"PRISM_HEALTH_INTERVAL_S": "0.5", "PRISM_PROBE_INTERVAL_S": "0.5"}
    with (
        mosquitto() as port,
        agent(port, CLUSTER, "s1", "bert=tiny-bert", env=fast),
        agent(port, CLUSTER, "s2", "bert=tiny-bert", env={**fast, "PRISM_STATE_DIR": str(tmp_path)}),
    ):
        wait_peer(port, CLUSTER, "s1", "s2")
        waiter = sub(port, f"prism/v1/{CLUSTER}/results/#", 100, timeout_s=60)
        lock = sqlite3.connect(tmp_path / f"journal-{CLUSTER}-s2.sqlite3", isolation_level=None)
        try:
            lock.execute("BEGIN EXCLUSIVE")  # s2's journal writes now wait, then fail
            for i in range(3):  # s2's jobs queue behind the lock for ~15 s
                pub(port, f"prism/v1/{CLUSTER}/nodes/s2/jobs", job(f"slow-{i}"))
            split = {"id": "split", "model": "bert", "inputs": {"text": ["one", "two"]}, "mode": "distributed"}
            pub(port, f"prism/v1/{CLUSTER}/nodes/s1/jobs", json.dumps(split))
            result = json.loads(waiter.next(60))
            while result["id"] != "split":  # s2's own jobs: journal_unavailable once the wait runs out
                assert error_code(result) == "journal_unavailable", result
                result = json.loads(waiter.next(60))
            assert result["peers"] == ["s2"]
            assert result["fallback"] is False, result  # s2 took its part: its control was not held up
        finally:
            lock.close()
            waiter.close()


@pytest.mark.skipif(not fuse_available(), reason=NO_FUSE)
def test_submit_sends_a_job_again_while_the_disk_fails_and_gets_it_answered_once_it_recovers() -> None:
    """``prism-agent submit`` as a user types it: the node answers journal_unavailable (the job
    was not taken), the client sends the same job again after a pause, and once the disk works
    the job runs, once."""
    with (
        failing_disk() as disk,
        mosquitto() as port,
        agent(port, CLUSTER, "e1", "bert=tiny-bert", env={"PRISM_STATE_DIR": str(disk.path)}) as proc,
    ):
        disk.fail()
        cmd = [sys.executable, "-m", "agent", "submit", "--broker", f"mqtt://127.0.0.1:{port}", "--cluster", CLUSTER]
        cmd += ["--node", "e1", "--model", "bert", "--id", "again", "--text", "a failing disk", "--json"]
        client = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_logged(proc, "journal_unavailable", 30, job="again")  # refused at least once, not taken
            disk.recover()
            out, err = client.communicate(timeout=60)
        finally:
            client.kill()
        assert client.returncode == 0, err[-2000:]
        result = json.loads(out)  # the JSON alone on stdout
        assert result["ok"] is True, result
        assert "job_sent_again" in err  # the client said why it waited
        assert len(logged(proc, "job_done", job="again")) == 1
