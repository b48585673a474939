"""A hostile host's tools, run inside a bed namespace by the security tests
(``python -m testbed.rogue COMMAND``): capture and replay broker traffic, forge unsigned
messages, replay or squat mDNS adverts, send mDNS goodbyes, hammer or burst TCP ports, hold every
slot of a probe server, and stand in for a third party that counts what it is sent. Each prints
one JSON summary on stdout, also when a SIGTERM ends it before its ``--seconds`` are up (a test
stops an attack once it has seen what it waited for).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import select
import signal
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

SERVICE = "_prism._tcp.local."


class Window:
    """How long a command runs: ``seconds``, or until a SIGTERM."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds
        self.stopped = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, self.stopped.set)

    def open(self) -> bool:
        """Still within the window."""
        return not self.stopped.is_set() and time.monotonic() < self.deadline

    async def sleep(self, seconds: float) -> None:
        """``seconds``, or less when the window closes first."""
        left = min(seconds, self.deadline - time.monotonic())
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.stopped.wait(), max(left, 0.0))

    async def close(self) -> None:
        """Until the window closes."""
        await self.sleep(self.deadline - time.monotonic())


def _client(host: str, port: int) -> Any:
    import aiomqtt

    return aiomqtt.Client(host, port, identifier=f"rogue-{time.monotonic_ns()}", protocol=aiomqtt.ProtocolVersion.V5)


async def capture(host: str, port: int, topics: list[str], seconds: float) -> dict[str, Any]:
    """Record every message on ``topics`` (retained ones included) for ``seconds``."""
    got: list[dict[str, Any]] = []
    window = Window(seconds)
    async with _client(host, port) as client:
        for topic in topics:
            await client.subscribe(topic, qos=1)

        async def read() -> None:
            async for m in client.messages:
                raw = m.payload if isinstance(m.payload, bytes) else str(m.payload).encode()
                got.append({"topic": str(m.topic), "payload": base64.b64encode(raw).decode(), "retain": m.retain})

        reading = asyncio.ensure_future(read())
        await window.close()
        reading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reading
    return {"captured": got}


async def replay(
    host: str, port: int, items: list[dict[str, Any]], every_s: float, seconds: float, retain: bool
) -> dict[str, Any]:
    """Publish the captured messages again, all of them every ``every_s``, for ``seconds``."""
    sent = 0
    window = Window(seconds)
    async with _client(host, port) as client:
        while window.open():
            for item in items:
                await client.publish(item["topic"], base64.b64decode(item["payload"]), qos=1, retain=retain)
                sent += 1
            await window.sleep(every_s)
    return {"sent": sent}


async def forge(host: str, port: int, topic: str, payload: str, every_s: float, seconds: float) -> dict[str, Any]:
    """Publish ``payload`` (unsigned) to ``topic`` every ``every_s`` for ``seconds``."""
    sent = 0
    window = Window(seconds)
    async with _client(host, port) as client:
        while window.open():
            await client.publish(topic, payload.encode(), qos=1, retain=topic.endswith("/status"))
            sent += 1
            await window.sleep(every_s)
    return {"sent": sent}


async def mdns(address: str, action: str, name: str, props: dict[str, str], seconds: float, every_s: float) -> Any:
    """``register`` an advert under ``name`` (a squatter, or a replayed advert) and hold it for
    ``seconds``; or send a ``goodbye`` for ``name`` (TTL 0) every ``every_s``."""
    from zeroconf import DNSOutgoing, DNSPointer, IPVersion  # type: ignore[attr-defined]
    from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

    window = Window(seconds)
    azc = AsyncZeroconf(interfaces=[address], ip_version=IPVersion.V4Only)
    await azc.zeroconf.async_wait_for_start()
    try:
        if action == "register":
            info = AsyncServiceInfo(
                SERVICE, f"{name}.{SERVICE}", addresses=[socket.inet_aton(address)], port=9, properties=props
            )
            await azc.async_register_service(info, allow_name_change=False)
            await window.close()
            return {"registered": info.name}
        sent = 0
        while window.open():
            out = DNSOutgoing(0x8400)  # a response, authoritative
            out.add_answer_at_time(DNSPointer(SERVICE, 12, 1, 0, f"{name}.{SERVICE}"), 0)
            azc.zeroconf.async_send(out)
            sent += 1
            await window.sleep(every_s)
        return {"goodbyes": sent}
    finally:
        await azc.async_close()


