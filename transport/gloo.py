"""GLOO process groups and a byte-counting, timed tensor channel over one.

Groups are standalone ``ProcessGroupGloo`` objects (no global default group), so one
process can hold several and tear one down without touching the others. On CUDA
devices every tensor is staged through pinned CPU memory, timed as staging.

The per-layer exchange can run asynchronously: :meth:`GlooComm.start_exchange` launches the all-to-all
and returns at once, :meth:`GlooComm.finish_exchange` waits for it. GLOO runs launched collectives in
launch order on its own threads, so several may be in flight while the caller computes.
"""

from __future__ import annotations

import datetime
import json
import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from engine.trace import RankTrace
from transport.gloo_errors import collective_error, formation_error
from transport.listener import new_listeners, seal

Tensors = dict[str, torch.Tensor]


def connect_store(host: str, port: int, rank: int, size: int, *, timeout_s: float) -> Any:
    """The rendezvous store of a group: rank 0 serves it at ``host:port``, the others join."""
    timeout = datetime.timedelta(seconds=timeout_s)
    try:
        return dist.TCPStore(host, port, size, rank == 0, timeout=timeout, wait_for_workers=False)  # type: ignore[attr-defined]
    except (RuntimeError, ValueError) as exc:
        raise formation_error(f"cannot reach the group's rendezvous at {host}:{port} as rank {rank}: {exc}") from exc


def make_group(
    store: Any,
    rank: int,
    size: int,
    *,
    timeout_s: float,
    interface: str | None = None,
    address: str | None = None,
    prefix: str = "prism",
    closed_ports: list[int] | None = None,
    admit: Sequence[str] | None = None,
) -> Any:
    """A GLOO group of ranks ``0..size-1`` over ``store`` (several may share one store).

    ``interface`` (e.g. ``lo``, ``eth0``) or ``address`` pins the NIC GLOO uses; without
    either GLOO resolves the hostname, which often lands on 127.0.0.1 and fails.
    Every collective on the group fails after ``timeout_s``. With ``admit`` (the other members'
    IPv4 addresses) the group's listening port hears only from them while it forms; once formed it
    is closed (:func:`transport.listener.seal`), its number appended to ``closed_ports``.
    """
    gloo: Any = dist.ProcessGroupGloo
    options = gloo._Options()
    options._timeout = datetime.timedelta(seconds=timeout_s)
    try:
        with new_listeners(admit) as listeners:  # eager pairs: all connected once the group is built
            if interface or address:
                device = gloo.create_device(hostname=address or "", interface=interface or "", lazy_init=False)
            else:
                device = gloo.create_default_device(lazy_init=False)
        options._devices = [device]
        group = gloo(dist.PrefixStore(prefix, store), rank, size, options)  # type: ignore[attr-defined]
    except (RuntimeError, ValueError, OSError) as exc:
        raise formation_error(f"cannot form a GLOO group of {size} as rank {rank}: {exc}") from exc
    (closed_ports if closed_ports is not None else []).extend(seal(listeners))  # strangers are refused now
    return group


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@dataclass(frozen=True, slots=True)
class PendingExchange:
    """An all-to-all in flight: its work handle and the buffers it reads and writes."""

    work: Any
    sent: torch.Tensor  # kept alive until the wait: GLOO reads it meanwhile
    out: torch.Tensor
    out_splits: list[int]
    senders: list[int]
    recv_shapes: list[tuple[int, ...]]
    dtype: torch.dtype | None = None  # of the rows, when ``out`` holds them as bytes (sealed)


