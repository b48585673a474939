"""Zero-config broker: find one advertised over mDNS (``_mqtt._tcp``), else host one.

Hosting means supervising a ``mosquitto`` child process with a generated config
(TCP_NODELAY on, no persistence, anonymous on the chosen address) and advertising it over
mDNS, so a single box, or the first box of a cluster, works with no configuration.
Production deployments should run mosquitto as a system service (see README).
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

import structlog
from zeroconf import IPVersion
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

from agent.base.config import Broker, ConfigError

MQTT_SERVICE = "_mqtt._tcp.local."
log = structlog.get_logger("prism.broker")


async def find_broker(address: str, wait_s: float = 2.0) -> Broker | None:
    """A broker advertised over mDNS on ``address``'s network, if one answers in ``wait_s``."""
    from zeroconf.asyncio import AsyncServiceBrowser

    found: asyncio.Queue[str] = asyncio.Queue()
    azc = AsyncZeroconf(interfaces=[address], ip_version=IPVersion.V4Only)
    browser = AsyncServiceBrowser(azc.zeroconf, MQTT_SERVICE, handlers=[lambda **kw: found.put_nowait(kw["name"])])
    try:
        name = await asyncio.wait_for(found.get(), wait_s)
        info = AsyncServiceInfo(MQTT_SERVICE, name)
        if await info.async_request(azc.zeroconf, 3000) and info.parsed_addresses(IPVersion.V4Only) and info.port:
            return Broker(info.parsed_addresses(IPVersion.V4Only)[0], int(info.port))
        return None
    except asyncio.TimeoutError:
        return None
    finally:
        await browser.async_cancel()
        await azc.async_close()


def mosquitto_binary() -> str:
    """Path of the mosquitto broker binary."""
    path = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
    if path is None:
        raise ConfigError(
            "no broker configured, none advertised, and mosquitto is not installed to host one "
            "(apt-get install mosquitto, or pass --broker mqtt://host:port)"
        )
    return path


def port_free(address: str, port: int) -> bool:
    """True when nothing listens on ``address:port``."""
    with socket.socket() as s:
        return s.connect_ex((address, port)) != 0


PR_SET_PDEATHSIG = 1


def die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the child SIGKILLed when its parent dies (Linux
    ``PR_SET_PDEATHSIG``), so a SIGKILLed agent leaves no orphaned broker; None elsewhere.

    The signal follows the thread that forks (asyncio forks from the event loop's thread) and
    is cleared when the child changes its user, which mosquitto does when started as root,
    unless its config says ``user root``.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here: the child only calls it
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the signal was armed
            os._exit(1)

    return preexec


class HostedBroker:
    """A mosquitto child process on ``address:port``, advertised over mDNS (async context manager)."""

    def __init__(
        self,
        address: str,
        port: int = 1883,
        node: str = "prism",
        advertise: bool = True,
        workdir: Path | None = None,
    ) -> None:
        self.broker = Broker(address, port)
        self.node = node
        self.advertise = advertise
        self._proc: asyncio.subprocess.Process | None = None
        self._workdir = workdir
        self._dir: Path | None = None
        self._zc: AsyncZeroconf | None = None

    async def __aenter__(self) -> HostedBroker:
        # A fixed directory (the node's state) is emptied first: a SIGKILLed agent left it behind.
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir.mkdir(parents=True, mode=0o700)
            self._dir = self._workdir
        else:
            self._dir = Path(tempfile.mkdtemp(prefix="prism-broker-"))
        conf = self._dir / "mosquitto.conf"
        # As root, mosquitto would switch to user 'mosquitto', which clears the parent-death
        # signal: it keeps the agent's user instead, so it dies with its agent.
        same_user = "user root\n" if os.geteuid() == 0 else ""
        conf.write_text(
            f"listener {self.broker.port} {self.broker.host}\nallow_anonymous true\n"
            f"set_tcp_nodelay true\npersistence false\n{same_user}"
        )
        log_path = self._dir / "mosquitto.log"  # a pipe nobody reads would freeze the broker
        with log_path.open("wb") as log_file:
            self._proc = await asyncio.create_subprocess_exec(
                mosquitto_binary(),
                "-c",
                str(conf),
                stdout=asyncio.subprocess.DEVNULL,
                stderr=log_file,
                preexec_fn=die_with_parent(),
            )
        for _ in range(100):
            if self._proc.returncode is not None:
                err = log_path.read_text(errors="replace").strip()
                raise ConfigError(f"hosted mosquitto exited: {err.splitlines()[-1] if err else self._proc.returncode}")
            if not port_free(self.broker.host, self.broker.port):
                break
            await asyncio.sleep(0.05)
        if self.advertise:
            self._zc = AsyncZeroconf(interfaces=[self.broker.host], ip_version=IPVersion.V4Only)
            info = AsyncServiceInfo(
                MQTT_SERVICE,
                f"prism-{self.node}.{MQTT_SERVICE}",
                addresses=[socket.inet_aton(self.broker.host)],
                port=self.broker.port,
                properties={"node": self.node},
            )
            await self._zc.async_register_service(info)
        log.info("broker_hosted", broker=f"{self.broker.host}:{self.broker.port}", advertised=self.advertise)
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._zc is not None:
            await self._zc.async_unregister_all_services()
            await self._zc.async_close()
        if self._proc is not None and self._proc.returncode is None:
            self._proc.terminate()
            try:
                await asyncio.wait_for(self._proc.wait(), 10)
            except asyncio.TimeoutError:
                self._proc.kill()
                await self._proc.wait()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