async def read_advert(address: str, name: str, seconds: float) -> dict[str, Any]:
    """The TXT record of ``name`` as the network shows it."""
    from zeroconf import IPVersion
    from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

    azc = AsyncZeroconf(interfaces=[address], ip_version=IPVersion.V4Only)
    await azc.zeroconf.async_wait_for_start()
    try:
        info = AsyncServiceInfo(SERVICE, f"{name}.{SERVICE}")
        ok = await info.async_request(azc.zeroconf, int(seconds * 1000))
        props = {k.decode(errors="replace"): (v or b"").decode(errors="replace") for k, v in info.properties.items()}
        return {"found": bool(ok or props), "props": props}
    finally:
        await azc.async_close()


def hammer(host: str, ports: list[int], count: int) -> dict[str, Any]:
    """``count`` TCP connects to each port, each closed at once (some with garbage first)."""
    done = refused = 0
    for port in ports:
        for k in range(count):
            try:
                with socket.create_connection((host, port), timeout=2) as s:
                    if k % 3 == 0:
                        s.sendall(b"\x00GET / HTTP/1.0\r\n\r\n")
                done += 1
            except OSError:
                refused += 1
    return {"connects": done, "refused": refused}


def burst(
    host: str, ports: list[int], count: int, *, source: str = "", batch: int = 200, wait_s: float = 0.2
) -> dict[str, Any]:
    """``count`` TCP connects to each port, ``batch`` at a time, each closed once connected or
    after ``wait_s`` (a port that drops SYNs costs ``wait_s`` a batch, not a timeout a connect)."""
    tally = {"connects": 0, "refused": 0, "timeouts": 0}
    for port in ports:
        for first in range(0, count, batch):
            socks = []
            for _ in range(min(batch, count - first)):
                s = socket.socket()
                s.setblocking(False)
                s.bind((source, 0))
                s.connect_ex((host, port))
                socks.append(s)
            poll, pending = select.poll(), {s.fileno(): s for s in socks}
            for fd in pending:
                poll.register(fd, select.POLLOUT)
            end = time.monotonic() + wait_s
            while pending and (left := end - time.monotonic()) > 0:
                for fd, _ in poll.poll(left * 1000):
                    poll.unregister(fd)
                    err = pending.pop(fd).getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    tally["connects" if err == 0 else "refused"] += 1
            tally["timeouts"] += len(pending)
            for s in socks:
                s.close()
    return tally


async def hold(host: str, port: int, count: int, seconds: float) -> dict[str, Any]:
    """Hold ``count`` greeted connections to a prism probe server for ``seconds``, pinging each
    every second (so none times out) and reopening any that closes; says ``{"held": count}`` on
    stdout once all are held."""
    greeting, held, opened = b"PRISM-PROBE/2\n", [0], [0]
    deadline = time.monotonic() + seconds
    told = asyncio.Event()

    async def one() -> None:
        while time.monotonic() < deadline:
            try:
                reader, writer = await asyncio.open_connection(host, port)
                opened[0] += 1
                writer.write(greeting)
                await asyncio.wait_for(reader.readexactly(len(greeting)), 5)
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError):
                await asyncio.sleep(0.05)  # the server was full (one of its own probes held a slot)
                continue
            held[0] += 1
            try:
                while time.monotonic() < deadline:
                    if held[0] >= count and not told.is_set():
                        told.set()
                        print(json.dumps({"held": held[0]}), flush=True)  # noqa: T201 - the test waits on it
                    writer.write(b"p")
                    await asyncio.wait_for(reader.readexactly(1), 5)
                    await asyncio.sleep(1.0)
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError):
                pass
            finally:
                held[0] -= 1
                writer.transport.abort()

    await asyncio.gather(*(one() for _ in range(count)))
    return {"opened": opened[0]}


