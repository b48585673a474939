"""Where ``prism-agent demo`` runs its two agents: a two-host namespace bed whose link can be
shaped (root, ``ip netns``), or loopback on this box (anyone; the link cannot be shaped).

Both give the demo the same four things: start the broker and the agents with a map, shape
the link, wait until the first agent's probes see the new rate, and run one job on it.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Protocol

#: The agents' settings for the demo: fast health, frequent probes (the link changes under them).
AGENT_ENV = {"HF_HUB_OFFLINE": "1", "PRISM_HEALTH_INTERVAL_S": "0.5", "PRISM_PROBE_INTERVAL_S": "1"}
LINK_TIMEOUT_S = 60.0
JOB_TIMEOUT_S = 300.0


class Site(Protocol):
    """Two agents, ``nodes[0]`` takes the jobs and ``nodes[1]`` is its peer."""

    nodes: tuple[str, str]
    where: str

    def start(self, model: str, map_file: Path) -> None:
        """Start the broker and both agents (serving ``model`` with ``map_file``), until they are peers."""

    def shape(self, mbit: float | None) -> None:
        """Limit the link between them to ``mbit`` (None: unshaped)."""

    def wait_link(self, mbit: float | None) -> float:
        """Until the first agent's probes see that link; the Mbit/s they measured."""

    def submit(self, job: dict[str, Any]) -> dict[str, Any]:
        """Send ``job`` to the first agent; its result."""

    def close(self) -> None:
        """Stop everything the site started."""


def _settled(mbit: float | None, seen: float | None) -> bool:
    """The probes' estimate is where a link of ``mbit`` (None: unshaped) puts it."""
    if seen is None:
        return False
    return seen > 200 if mbit is None else 0.5 * mbit <= seen <= 1.5 * mbit


class NamespaceSite:
    """Hosts h0 and h1 in network namespaces on a bridge (testbed.bed); clients run inside h0."""

    nodes = ("h0", "h1")
    where = "two network namespaces joined by a bridge (h0 at 10.231.0.1, h1 at 10.231.0.2)"

    def __init__(self) -> None:
        from testbed.bed import Testbed

        self.bed = Testbed(2, cluster="demo", models=[])
        self.watch: Any = None

    def start(self, model: str, map_file: Path) -> None:
        """Build the bed, start mosquitto on h0 and an agent on each host, until they are peers."""
        bed = self.bed
        bed.models = [f"demo={model}"]
        bed.up()
        bed.start_broker()
        for i in range(2):
            bed.start_agent(i, env={**AGENT_ENV, "PRISM_MAP_FILE": str(map_file)})
        bed.wait_cluster(list(self.nodes))
        self.watch = bed.watch(bed.topic("results/+"), bed.topic("nodes/h0/health"))

    def shape(self, mbit: float | None) -> None:
        """Both hosts' uplinks at ``mbit`` (tc tbf), or unshaped."""
        for i in range(2):
            if mbit is None:
                self.bed.unshape(i)
            else:
                self.bed.shape(i, f"{mbit:g}mbit")

    def wait_link(self, mbit: float | None) -> float:
        """Until h0's probes see the link at ``mbit``; what they see."""
        since = time.monotonic()
        got = self.watch.wait_health(
            "h0", lambda h: _settled(mbit, h.get("links", {}).get("h1", {}).get("mbps")), LINK_TIMEOUT_S, since
        )
        return float(got["links"]["h1"]["mbps"])

    def submit(self, job: dict[str, Any]) -> dict[str, Any]:
        """Publish ``job`` to h0 from inside h0's namespace and wait for its result."""
        self.bed.pub(self.bed.topic("nodes/h0/jobs"), json.dumps(job))
        result: dict[str, Any] = self.watch.result(job["id"], JOB_TIMEOUT_S)
        result.pop("_t", None)
        return result

    def close(self) -> None:
        """Stop everything and delete the namespaces."""
        if self.watch is not None:
            self.watch.close()
        self.bed.down()


