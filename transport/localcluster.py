"""A GLOO cluster on one box: this process is rank 0, workers are child processes.

Used by ``bench engine``, the tests, the profiler and ``scripts/gpu_check.py`` to run
the real multi-process GLOO path on loopback, on the CPU or with every rank's model on
a CUDA device (tensors then cross GLOO staged through pinned CPU memory). Workers
import `transformers` once and serve many jobs; groups of every size 2..P are formed
once (ranks 0..k-1), so jobs on fewer ranks reuse them. Control (which model, which
job) goes over a pipe; tensors go over GLOO.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import socket
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import torch

from engine.adapters import Tensors
from engine.distributed import run_rank
from engine.errors import BadRequest, FailureReason, GroupError, PrismError
from engine.models import LoadedModel, fingerprint, load, to_device
from engine.program import JobSpec
from engine.trace import RunResult
from engine.weights import same_weights
from transport.gloo import GlooComm, connect_store, make_group


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """Where and how the local group runs."""

    ranks: int
    host: str = "127.0.0.1"
    interface: str = "lo"
    threads: int = 1
    timeout_s: float = 120.0
    device: str = "cpu"  # where workers put their models (``cuda``: rank 0 passes a model there too)


def _groups(cfg: ClusterConfig, port: int, rank: int) -> dict[int, GlooComm]:
    store = connect_store(cfg.host, port, rank, cfg.ranks, timeout_s=cfg.timeout_s)
    comms = {}
    for size in range(2, cfg.ranks + 1):
        if rank < size:
            group = make_group(store, rank, size, timeout_s=cfg.timeout_s, interface=cfg.interface, prefix=f"g{size}")
            comms[size] = GlooComm(group)
    return comms


def _worker(cfg: ClusterConfig, port: int, rank: int, conn: Connection) -> None:
    """A rank process: form the groups, then serve (seq, op, arg) requests until told to stop."""
    torch.set_num_threads(cfg.threads)
    models: dict[str, LoadedModel] = {}
    try:
        comms = _groups(cfg, port, rank)
        conn.send((0, "ok", None))
    except PrismError as exc:
        conn.send((0, "error", str(exc)))
        return
    while True:
        try:
            seq, op, arg = conn.recv()
        except (EOFError, OSError):
            return  # rank 0 is gone
        if op == "stop":
            return
        try:
            if op == "load":
                if arg not in models:
                    models[arg] = to_device(load(arg), cfg.device)
                conn.send((seq, "ok", fingerprint(models[arg].adapter)))
            elif op == "run":
                run_rank(comms[arg.plan.ranks], models[arg.model].adapter, arg)
                conn.send((seq, "ok", None))
        except Exception as exc:  # noqa: BLE001 - reported to rank 0, worker keeps serving
            conn.send((seq, "error", f"rank {rank}: {exc}\n{traceback.format_exc(limit=3)}"))


class LocalCluster:
    """Rank 0 here, ranks 1..P-1 in child processes, joined by real GLOO groups.

    A failed job leaves the GLOO groups in an unknown state, so the cluster marks itself
    broken and re-spawns its workers before the next job.
    """

    def __init__(self, cfg: ClusterConfig) -> None:
        if cfg.ranks < 2:
            raise BadRequest("a cluster needs at least 2 ranks")
        self.cfg = cfg
        self._procs: list[Any] = []
        self._conns: list[Connection] = []
        self._comms: dict[int, GlooComm] = {}
        self._fingerprints: dict[str, float] = {}
        self._seq = 0
        self._broken = False
        self.restarts = 0

    def __enter__(self) -> LocalCluster:
        self._start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self) -> None:
        port = free_port(self.cfg.host)
        ctx = mp.get_context("spawn")
        try:
            for rank in range(1, self.cfg.ranks):
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=_worker, args=(self.cfg, port, rank, child), daemon=True)
                proc.start()
                self._procs.append(proc)
                self._conns.append(parent)
            try:
                self._comms = _groups(self.cfg, port, 0)
            except GroupError as exc:
                dead = [f"rank {r} exited with {p.exitcode}" for r, p in enumerate(self._procs, 1) if not p.is_alive()]
                raise GroupError(f"{exc}; {', '.join(dead) or 'no worker exited'}", reason=exc.reason) from exc
            self._replies(self._conns, 0)
        except BaseException:
            self.close()
            raise
        self._broken = False

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of ranks 1..P-1."""
        return [int(p.pid) for p in self._procs]

    def _restart(self) -> None:
        self.close()
        self._fingerprints.clear()
        self.restarts += 1
        self._start()

    def _replies(self, conns: list[Connection], seq: int, timeout_s: float | None = None) -> list[Any]:
        """Each worker's answer to request ``seq`` (stale answers to older requests are dropped)."""
        out, errors = [], []
        for rank, conn in enumerate(conns, start=1):
            proc = self._procs[rank - 1]
            value = None
            try:
                while True:
                    wait_s = self.cfg.timeout_s if timeout_s is None else timeout_s
                    if not conn.poll(wait_s):
                        errors.append(f"rank {rank} (pid {proc.pid}) did not answer in {wait_s:g} s")
                        break
                    got, status, value = conn.recv()
                    if got != seq:
                        continue
                    if status == "error":
                        errors.append(str(value))
                    break
            except (EOFError, OSError):
                proc.join(timeout=1)
                errors.append(f"rank {rank} (pid {proc.pid}) exited with {proc.exitcode}")
            out.append(value)
        if errors:
            raise GroupError("; ".join(e.splitlines()[0] for e in errors), reason=FailureReason.PEER_FAILED)
        return out

    def _send(self, conns: list[Connection], op: str, arg: Any) -> int:
        self._seq += 1
        for rank, conn in enumerate(conns, start=1):
            try:
                conn.send((self._seq, op, arg))
            except OSError:
                raise GroupError(
                    f"rank {rank} exited with {self._procs[rank - 1].exitcode}", reason=FailureReason.PEER_OFFLINE
                ) from None
        return self._seq

    def prepare(self, model: LoadedModel) -> None:
        """Make every worker load ``model.name``; fail if any loaded different weights."""
        if self._broken:
            self._restart()
        if model.name in self._fingerprints:
            return
        seq = self._send(self._conns, "load", model.name)
        mine = fingerprint(model.adapter)
        for rank, theirs in enumerate(self._replies(self._conns, seq), start=1):
            if not same_weights(mine, theirs):
                raise GroupError(
                    f"rank {rank} loaded different weights for '{model.name}'", reason=FailureReason.WEIGHTS_DIFFER
                )
        self._fingerprints[model.name] = mine

    def run(self, model: LoadedModel, spec: JobSpec, inputs: Tensors) -> RunResult:
        """Run ``spec`` over ranks 0..spec.plan.ranks-1; rank 0 is this process."""
        if not 2 <= spec.plan.ranks <= self.cfg.ranks:
            raise BadRequest(f"job wants {spec.plan.ranks} ranks; this cluster has {self.cfg.ranks}")
        self.prepare(model)
        used = self._conns[: spec.plan.ranks - 1]
        seq = self._send(used, "run", spec)
        try:
            result = run_rank(self._comms[spec.plan.ranks], model.adapter, spec, inputs)
            self._replies(used, seq)
        except BaseException as exc:
            self._broken = True  # the groups may hold half-finished collectives
            try:  # a worker that failed first explains more than rank 0's timeout
                self._replies(used, seq, timeout_s=1.0)
            except GroupError as worker:
                if "did not answer" not in str(worker):
                    raise worker from exc
            if isinstance(exc, PrismError):
                raise
            raise GroupError(f"job failed on rank 0: {exc}", reason=FailureReason.INTERNAL) from exc
        assert result is not None
        return result

    def close(self) -> None:
        """Stop the workers (politely, then by force) and drop the groups."""
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.send((0, "stop", None))
        deadline = time.monotonic() + 5
        for proc in self._procs:
            proc.join(timeout=max(0.0, deadline - time.monotonic()))
        for proc in self._procs:
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
        for conn in self._conns:
            conn.close()
        self._comms.clear()
        self._procs.clear()
        self._conns.clear()
