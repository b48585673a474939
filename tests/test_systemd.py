"""The systemd unit: verified clean, hardened, and installable."""

from __future__ import annotations

import contextlib
import re
import shutil
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from agent.base.sdnotify import Notifier
from agent.node.install import install, render_unit


@pytest.fixture
def unit(tmp_path: Path) -> Path:
    path = tmp_path / "prism-agent.service"
    path.write_text(render_unit())
    return path


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("systemd-analyze")
    assert exe, "systemd-analyze is missing (Debian package systemd)"
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=60, check=False)


def test_unit_verifies_without_a_word(unit: Path) -> None:
    out = analyze("verify", str(unit))
    assert out.returncode == 0
    assert out.stdout + out.stderr == ""


def test_unit_is_hardened(unit: Path) -> None:
    out = analyze("security", "--offline=true", str(unit))
    score = re.search(r"Overall exposure level for \S+: ([0-9.]+)", out.stdout)
    assert score, out.stdout[-500:]
    assert float(score.group(1)) <= 2.5
    text = unit.read_text()
    for line in (
        "Type=notify",
        "WatchdogSec=",
        "Restart=on-failure",
        "User=prism-agent",
        "StateDirectory=",
        "EnvironmentFile=",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "SystemCallFilter=@system-service",
    ):
        assert line in text


def unit_section(text: str, section: str) -> dict[str, set[str]]:
    """The space-separated values of each key in ``[section]`` (repeated keys add up, as in systemd)."""
    out: dict[str, set[str]] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("["):
            current = line.strip("[]")
        elif current == section and "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out.setdefault(key, set()).update(value.split())
    return out


def test_unit_starts_after_the_network_and_the_clock_are_up(unit: Path) -> None:
    """Adverts, health and boots are signed with wall-clock times: a box that starts before
    NTP has set its clock (a Jetson without an RTC battery) would be refused by its peers."""
    deps = unit_section(unit.read_text(), "Unit")
    assert {"network-online.target", "time-sync.target"} <= deps["After"]
    assert "network-online.target" in deps["Wants"]
    # A passive target: units that need the time order after it but never pull it in
    # (systemd.special(7)); the NTP client or systemd-time-wait-sync does.
    assert "time-sync.target" not in deps["Wants"] | deps.get("Requires", set())


def test_install_writes_config_env_and_unit(tmp_path: Path) -> None:
    done = install(unit_dir=tmp_path, config_dir=tmp_path / "etc", user=False)
    assert (tmp_path / "prism-agent.service").read_text() == render_unit()
    assert "minilm" in (tmp_path / "etc/agent.toml").read_text()
    assert (tmp_path / "etc/agent.env").stat().st_mode & 0o777 == 0o600
    assert done[-1].startswith("next: systemctl daemon-reload")
    (tmp_path / "etc/agent.toml").write_text("cluster = 'mine'\n")
    install(unit_dir=tmp_path, config_dir=tmp_path / "etc", user=False)
    assert (tmp_path / "etc/agent.toml").read_text() == "cluster = 'mine'\n"  # never overwritten


def test_the_shipped_example_config_loads() -> None:
    from agent.base.config import load_settings

    settings = load_settings(Path(__file__).resolve().parents[1] / "systemd" / "agent.toml", {}, {})
    assert [m.name for m in settings.models] == ["minilm"]


def test_a_notify_socket_that_reads_nothing_never_blocks_the_agent(tmp_path: Path) -> None:
    """systemd busy (its queue full): a watchdog ping is dropped, the caller goes on at once."""
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(path)
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as filler:
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                for _ in range(100_000):  # until the receiver's queue is full
                    filler.sendto(b"WATCHDOG=1", path)
        sender = threading.Thread(target=Notifier(path).notify, args=("WATCHDOG=1",), daemon=True)
        sender.start()
        sender.join(timeout=5)
        assert not sender.is_alive(), "notify blocked on a full notify socket"