class GlooComm:
    """Collectives the engine needs, with bytes and seconds booked into ``trace``.

    Per-layer hidden-state traffic (``exchange``) is booked as exchange bytes; inputs,
    outputs and control as io bytes.
    """

    def __init__(self, group: Any, device: torch.device | None = None) -> None:
        self.group = group
        self.rank = group.rank()
        self.size = group.size()
        self.device = device or torch.device("cpu")
        self.trace = RankTrace(rank=self.rank)
        self._in_flight = 0  # exchanges launched and not yet waited for, in self._flight_trace's run
        self._flight_trace = self.trace
        self._flight_since = 0.0
        self._busy_at_flight = 0.0  # comm_s + staging_s when the current flight began

    # -- plumbing ---------------------------------------------------------------------
    @contextmanager
    def _collective(self, what: str, launch: bool = True) -> Iterator[None]:
        """Time in the group (a launch, a wait, or both) as comm; ``launch`` counts a round."""
        self.trace.rounds += int(launch)
        start = time.perf_counter()
        try:
            yield
        except RuntimeError as exc:
            raise collective_error(what, self.rank, exc) from exc
        finally:
            self.trace.comm_s += time.perf_counter() - start

    def _to_cpu(self, t: torch.Tensor) -> torch.Tensor:
        """Stage a device tensor into pinned CPU memory (GLOO works on CPU tensors)."""
        if t.device.type == "cpu":
            return t.contiguous()
        start = time.perf_counter()
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        torch.cuda.synchronize(t.device)
        self.trace.staging_s += time.perf_counter() - start
        return host

    def _host_empty(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """A CPU receive buffer; pinned when it is bound for a CUDA device."""
        return torch.empty(tuple(shape), dtype=dtype, pin_memory=self.device.type == "cuda")

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cpu":
            return t
        start = time.perf_counter()
        out = t.to(self.device, non_blocking=True)
        torch.cuda.synchronize(self.device)
        self.trace.staging_s += time.perf_counter() - start
        return out

    # -- the per-layer exchange -------------------------------------------------------
    def exchange(
        self,
        send: torch.Tensor,
        receivers: list[int],
        senders: list[int],
        recv_shapes: Sequence[tuple[int, ...]],
    ) -> list[torch.Tensor]:
        """Send ``send`` to every rank in ``receivers``; get one tensor from each sender
        (every sender sends the same dtype). Blocks until the rows are here."""
        with self._collective("exchange"):
            pending = self._launch(send, receivers, senders, recv_shapes)
            pending.work.wait()
        return self._received(pending)

    def start_exchange(
        self,
        send: torch.Tensor,
        receivers: list[int],
        senders: list[int],
        recv_shapes: Sequence[tuple[int, ...]],
    ) -> PendingExchange:
        """Launch :meth:`exchange`'s all-to-all and return without waiting for it."""
        with self._collective("exchange"):
            pending = self._launch(send, receivers, senders, recv_shapes)
        if self._in_flight == 0 or self._flight_trace is not self.trace:  # a new run after a failed one
            self._in_flight, self._flight_trace = 0, self.trace
            self._flight_since = time.perf_counter()
            self._busy_at_flight = self.trace.comm_s + self.trace.staging_s
        self._in_flight += 1
        return pending

    def finish_exchange(self, pending: PendingExchange) -> list[torch.Tensor]:
        """Wait for an exchange :meth:`start_exchange` launched; what each sender sent.

        Exchanges must be finished in the order they were started.
        """
        if bool(pending.work.is_completed()):
            self.trace.hidden_rounds += 1
        with self._collective("exchange", launch=False):
            pending.work.wait()
        self._in_flight -= 1
        if self._in_flight == 0:
            busy = self.trace.comm_s + self.trace.staging_s - self._busy_at_flight
            self.trace.overlap_s += max(0.0, time.perf_counter() - self._flight_since - busy)
        return self._received(pending)

    def _launch(
        self, send: torch.Tensor, receivers: list[int], senders: list[int], recv_shapes: Sequence[tuple[int, ...]]
    ) -> PendingExchange:
        host = self._to_cpu(send).flatten()
        in_splits = [host.numel() if q in receivers else 0 for q in range(self.size)]
        out_splits = [0] * self.size
        for q, shape in zip(senders, recv_shapes, strict=True):
            out_splits[q] = math.prod(shape)
        inp = host.repeat(len(receivers)) if receivers else host[:0]
        out = self._host_empty((sum(out_splits),), host.dtype)
        work = self.group.alltoall_base(out, inp, out_splits, in_splits, dist.AllToAllOptions())
        self.trace.exchange_bytes_sent += _nbytes(inp)
        return PendingExchange(work, inp, out, out_splits, list(senders), [tuple(s) for s in recv_shapes])

    def _received(self, pending: PendingExchange) -> list[torch.Tensor]:
        self.trace.exchange_bytes_recv += _nbytes(pending.out)
        pieces = torch.split(pending.out, pending.out_splits)
        shapes = zip(pending.senders, pending.recv_shapes, strict=True)
        return [self._to_device(pieces[q].view(shape)) for q, shape in shapes]

    # -- inputs, outputs, control -----------------------------------------------------
    def _header(self, tensors: Tensors) -> torch.Tensor:
        meta = [[k, str(v.dtype).removeprefix("torch."), list(v.shape)] for k, v in tensors.items()]
        return torch.frombuffer(bytearray(json.dumps(meta).encode()), dtype=torch.uint8)

    def _empty_from(self, header: torch.Tensor) -> Tensors:
        meta = json.loads(bytes(header.tolist()).decode())
        return {k: self._host_empty(shape, getattr(torch, dtype)) for k, dtype, shape in meta}

    @staticmethod
    def _raw(t: torch.Tensor) -> torch.Tensor:
        """The bytes of a contiguous tensor, sharing its memory: GLOO moves any dtype this way
        (its broadcast refuses some, e.g. int16 token ids)."""
        return t.reshape(-1).view(torch.uint8)

    def _bcast(self, t: torch.Tensor, root: int) -> None:
        opts = dist.BroadcastOptions()
        opts.rootRank = root
        with self._collective("broadcast"):
            self.group.broadcast([self._raw(t)], opts).wait()
        if self.rank == root:
            self.trace.io_bytes_sent += _nbytes(t) * (self.size - 1)
        else:
            self.trace.io_bytes_recv += _nbytes(t)

    def broadcast_tensors(self, tensors: Tensors | None, root: int = 0) -> Tensors:
        """Rank ``root`` passes ``tensors``; every rank returns them (on its device)."""
        if self.rank == root:
            assert tensors is not None
            host = {k: self._to_cpu(v) for k, v in tensors.items()}
            header = self._header(host)
            self._bcast(torch.tensor([header.numel()]), root)
            self._bcast(header, root)
        else:
            length = torch.zeros(1, dtype=torch.long)
            self._bcast(length, root)
            header = torch.empty(int(length.item()), dtype=torch.uint8)
            self._bcast(header, root)
            host = self._empty_from(header)
        for v in host.values():
            self._bcast(v, root)
        return {k: self._to_device(v) for k, v in host.items()}

    def _p2p(self, t: torch.Tensor, peer: int, sending: bool) -> None:
        with self._collective("send" if sending else "recv"):
            if sending:
                self.group.send([self._raw(t)], peer, 0).wait()
                self.trace.io_bytes_sent += _nbytes(t)
            else:
                self.group.recv([self._raw(t)], peer, 0).wait()
                self.trace.io_bytes_recv += _nbytes(t)

    def send_tensors(self, tensors: Tensors, dst: int) -> None:
        """Send a dict of tensors to one rank."""
        host = {k: self._to_cpu(v) for k, v in tensors.items()}
        header = self._header(host)
        self._p2p(torch.tensor([header.numel()]), dst, True)
        self._p2p(header, dst, True)
        for v in host.values():
            self._p2p(v, dst, True)

    def recv_tensors(self, src: int) -> Tensors:
        """Receive a dict of tensors sent with :meth:`send_tensors`."""
        length = torch.zeros(1, dtype=torch.long)
        self._p2p(length, src, False)
        header = torch.empty(int(length.item()), dtype=torch.uint8)
        self._p2p(header, src, False)
        host = self._empty_from(header)
        for v in host.values():
            self._p2p(v, src, False)
        return {k: self._to_device(v) for k, v in host.items()}

    def reduce_sum(self, tensors: Tensors, root: int = 0) -> Tensors:
        """Element-wise sum over ranks, valid on ``root``; all ranks pass equal shapes."""
        keys = list(tensors)
        host = [self._to_cpu(tensors[k]) for k in keys]
        flat = torch.cat([t.flatten() for t in host])
        opts = dist.ReduceOptions()
        opts.rootRank = root
        opts.reduceOp = dist.ReduceOp.SUM  # type: ignore[assignment]
        with self._collective("reduce"):
            self.group.reduce([flat], opts).wait()
        if self.rank == root:
            self.trace.io_bytes_recv += _nbytes(flat) * (self.size - 1)
        else:
            self.trace.io_bytes_sent += _nbytes(flat)
        out = {}
        for k, t, piece in zip(keys, host, torch.split(flat, [t.numel() for t in host]), strict=True):
            out[k] = self._to_device(piece.view(t.shape))
        return out

    def gather_traces(self, trace: RankTrace) -> list[RankTrace]:
        """Every rank's trace, on every rank (a few dozen bytes; not booked)."""
        mine = trace.to_tensor()
        outs = [[torch.empty_like(mine) for _ in range(self.size)]]
        with self._collective("allgather"):
            self.group.allgather(outs, [mine]).wait()
        return [RankTrace.from_tensor(t) for t in outs[0]]
