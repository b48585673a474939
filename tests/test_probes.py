"""The probe server under hostile or broken clients, and probes sized to the link."""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import time
from collections.abc import Callable

import pytest

from agent.cluster.links import STALE_ROUNDS, LinkTable, RunsWith, probe_loop
from agent.cluster.peers import Peer, PeerTable
from agent.cluster.probes import GREETING, MAX_PROBE_BYTES, MIN_PROBE_BYTES, ProbeServer, probe, probe_bytes


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def send_and_close(port: int, data: bytes) -> None:
    _reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    writer.close()  # FIN: the server sees end of stream


async def test_half_a_bulk_header_then_eof_does_not_spin_the_loop() -> None:
    async with ProbeServer("127.0.0.1", read_timeout_s=5) as server:
        header = GREETING + b"b" + (1 << 20).to_bytes(4, "big")  # a bulk of 1 MiB announced, then nothing
        for _ in range(20):
            await send_and_close(server.port, header)
        start = time.monotonic()
        for _ in range(20):  # the loop stays responsive: each tick comes on time
            await asyncio.sleep(0.01)
        assert time.monotonic() - start < 0.5
        rtt_ms, mbps = await probe("127.0.0.1", server.port, payload_bytes=1 << 20)
        assert rtt_ms > 0
        assert mbps > 10
        await asyncio.sleep(0.1)
        assert server.open_connections == 0


async def test_garbage_and_idle_connections_are_closed_and_capped() -> None:
    async with ProbeServer("127.0.0.1", max_connections=8, read_timeout_s=0.5) as server:
        baseline = open_fds()
        for junk in (b"GET / HTTP/1.0\r\n\r\n", os.urandom(64), b"", GREETING + b"z"):
            await send_and_close(server.port, junk)
        idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(40)]
        await asyncio.sleep(0.2)
        assert server.open_connections <= 8  # the rest were closed at once
        assert server.refused >= 32
        await asyncio.sleep(0.8)  # past the read timeout: the idle ones are closed too
        assert server.open_connections == 0
        for sock in idle:
            sock.close()
        await asyncio.sleep(0.1)
        assert open_fds() <= baseline + 2
        await probe("127.0.0.1", server.port)  # and it still serves


