"""The bed's processes: spawn, signal and stop them (their pids survive in the bed's state,
so another process can stop them too), and the two services every bed runs — mosquitto on
host 0 and a ``prism-agent run`` per host. A mixin of :class:`testbed.bed.Testbed`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from testbed.procs import Proc, TestbedError, need, pid_alive, proc_stat

BROKER_PORT = 1883
#: Settings every agent on the bed gets unless overridden: fast health, bounded group waits.
AGENT_ENV = {"HF_HUB_OFFLINE": "1", "PRISM_HEALTH_INTERVAL_S": "0.5", "PRISM_GROUP_TIMEOUT_S": "10"}
REPO = Path(__file__).resolve().parents[1]


class Services:
    """Process and service management of a bed (see the module docstring)."""

    procs: dict[str, Proc]
    _popen: dict[str, subprocess.Popen[bytes]]
    cluster: str
    models: list[str]

    @property
    def workdir(self) -> Path:
        raise NotImplementedError

    @property
    def broker_url(self) -> str:
        raise NotImplementedError

    def address(self, i: int) -> str:
        raise NotImplementedError

    def run(self, i: int, *cmd: str) -> list[str]:
        raise NotImplementedError

    def exec(self, i: int, *cmd: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
        raise NotImplementedError

    def save(self) -> None:
        raise NotImplementedError

    def spawn(self, key: str, i: int, cmd: Sequence[str], env: dict[str, str] | None = None) -> Proc:
        """Start a long-running process on host i, logged to ``workdir/KEY.log``, recorded in the state."""
        if key in self.procs and pid_alive(self.procs[key].pid, self.procs[key].start):
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
        stat = proc_stat(popen.pid)
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
        return pid_alive(proc.pid, proc.start)

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
        while pid_alive(proc.pid, proc.start):
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
        self,
        i: int,
        node: str | None = None,
        env: dict[str, str] | None = None,
        models: Sequence[str] | None = None,
        files: int | None = None,
    ) -> Proc:
        """Start (or restart) the agent of host i; its key is its node id (``hI`` by default).
        ``files`` sets its descriptor limit, soft and hard (as ``LimitNOFILE=`` does).

        Its state (the job journal) lives in the bed's work directory, so a restarted agent
        finds what its previous run left."""
        key = node or f"h{i}"
        state = {"PRISM_STATE_DIR": str(self.workdir / f"state-{key}")}
        limit = [] if files is None else [need("prlimit"), f"--nofile={files}:{files}", "--"]
        return self.spawn(key, i, [*limit, *self.agent_cmd(i, key, models)], {**AGENT_ENV, **state, **(env or {})})

    def log(self, key: str) -> str:
        """Everything the process ``key`` logged so far."""
        return Path(self.procs[key].log).read_text(errors="replace")

    def events(self, key: str, *names: str, last: int = 4) -> str:
        """The last ``last`` log lines of ``key`` with any of the events ``names`` (to show why)."""
        lines = [ln for ln in self.log(key).splitlines() if any(f'"{n}"' in ln for n in names)]
        return "\n".join(lines[-last:])

    def wait_log(self, key: str, needle: str, count: int = 1, timeout_s: float = 60.0) -> None:
        """Until ``needle`` appears ``count`` times in the log of ``key`` (which survives restarts)."""
        deadline = time.monotonic() + timeout_s
        while self.log(key).count(needle) < count:
            assert time.monotonic() < deadline, f"{key} never logged {needle!r} {count} times in {timeout_s:g} s"
            time.sleep(0.02)

    # -- watching the cluster (from inside host 0) -----------------------------------------
