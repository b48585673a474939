"""MQTT security: a broker with passwords refuses an anonymous agent once (no retry storm);
a TLS broker signed by a test CA serves an agent that trusts that CA."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.mqtt_env import REPO, mosquitto, need, pub, sub

pytestmark = pytest.mark.mqtt
# Started as root, mosquitto drops to its own user, which cannot read pytest's private tmp
# directories; these test brokers keep their user instead.
READABLE = "user root\n" if os.geteuid() == 0 else ""


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_test_ca(tmp: Path) -> None:
    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=prism-test-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        cwd=tmp,
    )
    openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        cwd=tmp,
    )
    (tmp / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
        "-out",
        "server.crt",
        cwd=tmp,
    )


@contextmanager
def running_agent(broker: str, node: str, log: Path, env: dict[str, str]) -> Iterator[Path]:
    """An agent process, yielded once it has connected to the broker (its log says so)."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "agent",
            "run",
            "--broker",
            broker,
            "--cluster",
            "sec",
            "--node-id",
            node,
            "--model",
            "bert=tiny-bert",
            "--log-format",
            "json",
        ],
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **env},
        stdout=subprocess.DEVNULL,
        stderr=log.open("w"),
        text=True,
    )
    try:
        deadline = time.monotonic() + 90
        while '"event": "mqtt_connected"' not in log.read_text():
            assert proc.poll() is None, log.read_text()[-1500:]
            assert time.monotonic() < deadline, "the agent did not connect in 90 s"
            time.sleep(0.2)
        yield log
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_anonymous_agent_is_refused_once_with_a_clear_line(tmp_path: Path) -> None:
    passwd = tmp_path / "passwd"
    subprocess.run([need("mosquitto_passwd"), "-b", "-c", str(passwd), "node", "s3cret-pass"], check=True)
    os.chmod(passwd, 0o644)
    conf = f"allow_anonymous false\npassword_file {passwd}\n{READABLE}"
    with mosquitto(extra_conf=conf) as port:
        anonymous = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "agent",
                "run",
                "--broker",
                f"mqtt://127.0.0.1:{port}",
                "--cluster",
                "sec",
                "--node-id",
                "anon",
                "--model",
                "bert=tiny-bert",
                "--log-format",
                "json",
            ],
            cwd=REPO,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        # With the password, the same agent gets in (started alongside the anonymous one).
        secret = tmp_path / "mqtt-password"
        secret.write_text("s3cret-pass\n")
        env = {"PRISM_MQTT_USERNAME": "node", "PRISM_MQTT_PASSWORD_FILE": str(secret)}
        try:
            with running_agent(f"mqtt://127.0.0.1:{port}", "withpass", tmp_path / "good.log", env) as log:
                assert '"event": "mqtt_connected"' in log.read_text()
            _, stderr = anonymous.communicate(timeout=120)
        finally:
            if anonymous.poll() is None:
                anonymous.kill()
                anonymous.communicate()
        assert anonymous.returncode == 1
        assert '"event": "mqtt_refused"' in stderr
        assert stderr.count('"event": "mqtt_reconnect"') == 0  # a wrong login is not retried
        assert "prism-agent: error: broker refused the connection" in stderr


def test_tls_broker_with_a_test_ca(tmp_path: Path) -> None:
    make_test_ca(tmp_path)
    from transport.localcluster import free_port

    tls_port = free_port()
    conf = (
        f"listener {tls_port} 127.0.0.1\ncafile {tmp_path / 'ca.crt'}\ncertfile {tmp_path / 'server.crt'}\n"
        f"keyfile {tmp_path / 'server.key'}\n"
    )
    for name in ("server.key", "server.crt", "ca.crt"):
        os.chmod(tmp_path / name, 0o644)
    with mosquitto(extra_conf=conf + READABLE) as plain_port:
        env = {"PRISM_TLS_CA": str(tmp_path / "ca.crt")}
        waiter = sub(plain_port, "prism/v1/sec/results/tls1", 1, timeout_s=90)
        with running_agent(f"mqtts://127.0.0.1:{tls_port}", "t1", tmp_path / "agent.log", env):
            pub(plain_port, "prism/v1/sec/jobs", json.dumps({"id": "tls1", "model": "bert", "inputs": {"text": "x"}}))
            out, _ = waiter.communicate(timeout=90)
            assert json.loads(out)["ok"] is True  # the agent talks to the broker over TLS only
