"""A GLOO cluster on one box: this process is rank 0, workers are child processes.

Used by ``bench engine``, the tests and the profiler to run the real multi-process
GLOO path on loopback. Workers import `transformers` once and serve many jobs; groups
of every size 2..P are formed once (ranks 0..k-1), so jobs on fewer ranks reuse them.
Control (which model, which job) goes over a pipe; tensors go over GLOO.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import socket
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import torch

from engine.adapters import Tensors
from engine.distributed import run_rank
from engine.errors import GroupError, PrismError
from engine.models import LoadedModel, fingerprint, load
from engine.program import JobSpec
from engine.trace import RunResult
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


def _groups(cfg: ClusterConfig, port: int, rank: int) -> dict[int, GlooComm]:
    store = connect_store(cfg.host, port, rank, cfg.ranks, timeout_s=cfg.timeout_s)
    comms = {}
    for size in range(2, cfg.ranks + 1):
        if rank < size:
            group = make_group(store, rank, size, timeout_s=cfg.timeout_s, interface=cfg.interface, prefix=f"g{size}")
            comms[size] = GlooComm(group)
    return comms


def _worker(cfg: ClusterConfig, port: int, rank: int, conn: Connection) -> None:
    torch.set_num_threads(cfg.threads)
    models: dict[str, LoadedModel] = {}
    try:
        comms = _groups(cfg, port, rank)
        conn.send(("ok", None))
    except PrismError as exc:
        conn.send(("error", str(exc)))
        return
    while True:
        msg = conn.recv()
        if msg[0] == "stop":
            break
        try:
            if msg[0] == "load":
                source = msg[1]
                if source not in models:
                    models[source] = load(source)
                conn.send(("ok", fingerprint(models[source].adapter)))
            elif msg[0] == "run":
                spec: JobSpec = msg[1]
                run_rank(comms[spec.plan.ranks], models[spec.model].adapter, spec)
                conn.send(("ok", None))
        except Exception as exc:  # noqa: BLE001 - reported to rank 0, worker keeps serving
            conn.send(("error", f"rank {rank}: {exc}\n{traceback.format_exc(limit=3)}"))


class LocalCluster:
    """Rank 0 here, ranks 1..P-1 in child processes, joined by real GLOO groups."""

    def __init__(self, cfg: ClusterConfig) -> None:
        if cfg.ranks < 2:
            raise GroupError("a cluster needs at least 2 ranks")
        self.cfg = cfg
        self._procs: list[Any] = []
        self._conns: list[Connection] = []
        self._comms: dict[int, GlooComm] = {}
        self._fingerprints: dict[str, float] = {}

    def __enter__(self) -> LocalCluster:
        port = free_port(self.cfg.host)
        ctx = mp.get_context("spawn")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            for rank in range(1, self.cfg.ranks):
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=_worker, args=(self.cfg, port, rank, child), daemon=True)
                proc.start()
                self._procs.append(proc)
                self._conns.append(parent)
            self._comms = _groups(self.cfg, port, 0)
            self._replies()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _replies(self) -> list[Any]:
        out, errors = [], []
        for conn, proc in zip(self._conns, self._procs, strict=True):
            if not conn.poll(self.cfg.timeout_s):
                errors.append(f"worker pid {proc.pid} did not answer in {self.cfg.timeout_s:g} s")
                continue
            status, value = conn.recv()
            if status == "error":
                errors.append(value)
            out.append(value)
        if errors:
            raise GroupError("; ".join(e.splitlines()[0] for e in errors))
        return out

    def prepare(self, model: LoadedModel) -> None:
        """Make every worker load ``model.name``; fail if any loaded different weights."""
        if model.name in self._fingerprints:
            return
        for conn in self._conns:
            conn.send(("load", model.name))
        mine = fingerprint(model.adapter)
        for rank, theirs in enumerate(self._replies(), start=1):
            if abs(theirs - mine) > 1e-6 * max(1.0, abs(mine)):
                raise GroupError(f"rank {rank} loaded different weights for '{model.name}'")
        self._fingerprints[model.name] = mine

    def run(self, model: LoadedModel, spec: JobSpec, inputs: Tensors) -> RunResult:
        """Run ``spec`` over ranks 0..spec.plan.ranks-1; rank 0 is this process."""
        if not 2 <= spec.plan.ranks <= self.cfg.ranks:
            raise GroupError(f"job wants {spec.plan.ranks} ranks; this cluster has {self.cfg.ranks}")
        self.prepare(model)
        used = self._conns[: spec.plan.ranks - 1]
        for conn in used:
            conn.send(("run", spec))
        try:
            result = run_rank(self._comms[spec.plan.ranks], model.adapter, spec, inputs)
        finally:
            for conn in used:
                if conn.poll(self.cfg.timeout_s):
                    status, value = conn.recv()
                    if status == "error":
                        raise GroupError(value.splitlines()[0])
        assert result is not None
        return result

    def close(self) -> None:
        """Stop the workers (politely, then by force) and drop the groups."""
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.send(("stop",))
        for proc in self._procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
        self._comms.clear()
        self._procs.clear()
        self._conns.clear()
