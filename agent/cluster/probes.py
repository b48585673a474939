"""Active link probes: a small TCP service on every agent, and a client that times it.

A probe opens with a fixed greeting both ways (so nothing is sent to a port that is not a
prism agent), sends a few 1-byte pings (round-trip time), then ``payload_bytes`` that the
server acknowledges once all have arrived (bandwidth = bytes / time, one RTT subtracted).
The client sizes the payload to the link (:func:`probe_bytes`: about a quarter of a second
of transfer at the last estimate), so fast links are not underestimated and slow ones not
flooded.

The server is exposed to the network, so it defends itself: at most ``max_connections`` at
once (more are closed at once), every read has a timeout and every connection a lifetime,
end of stream ends the connection, and bulk bytes per remote address are rate-limited.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from dataclasses import dataclass, field
from types import TracebackType

import structlog

log = structlog.get_logger("prism.probes")

GREETING = b"PRISM-PROBE/2\n"
PING, BULK = b"p", b"b"
#: Bulk transfers: the largest one, and what one remote address may send per minute.
MAX_BULK_BYTES = 32 << 20
BULK_BYTES_PER_MIN = 128 << 20
#: Probe sizes the client picks from (see :func:`probe_bytes`).
MIN_PROBE_BYTES, MAX_PROBE_BYTES = 64 << 10, 16 << 20
PROBE_TARGET_S = 0.25


def probe_bytes(mbps: float | None) -> int:
    """Payload for the next probe: ~``PROBE_TARGET_S`` of transfer at ``mbps`` (256 KiB when unknown)."""
    if mbps is None or mbps <= 0:
        return 256 << 10
    want = int(mbps * 1e6 / 8 * PROBE_TARGET_S)
    return max(MIN_PROBE_BYTES, min(MAX_PROBE_BYTES, want))


@dataclass(slots=True)
class _Budget:
    """Bulk bytes a remote address may still send this minute."""

    left: float = float(BULK_BYTES_PER_MIN)
    at_s: float = field(default_factory=time.monotonic)

    def take(self, size: int) -> bool:
        now = time.monotonic()
        self.left = min(BULK_BYTES_PER_MIN, self.left + (now - self.at_s) * BULK_BYTES_PER_MIN / 60.0)
        self.at_s = now
        if size > self.left:
            return False
        self.left -= size
        return True


class ProbeServer:
    """Answers pings and acknowledges bulk transfers (async context manager)."""

    def __init__(
        self,
        address: str,
        port: int = 0,
        *,
        max_connections: int = 32,
        read_timeout_s: float = 5.0,
        lifetime_s: float = 60.0,
    ) -> None:
        self.address = address
        self.port = port
        self.max_connections = max_connections
        self.read_timeout_s = read_timeout_s
        self.lifetime_s = lifetime_s
        self.open_connections = 0
        self.refused = 0
        self._server: asyncio.Server | None = None
        self._budgets: dict[str, _Budget] = {}

    async def __aenter__(self) -> ProbeServer:
        self._server = await asyncio.start_server(self._serve, self.address, self.port)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.open_connections >= self.max_connections:
            self.refused += 1
            writer.transport.abort()
            return
        self.open_connections += 1
        try:
            await asyncio.wait_for(self._talk(reader, writer), self.lifetime_s)
        except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError, OSError, ValueError):
            pass  # a slow, silent, garbled or vanished client: just close
        finally:
            self.open_connections -= 1
            writer.transport.abort()

    async def _read(self, reader: asyncio.StreamReader, n: int) -> bytes:
        return await asyncio.wait_for(reader.readexactly(n), self.read_timeout_s)

    async def _talk(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if await self._read(reader, len(GREETING)) != GREETING:
            return
        writer.write(GREETING)
        peer = writer.get_extra_info("peername")
        budget = self._budgets.setdefault(str(peer[0]) if peer else "?", _Budget())
        if len(self._budgets) > 4096:
            self._budgets.clear()
        while True:
            await writer.drain()
            kind = await self._read(reader, 1)
            if kind == PING:
                writer.write(PING)
                continue
            if kind != BULK:
                return
            size = int.from_bytes(await self._read(reader, 4), "big")
            if size > MAX_BULK_BYTES or not budget.take(size):
                return
            while size:
                chunk = await asyncio.wait_for(reader.read(min(size, 1 << 16)), self.read_timeout_s)
                if not chunk:
                    return  # end of stream mid-transfer
                size -= len(chunk)
            writer.write(BULK)


async def answers(address: str, port: int, timeout_s: float = 2.0) -> bool:
    """Whether a prism probe server answers at ``address:port`` (a greeting and one ping)."""

    async def run() -> None:
        reader, writer = await asyncio.open_connection(address, port)
        try:
            writer.write(GREETING + PING)
            await writer.drain()
            if await reader.readexactly(len(GREETING) + 1) != GREETING + PING:
                raise ConnectionError("not a prism probe server")
        finally:
            writer.transport.abort()

    try:
        await asyncio.wait_for(run(), timeout_s)
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError):
        return False
    return True


class SlowLink(asyncio.TimeoutError):
    """The probe server answered, but the bulk transfer did not finish in time: the link is
    slower than the payload was sized for. ``mbps`` is an upper bound on its rate."""

    def __init__(self, mbps: float) -> None:
        super().__init__(f"bulk transfer not done in time: the link moves under {mbps:.2f} Mbit/s")
        self.mbps = mbps


async def probe(
    address: str, port: int, *, pings: int = 3, payload_bytes: int = 256 << 10, timeout_s: float = 5.0
) -> tuple[float, float]:
    """(RTT ms, Mbit/s) to a probe server; raises OSError / TimeoutError on failure,
    ConnectionError when the other side is not a prism agent's probe server, and
    :class:`SlowLink` when only the bulk transfer ran out of time."""
    greeted = asyncio.Event()
    bulk_start = [0.0]

    async def run() -> tuple[float, float]:
        reader, writer = await asyncio.open_connection(address, port)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            writer.write(GREETING)
            await writer.drain()
            if await reader.readexactly(len(GREETING)) != GREETING:
                raise ConnectionError(f"{address}:{port} is not a prism probe server")
            greeted.set()
            rtts = []
            for _ in range(pings):
                start = time.perf_counter()
                writer.write(PING)
                await writer.drain()
                await reader.readexactly(1)
                rtts.append(time.perf_counter() - start)
            rtt = min(rtts)
            start = bulk_start[0] = time.perf_counter()
            writer.write(BULK + payload_bytes.to_bytes(4, "big") + bytes(payload_bytes))
            await writer.drain()
            await reader.readexactly(1)
            elapsed = max(time.perf_counter() - start - rtt, 1e-6)
            return rtt * 1e3, payload_bytes * 8 / elapsed / 1e6
        except asyncio.IncompleteReadError as exc:
            raise ConnectionError(f"{address}:{port} closed the probe early") from exc
        finally:
            writer.transport.abort()

    try:
        return await asyncio.wait_for(run(), timeout_s)
    except asyncio.TimeoutError:
        if greeted.is_set() and bulk_start[0]:
            raise SlowLink(payload_bytes * 8 / (time.perf_counter() - bulk_start[0]) / 1e6) from None
        raise