class LoopbackSite:
    """Two agents on 127.0.0.1 with a broker of their own; the link is loopback, unshaped."""

    nodes = ("demo-a", "demo-b")
    where = "two agents on 127.0.0.1 (loopback)"

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []
        self.broker_proc: subprocess.Popen[bytes] | None = None
        self.cluster = f"demo-{uuid.uuid4().hex[:6]}"
        self.workdir: Path | None = None
        self.broker: Any = None

    def start(self, model: str, map_file: Path) -> None:
        """A mosquitto on a free loopback port and the two agents, until they are peers."""
        from agent.base.config import Broker
        from agent.cli.demo import DemoError
        from agent.node.broker import mosquitto_binary, port_free
        from transport.localcluster import free_port

        self.workdir = map_file.parent
        port = free_port()
        conf = self.workdir / "mosquitto.conf"
        user = "user root\n" if os.geteuid() == 0 else ""
        conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\n{user}")
        self.broker_proc = subprocess.Popen(
            [mosquitto_binary(), "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self.broker = Broker("127.0.0.1", port)
        deadline = time.monotonic() + 10
        while port_free("127.0.0.1", port):  # agents would retry, but a clear error beats a slow one
            if self.broker_proc.poll() is not None or time.monotonic() > deadline:
                raise DemoError(f"mosquitto did not start on 127.0.0.1:{port}")
            time.sleep(0.05)
        env = {**os.environ, **AGENT_ENV, "PRISM_MAP_FILE": str(map_file)}
        for node in self.nodes:
            cmd = [sys.executable, "-m", "agent", "run", "--broker", f"mqtt://127.0.0.1:{port}"]
            cmd += ["--cluster", self.cluster, "--node-id", node, "--model", f"demo={model}", "--threads", "1"]
            self.logs.append(self.workdir / f"{node}.log")
            with self.logs[-1].open("wb") as log:  # the child keeps its own descriptor
                self.procs.append(subprocess.Popen([*cmd, "--log-format", "json"], env=env, stdout=log, stderr=log))
        self._until(lambda h: bool(h.get("peers")), "the two agents to find each other")

    def _health(self) -> dict[str, Any]:
        from agent.client import peers

        nodes = asyncio.run(peers(self.broker, self.cluster, listen_s=0.5))
        return next((n.get("health") or {} for n in nodes if n["node"] == self.nodes[0]), {})

    def _until(self, check: Any, what: str) -> dict[str, Any]:
        from agent.cli.demo import DemoError

        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            dead = [i for i, p in enumerate(self.procs) if p.poll() is not None]
            if dead:
                lines = self.logs[dead[0]].read_text(errors="replace").strip().splitlines() or ["(no output)"]
                raise DemoError(f"demo agent {self.nodes[dead[0]]} exited: {lines[-1][:300]}")
            health = self._health()
            if check(health):
                return health
        raise DemoError(f"timed out waiting for {what}")

    def shape(self, mbit: float | None) -> None:
        """Loopback cannot be shaped here; only ``None`` (as it is) is accepted."""
        if mbit is not None:
            raise ValueError("loopback cannot be shaped")

    def wait_link(self, mbit: float | None) -> float:
        """Until the first agent has probed its peer; what it measured."""
        health = self._until(
            lambda h: h.get("links", {}).get(self.nodes[1], {}).get("mbps") is not None, "the first link probe"
        )
        return float(health["links"][self.nodes[1]]["mbps"])

    def submit(self, job: dict[str, Any]) -> dict[str, Any]:
        """Send ``job`` to the first agent and wait for its result."""
        from agent.client import submit

        result: dict[str, Any] = asyncio.run(
            submit(self.broker, self.cluster, job, node=self.nodes[0], timeout_s=JOB_TIMEOUT_S)
        )
        return result

    def close(self) -> None:
        """SIGTERM the agents, then the broker, and wait for them."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self.broker_proc is not None:
            self.broker_proc.terminate()
            self.broker_proc.wait(timeout=10)