async def third_party(address: str, port: int, seconds: float) -> dict[str, Any]:
    """A service that is not a prism agent: count connections and bytes, per source, for ``seconds``."""
    seen: dict[str, list[int]] = {}

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        source = str(writer.get_extra_info("peername")[0])
        entry = seen.setdefault(source, [0, 0])
        entry[0] += 1
        try:
            while data := await asyncio.wait_for(reader.read(65536), 10):
                entry[1] += len(data)
        except (asyncio.TimeoutError, ConnectionError):
            pass
        writer.close()

    window = Window(seconds)
    server = await asyncio.start_server(serve, address, port)
    await window.close()
    server.close()
    return {"sources": {k: {"connections": v[0], "bytes": v[1]} for k, v in seen.items()}}


def main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m testbed.rogue")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("capture")
    c.add_argument("--topic", action="append", required=True)
    for name in ("replay", "forge", "capture"):
        q = c if name == "capture" else sub.add_parser(name)
        q.add_argument("--host", required=True)
        q.add_argument("--port", type=int, default=1883)
        q.add_argument("--seconds", type=float, default=10.0)
    c.add_argument("--out", type=Path, required=True)
    r = sub.choices["replay"]
    r.add_argument("--file", type=Path, required=True)
    r.add_argument("--every", type=float, default=1.0)
    r.add_argument("--retain", action="store_true")
    f = sub.choices["forge"]
    f.add_argument("--topic", required=True)
    f.add_argument("--payload", required=True)
    f.add_argument("--every", type=float, default=2.0)
    m = sub.add_parser("mdns")
    m.add_argument("action", choices=["register", "goodbye", "read"])
    m.add_argument("--address", required=True)
    m.add_argument("--name", required=True)
    m.add_argument("--props", default="{}")
    m.add_argument("--seconds", type=float, default=10.0)
    m.add_argument("--every", type=float, default=2.0)
    h = sub.add_parser("hammer")
    h.add_argument("--host", required=True)
    h.add_argument("--ports", required=True)
    h.add_argument("--count", type=int, default=2000)
    b = sub.add_parser("burst")
    b.add_argument("--host", required=True)
    b.add_argument("--ports", required=True)
    b.add_argument("--count", type=int, default=2000)
    b.add_argument("--wait-s", type=float, default=0.2)
    b.add_argument("--batch", type=int, default=200)
    o = sub.add_parser("hold")
    o.add_argument("--host", required=True)
    o.add_argument("--port", type=int, required=True)
    o.add_argument("--count", type=int, default=32)
    o.add_argument("--seconds", type=float, required=True)
    t = sub.add_parser("third-party")
    t.add_argument("--address", required=True)
    t.add_argument("--port", type=int, required=True)
    t.add_argument("--seconds", type=float, required=True)
    ns = p.parse_args(argv)
    out: Any
    if ns.cmd == "capture":
        got = asyncio.run(capture(ns.host, ns.port, ns.topic, ns.seconds))
        ns.out.write_text(json.dumps(got["captured"]))
        out = {"captured": len(got["captured"])}
    elif ns.cmd == "replay":
        items = json.loads(ns.file.read_text())
        out = asyncio.run(replay(ns.host, ns.port, items, ns.every, ns.seconds, ns.retain))
    elif ns.cmd == "forge":
        out = asyncio.run(forge(ns.host, ns.port, ns.topic, ns.payload, ns.every, ns.seconds))
    elif ns.cmd == "mdns" and ns.action == "read":
        out = asyncio.run(read_advert(ns.address, ns.name, ns.seconds))
    elif ns.cmd == "mdns":
        out = asyncio.run(mdns(ns.address, ns.action, ns.name, json.loads(ns.props), ns.seconds, ns.every))
    elif ns.cmd == "hold":
        out = asyncio.run(hold(ns.host, ns.port, ns.count, ns.seconds))
    elif ns.cmd == "hammer":
        out = hammer(ns.host, [int(x) for x in ns.ports.split(",")], ns.count)
    elif ns.cmd == "burst":
        out = burst(ns.host, [int(x) for x in ns.ports.split(",")], ns.count, batch=ns.batch, wait_s=ns.wait_s)
    else:
        out = asyncio.run(third_party(ns.address, ns.port, ns.seconds))
    print(json.dumps(out))  # noqa: T201 - the summary is the output
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
