"""One rank of ``scripts/bench_split.py``: a GLOO rank on a test-bed host, no agent around it.

    python scripts/split_rank.py --rank R --ranks 2 --master 10.231.0.1:29611 --interface eth0 --model vit-base

Rank 0 takes one JSON request per line on stdin and answers one JSON line on stdout:

- ``{"op": "local", "batch": B, "seed": S}``: the plain model on this host;
- ``{"op": "split", "batch": B, "seed": S, "cr": ..., "method": ..., "wire_dtype": ..., "overlap": ...,
  "weights": [...]}``: the job split over the group (rank 0 plans it and broadcasts the spec first,
  outside the timed run);
- ``{"op": "stop"}``.

With ``"task": "generate"`` (GPT-2, batch 1) either op writes ``"new"`` tokens greedily: the
prefill locally (transformers' own) or split (a ``generate`` job: rank 0 takes the last block),
then the decode on rank 0 alone; ``ms`` is then the time to the first token and the answer adds
``prefill_ms``, ``tok_s`` (decode tokens per second after the first) and the ``tokens``.

Answers carry the wall ms of the run and every rank's trace; split answers also carry the cost
model's block MACs (engine/cost.py) of one device (``local``) and of every rank under the job's
plan (``ranks``), what ``bench_split.py`` predicts its speed-up from. Images are random raw uint8
pixels (the compact form jobs cross the group in); one torch thread per rank.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from agent.base.memory import tame_malloc  # noqa: E402
from engine.adapters import Task  # noqa: E402
from engine.cost import block_macs_local, rank_macs  # noqa: E402
from engine.distributed import run_rank  # noqa: E402
from engine.generate import decode  # noqa: E402
from engine.inputs import make_inputs  # noqa: E402
from engine.models import LoadedModel, load  # noqa: E402
from engine.program import JobSpec, plan_job, spec_from_dict, spec_to_dict  # noqa: E402
from engine.segments import Compression  # noqa: E402
from engine.sim import run_local  # noqa: E402
from transport.gloo import GlooComm, connect_store, make_group  # noqa: E402

STOP = {"op": "stop"}


def control(comm: GlooComm, message: dict[str, Any] | None) -> dict[str, Any]:
    """Rank 0 passes ``message``; every rank returns it (a JSON document over the group)."""
    payload = None
    if message is not None:
        payload = {"json": torch.frombuffer(bytearray(json.dumps(message).encode()), dtype=torch.uint8)}
    got = comm.broadcast_tensors(payload)
    return dict(json.loads(bytes(got["json"].tolist()).decode()))


def macs(model: LoadedModel, spec: JobSpec) -> dict[str, Any]:
    """Block MACs of one device over all the tokens and of every rank of ``spec``'s plan."""
    adapter = model.adapter
    d, f = adapter.hidden_size, adapter.ffn_ratio
    ranks = rank_macs(spec.plan, spec.comp, d, f, adapter.causal)
    return {"local": block_macs_local(spec.plan.n_tokens, d, f), "ranks": ranks}


def split(comm: GlooComm, model: LoadedModel, req: dict[str, Any]) -> dict[str, Any]:
    adapter = model.adapter
    inputs = make_inputs(model, int(req["batch"]), req.get("seq"), int(req.get("seed", 0)), raw_pixels=True)
    comp = Compression(cr=req.get("cr"), method=req.get("method", "means"), wire_dtype=req.get("wire_dtype"))
    generating = req.get("task") == "generate"
    spec = plan_job(
        adapter,
        model.name,
        Task.GENERATE if generating else adapter.default_task(),
        inputs,
        ranks=comm.size,
        comp=comp,
        weights=req.get("weights"),
        overlap=bool(req.get("overlap", True)),
        chunks=req.get("chunks"),
    )
    control(comm, {"op": "run", "spec": spec_to_dict(spec)})
    start = time.perf_counter()
    result = run_rank(comm, adapter, spec, inputs)
    ms = (time.perf_counter() - start) * 1e3
    assert result is not None
    answer = {
        "ms": ms,
        "chunks": spec.chunks,
        "traces": [t.as_dict() for t in result.traces],
        "macs": macs(model, spec),
    }
    if generating:
        answer.update(written(model, inputs, req, ms, result.outputs["past_kv"]))
    return answer


def written(
    model: LoadedModel, inputs: dict[str, Any], req: dict[str, Any], prefill_ms: float, past: Any
) -> dict[str, Any]:
    """The decode after a prefill of ``prefill_ms`` (``past`` None: transformers' own, timed here)."""
    made = decode(model.adapter, inputs["input_ids"], max_new_tokens=int(req.get("new", 32)), past=past)
    first_ms = made.first_token_s * 1e3
    return {"ms": prefill_ms + first_ms, "prefill_ms": prefill_ms, "tok_s": made.tokens_per_s, "tokens": made.tokens}


def local(model: LoadedModel, req: dict[str, Any]) -> dict[str, Any]:
    inputs = make_inputs(model, int(req["batch"]), req.get("seq"), int(req.get("seed", 0)), raw_pixels=True)
    if req.get("task") == "generate":
        return {"traces": [], **written(model, inputs, req, 0.0, None)}
    start = time.perf_counter()
    result = run_local(model.adapter, model.adapter.default_task(), inputs)
    return {"ms": (time.perf_counter() - start) * 1e3, "traces": [result.traces[0].as_dict()]}


def coordinate(comm: GlooComm, model: LoadedModel) -> None:
    """Rank 0: serve the driver's requests until it says stop (or closes stdin)."""
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "stop":
            break
        try:
            answer = local(model, req) if req["op"] == "local" else split(comm, model, req)
        except Exception as exc:  # noqa: BLE001 - the driver reports it and stops
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(answer), flush=True)
    control(comm, STOP)


def follow(comm: GlooComm, model: LoadedModel) -> None:
    """Rank > 0: run every job rank 0 announces."""
    while (msg := control(comm, None)) != STOP:
        run_rank(comm, model.adapter, spec_from_dict(msg["spec"]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--master", required=True, help="host:port of rank 0's rendezvous store")
    p.add_argument("--interface", default="eth0")
    p.add_argument("--model", required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--timeout-s", type=float, default=900.0, help="GLOO collectives and the rendezvous")
    p.add_argument("--cpu", type=int, default=None, help="pin this process (and its threads) to one CPU")
    p.add_argument("--malloc", choices=["agent", "default"], default="agent", help="glibc: the agent's settings or its")
    args = p.parse_args()
    if args.malloc == "agent":
        tame_malloc()  # before the model loads, as the agent does (agent/base/memory.py)
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})  # before torch and GLOO start their threads
    torch.set_num_threads(args.threads)
    model = load(args.model)
    host, port = args.master.rsplit(":", 1)
    store = connect_store(host, int(port), args.rank, args.ranks, timeout_s=args.timeout_s)
    group = make_group(store, args.rank, args.ranks, timeout_s=args.timeout_s, interface=args.interface)
    comm = GlooComm(group)
    with torch.inference_mode():
        coordinate(comm, model) if args.rank == 0 else follow(comm, model)


if __name__ == "__main__":
    main()
