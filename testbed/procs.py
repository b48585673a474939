"""Shell and process helpers of the test bed: commands, pids that outlive us, RSS."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path


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


def proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks) of a process, or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return fields[0], int(fields[19])


def pid_alive(pid: int, start: int | None = None) -> bool:
    """The process exists, is not a zombie, and (when ``start`` is given) is the same one."""
    stat = proc_stat(pid)
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
