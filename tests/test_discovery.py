"""mDNS discovery on real zeroconf bound to 127.0.0.1: a signed advert stays fresh for good."""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from typing import Any

import pytest
from structlog.testing import capture_logs
from zeroconf import IPVersion, ServiceStateChange
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from agent.cluster import discovery as discovery_module
from agent.cluster.admission import Admission
from agent.cluster.discovery import SERVICE, Discovery, advert, txt
from agent.cluster.peers import PeerTable
from agent.cluster.trust import Trust

pytestmark = pytest.mark.usefixtures("quick_name_check")
SECRET = b"0123456789abcdef-cluster-secret"
#: Shrunk from a minute and 150 s, so that a run spans several refreshes and an advert left
#: unrefreshed goes stale within the test.
REFRESH_S = 0.4
MAX_AGE_S = 1.5


def member(node: str, cluster: str, on_change: Any = None, failures: int = 0) -> Discovery:
    """A node's discovery with the cluster secret, advertising on loopback only; its first
    ``failures`` re-signs raise."""
    trust = Trust(Admission(SECRET, cluster))
    calls = itertools.count()

    def make_info(name: str | None) -> AsyncServiceInfo:
        if 0 < next(calls) <= failures:
            raise OSError("injected: the advert could not be signed")
        return advert(node, cluster, "127.0.0.1", 9, "test", ["bert"], trust, name)

    return Discovery(PeerTable(cluster, node), make_info, ["127.0.0.1"], trust, on_change=on_change)


async def signed_adverts(name: str, cluster: str, until_age_s: float) -> list[dict[str, str]]:
    """Every version of ``name``'s advert a browser on loopback sees (each signed by a member),
    until three were seen and the last was signed ``until_age_s`` after the first."""
    changes: asyncio.Queue[ServiceStateChange] = asyncio.Queue()

    def changed(zeroconf: Any, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        if name == wanted:
            changes.put_nowait(state_change)

    wanted = name
    checker = Admission(SECRET, cluster)
    zc = AsyncZeroconf(interfaces=["127.0.0.1"], ip_version=IPVersion.V4Only)
    browser = AsyncServiceBrowser(zc.zeroconf, SERVICE, handlers=[changed])
    seen: list[dict[str, str]] = []
    try:
        while len(seen) < 3 or float(seen[-1]["ts"]) - float(seen[0]["ts"]) < until_age_s:
            try:
                change = await asyncio.wait_for(changes.get(), 10)
            except asyncio.TimeoutError:
                pytest.fail(f"the advert was not re-signed within 10 s; versions seen: {len(seen)}")
            assert change is not ServiceStateChange.Removed
            info = AsyncServiceInfo(SERVICE, name)
            assert await info.async_request(zc.zeroconf, 3000)
            fields = txt(info)
            assert checker.verify(fields, time.time(), max_age_s=60.0), fields
            if not seen or fields["seq"] != seen[-1]["seq"]:
                seen.append(fields)
    finally:
        await browser.async_cancel()
        await zc.async_close()
    return seen


@pytest.mark.timeout(90)
async def test_a_signed_advert_is_re_signed_and_a_peer_starting_later_admits_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(discovery_module, "ADVERT_REFRESH_S", REFRESH_S)
    monkeypatch.setattr(discovery_module, "ADVERT_MAX_AGE_S", MAX_AGE_S)
    run = uuid.uuid4().hex[:8]  # other tests' agents may advertise on loopback too
    cluster, first, late = f"disc-{run}", f"first-{run}", f"late-{run}"
    found = asyncio.Event()
    with capture_logs() as logs:
        async with member(first, cluster) as advertiser:
            seen = await signed_adverts(advertiser.info.name, cluster, until_age_s=MAX_AGE_S)
            # Re-signed again and again, each time with a new sequence number: by now the
            # first advert is too old for any peer.
            assert len(seen) >= 3
            assert [int(f["seq"]) for f in seen] == sorted({int(f["seq"]) for f in seen})
            async with member(late, cluster, on_change=found.set) as peer:
                await asyncio.wait_for(found.wait(), 15)
                admitted = peer.table.get(first)
                assert admitted is not None
                assert admitted.address == "127.0.0.1"
    failed = [e for e in logs if e["event"].endswith("_task_failed") or e["event"] == "loop_crashed"]
    assert not failed, failed


@pytest.mark.timeout(60)
async def test_a_failed_refresh_is_retried_not_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(discovery_module, "ADVERT_REFRESH_S", REFRESH_S)
    run = uuid.uuid4().hex[:8]
    cluster = f"disc-{run}"
    with capture_logs() as logs:
        async with member(f"flaky-{run}", cluster, failures=1) as advertiser:
            seen = await signed_adverts(advertiser.info.name, cluster, until_age_s=MAX_AGE_S)
    assert len(seen) >= 3
    crashes = [e for e in logs if e["event"] == "loop_crashed"]
    assert [e["loop"] for e in crashes] == ["mdns-refresh"]  # logged once, then signed again
