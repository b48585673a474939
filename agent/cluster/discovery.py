"""mDNS discovery: advertise this node as ``_prism._tcp.local.`` and browse for peers.

TXT records carry node id, cluster, version, address and the models served; the SRV record
points at the node's probe port. Adverts of other clusters are ignored. ``interfaces`` pins
where multicast goes (tests in the root namespace use ``["127.0.0.1"]`` only).

With a cluster secret the TXT record is signed (agent/cluster/admission.py) and re-signed
every :data:`ADVERT_REFRESH_S`; an advert older than :data:`ADVERT_MAX_AGE_S` or seen before
is refused, so a dead node's advert cannot be replayed for long. A goodbye (an mDNS removal,
which anyone on the link can send) is not taken at its word: it triggers a check of the node.
An instance name another host already holds is changed (``node (2)``, as Avahi does) and
logged, never fatal. TXT decoding never raises.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

import structlog
from zeroconf import IPVersion, ServiceStateChange
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from agent.base.supervise import supervise
from agent.cluster.clock import wall_s
from agent.cluster.peers import Peer, PeerTable
from agent.cluster.trust import Trust

SERVICE = "_prism._tcp.local."
RESOLVE_TIMEOUT_MS = 3000
#: How long to ask whether our instance name is taken before claiming it.
NAME_CHECK_MS = 1000
#: Signed adverts are re-signed this often and refused past the larger age.
ADVERT_REFRESH_S = 60.0
ADVERT_MAX_AGE_S = 150.0
log = structlog.get_logger("prism.discovery")


def txt(info: AsyncServiceInfo) -> dict[str, str]:
    """An advert's TXT record as text, whatever bytes it holds."""
    return {
        k.decode("utf-8", errors="replace"): (v or b"").decode("utf-8", errors="replace")
        for k, v in (info.properties or {}).items()
        if isinstance(k, bytes)
    }


def advert(
    node: str,
    cluster: str,
    address: str,
    port: int,
    version: str,
    models: list[str],
    trust: Trust | None = None,
    name: str | None = None,
) -> AsyncServiceInfo:
    """This node's service record (signed when the cluster has a secret)."""
    props = {"node": node, "cluster": cluster, "version": version, "models": ",".join(models), "addr": address}
    if trust is not None:
        props = trust.admission.sign(props, wall_s())
    instance = name or f"{node}.{SERVICE}"
    # The host the SRV record names. zeroconf registers a record without one under its
    # instance name but refuses to update it (``ServiceInfo must have a server``), so it is
    # set here, to that same name: every re-signed record keeps the host of the first, and
    # it is unique wherever the instance name is (a node id may be the box's own host name,
    # which Avahi already answers for).
    return AsyncServiceInfo(
        SERVICE, instance, server=instance, addresses=[socket.inet_aton(address)], port=port, properties=props
    )


def peer_from(info: AsyncServiceInfo) -> Peer | None:
    """A Peer from a resolved record, or None when it lacks what we need."""
    props = txt(info)
    addresses = info.parsed_addresses(IPVersion.V4Only)
    if not props.get("node") or not props.get("cluster") or not addresses:
        return None
    return Peer(
        node=props["node"],
        cluster=props["cluster"],
        address=props.get("addr") or addresses[0],
        version=props.get("version", ""),
    )


