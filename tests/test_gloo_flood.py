"""Strangers connecting to GLOO listeners cannot stop a node, on the namespace bed: h0 and h1 run
agents under a descriptor limit (soft = hard, as ``LimitNOFILE=`` sets it), h2 is a host without
the secret that connects to every port their group listened on, again and again, closing each
connection at once (testbed/rogue.py ``hammer``): once with the group idle, once while it runs
splits, one after another; and to the port of a group while it forms (``burst``). Without the
fixes gloo aborted the process (``accept: Too many open files``) after ~1,000 such connects at a
limit of 1024.
"""

from __future__ import annotations

import json
import resource
import signal
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from testbed.bed import Testbed
from testbed.procs import TestbedError
from tests.netns import require_netns
from tests.volumes import soak

pytestmark = [pytest.mark.testbed, pytest.mark.mqtt, pytest.mark.gloo]
NODES = ("h0", "h1")
UNIT_FILES = 65536  # the unit's LimitNOFILE
#: (descriptor limit, connects to each GLOO port): the issue's 1,100 at 1024 in every run, and in
#: the soak (``scripts/soak.py``) also 70,000 at the unit's limit (or this machine's hard limit
#: where that is lower: without CAP_SYS_RESOURCE a test cannot raise it, and a lower limit only
#: makes 70,000 connects harder to survive). Both run the descriptors out the same way.
CASES = [pytest.param(1024, 1100, id="limit1024")]
if soak():
    CASES.append(pytest.param(UNIT_FILES, 70_000, id="unit-limit"))
#: (descriptor limit, connects, connects at a time) to the port of a group that forms.
FORMING = [pytest.param(1024, 1100, 200, id="limit1024")]
if soak():
    FORMING.append(pytest.param(UNIT_FILES, 70_000, 1000, id="unit-limit"))


@pytest.fixture(scope="module")
def bed() -> Iterator[Testbed]:
    require_netns()
    tb = Testbed(3, cluster="gf", models=["bert=tiny-bert"]).up()
    try:
        tb.start_broker()
        yield tb
    finally:
        tb.down()


def job(job_id: str, rows: int = 4, tokens: int = 64, **extra: Any) -> dict[str, Any]:
    ids = [[(7 * r + j) % 900 + 100 for j in range(tokens)] for r in range(rows)]
    return {"id": job_id, "model": "bert", "mode": "distributed", "inputs": {"token_ids": ids}, **extra}


def listening(bed: Testbed, node: str) -> set[int]:
    """The TCP ports the agent ``node`` listens on now."""
    i, pid = NODES.index(node), bed.procs[node].pid
    out = bed.exec(i, "ss", "-ltnpH", capture_output=True, text=True, check=True).stdout
    return {int(line.split()[3].rsplit(":", 1)[1]) for line in out.splitlines() if f"pid={pid}," in line}


def gloo_ports(bed: Testbed, node: str, before: set[int]) -> set[int]:
    """The ports ``node``'s groups listened on: listening now and not ``before`` any group
    formed, or logged as closed once formed."""
    closed = {
        port
        for line in bed.log(node).splitlines()
        if '"group_formed"' in line or '"group_joined"' in line
        for port in json.loads(line).get("closed", [])
    }
    return (listening(bed, node) - before) | closed


def hammer(bed: Testbed, node: str, ports: set[int], connects: int) -> None:
    """From h2, in the background: ``connects`` connects to each of ``ports`` on ``node``."""
    args = ["--host", bed.address(NODES.index(node)), "--ports", ",".join(map(str, sorted(ports)))]
    bed.spawn(f"hammer-{node}", 2, [sys.executable, "-m", "testbed.rogue", "hammer", *args, "--count", str(connects)])


def hammered(bed: Testbed, node: str) -> dict[str, Any]:
    proc = bed.popen(f"hammer-{node}")
    assert proc is not None
    proc.wait(timeout=300)
    out: dict[str, Any] = json.loads(bed.log(f"hammer-{node}").strip().splitlines()[-1])
    del bed.procs[f"hammer-{node}"]
    return out


def flood(bed: Testbed, ports: dict[str, set[int]], connects: int) -> dict[str, dict[str, Any]]:
    for node in NODES:
        hammer(bed, node, ports[node], connects)
    return {node: hammered(bed, node) for node in NODES}


