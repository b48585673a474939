"""Real agents whose clocks are off (``PRISM_CLOCK_OFFSET_S``, agent/cluster/clock.py): a boot
after the clock was set back still counts, a slow clock still admits its peers or says why,
and a restarted agent refuses replays of what it accepted before."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.mqtt_env import agent, ask_node, mosquitto, pub, sub, wait_peer

pytestmark = [pytest.mark.mqtt, pytest.mark.gloo, pytest.mark.timeout(300)]
CLUSTER = "clk"
HEALTH_S = 1.0
FAST = {"PRISM_HEALTH_INTERVAL_S": str(HEALTH_S), "PRISM_GROUP_TIMEOUT_S": "8"}


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, dict[str, str], Path]]:
    """A broker and g1 (clock right); yields the port, the env of a member, and a scratch dir."""
    tmp = tmp_path_factory.mktemp("clock")
    (tmp / "secret").write_text("correct horse battery staple 42\n")
    env = {**FAST, "PRISM_SECRET_FILE": str(tmp / "secret")}
    with mosquitto() as port, agent(port, CLUSTER, "g1", "bert=tiny-bert", env=env):
        yield port, env, tmp


def healths(port: int, node: str, count: int) -> list[dict[str, Any]]:
    """The retained health of ``node`` and its next ``count - 1`` rounds."""
    out, err = sub(
        port, f"prism/v1/{CLUSTER}/nodes/{node}/health", count, timeout_s=10 * HEALTH_S * count
    ).communicate()
    docs = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert len(docs) == count, err
    return docs


def log_events(proc: subprocess.Popen[str], event: str) -> list[dict[str, Any]]:
    lines = Path(proc.log_path).read_text().splitlines()  # type: ignore[attr-defined]
    return [d for d in (json.loads(ln) for ln in lines if ln.startswith("{")) if d.get("event") == event]


def wait_for(what: str, check: Any, timeout_s: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (got := check()):
        assert time.monotonic() < deadline, what
        time.sleep(0.2)
    return got


def test_a_node_rebooted_with_its_clock_an_hour_behind_its_last_boot_rejoins(
    bed: tuple[int, dict[str, str], Path],
) -> None:
    port, env, tmp = bed
    state = {"PRISM_STATE_DIR": str(tmp / "g2")}
    with agent(port, CLUSTER, "g2", "bert=tiny-bert", env={**env, **state, "PRISM_CLOCK_OFFSET_S": "3600"}) as g2:
        # An hour fast is out of any skew bound: refused (both sides say so, checked below).
        seen_by_g1, seen_by_g2 = healths(port, "g1", 3)[-1], healths(port, "g2", 3)[-1]
    with agent(port, CLUSTER, "g2", "bert=tiny-bert", env={**env, **state}):  # corrected: an hour back
        for node, peer in (("g1", "g2"), ("g2", "g1")):  # within two health rounds of coming online
            docs = healths(port, node, 3)  # the retained one and two rounds
            assert any(peer in d["peers"] for d in docs), (node, [d["peers"] for d in docs])
            assert docs[-1]["clock"]["refused"] == {}
    assert 3590 < seen_by_g1["clock"]["refused"]["g2"] < 3610  # g2's clock is an hour ahead of g1's
    assert -3610 < seen_by_g2["clock"]["refused"]["g1"] < -3590
    assert any("its clock is behind ours" in e.get("why", "") for e in log_events(g2, "admission_refused"))


def test_a_slow_node_admits_its_peers_or_says_why_and_stays_in_once_corrected(
    bed: tuple[int, dict[str, str], Path],
) -> None:
    port, env, tmp = bed
    state, slow = {"PRISM_STATE_DIR": str(tmp / "g3")}, {"PRISM_CLOCK_OFFSET_S": "-20"}
    with agent(port, CLUSTER, "g3", "bert=tiny-bert", env={**env, **state, **slow}):  # the default bound: 30 s
        wait_peer(port, CLUSTER, "g3", "g1")
        wait_peer(port, CLUSTER, "g1", "g3")
        job = {"id": "slow1", "model": "bert", "inputs": {"text": ["hi"]}, "mode": "distributed", "peers": ["g3"]}
        result = ask_node(port, CLUSTER, "g1", [job])["slow1"]
        assert (result["ok"], result["mode"], result["peers"]) == (True, "distributed", ["g3"])
        assert -22 < healths(port, "g1", 2)[-1]["clock"]["ahead_s"]["g3"] < -18  # reported, not refused
    strict = {**env, **state, **slow, "PRISM_MAX_CLOCK_SKEW_S": "5"}
    with agent(port, CLUSTER, "g3", "bert=tiny-bert", env=strict) as g3:  # a bound it is beyond: it says why
        refused = wait_for("g3 never said why", lambda: healths(port, "g3", 2)[-1]["clock"]["refused"])
        assert 18 < refused["g1"] < 22  # g1's clock is 20 s ahead of g3's
        why = [e.get("why", "") for e in log_events(g3, "admission_refused") if e.get("node") == "g1"]
        assert any("ahead of ours" in w for w in why), why
        assert any(e["node"] == "g1" and e["refused"] for e in log_events(g3, "clock_skew"))
    with agent(port, CLUSTER, "g3", "bert=tiny-bert", env={**env, **state}):  # the clock corrected
        for node, peer in (("g1", "g3"), ("g3", "g1")):
            docs = healths(port, node, 3)
            assert any(peer in d["peers"] for d in docs), (node, [d["peers"] for d in docs])
            assert peer not in docs[-1]["clock"]["ahead_s"]
            assert docs[-1]["clock"]["refused"] == {}


def test_a_restarted_node_refuses_replays_of_control_messages_it_accepted(
    bed: tuple[int, dict[str, str], Path],
) -> None:
    port, env, tmp = bed
    state = {"PRISM_STATE_DIR": str(tmp / "g4")}
    job = {"model": "bert", "inputs": {"text": ["hi"]}, "mode": "distributed", "peers": ["g4"]}
    with agent(port, CLUSTER, "g4", "bert=tiny-bert", env={**env, **state}):
        wait_peer(port, CLUSTER, "g1", "g4")
        capture = sub(port, f"prism/v1/{CLUSTER}/nodes/g4/control", 1000, timeout_s=60)
        result = ask_node(port, CLUSTER, "g1", [{**job, "id": "before"}])["before"]
        assert (result["mode"], result["peers"]) == ("distributed", ["g4"])
        captured = [m.encode() for m in capture.communicate(timeout=1)[0].splitlines()]
        assert len(captured) >= 3, captured  # form, reserve, run, ...
    # Restarted with its clock set back 15 s (a box corrected by NTP after its start): the
    # replays' times are well within any age bound, so only what g4 kept can refuse them.
    back = {"PRISM_CLOCK_OFFSET_S": "-15"}
    with agent(port, CLUSTER, "g4", "bert=tiny-bert", env={**env, **state, **back}) as g4:
        for payload in captured:
            pub(port, f"prism/v1/{CLUSTER}/nodes/g4/control", payload)
        refused = wait_for(
            f"g4 refused fewer than {len(captured)} replays",
            lambda: (
                len(r := [e for e in log_events(g4, "admission_refused") if e.get("via") == "control"]) >= len(captured)
                and r
            ),
        )
        assert all(e["why"] == "a replay" for e in refused), refused
        assert log_events(g4, "control_ignored") == []  # none got past the channel
        wait_peer(port, CLUSTER, "g1", "g4")
        result = ask_node(port, CLUSTER, "g1", [{**job, "id": "after"}])["after"]
        assert (result["mode"], result["peers"]) == ("distributed", ["g4"])  # g1's new messages pass
