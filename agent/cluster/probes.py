"""Active link probes: a tiny TCP service on every agent, and a client that times it.

The probe sends a few 1-byte pings (round-trip time), then ``payload_bytes`` that the
server acknowledges once all have arrived (bandwidth = bytes / time, one RTT subtracted).
Short on purpose: a probe must not compete with real work.
"""

from __future__ import annotations

import asyncio
import socket
import time
from types import TracebackType

PING, BULK = b"p", b"b"


class ProbeServer:
    """Answers pings and acknowledges bulk transfers (async context manager)."""

    def __init__(self, address: str, port: int = 0) -> None:
        self.address = address
        self.port = port
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> ProbeServer:
        self._server = await asyncio.start_server(self._serve, self.address, self.port)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                kind = await reader.readexactly(1)
                if kind == PING:
                    writer.write(PING)
                elif kind == BULK:
                    size = int.from_bytes(await reader.readexactly(4), "big")
                    if size > 64 * 1024 * 1024:
                        break
                    while size:
                        size -= len(await reader.read(min(size, 1 << 16)))
                    writer.write(BULK)
                else:
                    break
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def probe(
    address: str, port: int, *, pings: int = 3, payload_bytes: int = 256 * 1024, timeout_s: float = 5.0
) -> tuple[float, float]:
    """(RTT ms, Mbit/s) to a probe server; raises OSError / TimeoutError on failure."""

    async def run() -> tuple[float, float]:
        reader, writer = await asyncio.open_connection(address, port)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            rtts = []
            for _ in range(pings):
                start = time.perf_counter()
                writer.write(PING)
                await writer.drain()
                await reader.readexactly(1)
                rtts.append(time.perf_counter() - start)
            rtt = min(rtts)
            start = time.perf_counter()
            writer.write(BULK + payload_bytes.to_bytes(4, "big") + bytes(payload_bytes))
            await writer.drain()
            await reader.readexactly(1)
            elapsed = max(time.perf_counter() - start - rtt, 1e-6)
            return rtt * 1e3, payload_bytes * 8 / elapsed / 1e6
        finally:
            writer.close()

    return await asyncio.wait_for(run(), timeout_s)
