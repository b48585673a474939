"""mDNS discovery: advertise this node as ``_prism._tcp.local.`` and browse for peers.

TXT records carry node id, cluster, version, the GLOO address and the models served.
Adverts of other clusters are ignored. ``interfaces`` pins where multicast goes (tests in
the root namespace use ``["127.0.0.1"]`` only).
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

from agent.cluster.admission import Admission
from agent.cluster.peers import Peer, PeerTable

SERVICE = "_prism._tcp.local."
RESOLVE_TIMEOUT_MS = 3000
log = structlog.get_logger("prism.discovery")


#: Adverts are static records: their proof shows the key, not freshness (health and group
#: control messages carry the fresh proofs), so they are accepted for a long time.
ADVERT_MAX_AGE_S = 30 * 86400.0


def advert(
    node: str,
    cluster: str,
    address: str,
    port: int,
    version: str,
    models: list[str],
    admission: Admission | None = None,
) -> AsyncServiceInfo:
    """This node's service record (signed when the cluster has a secret)."""
    props = {"node": node, "cluster": cluster, "version": version, "models": ",".join(models), "addr": address}
    if admission is not None:
        props = admission.sign(props, time.time())
    return AsyncServiceInfo(
        SERVICE, f"{node}.{SERVICE}", addresses=[socket.inet_aton(address)], port=port, properties=props
    )


def peer_from(info: AsyncServiceInfo) -> Peer | None:
    """A Peer from a resolved record, or None when it lacks what we need."""
    props = {k.decode(): (v or b"").decode(errors="replace") for k, v in info.properties.items()}
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
        info: AsyncServiceInfo,
        interfaces: list[str],
        on_change: Callable[[], None] | None = None,
        admission: Admission | None = None,
    ) -> None:
        self.admission = admission
        self.table = table
        self.info = info
        self.interfaces = interfaces
        self.on_change = on_change or (lambda: None)
        self._zc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Discovery:
        self._zc = AsyncZeroconf(interfaces=self.interfaces, ip_version=IPVersion.V4Only)
        await self._zc.async_register_service(self.info)
        self._browser = AsyncServiceBrowser(self._zc.zeroconf, SERVICE, handlers=[self._changed])
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

    def _changed(self, zeroconf: Any, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        if state_change is ServiceStateChange.Removed:
            node = name.removesuffix(f".{SERVICE}")
            self.table.offline(node)
            self.on_change()
            return
        task = asyncio.get_running_loop().create_task(self._resolve(zeroconf, name), name=f"mdns-resolve-{name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resolve(self, zeroconf: Any, name: str) -> None:
        info = AsyncServiceInfo(SERVICE, name)
        if not await info.async_request(zeroconf, RESOLVE_TIMEOUT_MS):
            return
        peer = peer_from(info)
        if peer is None:
            log.info("mdns_advert_ignored", name=name, reason="incomplete")
            return
        props = {k.decode(): (v or b"").decode(errors="replace") for k, v in info.properties.items()}
        in_cluster = peer.cluster == self.table.cluster
        if (
            in_cluster
            and self.admission is not None
            and not self.admission.verify(props, time.time(), ADVERT_MAX_AGE_S)
        ):
            log.warning("admission_refused", node=peer.node, address=peer.address, via="mdns")
            return
        if self.table.seen(peer, time.monotonic()):
            log.info("peer_seen", node=peer.node, address=peer.address, via="mdns")
            self.on_change()
        elif peer.cluster != self.table.cluster:
            log.debug("mdns_advert_ignored", name=name, reason="other cluster", cluster=peer.cluster)