async def test_a_port_that_is_not_a_probe_server_gets_no_bulk() -> None:
    got = bytearray()

    async def other_service(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        got.extend(await reader.read(1 << 20))
        writer.write(b"HTTP/1.0 400 Bad Request\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(other_service, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    with pytest.raises(ConnectionError):
        await probe("127.0.0.1", port, payload_bytes=1 << 20)
    server.close()
    assert len(got) <= len(GREETING)  # the greeting, never the megabyte


@pytest.mark.parametrize(
    ("mbps", "size"),
    [(None, 256 << 10), (1.0, MIN_PROBE_BYTES), (100.0, 3_125_000), (1000.0, MAX_PROBE_BYTES)],
)
def test_probes_are_sized_to_the_link(mbps: float | None, size: int) -> None:
    assert probe_bytes(mbps) == size


async def test_a_bulk_that_outruns_its_time_bounds_the_link_instead_of_failing() -> None:
    from agent.cluster.probes import PING, SlowLink

    async def stalls_on_bulk(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A probe server on a link that crawls: greets, answers pings, never finishes a bulk."""
        await reader.readexactly(len(GREETING))
        writer.write(GREETING)
        while await reader.readexactly(1) == PING:
            writer.write(PING)
            await writer.drain()
        await asyncio.sleep(30)

    server = await asyncio.start_server(stalls_on_bulk, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    with pytest.raises(SlowLink) as slow:
        await probe("127.0.0.1", port, payload_bytes=1 << 20, timeout_s=1.0)
    server.close()
    assert 0 < slow.value.mbps < 1 * 8 / 0.5  # 1 MiB not through in ~1 s: under ~16 Mbit/s


async def test_a_fast_link_is_read_with_a_payload_sized_to_it_in_the_first_round(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A first probe knows nothing of the link and sends 256 KiB: on a link of gigabits that
    # times TCP's slow start (a veth link of 2-3 Gbit/s read 307 Mbit/s), and splits were
    # priced on it for a whole round (30 s by default). The loop probes again at once, sized.
    import agent.cluster.links as links_module

    sent: list[int] = []

    async def counted(address: str, port: int, *, payload_bytes: int) -> tuple[float, float]:
        sent.append(payload_bytes)
        return await probe(address, port, payload_bytes=payload_bytes)

    monkeypatch.setattr(links_module, "probe", counted)
    async with ProbeServer("127.0.0.1") as server:
        peers = PeerTable("c", me="me")
        peers.seen(Peer("p", "c", "127.0.0.1", probe_port=server.port), time.monotonic())
        links = LinkTable()
        task = asyncio.ensure_future(probe_loop(peers, links, 60.0))  # one round in this test

        def read_with_a_sized_probe() -> bool:
            estimate = links.links.get("p")
            if estimate is None or estimate.mbps is None or estimate.samples != len(sent):
                return False
            return sent[-1] >= links_module.UNDERSIZED * probe_bytes(estimate.mbps)

        try:
            await _until(lambda: len(sent) >= 2 and read_with_a_sized_probe(), 10.0)
        finally:
            task.cancel()
    assert sent[0] == 256 << 10
    assert sent[1] > 4 * sent[0]  # loopback carries gigabits: the next is sized to what the first read
    assert len(sent) <= 1 + links_module.RESIZES


async def _probed(peers: PeerTable, runs: RunsWith) -> tuple[LinkTable, float]:
    """Run the probe loop for half a second with ``runs``; what it measured."""
    links = LinkTable()
    task = asyncio.ensure_future(probe_loop(peers, links, 0.01, runs))
    await asyncio.sleep(0.5)
    task.cancel()
    return links, time.monotonic()


async def test_the_probe_loop_keeps_off_a_link_a_run_is_using() -> None:
    # A probe during a split reads only what the run's exchanges leave of the link (a quarter
    # of a 20 Mbit/s link on the test bed), and the policy priced the next split on that.
    async with ProbeServer("127.0.0.1") as server:
        peers = PeerTable("c", me="me")
        peers.seen(Peer("p", "c", "127.0.0.1", probe_port=server.port), time.monotonic())
        links, _ = await _probed(peers, lambda node: (True, 1))  # a run is on: no probe
        assert "p" not in links.links
        links, _ = await _probed(peers, lambda node: (False, 1))  # the link is free: probed
        assert links.links["p"].mbps is not None
        asked = itertools.count()
        # Free when asked before each probe, a run begun when asked after it: every sample is thrown away.
        links, _ = await _probed(peers, lambda node: (False, 1) if next(asked) % 2 == 0 else (True, 2))
        assert next(asked) > 2
        assert "p" not in links.links


async def test_the_probe_loop_holds_back_while_the_engine_works_until_the_estimate_is_stale() -> None:
    # A probe's bulk transfer costs a running job CPU: while the engine works a known link is
    # left alone, an unknown or stale one is still measured.
    async with ProbeServer("127.0.0.1") as server:
        peers = PeerTable("c", me="me")
        peers.seen(Peer("p", "c", "127.0.0.1", probe_port=server.port), time.monotonic())
        links = LinkTable()
        interval_s = 0.05
        task = asyncio.ensure_future(probe_loop(peers, links, interval_s, busy=lambda: True))
        try:
            await _until(lambda: "p" in links.links, 5.0)  # unknown: probed although busy
            first = links.links["p"].measured_s
            assert first is not None
            stale_s = STALE_ROUNDS * interval_s
            await _until(lambda: links.links["p"].measured_s != first, 5.0)  # re-probed once stale
            second = links.links["p"].measured_s
            assert second is not None
            assert second - first >= stale_s
        finally:
            task.cancel()


async def _until(condition: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_an_address_that_is_not_a_probe_server_is_left_alone_for_the_back_off() -> None:
    # A forged health may name anyone's host:port as a probe endpoint (tests/test_faults.py
    # runs that on the bed): the loop greets it, then leaves it alone for the back-off.
    from agent.base.config import load_settings

    greeted = [0]

    async def other_service(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        greeted[0] += 1
        await reader.read(64)
        writer.write(b"HTTP/1.0 400 Bad Request\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(other_service, "127.0.0.1", 0)
    peers = PeerTable("c", me="me")
    peers.seen(Peer("p", "c", "127.0.0.1", probe_port=server.sockets[0].getsockname()[1]), time.monotonic())
    try:
        for backoff_s, most in ((LinkTable().probe_backoff_s, 1), (0.2, 10)):
            greeted[0] = 0
            task = asyncio.ensure_future(probe_loop(peers, LinkTable(probe_backoff_s=backoff_s), 0.01))
            await _until(lambda: greeted[0] >= 1, 5.0)
            if most > 1:
                await _until(lambda: greeted[0] >= 3, 5.0)  # greeted again once each back-off is up
            else:
                await asyncio.sleep(0.5)  # fifty rounds of the loop: none greets it again
            task.cancel()
            assert 1 <= greeted[0] <= most, (backoff_s, greeted[0])
    finally:
        server.close()
    assert LinkTable().probe_backoff_s == load_settings(None, {"PRISM_NODE_ID": "n"}, {}).probe_backoff_s == 60.0