@pytest.mark.parametrize(("files", "connects"), CASES)
def test_connects_to_gloo_listeners_leave_the_daemon_serving(bed: Testbed, files: int, connects: int) -> None:
    files = min(files, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
    for i, node in enumerate(NODES):
        bed.stop(node)
        bed.start_agent(i, files=files)
    bed.wait_cluster(NODES)
    before = {node: listening(bed, node) for node in NODES}
    with bed.watch() as watch:

        def ask(j: dict[str, Any]) -> dict[str, Any]:
            bed.pub(bed.topic("nodes/h0/jobs"), json.dumps(j))
            result: dict[str, Any] = watch.result(j["id"], 120)
            return result

        warm = ask(job(f"warm{files}"))
        assert (warm["ok"], warm["mode"]) == (True, "distributed"), warm
        ports = {node: gloo_ports(bed, node, before[node]) for node in NODES}
        assert all(ports.values()), ports

        idle = flood(bed, ports, connects)  # the group is idle
        assert [bed.alive(node) for node in NODES] == [True, True]
        after_idle = ask(job(f"idle{files}"))
        assert (after_idle["ok"], after_idle["mode"]) == (True, "distributed"), after_idle

        for node in NODES:  # splits one after another (each waits for the last) while the flood lasts
            hammer(bed, node, ports[node], connects)
        start, splits = time.monotonic(), []
        while any(bed.alive(f"hammer-{node}") for node in NODES) or not splits:
            splits.append(ask(job(f"run{files}-{len(splits)}", rows=8, tokens=256, cr="full")))
            assert len(splits) < 1000
        flooded_s = time.monotonic() - start
        running = {node: hammered(bed, node) for node in NODES}
        assert all(r["ok"] for r in splits), [r for r in splits if not r["ok"]]  # finished, or ran locally
        assert [bed.alive(node) for node in NODES] == [True, True]
        nxt = ask(job(f"next{files}"))
        assert nxt["ok"] is True, nxt
    modes = [r["mode"] for r in splits]
    print(
        f"limit {files}: {connects} connects to each of {ports}, group idle: {idle}; running: {running} in "
        f"{flooded_s:.1f} s, {len(splits)} splits meanwhile, {modes.count('distributed')} distributed, "
        f"the rest local; next job {nxt['mode']}; h0 and h1 alive"
    )


@pytest.mark.parametrize(("files", "connects", "batch"), FORMING)
def test_connects_while_a_group_forms_leave_the_daemon_serving(
    bed: Testbed, files: int, connects: int, batch: int
) -> None:
    """h1 is frozen, so h0's group waits for it with its port open (up to the silence, 20 s here);
    h2 finds the port and connects to it ``connects`` times. Before the listener admitted only the
    members' addresses, h0 aborted; now the strangers' connects time out and h0 forms with h1
    once it thaws (or, had the silence passed, runs the job locally)."""
    files = min(files, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
    for i, node in enumerate(NODES):
        bed.stop(node)
        bed.start_agent(i, files=files, env={"PRISM_PEER_SILENCE_S": "20", "PRISM_GROUP_TIMEOUT_S": "30"})
    bed.wait_cluster(NODES)
    before = listening(bed, "h0")
    with bed.watch() as watch:
        bed.send("h1", signal.SIGSTOP)
        try:
            bed.pub(bed.topic("nodes/h0/jobs"), json.dumps(job(f"forming{files}")))
            deadline = time.monotonic() + 20
            while not (ports := listening(bed, "h0") - before):
                assert time.monotonic() < deadline, "h0 opened no GLOO listener"
            cmd = ["burst", "--host", bed.address(0), "--ports", ",".join(map(str, ports)), "--count", str(connects)]
            out = bed.exec(2, sys.executable, "-m", "testbed.rogue", *cmd, "--batch", str(batch), "--wait-s", "0.05",
                           capture_output=True, text=True, check=True).stdout  # fmt: skip
            flood = json.loads(out.strip().splitlines()[-1])
        finally:
            bed.send("h1", signal.SIGCONT)
        try:
            first = watch.result(f"forming{files}", 40)
        except TestbedError:
            assert bed.alive("h0"), bed.log("h0")[-600:]  # gloo's abort, if that is why
            raise
        assert first["ok"] is True, first
        nxt = {"mode": "", "ok": False}
        deadline = time.monotonic() + 30  # h1 sits out until it is heard again, if the group failed
        while nxt["mode"] != "distributed" and time.monotonic() < deadline:
            bed.pub(bed.topic("nodes/h0/jobs"), json.dumps(job(jid := f"after{files}-{time.monotonic_ns()}")))
            nxt = watch.result(jid, 60)
            assert nxt["ok"] is True, nxt
    assert [bed.alive(node) for node in NODES] == [True, True]
    assert flood["connects"] == 0, flood  # no stranger got a connection
    assert nxt["mode"] == "distributed", nxt  # groups form with the members' real addresses
    print(f"limit {files}: {connects} connects to h0's forming port {ports}: {flood}; first job {first['mode']}")
