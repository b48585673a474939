"""A multi-host test bed on one Linux box: network namespaces on a bridge, a real mosquitto
on host 0 and a real ``prism-agent run`` on each host (``prism-agent testbed``).

Layout (DESIGN.md §8): a switch namespace ``prsw-TAG`` holds bridge ``br0``; host i is the
namespace ``prhI-TAG`` with one veth ``eth0`` (address 10.231.0.(i+1)/24) whose peer ``pI``
sits on the bridge. Nothing touches the root namespace's interfaces and nothing in the root
namespace talks to the 10.231.0.0/24 addresses: every client runs inside a host namespace
(``ip netns exec``). Links are shaped with ``tc tbf`` (this kernel has no netem) and cut by
setting the switch port down.

A state file (``/run/prism-testbed/TAG.json``) lists the namespaces and the processes the bed
started, so ``down`` works from another process or after a crashed run: it kills every
process in the bed's namespaces (and the recorded ones), then deletes the namespaces.

Also the in-namespace load clients the fault tests and the soak use
(``python -m agent.testbed blast|stream``); this module imports only the standard library
at the top, so the command line stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STATE_DIR = Path(os.environ.get("PRISM_TESTBED_DIR", "/run/prism-testbed"))
SUBNET = "10.231.0"
BROKER_PORT = 1883
REPO = Path(__file__).resolve().parents[1]
#: Settings every agent on the bed gets unless overridden: fast health, bounded group waits.
AGENT_ENV = {"HF_HUB_OFFLINE": "1", "PRISM_HEALTH_INTERVAL_S": "0.5", "PRISM_GROUP_TIMEOUT_S": "10"}


class TestbedError(RuntimeError):
    """The bed cannot be built, found or driven."""

    __test__ = False


class UsageError(TestbedError):
    """A command named a bed or host that does not exist (exit status 2)."""


def netns_unavailable() -> str | None:
    """Why a namespace test bed cannot run here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 ('ip') is not installed"
    probe = f"prism-probe-{uuid.uuid4().hex[:6]}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, check=False)
    if made.returncode != 0:
        return f"'ip netns add' failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], check=False)
    return None


def sh(*args: str) -> None:
    """Run a command; a failure raises with its stderr."""
    done = subprocess.run(list(args), capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise TestbedError(f"{' '.join(args)}: {done.stderr.strip() or done.returncode}")


def need(binary: str) -> str:
    """Path of a required program (mosquitto lives in /usr/sbin on Debian)."""
    path = shutil.which(binary) or (f"/usr/sbin/{binary}" if Path(f"/usr/sbin/{binary}").exists() else None)
    if path is None:
        raise TestbedError(f"{binary} is not installed (apt-get install mosquitto mosquitto-clients iproute2)")
    return path


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks) of a process, or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return fields[0], int(fields[19])


def _alive(pid: int, start: int | None = None) -> bool:
    """The process exists, is not a zombie, and (when ``start`` is given) is the same one."""
    stat = _proc_stat(pid)
    if stat is None or stat[0] in ("Z", "X"):
        return False
    return start is None or stat[1] == start


