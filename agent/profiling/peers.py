"""``prism-agent profile --peers``: the performance map measured over real links, through agents.

The profiler asks the node that will use the map (``--node``) to run one job per timed pass,
each forcing one option (local, full exchange, a method at a CR) over the named peers, and
records what that agent measured itself: engine time with its compute / communication /
staging / overhead split, the bytes on the wire, the collectives, and the CPU seconds of
every rank (energy: the CPU-time model, labelled so). Each cell carries the link the node's
own probes saw to its slowest peer while it was measured, so the link model can move it to
other links. Nothing is loaded here: the agents hold the model, and the map names the
node's hardware and weights, as a loopback profile does.

Every option's outputs come back with its results; they are scored against the local
pass's on the same inputs (agent.profiling.accuracy) into the cell's fidelity. A codes CR
the model cannot take is skipped and said so, and so is codes altogether when the node's
agent does not say which method it ran (one from before methods runs Segment Means).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from agent.base.config import Broker
from agent.base.energy import CpuModelMeter
from agent.profiling.accuracy import Score, score_output
from agent.profiling.loopback import Grid, Pass, energy_label, make_cell
from agent.profiling.progress import Progress, kind_of
from engine.errors import BadRequest, PrismError
from engine.weights import same_weights
from policy.perfmap import ModelShape, PerfMap, option_name
from policy.predict import fit_link_efficiency
from transport.mqtt import MqttLink

#: The CPU-time model's power per busy core, as the agents' own meter uses.
WATTS_PER_CORE = CpuModelMeter().watts_per_core


class ProfileError(PrismError):
    """A pass did not run as asked (an error result, a fallback to local, no answer)."""

    code = "profile_failed"


@dataclass(frozen=True, slots=True)
class Target:
    """Who runs the passes: the coordinating node, its peers, and what it serves."""

    node: str
    peers: tuple[str, ...]
    family: str
    fingerprint: float
    hardware: dict[str, Any]


def resolve(nodes: Sequence[Mapping[str, Any]], node: str, model: str, peers: str) -> Target:
    """Check ``node`` serves ``model`` and every peer can help it (``peers``: ids or ``auto``)."""
    health = {n["node"]: n.get("health") or {} for n in nodes if n.get("status") == "online"}
    if node not in health:
        seen = ", ".join(sorted(health)) or "none"
        raise BadRequest(f"node '{node}' is not online on this broker (online: {seen}); is its agent running?")
    mine = health[node]
    if model not in mine.get("models", []):
        raise BadRequest(f"node '{node}' does not serve '{model}' (it serves: {', '.join(mine.get('models', []))})")
    if "hardware" not in mine or "families" not in mine:
        raise BadRequest(f"node '{node}' runs an agent too old to profile through (no hardware in its health)")
    fp = float(mine["fingerprints"][model])
    able = sorted(
        n
        for n in mine.get("peers", [])
        if any(same_weights(fp, float(v)) for v in health.get(n, {}).get("fingerprints", {}).values())
    )
    if peers.strip() == "auto":
        chosen = able
    else:
        chosen = [p.strip() for p in peers.split(",") if p.strip()]
        if len(set(chosen)) != len(chosen):
            raise BadRequest(f"--peers names a node twice: {peers}")
    if not chosen:
        raise BadRequest(f"no peer of '{node}' serves '{model}' with the same weights")
    for p in chosen:
        if p not in able:
            raise BadRequest(
                f"peer '{p}' cannot help '{node}' with '{model}' (not online, not admitted by '{node}', or other "
                f"weights); able: {', '.join(able) or 'none'}"
            )
    return Target(node, tuple(chosen), str(mine["families"][model]), fp, dict(mine["hardware"]))


def job_inputs(family: str, batch: int, seq: int | None) -> dict[str, Any]:
    """Inputs of the right kind: noise images for a ViT (the agent resizes them), else token ids."""
    if family == "vit":
        if seq is not None:
            raise BadRequest("--seq does not apply to ViT (its token count is set by the image size)")
        import numpy as np
        from PIL import Image

        images = []
        for i in range(batch):  # coarse noise: a few kB as PNG, so a batch of 16 fits the payload limit
            pixels = np.random.default_rng(i).integers(0, 255, (28, 28, 3), dtype=np.uint8)
            buf = io.BytesIO()
            Image.fromarray(pixels).resize((224, 224), Image.Resampling.NEAREST).save(buf, format="PNG")
            images.append(base64.b64encode(buf.getvalue()).decode())
        return {"image": images}
    n = seq or 128
    return {
        "token_ids": [[101, *[110 + (i * 7 + k) % 800 for k in range(max(0, n - 2))], 102][:n] for i in range(batch)]
    }


def option_fields(mode: str, cr: float | None, peers: tuple[str, ...], method: str | None = None) -> dict[str, Any]:
    """The job fields that force one option."""
    if mode == "local":
        return {"mode": "local"}
    fields = {"mode": "distributed", "cr": "full" if cr is None else cr, "peers": list(peers)}
    return fields if method is None or cr is None else {**fields, "method": method}


class Skip(Exception):
    """This option cannot be measured on this node (``str()`` says why); ``every_batch``:
    nor at any other batch size (the node does not run the method at all)."""

    def __init__(self, why: str, *, every_batch: bool = False) -> None:
        super().__init__(why)
        self.every_batch = every_batch


class _Session:
    """One MQTT connection: jobs to the node, results on a private topic, the node's health."""

    def __init__(self, link: MqttLink, root: str, node: str) -> None:
        self.link, self.node = link, node
        self.jobs = f"{root}/nodes/{node}/jobs"
        self.health_topic = f"{root}/nodes/{node}/health"
        self.reply = f"{root}/clients/{uuid.uuid4().hex}/result"
        self.health: dict[str, Any] = {}
        self.waiting: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self.health_seen = asyncio.Event()
        self.pumping: asyncio.Task[None] = asyncio.create_task(self.pump())

    async def pump(self) -> None:
        async for message in self.link.messages():
            payload = message.payload if isinstance(message.payload, bytes) else str(message.payload).encode()
            with contextlib.suppress(ValueError):
                data = json.loads(payload)
                if str(message.topic) == self.health_topic and isinstance(data, dict):
                    self.health = data
                    self.health_seen.set()
                elif isinstance(data, dict) and (fut := self.waiting.pop(str(data.get("id")), None)) is not None:
                    fut.set_result(data)

    async def ask(self, job: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.waiting[job["id"]] = fut
        try:
            await self.link.publish(self.jobs, json.dumps(job).encode(), response_topic=self.reply)
            either: set[asyncio.Future[Any]] = {fut, self.pumping}
            await asyncio.wait(either, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.waiting.pop(job["id"], None)
        if fut.done():
            return fut.result()
        if self.pumping.done():
            raise ProfileError(f"lost the broker while '{self.node}' ran job {job['id']}")
        raise ProfileError(f"no result from '{self.node}' for job {job['id']} within {timeout_s:g} s")

    def link_mbps(self, peers: tuple[str, ...]) -> float | None:
        """What the node's probes see to its slowest peer (None: not measured yet)."""
        links = self.health.get("links", {})
        seen = [links.get(p, {}).get("mbps") for p in peers]
        return None if any(s is None for s in seen) else float(min(seen))


def _pass(result: dict[str, Any], ranks: int, idle_w: float) -> Pass:
    lat = result["latency_ms"]
    engine_s = lat["engine"] / 1e3
    cpu_s = float(result.get("energy", {}).get("group_cpu_s") or 0.0)
    joules = cpu_s * WATTS_PER_CORE + idle_w * max(0.0, ranks * engine_s - cpu_s)
    return Pass(
        engine_s,
        joules,
        lat["compute"] / 1e3,
        lat["comm"] / 1e3,
        lat["staging"] / 1e3,
        lat["overhead"] / 1e3,
        int(lat.get("wire_bytes", 0)),
        int(lat.get("rounds", 0)),
    )


async def profile_peers(
    broker: Broker,
    cluster: str,
    grid: Grid,
    target: Target,
    *,
    auth: Mapping[str, Any] | None = None,
    timeout_s: float = 600.0,
    progress: Progress | None = None,
) -> PerfMap:
    """Measure ``grid`` on ``target.node`` with ``target.peers`` (see the module docstring)."""
    progress = progress or Progress.for_grid(grid)
    perf = PerfMap(
        hardware=target.hardware,
        models={grid.model: target.fingerprint},
        energy_source=energy_label("cpu-model", grid.idle_w),
    )
    perf.shapes[grid.model] = ModelShape(causal=target.family == "gpt2")  # the width is not in the health
    ranks = len(target.peers) + 1
    client = f"prism-profile-{uuid.uuid4().hex[:8]}"
    async with MqttLink(broker.host, broker.port, client_id=client, **dict(auth or {})) as link:
        session = _Session(link, f"prism/v1/{cluster}", target.node)
        try:
            await link.subscribe(session.reply, session.health_topic)
            await _wait_links(session, target.peers)
            skipped: set[str] = set()
            for batch in grid.batches:
                inputs = job_inputs(target.family, batch, grid.seq)
                reference: dict[str, Any] = {}
                for mode, method, cr in grid.options:
                    cell_ranks = 1 if mode == "local" else ranks
                    label = f"batch {batch} {option_name(method or mode, cr, cell_ranks)}"
                    every = grid.warmup + grid.repeat
                    if method in skipped:
                        progress.skip(
                            batch, kind_of(mode, method), every, f"{label}: {method} is not run by '{target.node}'"
                        )
                        continue
                    fields = {"model": grid.model, "inputs": inputs, **option_fields(mode, cr, target.peers, method)}
                    try:
                        passes, seq, output = await _passes(
                            session, grid, fields, (mode, method), label, progress, timeout_s
                        )
                    except Skip as exc:
                        progress.skip(batch, kind_of(mode, method), every, f"{label}: {exc}")
                        if exc.every_batch:
                            skipped.add(str(method))
                        continue
                    if mode == "local":
                        reference = output
                    fidelity = _fidelity(mode, reference, output)
                    mbps = None if mode == "local" else session.link_mbps(target.peers)
                    perf.cells.append(
                        make_cell(
                            grid.model, batch, seq, mode, cr, cell_ranks, passes, mbps, method=method, fidelity=fidelity
                        )
                    )
        finally:
            session.pumping.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await session.pumping
    perf.link_efficiency = fit_link_efficiency(perf)
    return perf


async def _passes(
    session: _Session,
    grid: Grid,
    fields: dict[str, Any],
    option: tuple[str, str | None],
    label: str,
    progress: Progress,
    timeout_s: float,
) -> tuple[list[Pass], int, dict[str, Any]]:
    """One option's timed passes (after the warm-up), the tokens it ran and its last output.
    The first pass tells whether the node can run the option at all (:class:`Skip`)."""
    mode, method = option
    ranks = 1 if mode == "local" else len(fields.get("peers", [])) + 1
    passes: list[Pass] = []
    output: dict[str, Any] = {}
    seq = 0
    for i in range(grid.warmup + grid.repeat):
        result = await session.ask({"id": f"profile-{uuid.uuid4().hex[:10]}", **fields}, timeout_s)
        _check(result, mode, method, label, session.node)
        seq = int(result.get("decision", {}).get("tokens") or 0)
        output = result.get("output") or {}
        timed = i >= grid.warmup
        progress.step(label, float(result["latency_ms"]["engine"]) / 1e3, timed=timed)
        if timed:
            passes.append(_pass(result, ranks, grid.idle_w))
    return passes, seq, output


async def _wait_links(session: _Session, peers: tuple[str, ...], timeout_s: float = 60.0) -> None:
    """Until the node's health shows a probed link to every peer."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while session.link_mbps(peers) is None:
        left = deadline - asyncio.get_running_loop().time()
        if left <= 0:
            raise ProfileError(f"'{session.node}' has not measured its link to {', '.join(peers)} in {timeout_s:g} s")
        session.health_seen.clear()
        seen = asyncio.ensure_future(session.health_seen.wait())
        either: set[asyncio.Future[Any]] = {seen, session.pumping}
        await asyncio.wait(either, timeout=left, return_when=asyncio.FIRST_COMPLETED)
        seen.cancel()
        if session.pumping.done():
            raise ProfileError(f"lost the broker while waiting for '{session.node}' to measure its links")


def _fidelity(mode: str, reference: dict[str, Any], output: dict[str, Any]) -> Score:
    """Local and full exchange are exact; a compressed option is scored against local."""
    if mode != "prism":
        exact = score_output(reference, reference)
        return Score(exact.cosine, exact.cosine, exact.top1)
    return score_output(reference, output)


def _check(result: dict[str, Any], mode: str, method: str | None, label: str, node: str) -> None:
    """Raise ProfileError unless ``result`` ran the option asked for; :class:`Skip` when the
    node cannot run it at all (a codes CR too tight for the model, codes on an old agent)."""
    error = result.get("error") or {}
    why = str((result.get("decision") or {}).get("fallback_reason") or error.get("message") or "")
    if method in ("codes", "kv") and "too tight" in why:
        raise Skip(why)
    if not result.get("ok"):
        raise ProfileError(f"{label}: '{node}' answered {error.get('code')}: {error.get('message')}")
    if result.get("fallback") or (mode != "local") != (result.get("mode") == "distributed"):
        raise ProfileError(f"{label}: '{node}' ran it {result.get('mode')} instead ({why or 'no reason given'})")
    if mode == "prism":
        ran = result.get("method")
        if ran is None and method != "means":
            raise Skip(
                f"'{node}' does not say which method it ran (an agent from before methods runs means only)",
                every_batch=True,
            )
        if ran is not None and ran != method:
            raise ProfileError(f"{label}: '{node}' ran method {ran} instead")