class Discovery:
    """Registers our advert and keeps ``table`` up to date (async context manager)."""

    def __init__(
        self,
        table: PeerTable,
        make_info: Callable[[str | None], AsyncServiceInfo],
        interfaces: list[str],
        trust: Trust,
        on_change: Callable[[], None] | None = None,
        check: Callable[[str], None] | None = None,
        name_check_ms: int | None = None,
    ) -> None:
        self.table = table
        # How long a start asks whether its name is taken (None: NAME_CHECK_MS, read now).
        self.name_check_ms = NAME_CHECK_MS if name_check_ms is None else name_check_ms
        self.make_info = make_info  # a fresh (re-signed) record, under a given instance name
        self.info = make_info(None)
        self._signed_s = time.monotonic()  # when ``info`` was signed
        self.interfaces = interfaces
        self.trust = trust
        self.on_change = on_change or (lambda: None)
        self.check = check or (lambda node: None)
        self._zc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Discovery:
        self._zc = AsyncZeroconf(interfaces=self.interfaces, ip_version=IPVersion.V4Only)
        await self._zc.zeroconf.async_wait_for_start()
        wanted = self.info.name
        name = await self._free_name(wanted)
        if name != wanted:
            self.info = self.make_info(name)
            self._signed_s = time.monotonic()
        await self._zc.async_register_service(self.info, allow_name_change=True)
        if self.info.name != wanted:
            log.warning("mdns_name_taken", wanted=wanted, now=self.info.name, hint="another host holds the name")
        self._browser = AsyncServiceBrowser(self._zc.zeroconf, SERVICE, handlers=[self._changed])
        if not self.trust.open:
            self._own(supervise("mdns-refresh", self._refresh), "mdns-refresh")
        log.info("mdns_started", interfaces=self.interfaces, name=self.info.name)
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        # Teardown in a fixed order: browser, then our service, then the socket.
        for task in list(self._tasks):
            task.cancel()
        if self._browser is not None:
            await self._browser.async_cancel()
        if self._zc is not None:
            await self._zc.async_unregister_all_services()
            await self._zc.async_close()

    async def _free_name(self, wanted: str) -> str:
        """``wanted``, or ``node-2``, ``node-3``... when another host answers for it. (Probing
        alone misses a holder that answers late; asking first does not.) A wait that took far
        longer than asked (this process was starved, e.g. by a busy box while it starts) may
        have missed the answer: the name is asked for again, up to three times."""
        assert self._zc is not None
        base = wanted.removesuffix(f".{SERVICE}")
        for n in range(1, 10):
            name = wanted if n == 1 else f"{base}-{n}.{SERVICE}"
            if not await self._answered(name):
                return name
        return wanted  # let zeroconf's own probing pick one

    async def _answered(self, name: str) -> bool:
        """Does another host answer for ``name``?"""
        assert self._zc is not None
        for attempt in range(3):
            info = AsyncServiceInfo(SERVICE, name)
            start = time.monotonic()
            if await info.async_request(self._zc.zeroconf, self.name_check_ms) or info.properties:
                return True
            # A single unanswered ask can miss a holder whose first answer was lost (the
            # name-conflict bed test failed 2 in 3 that way): the wanted name is always asked twice.
            if attempt >= 1 and time.monotonic() - start < 1.5 * self.name_check_ms / 1e3:
                return False
        return False

    def _own(self, coro: Any, name: str) -> None:
        task = asyncio.get_running_loop().create_task(_logged(coro, name), name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _refresh(self) -> None:
        """Re-sign the advert every :data:`ADVERT_REFRESH_S`, so the signed one is always recent.
        Supervised: a failed update is logged and retried after a short backoff, at once
        (the advert is overdue by then), not after another full period."""
        while True:
            due_s = self._signed_s + ADVERT_REFRESH_S - time.monotonic()
            if due_s > 0:
                await asyncio.sleep(due_s)
            assert self._zc is not None
            self.info = self.make_info(self.info.name)
            broadcast = await self._zc.async_update_service(self.info)
            self._signed_s = time.monotonic()
            await broadcast
            log.debug("mdns_advert_signed", name=self.info.name)

    def _changed(self, zeroconf: Any, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        if name == self.info.name:
            return
        if state_change is ServiceStateChange.Removed:
            node = name.removesuffix(f".{SERVICE}")
            if self.trust.open:
                self.table.offline(node)
                self.on_change()
            else:  # anyone on the link can send a goodbye: check instead of dropping
                self.check(node)
            return
        self._own(self._resolve(zeroconf, name), f"mdns-resolve-{name[:40]}")

    async def _resolve(self, zeroconf: Any, name: str) -> None:
        info = AsyncServiceInfo(SERVICE, name)
        if not await info.async_request(zeroconf, RESOLVE_TIMEOUT_MS):
            return
        peer = peer_from(info)
        if peer is None:
            log.info("mdns_advert_ignored", name=name[:80], reason="incomplete")
            return
        if peer.cluster != self.table.cluster:
            log.debug("mdns_advert_ignored", name=name[:80], reason="other cluster", cluster=peer.cluster[:64])
            return
        if not self.trust.accept(txt(info), peer.node, "advert", wall_s(), ADVERT_MAX_AGE_S):
            log.warning("admission_refused", node=peer.node[:64], address=peer.address, via="mdns")
            return
        if self.table.seen(peer, time.monotonic()):
            log.info("peer_seen", node=peer.node, address=peer.address, via="mdns")
            self.on_change()


async def _logged(coro: Any, name: str) -> None:
    try:
        await coro
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("mdns_task_failed", task=name)