def rss_kib(pid: int) -> int:
    """Resident set size (VmRSS) of a process in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise TestbedError(f"process {pid} has no VmRSS")


@dataclass
class Proc:
    """A process the bed started: where, what, and its log."""

    host: int
    pid: int
    start: int
    log: str
    argv: list[str]


@dataclass
class Testbed:
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
        return self.owner is not None and _alive(self.owner[0], self.owner[1])

    # -- building and tearing down --------------------------------------------------------
    def up(self, detached: bool = False) -> Testbed:
        """Create the namespaces, the bridge and the links. The state file comes first, so a
        failure half way is still cleaned up by :meth:`down`."""
        if self.hosts < 1 or self.hosts > 200:
            raise TestbedError(f"hosts must be 1..200, got {self.hosts}")
        if self.state_path.exists():
            raise TestbedError(f"test bed {self.tag!r} already exists")
        if not detached:
            start = _proc_stat(os.getpid())
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
        """Stop every process of the bed, delete its namespaces, its state file and workdir."""
        recorded = [(p.pid, p.start) for p in self.procs.values() if _alive(p.pid, p.start)]
        for pid, _ in recorded:  # a short grace: agents say "offline", mosquitto saves its state
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while recorded and time.monotonic() < deadline and any(_alive(p, s) for p, s in recorded):
            time.sleep(0.05)
        namespaces = [*self.names, self.switch]
        for _ in range(50):
            victims: list[tuple[int, int | None]] = [(pid, None) for ns in namespaces for pid in self._ns_pids(ns)]
            victims += [(p, s) for p, s in recorded if _alive(p, s)]
            if not victims:
                break
            for pid, start in victims:
                if _alive(pid, start):
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

    def spawn(self, key: str, i: int, cmd: Sequence[str], env: dict[str, str] | None = None) -> Proc:
        """Start a long-running process on host i, logged to ``workdir/KEY.log``, recorded in the state."""
        if key in self.procs and _alive(self.procs[key].pid, self.procs[key].start):
            raise TestbedError(f"{key} is already running (pid {self.procs[key].pid})")
        log_path = self.workdir / f"{key}.log"
        with log_path.open("ab") as log:
            popen = subprocess.Popen(
                self.run(i, *cmd),
                cwd=REPO,
                env={**os.environ, **(env or {})},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,  # a Ctrl-C on the terminal that ran `testbed up` stays there
            )
        stat = _proc_stat(popen.pid)
        proc = Proc(i, popen.pid, stat[1] if stat else 0, str(log_path), list(cmd))
        self.procs[key] = proc
        self._popen[key] = popen
        self.save()
        return proc

    def alive(self, key: str) -> bool:
        """The process ``key`` runs."""
        proc = self.procs.get(key)
        if proc is None:
            return False
        popen = self._popen.get(key)
        if popen is not None:
            return popen.poll() is None
        return _alive(proc.pid, proc.start)

    def send(self, key: str, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the process ``key`` (only if it is still the one we started)."""
        proc = self.procs[key]
        if self.alive(key):
            os.kill(proc.pid, sig)

    def stop(self, key: str, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> int | None:
        """Signal ``key`` and wait for it to end (SIGKILL after ``timeout_s``); its exit status if known."""
        if key not in self.procs:
            return None
        self.send(key, sig)
        deadline = time.monotonic() + timeout_s
        while self.alive(key) and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.alive(key):
            self.send(key, signal.SIGKILL)
        popen = self._popen.pop(key, None)
        code = popen.wait(timeout=10) if popen is not None else None
        proc = self.procs[key]
        while _alive(proc.pid, proc.start):
            time.sleep(0.05)
        return code

    def popen(self, key: str) -> subprocess.Popen[bytes] | None:
        """The Popen of a process this object started (None for one started elsewhere)."""
        return self._popen.get(key)

    def start_broker(self, extra_conf: str = "") -> Proc:
        """A real mosquitto on host 0: TCP_NODELAY, persistence in the workdir, log to a file,
        queues deep enough for bursts of thousands of QoS 1 jobs."""
        data = self.workdir / "mosquitto"
        data.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(
            f"listener {BROKER_PORT} {self.address(0)}\n"
            "allow_anonymous true\n"
            "set_tcp_nodelay true\n"
            "user root\n"  # stay root: no drop to 'mosquitto', which could not write the workdir
            "persistence true\n"
            f"persistence_location {data}/\n"
            f"log_dest file {self.workdir / 'mosquitto.events.log'}\n"
            "log_type error\nlog_type warning\nlog_type notice\nlog_type information\n"
            "connection_messages true\n"
            "max_queued_messages 100000\n"
            "max_inflight_messages 100\n"
            f"{extra_conf}"
        )
        proc = self.spawn("broker", 0, [need("mosquitto"), "-c", str(conf)])
        self.wait_listening(0, BROKER_PORT, "broker")
        return proc

    def wait_listening(self, i: int, port: int, key: str, timeout_s: float = 20.0) -> None:
        """Until something listens on ``port`` on host i (checked with ``ss`` inside the namespace)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive(key):
                raise TestbedError(f"{key} exited; see {self.procs[key].log}")
            out = self.exec(i, "ss", "-Hltn", f"sport = :{port}", capture_output=True, text=True).stdout
            if out.strip():
                return
            time.sleep(0.1)
        raise TestbedError(f"nothing listens on {self.address(i)}:{port} after {timeout_s} s")

    def agent_cmd(self, i: int, node: str | None = None, models: Sequence[str] | None = None) -> list[str]:
        """The ``prism-agent run`` command line for host i: one torch thread, its own node id,
        ``--interface eth0``, the broker on host 0."""
        cmd = [sys.executable, "-m", "agent", "run", "--broker", self.broker_url, "--interface", "eth0"]
        cmd += ["--cluster", self.cluster, "--node-id", node or f"h{i}", "--threads", "1", "--log-format", "json"]
        for model in self.models if models is None else models:
            cmd += ["--model", model]
        return cmd

    def start_agent(
        self, i: int, node: str | None = None, env: dict[str, str] | None = None, models: Sequence[str] | None = None
    ) -> Proc:
        """Start (or restart) the agent of host i; its key is its node id (``hI`` by default)."""
        key = node or f"h{i}"
        return self.spawn(key, i, self.agent_cmd(i, key, models), {**AGENT_ENV, **(env or {})})

    def log(self, key: str) -> str:
        """Everything the process ``key`` logged so far."""
        return Path(self.procs[key].log).read_text(errors="replace")

    # -- watching the cluster (from inside host 0) -----------------------------------------
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


class Watch:
    """``mosquitto_sub -v`` on host 0 in a thread: the latest message per topic and every result by id."""

    def __init__(self, bed: Testbed, topics: Sequence[str]) -> None:
        self.bed = bed
        cmd = [need("mosquitto_sub"), "-h", bed.address(0), "-p", str(BROKER_PORT), "-V", "mqttv5", "-q", "1", "-v"]
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


# -- load clients, run inside a host namespace ------------------------------------------------
def _decode(payload: bytes) -> Any:
    if payload.lstrip().startswith(b"{"):
        return json.loads(payload)
    import msgpack

    return msgpack.unpackb(payload, raw=False)


def _client(host: str, port: int, name: str) -> Any:
    import socket

    import aiomqtt

    return aiomqtt.Client(
        host,
        port,
        identifier=f"{name}-{uuid.uuid4().hex[:8]}",
        protocol=aiomqtt.ProtocolVersion.V5,
        max_inflight_messages=1000,
        socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
        keepalive=30,
        timeout=30,
    )


async def blast(
    host: str, port: int, results: str, payloads: list[tuple[str, bytes]], expect: set[str], timeout_s: float
) -> dict[str, Any]:
    """Publish every (topic, payload) at once (QoS 1) and collect results until each ``expect`` id has one
    (and a short quiet spell has passed) or ``timeout_s``."""
    import asyncio

    got: dict[str, list[Any]] = {}
    extra = 0
    async with _client(host, port, "blast") as client:
        await client.subscribe(results, qos=1)
        start = time.monotonic()
        done = asyncio.Event()
        last = [start]

        async def collect() -> None:
            nonlocal extra
            async for msg in client.messages:
                job_id = str(msg.topic).rsplit("/", 1)[1]
                raw = msg.payload if isinstance(msg.payload, bytes) else str(msg.payload).encode()
                try:
                    value = _decode(raw)
                except Exception:  # noqa: BLE001 - report, never stop collecting
                    value = {"ok": None, "error": {"code": "undecodable_result"}}
                error = value.get("error") or {} if isinstance(value, dict) else {}
                got.setdefault(job_id, []).append(
                    [value.get("ok") if isinstance(value, dict) else None, error.get("code"), time.monotonic() - start]
                )
                if job_id not in expect:
                    extra += 1
                last[0] = time.monotonic()
                if expect <= got.keys():
                    done.set()

        reader = asyncio.create_task(collect(), name="collect")
        await asyncio.gather(*(client.publish(topic, p, qos=1) for topic, p in payloads))
        published_s = time.monotonic() - start
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(done.wait(), timeout_s)
        while time.monotonic() - last[0] < 1.0 and time.monotonic() - start < timeout_s:  # noqa: ASYNC110 - stragglers
            await asyncio.sleep(0.2)
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
    return {
        "sent": len(payloads),
        "published_s": published_s,
        "results": got,
        "missing": sorted(expect - got.keys()),
        "unexpected": extra,
    }


async def stream(
    host: str, port: int, cluster: str, node: str, rate_hz: float, duration_s: float, grace_s: float, batch: int
) -> dict[str, Any]:
    """A steady job stream to ``node`` (tiny-bert sized, alternately distributed and auto);
    every job must get a result within ``grace_s`` after the stream ends."""
    import asyncio

    root = f"prism/v1/{cluster}"
    sent: dict[str, float] = {}
    got: dict[str, dict[str, Any]] = {}
    async with _client(host, port, "stream") as client:
        await client.subscribe(f"{root}/results/+", qos=1)

        async def collect() -> None:
            async for msg in client.messages:
                job_id = str(msg.topic).rsplit("/", 1)[1]
                raw = msg.payload if isinstance(msg.payload, bytes) else str(msg.payload).encode()
                value = _decode(raw)
                if job_id in sent and job_id not in got:
                    got[job_id] = {
                        "ok": value.get("ok"),
                        "mode": value.get("mode"),
                        "fallback": value.get("fallback"),
                        "code": (value.get("error") or {}).get("code"),
                        "s": time.monotonic() - sent[job_id],
                    }

        reader = asyncio.create_task(collect(), name="collect")
        start = time.monotonic()
        n = 0
        while time.monotonic() - start < duration_s:
            job_id = f"s{n}-{uuid.uuid4().hex[:6]}"
            job = {
                "id": job_id,
                "model": "bert",
                "mode": "distributed" if n % 2 == 0 else "auto",
                "inputs": {"token_ids": [[(7 * r + j) % 900 + 100 for j in range(64)] for r in range(batch)]},
            }
            sent[job_id] = time.monotonic()
            await client.publish(f"{root}/nodes/{node}/jobs", json.dumps(job).encode(), qos=1)
            n += 1
            if n % max(1, int(rate_hz * 10)) == 0:
                print(f"stream: {n} sent, {len(got)} answered", file=sys.stderr, flush=True)  # noqa: T201
            await asyncio.sleep(max(0.0, start + n / rate_hz - time.monotonic()))
        end = time.monotonic() + grace_s
        while len(got) < len(sent) and time.monotonic() < end:  # noqa: ASYNC110 - polls two conditions
            await asyncio.sleep(0.2)
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
    codes: dict[str, int] = {}
    for r in got.values():
        key = "ok" if r["ok"] else str(r["code"])
        codes[key] = codes.get(key, 0) + 1
    latencies = sorted(r["s"] for r in got.values())
    return {
        "sent": len(sent),
        "answered": len(got),
        "lost": sorted(set(sent) - set(got)),
        "codes": codes,
        "distributed": sum(1 for r in got.values() if r["mode"] == "distributed"),
        "fallback": sum(1 for r in got.values() if r["fallback"]),
        "p50_s": latencies[len(latencies) // 2] if latencies else None,
        "max_s": latencies[-1] if latencies else None,
    }


def _client_main(argv: Sequence[str]) -> int:
    """``python -m agent.testbed blast|stream``: the in-namespace clients (JSON summary on stdout)."""
    import asyncio

    p = argparse.ArgumentParser(prog="python -m agent.testbed")
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("blast")
    b.add_argument("--host", required=True)
    b.add_argument("--port", type=int, default=BROKER_PORT)
    b.add_argument("--topic", required=True)
    b.add_argument("--results", required=True)
    b.add_argument("--payloads", type=Path, required=True, help="msgpack: [[payload, id or null, topic?], ...]")
    b.add_argument("--timeout", type=float, default=120.0)
    s = sub.add_parser("stream")
    s.add_argument("--host", required=True)
    s.add_argument("--port", type=int, default=BROKER_PORT)
    s.add_argument("--cluster", required=True)
    s.add_argument("--node", required=True)
    s.add_argument("--rate", type=float, default=2.0)
    s.add_argument("--duration", type=float, required=True)
    s.add_argument("--grace", type=float, default=60.0)
    s.add_argument("--batch", type=int, default=4)
    ns = p.parse_args(argv)
    if ns.cmd == "blast":
        import msgpack

        items = msgpack.unpackb(ns.payloads.read_bytes(), raw=False)
        payloads = [(str(item[2]) if len(item) > 2 else ns.topic, bytes(item[0])) for item in items]
        expect = {str(item[1]) for item in items if item[1] is not None}
        out = asyncio.run(blast(ns.host, ns.port, ns.results, payloads, expect, ns.timeout))
    else:
        out = asyncio.run(stream(ns.host, ns.port, ns.cluster, ns.node, ns.rate, ns.duration, ns.grace, ns.batch))
    print(json.dumps(out))  # noqa: T201 - the summary is the output
    return 0


# -- prism-agent testbed ----------------------------------------------------------------------
def add_cli(sub: Any) -> None:
    """Add ``testbed`` and its subcommands to the ``prism-agent`` parser."""
    tb = sub.add_parser("testbed", help="a multi-host test bed on this box: namespaces, a broker, agents (root)")
    cmds = tb.add_subparsers(dest="testbed", required=True, parser_class=type(tb))
    up = cmds.add_parser("up", help="build a bed: N hosts, mosquitto on host 0, an agent on every host")
    up.add_argument("--hosts", type=_count, required=True, help="number of hosts (1-200)")
    up.add_argument("--model", default="tiny-bert", help="model every agent serves, as 'bert' (default tiny-bert)")
    up.add_argument("--rate", type=_rate, default=None, help="shape every host's link, e.g. 20mbit")
    up.add_argument("--tag", type=_tag, default=None, help="the bed's name (default: random)")
    up.add_argument("--cluster", default="tb", help="cluster name of the agents (default tb)")
    up.add_argument("--no-agents", action="store_true", help="only the namespaces and the broker")
    sh_ = cmds.add_parser("shape", help="change a host's rate limit while running ('off' removes it)")
    sh_.add_argument("tag", type=_tag)
    sh_.add_argument("host", type=_host)
    sh_.add_argument("rate", type=_rate_or_off)
    for name, what in (("cut", "pull a host's cable (its switch port goes down)"), ("restore", "plug it back in")):
        c = cmds.add_parser(name, help=what)
        c.add_argument("tag", type=_tag)
        c.add_argument("host", type=_host)
    for name, what in (("kill", "SIGKILL a host's agent"), ("start", "(re)start a host's agent")):
        c = cmds.add_parser(name, help=what)
        c.add_argument("tag", type=_tag)
        c.add_argument("host", type=_host)
    st = cmds.add_parser("status", help="list beds: hosts, addresses, processes, shaping, cuts")
    st.add_argument("--json", action="store_true")
    dn = cmds.add_parser("down", help="tear a bed down: kill its processes, delete its namespaces")
    which = dn.add_mutually_exclusive_group(required=True)
    which.add_argument("tag", nargs="?", type=_tag)
    which.add_argument("--all", action="store_true", help="every bed not held by a running test (see --force)")
    dn.add_argument("--force", action="store_true", help="with --all: beds held by running tests too")
    ex = cmds.add_parser("exec", help="run a command on a host: testbed exec TAG HOST -- CMD...")
    ex.add_argument("tag", type=_tag)
    ex.add_argument("host", type=_host)
    ex.add_argument("cmd", nargs=argparse.REMAINDER)
    sm = cmds.add_parser("submit", help="prism-agent submit from host 0 to the bed's broker: submit TAG -- ARGS...")
    sm.add_argument("tag", type=_tag)
    sm.add_argument("args", nargs=argparse.REMAINDER)


def _count(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 200:
        raise argparse.ArgumentTypeError(f"expected 1-200, got {text!r}")
    return int(text)


def _host(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"host must be a number (0 is the broker's), got {text!r}")
    return int(text)


def _tag(text: str) -> str:
    if not text or len(text) > 8 or not all(c.isalnum() for c in text):
        raise argparse.ArgumentTypeError(f"tag must be 1-8 letters or digits, got {text!r}")
    return text


def _rate(text: str) -> str:
    import re

    if not re.fullmatch(r"\d+(\.\d+)?([kmg]?(bit|bps))", text.lower()):
        raise argparse.ArgumentTypeError(f"rate must look like 20mbit, 500kbit or 1gbit, got {text!r}")
    return text.lower()


def _rate_or_off(text: str) -> str:
    return "off" if text.lower() == "off" else _rate(text)


def _bed(tag: str, host: int | None = None) -> Testbed:
    bed = Testbed.load(tag)
    if host is not None:
        bed._check_host(host)
    return bed


def _print_status(beds: list[Testbed], as_json: bool) -> None:
    rows: list[dict[str, Any]] = []
    for bed in beds:
        procs = {k: {"host": p.host, "pid": p.pid, "alive": _alive(p.pid, p.start)} for k, p in bed.procs.items()}
        rows.append(
            {
                "tag": bed.tag,
                "hosts": bed.hosts,
                "cluster": bed.cluster,
                "broker": bed.broker_url,
                "namespaces": bed.names,
                "addresses": [bed.address(i) for i in range(bed.hosts)],
                "rates": {str(k): v for k, v in bed.rates.items()},
                "cut": bed.cut_hosts,
                "held_by_test": bed.owner_alive(),
                "procs": procs,
            }
        )
    if as_json:
        print(json.dumps(rows))  # noqa: T201 - command output
        return
    if not rows:
        print("no test beds")  # noqa: T201
    for r in rows:
        print(f"{r['tag']}: {r['hosts']} hosts, cluster {r['cluster']}, broker {r['broker']}")  # noqa: T201
        for i in range(r["hosts"]):
            here = [
                f"{k}({'up' if v['alive'] else 'dead'} pid {v['pid']})" for k, v in r["procs"].items() if v["host"] == i
            ]
            link = ("cut" if i in r["cut"] else "up") + (f", {r['rates'][str(i)]}" if str(i) in r["rates"] else "")
            print(f"  host {i}  {r['namespaces'][i]}  {r['addresses'][i]}  link {link}  {' '.join(here)}")  # noqa: T201


def run_cli(ns: argparse.Namespace) -> int:
    """Run ``prism-agent testbed ...``; errors are one line and exit status 1 (2 for usage)."""
    try:
        return _run_cli(ns)
    except TestbedError as exc:
        print(f"prism-agent: error: {exc}", file=sys.stderr)  # noqa: T201
        return 2 if isinstance(exc, UsageError) else 1


def _run_cli(ns: argparse.Namespace) -> int:
    cmd = ns.testbed
    if cmd in ("up", "shape", "cut", "restore", "kill", "start", "down") and netns_unavailable():
        raise TestbedError(f"test bed unavailable: {netns_unavailable()}")
    if cmd == "up":
        bed = Testbed(ns.hosts, tag=ns.tag or uuid.uuid4().hex[:6], cluster=ns.cluster, models=[f"bert={ns.model}"])
        bed.up(detached=True)
        try:
            if ns.rate:
                for i in range(bed.hosts):
                    bed.shape(i, ns.rate)
            bed.start_broker()
            if not ns.no_agents:
                for i in range(bed.hosts):
                    bed.start_agent(i)
                print(f"waiting for {bed.hosts} agents to start and find each other ...", file=sys.stderr)  # noqa: T201
                bed.wait_cluster([f"h{i}" for i in range(bed.hosts)])
        except BaseException:
            bed.down()
            raise
        _print_status([bed], False)
        print(f"next: prism-agent testbed submit {bed.tag} -- --model bert --text hello --mode distributed")  # noqa: T201
        return 0
    if cmd == "status":
        _print_status([Testbed.load(t) for t in Testbed.tags()], ns.json)
        return 0
    if cmd == "down":
        tags = Testbed.tags() if ns.all else [ns.tag]
        for tag in tags:
            bed = Testbed.load(tag)
            if ns.all and bed.owner_alive() and not ns.force:
                print(f"{tag}: held by running process {bed.owner[0] if bed.owner else '?'}; kept (--force)")  # noqa: T201
                continue
            bed.down()
            print(f"{tag}: down")  # noqa: T201
        return 0
    bed = _bed(ns.tag, getattr(ns, "host", None))
    if cmd == "shape":
        bed.unshape(ns.host) if ns.rate == "off" else bed.shape(ns.host, ns.rate)
    elif cmd == "cut":
        bed.cut(ns.host)
    elif cmd == "restore":
        bed.restore(ns.host)
    elif cmd == "kill":
        bed.stop(f"h{ns.host}", signal.SIGKILL)
    elif cmd == "start":
        bed.start_agent(ns.host)
    elif cmd == "exec":
        argv = ns.cmd[1:] if ns.cmd[:1] == ["--"] else ns.cmd
        if not argv:
            print("prism-agent: error: testbed exec needs a command after --", file=sys.stderr)  # noqa: T201
            return 2
        return bed.exec(ns.host, *argv).returncode
    elif cmd == "submit":
        argv = ns.args[1:] if ns.args[:1] == ["--"] else ns.args
        submit = [sys.executable, "-m", "agent", "submit", "--broker", bed.broker_url, "--cluster", bed.cluster]
        return bed.exec(0, *submit, *argv, cwd=REPO).returncode
    return 0


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


if __name__ == "__main__":
    sys.exit(_client_main(sys.argv[1:]))
