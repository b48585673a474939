"""A GLOO channel whose every message is encrypted and authenticated (AES-GCM), for clusters with a secret.

Whatever crosses the group — inputs, per-layer rows, partial outputs, traces — is sealed
with a key that only members can derive (the cluster secret, the group and the run), so a
host on the LAN that connects to a GLOO port or sniffs the link learns nothing of a job, and
a tampered or injected message fails the run (the job then runs locally) instead of changing
its answer. Each message's nonce is (sender, receiver, count): both sides count the messages
of every pair in the same order, so a replayed or reordered message fails too.

Partial outputs are not summed by GLOO's reduce (a sum cannot carry a tag): every rank sends
its partials to the root, which checks and sums them.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import struct
from typing import Any

import torch
import torch.distributed as dist
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from engine.errors import FailureReason, GroupError
from engine.trace import RankTrace
from transport.gloo import GlooComm, PendingExchange, Tensors, _nbytes

TAG = 16
_BROADCAST = 0xFFFFFFFF
_EVERYONE = 0xFFFFFFFE


def run_key(group_key: bytes, gid: str, run: int) -> bytes:
    """The key of one run of one group (every member derives the same)."""
    return hmac.new(group_key, f"prism-gloo-run\n{gid}\n{run}".encode(), hashlib.sha256).digest()


class SealedComm(GlooComm):
    """:class:`~transport.gloo.GlooComm` with sealed messages; call :meth:`begin` before each run."""

    def __init__(self, group: Any, device: torch.device | None = None) -> None:
        super().__init__(group, device)
        self._aead: AESGCM | None = None
        self._count: dict[tuple[int, int], int] = {}

    def begin(self, key: bytes) -> None:
        """A run starts: its key, and every pair's count from zero."""
        self._aead = AESGCM(key)
        self._count = {}

    def _nonce(self, src: int, dst: int) -> bytes:
        n = self._count.get((src, dst), 0)
        self._count[(src, dst)] = n + 1
        return struct.pack(">III", src, dst, n)

    def _seal(self, data: torch.Tensor, dst: int) -> torch.Tensor:
        if self._aead is None:
            raise GroupError("sealed group used before its run began", reason=FailureReason.INTERNAL)
        raw = self._raw(data.contiguous()).numpy().tobytes()
        sealed = self._aead.encrypt(self._nonce(self.rank, dst), raw, None)
        return torch.frombuffer(bytearray(sealed), dtype=torch.uint8)

    def _open(self, sealed: torch.Tensor, src: int, dst: int, into: torch.Tensor) -> None:
        if self._aead is None:
            raise GroupError("sealed group used before its run began", reason=FailureReason.INTERNAL)
        try:
            plain = self._aead.decrypt(self._nonce(src, dst), sealed.numpy().tobytes(), None)
        except InvalidTag:
            raise GroupError(
                f"a message from rank {src} failed authentication (tampered, replayed or foreign)",
                reason=FailureReason.SEALED_REJECTED,
            ) from None
        self._raw(into).copy_(torch.frombuffer(bytearray(plain), dtype=torch.uint8))

    # -- the per-layer exchange -------------------------------------------------------
    def _launch(
        self, send: torch.Tensor, receivers: list[int], senders: list[int], recv_shapes: Any
    ) -> PendingExchange:
        host = self._to_cpu(send).flatten()
        pieces = [self._seal(host, q) for q in sorted(receivers)]
        inp = torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.uint8)
        in_splits = [0] * self.size
        for q, piece in zip(sorted(receivers), pieces, strict=True):
            in_splits[q] = piece.numel()
        out_splits = [0] * self.size
        for q, shape in zip(senders, recv_shapes, strict=True):
            out_splits[q] = math.prod(shape) * host.element_size() + TAG
        out = self._host_empty((sum(out_splits),), torch.uint8)
        work = self.group.alltoall_base(out, inp, out_splits, in_splits, dist.AllToAllOptions())
        self.trace.exchange_bytes_sent += _nbytes(inp)
        shapes = [tuple(s) for s in recv_shapes]
        return PendingExchange(work, inp, out, out_splits, list(senders), shapes, host.dtype)

    def _received(self, pending: PendingExchange) -> list[torch.Tensor]:
        dtype = pending.dtype
        assert dtype is not None
        self.trace.exchange_bytes_recv += _nbytes(pending.out)
        pieces = torch.split(pending.out, pending.out_splits)
        out = []
        for q, shape in zip(pending.senders, pending.recv_shapes, strict=True):
            plain = self._host_empty(shape, dtype)
            self._open(pieces[q], q, self.rank, plain)
            out.append(self._to_device(plain))
        return out

    # -- inputs, outputs, control -----------------------------------------------------
    def _bcast(self, t: torch.Tensor, root: int) -> None:
        opts = dist.BroadcastOptions()
        opts.rootRank = root
        rooted = self.rank == root
        buf = self._seal(t, _BROADCAST) if rooted else torch.empty(_nbytes(t) + TAG, dtype=torch.uint8)
        with self._collective("broadcast"):
            self.group.broadcast([buf], opts).wait()
        if self.rank == root:
            self.trace.io_bytes_sent += buf.numel() * (self.size - 1)
        else:
            self._open(buf, root, _BROADCAST, t)
            self.trace.io_bytes_recv += buf.numel()

    def _p2p(self, t: torch.Tensor, peer: int, sending: bool) -> None:
        with self._collective("send" if sending else "recv"):
            if sending:
                buf = self._seal(t, peer)
                self.group.send([buf], peer, 0).wait()
                self.trace.io_bytes_sent += buf.numel()
            else:
                buf = torch.empty(_nbytes(t) + TAG, dtype=torch.uint8)
                self.group.recv([buf], peer, 0).wait()
                self.trace.io_bytes_recv += buf.numel()
        if not sending:
            self._open(buf, peer, self.rank, t)

    def reduce_sum(self, tensors: Tensors, root: int = 0) -> Tensors:
        """Every rank's partials to ``root`` (sealed), summed there in rank order."""
        keys = list(tensors)
        host = [self._to_cpu(tensors[k]) for k in keys]
        flat = torch.cat([t.flatten() for t in host])
        if self.rank != root:
            self._p2p(flat, root, True)
            total = flat
        else:
            parts = {self.rank: flat}
            for src in range(self.size):
                if src != root:
                    parts[src] = torch.empty_like(flat)
                    self._p2p(parts[src], src, False)
            total = torch.stack([parts[r] for r in range(self.size)]).sum(dim=0)
        out = {}
        for k, t, piece in zip(keys, host, torch.split(total, [t.numel() for t in host]), strict=True):
            out[k] = self._to_device(piece.view(t.shape))
        return out

    def gather_traces(self, trace: RankTrace) -> list[RankTrace]:
        """Every rank's trace on every rank, each sealed by its sender."""
        mine = trace.to_tensor()
        sealed = self._seal(mine, _EVERYONE)
        outs = [[torch.empty_like(sealed) for _ in range(self.size)]]
        with self._collective("allgather"):
            self.group.allgather(outs, [sealed]).wait()
        traces = []
        for src, buf in enumerate(outs[0]):
            got = torch.empty_like(mine)
            if src == self.rank:
                got = mine
            else:
                self._open(buf, src, _EVERYONE, got)
            traces.append(RankTrace.from_tensor(got))
        return traces
