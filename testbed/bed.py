"""A multi-host test bed on one Linux box: network namespaces on a bridge, a real mosquitto
on host 0 and a real ``prism-agent run`` on each host (``prism-agent testbed``).

Layout (docs/design.md §8): a switch namespace ``prsw-TAG`` holds bridge ``br0``; host i is the
namespace ``prhI-TAG`` with one veth ``eth0`` (address 10.231.0.(i+1)/24) whose peer ``pI``
sits on the bridge. Nothing touches the root namespace's interfaces and nothing in the root
namespace talks to the 10.231.0.0/24 addresses: every client runs inside a host namespace
(``ip netns exec``). Links are shaped with ``tc tbf`` (this kernel has no netem) and cut by
setting the switch port down.

A state file (``/run/prism-testbed/TAG.json``) lists the namespaces and the processes the bed
started, so ``down`` works from another process or after a crashed run: it kills every
process in the bed's namespaces (and the recorded ones), then deletes the namespaces.
Only the standard library is imported at the top, so the command line stays fast.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed.procs import Proc, TestbedError, UsageError, need, netns_unavailable, pid_alive, proc_stat, rss_kib, sh
from testbed.services import BROKER_PORT, Services
from testbed.watch import Watch

__all__ = [
    "BROKER_PORT",
    "REPO",
    "Proc",
    "Testbed",
    "TestbedError",
    "UsageError",
    "Watch",
    "bed_with_agents",
    "netns_unavailable",
    "pid_alive",
    "rss_kib",
    "sh",
]

STATE_DIR = Path(os.environ.get("PRISM_TESTBED_DIR", "/run/prism-testbed"))
SUBNET = "10.231.0"
REPO = Path(__file__).resolve().parents[1]


def exit_on_sigterm() -> None:
    """Make SIGTERM (``kill``, a CI timeout) raise SystemExit in the main thread, so a script's
    ``finally`` takes its bed down instead of leaving namespaces and agents behind."""

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)


@dataclass
class Testbed(Services):
    """``hosts`` namespaces on one bridge; host i has address 10.231.0.(i+1)/24 on ``eth0``."""

    __test__ = False  # a helper, not a test class

    hosts: int
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    cluster: str = "tb"
    names: list[str] = field(default_factory=list)
    procs: dict[str, Proc] = field(default_factory=dict)
    rates: dict[int, str] = field(default_factory=dict)
    cut_hosts: list[int] = field(default_factory=list)
    models: list[str] = field(default_factory=lambda: ["bert=tiny-bert"])
    owner: list[int] | None = None  # [pid, start] of the process that holds the bed; None: detached
    _popen: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict, repr=False)

    # -- names and state ----------------------------------------------------------------
    @property
    def switch(self) -> str:
        """The switch namespace (holds the bridge)."""
        return f"prsw-{self.tag}"

    def host_ns(self, i: int) -> str:
        """Host i's namespace name."""
        return f"prh{i}-{self.tag}"

    def address(self, i: int) -> str:
        """Host i's address on the bed."""
        return f"{SUBNET}.{i + 1}"

    @property
    def broker_port(self) -> int:
        """The broker's port on host 0."""
        return BROKER_PORT

    @property
    def broker_url(self) -> str:
        """The bed's broker (on host 0), as agents see it."""
        return f"mqtt://{self.address(0)}:{BROKER_PORT}"

    @property
    def workdir(self) -> Path:
        """Configs, broker persistence and logs."""
        return STATE_DIR / self.tag

    @property
    def state_path(self) -> Path:
        """The bed's state file."""
        return STATE_DIR / f"{self.tag}.json"

    def _check_host(self, i: int) -> None:
        if not 0 <= i < self.hosts:
            raise UsageError(f"host must be 0..{self.hosts - 1}, got {i}")

    def save(self) -> None:
        """Write the state file (atomically)."""
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        data = {
            "tag": self.tag,
            "hosts": self.hosts,
            "cluster": self.cluster,
            "switch": self.switch,
            "names": self.names,
            "addresses": [self.address(i) for i in range(self.hosts)],
            "broker": self.broker_url,
            "models": self.models,
            "rates": {str(k): v for k, v in self.rates.items()},
            "cut": self.cut_hosts,
            "owner": self.owner,
            "procs": {k: vars(p) for k, p in self.procs.items()},
        }
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(self.state_path)

    @classmethod
    def load(cls, tag: str) -> Testbed:
        """The bed with this tag, from its state file."""
        path = STATE_DIR / f"{tag}.json"
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise UsageError(f"no test bed {tag!r} (no {path})") from None
        except (OSError, ValueError) as exc:
            raise TestbedError(f"cannot read {path}: {exc}") from None
        return cls(
            hosts=int(data["hosts"]),
            tag=str(data["tag"]),
            cluster=str(data.get("cluster", "tb")),
            names=list(data.get("names", [])),
            procs={k: Proc(**v) for k, v in data.get("procs", {}).items()},
            rates={int(k): str(v) for k, v in data.get("rates", {}).items()},
            cut_hosts=list(data.get("cut", [])),
            models=list(data.get("models", [])),
            owner=data.get("owner"),
        )

    @staticmethod
    def tags() -> list[str]:
        """Tags of every bed with a state file."""
        return sorted(p.stem for p in STATE_DIR.glob("*.json")) if STATE_DIR.is_dir() else []

    def owner_alive(self) -> bool:
        """A live process holds this bed (a test run); False for detached (CLI) beds."""
        return self.owner is not None and pid_alive(self.owner[0], self.owner[1])

    # -- building and tearing down --------------------------------------------------------
    def up(self, detached: bool = False) -> Testbed:
        """Create the namespaces, the bridge and the links. The state file comes first, so a
        failure half way is still cleaned up by :meth:`down`."""
        if self.hosts < 1 or self.hosts > 200:
            raise TestbedError(f"hosts must be 1..200, got {self.hosts}")
        if self.state_path.exists():
            raise TestbedError(f"test bed {self.tag!r} already exists")
        if not detached:
            start = proc_stat(os.getpid())
            self.owner = [os.getpid(), start[1] if start else 0]
        self.names = [self.host_ns(i) for i in range(self.hosts)]
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.save()
        try:
            sh("ip", "netns", "add", self.switch)
            sh("ip", "-n", self.switch, "link", "set", "lo", "up")
            sh("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
            sh("ip", "-n", self.switch, "link", "set", "br0", "up")
            for i, name in enumerate(self.names):
                sh("ip", "netns", "add", name)
                sh("ip", "-n", name, "link", "set", "lo", "up")
                # Create the pair inside the host namespace, then move its peer to the switch.
                sh("ip", "-n", name, "link", "add", "eth0", "type", "veth", "peer", "name", f"p{i}")
                sh("ip", "-n", name, "link", "set", f"p{i}", "netns", self.switch)
                sh("ip", "-n", self.switch, "link", "set", f"p{i}", "master", "br0")
                sh("ip", "-n", self.switch, "link", "set", f"p{i}", "up")
                sh("ip", "-n", name, "addr", "add", f"{self.address(i)}/24", "dev", "eth0")
                sh("ip", "-n", name, "link", "set", "eth0", "up")
                sh("ip", "-n", name, "route", "add", "224.0.0.0/4", "dev", "eth0")
        except BaseException:
            self.down()
            raise
        return self

    def down(self, grace_s: float = 1.0) -> None:
        """Stop every process of the bed, delete its namespaces, its state file and workdir (its
        logs are copied first to ``$PRISM_TESTBED_KEEP_LOGS/{tag}/`` when that is set)."""
        recorded = [(p.pid, p.start) for p in self.procs.values() if pid_alive(p.pid, p.start)]
        for pid, _ in recorded:  # a short grace: agents say "offline", mosquitto saves its state
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while recorded and time.monotonic() < deadline and any(pid_alive(p, s) for p, s in recorded):
            time.sleep(0.05)
        namespaces = [*self.names, self.switch]
        for _ in range(50):
            victims: list[tuple[int, int | None]] = [(pid, None) for ns in namespaces for pid in self._ns_pids(ns)]
            victims += [(p, s) for p, s in recorded if pid_alive(p, s)]
            if not victims:
                break
            for pid, start in victims:
                if pid_alive(pid, start):
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)
        for proc in self._popen.values():  # reap our own children
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        self._popen.clear()
        for ns in namespaces:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        self.procs.clear()
        self.names.clear()
        with contextlib.suppress(FileNotFoundError):
            self.state_path.unlink()
        keep = os.environ.get("PRISM_TESTBED_KEEP_LOGS")
        if keep:  # what the run logged, to see why a test failed
            with contextlib.suppress(OSError):
                skip = shutil.ignore_patterns("*.db", "*.sqlite3*")
                shutil.copytree(self.workdir, Path(keep) / self.tag, ignore=skip)
        shutil.rmtree(self.workdir, ignore_errors=True)

    @staticmethod
    def _ns_pids(ns: str) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, check=False).stdout
        return [int(p) for p in out.split() if p.isdigit() and int(p) != os.getpid()]

    def __enter__(self) -> Testbed:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()

    # -- driving the hosts ----------------------------------------------------------------
    def run(self, i: int, *cmd: str) -> list[str]:
        """The command line that runs ``cmd`` on host i."""
        self._check_host(i)
        return ["ip", "netns", "exec", self.host_ns(i), *cmd]

    def exec(self, i: int, *cmd: str, **kwargs: Any) -> subprocess.CompletedProcess[Any]:
        """Run ``cmd`` on host i and wait (``subprocess.run`` keyword arguments apply)."""
        kwargs.setdefault("check", False)
        return subprocess.run(self.run(i, *cmd), **kwargs)

    def shape(self, i: int, rate: str) -> None:
        """Limit host i's outgoing rate (tbf, replaced in place while traffic flows)."""
        self._check_host(i)
        sh(
            "ip", "netns", "exec", self.host_ns(i), "tc", "qdisc", "replace", "dev", "eth0", "root",
            "tbf", "rate", rate, "burst", "32kbit", "latency", "400ms",
        )  # fmt: skip
        self.rates[i] = rate
        self.save()

    def unshape(self, i: int) -> None:
        """Remove host i's rate limit."""
        self._check_host(i)
        subprocess.run(
            ["ip", "netns", "exec", self.host_ns(i), "tc", "qdisc", "del", "dev", "eth0", "root"],
            capture_output=True,
            check=False,  # no qdisc to delete is fine
        )
        self.rates.pop(i, None)
        self.save()

    def cut(self, i: int) -> None:
        """Pull host i's cable: its switch port goes down (host i's eth0 loses carrier)."""
        self._check_host(i)
        sh("ip", "-n", self.switch, "link", "set", f"p{i}", "down")
        if i not in self.cut_hosts:
            self.cut_hosts.append(i)
        self.save()

    def restore(self, i: int) -> None:
        """Plug host i's cable back in."""
        self._check_host(i)
        sh("ip", "-n", self.switch, "link", "set", f"p{i}", "up")
        if i in self.cut_hosts:
            self.cut_hosts.remove(i)
        self.save()

    def topic(self, suffix: str) -> str:
        """A topic under the bed's cluster root."""
        return f"prism/v1/{self.cluster}/{suffix}"

    def pub(self, topic: str, payload: bytes | str, qos: int = 1) -> None:
        """Publish once from host 0 (mosquitto_pub, MQTT 5)."""
        data = payload if isinstance(payload, bytes) else payload.encode()
        cmd = [need("mosquitto_pub"), "-h", self.address(0), "-p", str(BROKER_PORT), "-V", "mqttv5"]
        self.exec(0, *cmd, "-q", str(qos), "-t", topic, "-s", input=data, check=True, timeout=30, capture_output=True)

    def watch(self, *topics: str) -> Watch:
        """A subscriber on host 0 following ``topics`` (default: results and every node's health/status)."""
        return Watch(
            self, topics or (self.topic("results/+"), self.topic("nodes/+/health"), self.topic("nodes/+/status"))
        )

    def wait_cluster(self, nodes: Sequence[str], timeout_s: float = 180.0) -> None:
        """Until every node in ``nodes`` is online and lists all the others as peers (fails
        at once when one of the bed's agents exits)."""
        deadline = time.monotonic() + timeout_s
        with self.watch() as w:
            for node in nodes:
                others = set(nodes) - {node}
                while True:
                    dead = [n for n in nodes if n in self.procs and not self.alive(n)]
                    if dead:
                        raise TestbedError(f"agent {dead[0]} exited; see {self.procs[dead[0]].log}")
                    try:
                        w.wait_health(node, lambda h, o=others: o <= set(h.get("peers", [])), 2.0)  # type: ignore[misc]
                        break
                    except TestbedError:
                        if time.monotonic() > deadline:
                            raise


@contextlib.contextmanager
def bed_with_agents(
    hosts: int, models: Sequence[str] = ("bert=tiny-bert",), env: dict[str, str] | None = None, cluster: str = "tb"
) -> Iterator[Testbed]:
    """A bed with the broker on host 0 and an agent on every host, all peers of each other; torn down after."""
    bed = Testbed(hosts, cluster=cluster, models=list(models))
    bed.up()
    try:
        bed.start_broker()
        for i in range(hosts):
            bed.start_agent(i, env=env)
        bed.wait_cluster([f"h{i}" for i in range(hosts)])
        yield bed
    finally:
        bed.down()
