"""Real mosquitto and real agent processes for integration tests."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transport.health import parse_status
from transport.localcluster import free_port

REPO = Path(__file__).resolve().parents[1]


def need(binary: str) -> str:
    path = shutil.which(binary) or (f"/usr/sbin/{binary}" if Path(f"/usr/sbin/{binary}").exists() else None)
    assert path, f"{binary} is not installed: run scripts/test.sh (it installs mosquitto) or apt-get install mosquitto"
    return path


class Mosquitto:
    """One mosquitto process on a loopback port with a config that survives restarts."""

    def __init__(self, port: int, conf: Path) -> None:
        self.port = port
        self.conf = conf
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start it and wait until it listens."""
        self.proc = subprocess.Popen(
            [need("mosquitto"), "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_port(self.port, self.proc)

    def stop(self) -> None:
        """SIGTERM (mosquitto saves its persistence file, if any, on the way out) and wait."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.proc = None

    def restart(self) -> None:
        """A graceful restart on the same port with the same config."""
        self.stop()
        self.start()


@contextmanager
def mosquitto_process(port: int | None = None, extra_conf: str = "") -> Iterator[Mosquitto]:
    """A broker on a loopback port (a free one by default), stopped after.

    ``extra_conf`` lines come last, so they win: for persistence pass ``persistence true``,
    ``persistence_location`` (a directory ending in ``/``) and ``autosave_interval``.
    """
    port = port or free_port()
    with tempfile.TemporaryDirectory() as tmp:
        conf = Path(tmp) / "mosquitto.conf"
        # As root, mosquitto drops to its own user, which cannot use our private temporary directories.
        user = "user root\n" if os.geteuid() == 0 and "\nuser " not in f"\n{extra_conf}" else ""
        conf.write_text(
            f"listener {port} 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\npersistence false\n{user}"
            f"{extra_conf}"
        )
        broker = Mosquitto(port, conf)
        broker.start()
        try:
            yield broker
        finally:
            broker.stop()


@contextmanager
def mosquitto(port: int | None = None, extra_conf: str = "") -> Iterator[int]:
    """A broker on a loopback port (a free one by default); yields the port."""
    with mosquitto_process(port, extra_conf) as broker:
        yield broker.port


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout_s: float = 10.0) -> None:
    import socket

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"process exited with {proc.returncode}"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"nothing listens on port {port} after {timeout_s} s")


class Subscription:
    """A subscriber (MQTT 5, QoS 1) that is subscribed once constructed: the broker has
    acknowledged the subscription, so nothing published after is missed (results are not
    retained). Takes up to ``count`` messages within ``timeout_s`` of its start."""

    def __init__(self, port: int, topic: str, count: int, timeout_s: float = 30.0) -> None:
        import paho.mqtt.client as mqtt

        self.topic, self.count = topic, count
        self.deadline = time.monotonic() + timeout_s
        self._messages: queue.Queue[bytes] = queue.Queue()
        self._taken: list[str] = []
        subscribed = threading.Event()
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        client.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
        client.on_subscribe = lambda *_: subscribed.set()
        client.on_message = lambda _c, _u, msg: self._messages.put(bytes(msg.payload))
        client.connect("127.0.0.1", port)
        client.loop_start()
        self._client = client
        if not subscribed.wait(timeout=min(10.0, timeout_s)):
            self.close()
            raise AssertionError(f"no SUBACK for {topic} in {min(10.0, timeout_s)} s")

    def next_raw(self, timeout_s: float) -> bytes:
        """The next message's bytes, waiting at most ``timeout_s``."""
        try:
            msg = self._messages.get(timeout=timeout_s)
        except queue.Empty:
            raise AssertionError(f"no message on {self.topic} in {timeout_s} s") from None
        self._taken.append(msg.decode("utf-8", "replace"))
        return msg

    def next(self, timeout_s: float) -> str:
        """The next message as text, waiting at most ``timeout_s``."""
        self.next_raw(timeout_s)
        return self._taken[-1]

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        """Like ``Popen.communicate`` of ``mosquitto_sub -C count -W timeout_s``: the messages,
        one a line, once ``count`` arrived or the time is up; then a note on what was missing."""
        end = self.deadline if timeout is None else min(self.deadline, time.monotonic() + timeout)
        while len(self._taken) < self.count and (left := end - time.monotonic()) > 0:
            with contextlib.suppress(AssertionError):
                self.next(left)
        self.close()
        got = self._taken[: self.count]
        note = "" if len(got) == self.count else f"{len(got)} of {self.count} messages on {self.topic} in time"
        return "".join(f"{m}\n" for m in got), note

    def close(self) -> None:
        """Disconnect and stop the network thread."""
        self._client.disconnect()
        self._client.loop_stop()


def sub(port: int, topic: str, count: int, timeout_s: float = 30.0) -> Subscription:
    """Subscribe for ``count`` messages (MQTT 5, QoS 1); subscribed when it returns."""
    return Subscription(port, topic, count, timeout_s)


def pub(port: int, topic: str, payload: str | bytes) -> None:
    """Publish once with ``mosquitto_pub`` (MQTT 5, QoS 1)."""
    data = payload if isinstance(payload, bytes) else payload.encode()
    args = [need("mosquitto_pub"), "-p", str(port), "-V", "mqttv5", "-q", "1", "-t", topic, "-s"]
    subprocess.run(args, input=data, check=True, timeout=10)


def wait_online(port: int, cluster: str, *nodes: str, timeout_s: float = 60.0) -> None:
    """Block until each node's retained status says online. Agents launched together (with
    ``agent(..., online=False)``) and then waited for start up side by side, not one by one."""
    deadline = time.monotonic() + timeout_s
    for node in nodes:
        while True:
            assert time.monotonic() < deadline, f"node {node} did not come online in {timeout_s} s"
            out = subprocess.run(
                [
                    need("mosquitto_sub"),
                    "-p",
                    str(port),
                    "-t",
                    f"prism/v1/{cluster}/nodes/{node}/status",
                    "-C",
                    "1",
                    "-W",
                    "2",
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            if parse_status(out.stdout.strip().encode())[0] == "online":
                break


@contextmanager
def agent(
    port: int,
    cluster: str,
    node: str,
    *models: str,
    env: dict[str, str] | None = None,
    extra: list[str] | None = None,
    no_broker: bool = False,
    online: bool = True,
) -> Iterator[subprocess.Popen[str]]:
    """A real ``prism-agent run`` process, online when yielded (unless ``online`` is False:
    then as soon as it is launched); SIGTERMed after.

    ``no_broker`` starts it without --broker (zero-config); ``port`` is then where the
    broker is expected to end up, to wait for the node to come online.
    """
    broker = [] if no_broker else ["--broker", f"mqtt://127.0.0.1:{port}"]
    cmd = [sys.executable, "-m", "agent", "run", *broker, "--cluster", cluster, "--node-id", node]
    cmd += ["--log-format", "json", *(extra or [])]
    for m in models:
        cmd += ["--model", m]
    # Each agent keeps its job journal in a directory of its own (unless the test gives one).
    state = {"PRISM_STATE_DIR": tempfile.mkdtemp(prefix=f"prism-state-{node}-")}
    # On loopback an mDNS answer takes milliseconds: ask 0.1 s, not 1 s, whether the name is
    # taken (the namespace bed tests name conflicts with the default).
    state["PRISM_MDNS_NAME_CHECK_MS"] = "100"
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **state, **(env or {})}
    # Logs go to a file: a pipe nobody reads would fill up and block the agent.
    log = tempfile.NamedTemporaryFile(prefix=f"agent-{node}-", suffix=".log", delete=False)  # noqa: SIM115
    proc = subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=subprocess.DEVNULL, stderr=log, text=True)
    proc.log_path = Path(log.name)  # type: ignore[attr-defined]
    try:
        if online:
            wait_online(port, cluster, node)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@dataclass(frozen=True)
class Agent:
    """One agent of :func:`agents`: its node id, the models it serves, extra environment and flags."""

    node: str
    models: tuple[str, ...] = ("bert=tiny-bert",)
    env: dict[str, str] | None = None
    extra: list[str] | None = None


@contextmanager
def agents(port: int, cluster: str, *specs: Agent) -> Iterator[list[subprocess.Popen[str]]]:
    """Real agents launched together, online when yielded, SIGTERMed together after: their
    start-ups (imports, model loads) and their drains overlap instead of queueing."""
    with contextlib.ExitStack() as stack:
        procs = [
            stack.enter_context(agent(port, cluster, a.node, *a.models, env=a.env, extra=a.extra, online=False))
            for a in specs
        ]
        try:
            wait_online(port, cluster, *(a.node for a in specs))
            yield procs
        finally:
            for proc in procs:  # each agent's own exit then waits for a drain already under way
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)


def ask_node(port: int, cluster: str, node: str, jobs: list[dict[str, Any]], timeout_s: float = 90) -> dict[str, Any]:
    """Publish ``jobs`` to ``node`` and return its results by job id (all must arrive)."""
    waiter = sub(port, f"prism/v1/{cluster}/results/#", len(jobs))
    for job in jobs:
        pub(port, f"prism/v1/{cluster}/nodes/{node}/jobs", json.dumps(job))
    out, err = waiter.communicate(timeout=timeout_s)
    results = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert len(results) == len(jobs), err
    return {str(r["id"]): r for r in results}


def wait_peer(port: int, cluster: str, node: str, peer: str, timeout_s: float = 30) -> None:
    """Until ``node``'s health lists ``peer`` (discovered and admitted by its weights)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        out = subprocess.run(
            ["mosquitto_sub", "-p", str(port), "-t", f"prism/v1/{cluster}/nodes/{node}/health", "-C", "1", "-W", "3"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
        if out and peer in json.loads(out).get("peers", []):
            return
    raise AssertionError(f"{node} never listed {peer} as a peer")


def logged(proc: subprocess.Popen[str], event: str, **fields: Any) -> list[dict[str, Any]]:
    """The agent's JSON log lines for ``event`` whose fields have the values given."""
    lines = Path(proc.log_path).read_text().splitlines()  # type: ignore[attr-defined]
    entries = (json.loads(line) for line in lines if line.startswith("{"))
    return [e for e in entries if e.get("event") == event and all(e.get(k) == v for k, v in fields.items())]


def wait_logged(
    proc: subprocess.Popen[str], event: str, timeout_s: float, count: int = 1, **fields: Any
) -> dict[str, Any]:
    """The ``count``-th log line for ``event`` with ``fields``, once the agent writes it (within ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    while len(found := logged(proc, event, **fields)) < count:
        assert proc.poll() is None, f"the agent exited with {proc.returncode}"
        assert time.monotonic() < deadline, f"{len(found)} of {count} {event} {fields} logged in {timeout_s} s"
        time.sleep(0.05)  # polling a log file: there is no event to wait on
    return found[count - 1]
