"""Real mosquitto and real agent processes for integration tests."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from agent.localcluster import free_port

REPO = Path(__file__).resolve().parents[1]


def need(binary: str) -> str:
    path = shutil.which(binary) or (f"/usr/sbin/{binary}" if Path(f"/usr/sbin/{binary}").exists() else None)
    assert path, f"{binary} is not installed: run scripts/test.sh (it installs mosquitto) or apt-get install mosquitto"
    return path


@contextmanager
def mosquitto(port: int | None = None, extra_conf: str = "") -> Iterator[int]:
    """A broker on a loopback port (a free one by default); yields the port."""
    port = port or free_port()
    with tempfile.TemporaryDirectory() as tmp:
        conf = Path(tmp) / "mosquitto.conf"
        conf.write_text(
            f"listener {port} 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\npersistence false\n{extra_conf}"
        )
        proc = subprocess.Popen(
            [need("mosquitto"), "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            wait_port(port, proc)
            yield port
        finally:
            proc.terminate()
            proc.wait(timeout=10)


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


def sub(port: int, topic: str, count: int, timeout_s: float = 30.0) -> subprocess.Popen[str]:
    """Start ``mosquitto_sub`` for ``count`` messages (MQTT 5, QoS 1)."""
    return subprocess.Popen(
        [
            need("mosquitto_sub"),
            "-p",
            str(port),
            "-V",
            "mqttv5",
            "-q",
            "1",
            "-t",
            topic,
            "-C",
            str(count),
            "-W",
            str(int(timeout_s)),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def pub(port: int, topic: str, payload: str | bytes) -> None:
    """Publish once with ``mosquitto_pub`` (MQTT 5, QoS 1)."""
    data = payload if isinstance(payload, bytes) else payload.encode()
    args = [need("mosquitto_pub"), "-p", str(port), "-V", "mqttv5", "-q", "1", "-t", topic, "-s"]
    subprocess.run(args, input=data, check=True, timeout=10)


def wait_online(port: int, cluster: str, node: str, timeout_s: float = 60.0) -> None:
    """Block until the node's retained status says online."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
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
        if out.stdout.strip() == "online":
            return
    raise AssertionError(f"node {node} did not come online in {timeout_s} s")


@contextmanager
def agent(
    port: int,
    cluster: str,
    node: str,
    *models: str,
    env: dict[str, str] | None = None,
    extra: list[str] | None = None,
    no_broker: bool = False,
) -> Iterator[subprocess.Popen[str]]:
    """A real ``prism-agent run`` process, online when yielded; SIGTERMed after.

    ``no_broker`` starts it without --broker (zero-config); ``port`` is then where the
    broker is expected to end up, to wait for the node to come online.
    """
    broker = [] if no_broker else ["--broker", f"mqtt://127.0.0.1:{port}"]
    cmd = [sys.executable, "-m", "agent", "run", *broker, "--cluster", cluster, "--node-id", node]
    cmd += ["--log-format", "json", *(extra or [])]
    for m in models:
        cmd += ["--model", m]
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    # Logs go to a file: a pipe nobody reads would fill up and block the agent.
    log = tempfile.NamedTemporaryFile(prefix=f"agent-{node}-", suffix=".log", delete=False)  # noqa: SIM115
    proc = subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=subprocess.DEVNULL, stderr=log, text=True)
    proc.log_path = Path(log.name)  # type: ignore[attr-defined]
    try:
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
