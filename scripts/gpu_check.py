"""The GPU path, measured: CR = 1 exactness on CUDA, the GLOO runner with pinned staging, and
``bench engine`` with staging split out (issue 14).

    python scripts/gpu_check.py --out runs/gpu/h200.json   # a CUDA box: vit-base and bert-base
    python scripts/gpu_check.py --dry-run                   # the same code on the CPU, tiny models

Steps, each in its own process under its own timeout (a hung or crashed step is reported and
the others still run):

- ``env``: torch, CUDA device, transformers.
- ``exact``: the plain `transformers` model on the device against PRISM at full exchange and
  CR = 1 (both exact), logits and hidden states; overlap on and off (same chunks) bit for bit;
  raw uint8 pixels against the same image normalised on the CPU. TF32 is off for this step.
- ``gloo``: two ranks on one device through a real GLOO group (transport.localcluster, tensors
  staged through pinned CPU memory) against the in-process runner: outputs, bytes, staging.
- ``bench``: local vs the split (full exchange, Segment Means at ``--cr``), overlap on and off,
  per batch: median ms and the rank-0 breakdown (compute, comm, staging, overhead, overlap).

Built-in configs only (random weights, seeded): no network, no hub. Prints markdown tables and
writes everything to ``--out`` (JSON). Exit status 0 when every step ran and every check held.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RESULT = "GPU_CHECK_RESULT "
STEPS = ("env", "exact", "gloo", "bench")
#: Largest |difference| accepted where a path is exact in exact arithmetic (fp32).
EXACT_TOL = 1e-4


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny-vit and tiny-bert, batches 1,2, one run each")
    p.add_argument("--models", default=None, help="comma-separated built-ins (default: vit-base,bert-base)")
    p.add_argument("--batches", default=None, help="default 1,2,4,8,16 (dry run: 1,2)")
    p.add_argument("--seq", type=int, default=128, help="BERT sequence length")
    p.add_argument("--cr", type=float, default=9.9, help="Segment Means CR of the split runs")
    p.add_argument("--repeat", type=int, default=None, help="timed runs per cell (default 5; dry run 1)")
    p.add_argument("--timeout-s", type=float, default=None, help="per step (default 600; dry run 120)")
    p.add_argument("--steps", default=",".join(STEPS), help=f"which of {','.join(STEPS)}")
    p.add_argument("--out", type=Path, default=Path("runs/gpu/gpu_check.json"))
    p.add_argument("--step", choices=STEPS, help=argparse.SUPPRESS)  # internal: run one step here
    p.add_argument("--device", default=None, help=argparse.SUPPRESS)
    ns = p.parse_args(argv)
    ns.models = (ns.models or ("tiny-vit,tiny-bert" if ns.dry_run else "vit-base,bert-base")).split(",")
    ns.batches = [int(b) for b in (ns.batches or ("1,2" if ns.dry_run else "1,2,4,8,16")).split(",")]
    ns.repeat = ns.repeat or (1 if ns.dry_run else 5)
    ns.timeout_s = ns.timeout_s or (120.0 if ns.dry_run else 600.0)
    ns.device = ns.device or ("cpu" if ns.dry_run else "cuda")
    return ns


# -- helpers run inside a step -------------------------------------------------------------------
def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str, repeat: int, warmup: int = 1) -> tuple[float, Any]:
    """Median wall ms over ``repeat`` runs after ``warmup``, and the last result."""
    out = None
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(repeat):
        sync(device)
        start = time.perf_counter()
        out = fn()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), out


def diff(a: Any, b: Any) -> float:
    return float((a.float().cpu() - b.float().cpu()).abs().max())


def equal(a: dict[str, Any], b: dict[str, Any]) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)


def loaded(name: str, device: str) -> Any:
    from engine.models import load, to_device

    return to_device(load(name), device)


def inputs_of(model: Any, batch: int, seq: int) -> dict[str, Any]:
    from engine.inputs import make_inputs

    vit = model.adapter.family == "vit"
    return make_inputs(model, batch, None if vit else seq, raw_pixels=True)


def on_device(inputs: dict[str, Any], device: str) -> dict[str, Any]:
    return {k: v.to(device) for k, v in inputs.items()}


# -- the steps ------------------------------------------------------------------------------------
def step_env(ns: argparse.Namespace) -> dict[str, Any]:
    import torch
    import transformers

    info: dict[str, Any] = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda_available": torch.cuda.is_available(),
        "gloo": torch.distributed.is_gloo_available(),
        "cpus": os.cpu_count(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    info["ok"] = info["gloo"] and (ns.device == "cpu" or info["cuda_available"])
    return info


def step_exact(ns: argparse.Namespace) -> dict[str, Any]:
    from engine.program import plan_job
    from engine.segments import Compression
    from engine.sim import run_local, run_simulated

    rows = []
    for name in ns.models:
        model = loaded(name, ns.device)
        adapter = model.adapter
        task = adapter.default_task()
        inputs = inputs_of(model, 2, ns.seq)
        ref = run_local(adapter, task, on_device(inputs, ns.device)).outputs
        for cr in (None, 1.0):
            spec = plan_job(adapter, name, task, inputs, ranks=2, comp=Compression(cr=cr), chunks=2, gather_hidden=True)
            got = run_simulated(adapter, spec, inputs).outputs
            off = plan_job(adapter, name, task, inputs, ranks=2, comp=Compression(cr=cr), chunks=2, overlap=False)
            row = {
                "model": name,
                "mode": Compression(cr=cr).label(),
                "logits_diff": diff(got["logits"], ref["logits"]),
                "hidden_diff": diff(got["hidden"], ref["hidden"]),
                "overlap_bit_exact": equal(
                    {"logits": got["logits"]}, {"logits": run_simulated(adapter, off, inputs).outputs["logits"]}
                ),
            }
            if adapter.family == "vit":  # raw pixels normalised on the device vs the daemon's float image
                floats = {"pixel_values": (inputs["pixel_values"].float() / 255.0 - 0.5) / 0.5}
                row["uint8_vs_float_diff"] = diff(run_simulated(adapter, spec, floats).outputs["logits"], got["logits"])
            row["ok"] = max(row["logits_diff"], row["hidden_diff"]) <= EXACT_TOL and row["overlap_bit_exact"]
            rows.append(row)
    return {"rows": rows, "ok": all(r["ok"] for r in rows)}


def step_gloo(ns: argparse.Namespace) -> dict[str, Any]:
    from engine.program import plan_job
    from engine.segments import Compression, Method
    from engine.sim import run_simulated
    from transport.localcluster import ClusterConfig, LocalCluster

    comps = [Compression(), Compression(cr=ns.cr), Compression(cr=ns.cr, wire_dtype="fp16")]
    comps.append(Compression(cr=ns.cr, method=Method.CODES))
    rows = []
    with LocalCluster(ClusterConfig(ranks=2, threads=1, device=ns.device, timeout_s=ns.timeout_s / 2)) as cluster:
        for name in ns.models:
            model = loaded(name, ns.device)
            adapter, task = model.adapter, model.adapter.default_task()
            inputs = inputs_of(model, 4, ns.seq)
            for comp in comps:
                on = plan_job(adapter, name, task, inputs, ranks=2, comp=comp, chunks=2)
                off = plan_job(adapter, name, task, inputs, ranks=2, comp=comp, chunks=2, overlap=False)
                sim, real, real_off = run_simulated(adapter, on, inputs), cluster.run(model, on, inputs), None
                real_off = cluster.run(model, off, inputs)
                row = {
                    "model": name,
                    "mode": comp.label(),
                    "vs_sim_diff": diff(real.outputs["logits"], sim.outputs["logits"]),
                    "bytes_match": [t.exchange_bytes_sent for t in real.traces]
                    == [t.exchange_bytes_sent for t in sim.traces],
                    "overlap_bit_exact": equal(real.outputs, real_off.outputs),
                    "exchange_bytes": real.exchange_bytes,
                    "staging_ms": [round(t.staging_s * 1e3, 3) for t in real.traces],
                    "overlap_ms": [round(t.overlap_s * 1e3, 3) for t in real.traces],
                }
                staged = ns.device == "cpu" or all(t.staging_s > 0 for t in real.traces)
                row["ok"] = row["vs_sim_diff"] <= 1e-5 and row["bytes_match"] and row["overlap_bit_exact"] and staged
                rows.append(row)
    return {"rows": rows, "ok": all(r["ok"] for r in rows)}


def bench_cell(ns: argparse.Namespace, cluster: Any, name: str, model: Any, batch: int) -> list[dict[str, Any]]:
    """One model and batch: local, then each split mode with overlap on and off."""
    from engine.program import plan_job
    from engine.segments import Compression
    from engine.sim import run_local

    adapter, task = model.adapter, model.adapter.default_task()
    inputs = inputs_of(model, batch, ns.seq)  # on the CPU, as a job arrives; the local run moves it too
    local_ms, _ = timed(lambda: run_local(adapter, task, on_device(inputs, ns.device)), ns.device, ns.repeat)
    rows = []
    for comp in (Compression(), Compression(cr=ns.cr)):
        for overlap in (True, False):
            spec = plan_job(adapter, name, task, inputs, ranks=2, comp=comp, overlap=overlap)
            ms, res = timed(lambda spec=spec: cluster.run(model, spec, inputs), ns.device, ns.repeat)
            t = res.traces[0]
            rows.append(
                {
                    "model": name,
                    "batch": batch,
                    "mode": comp.label(),
                    "overlap": overlap,
                    "chunks": spec.chunks,
                    "local_ms": local_ms,
                    "split_ms": ms,
                    "speedup": local_ms / ms,
                    "compute_ms": t.compute_s * 1e3,
                    "comm_ms": t.comm_s * 1e3,
                    "staging_ms": t.staging_s * 1e3,
                    "overhead_ms": t.overhead_s * 1e3,
                    "overlap_ms": t.overlap_s * 1e3,
                    "staging_ms_all_ranks": sum(x.staging_s for x in res.traces) * 1e3,
                    "exchange_bytes": res.exchange_bytes,
                    "io_bytes": sum(x.io_bytes_sent for x in res.traces),
                }
            )
    return rows


def step_bench(ns: argparse.Namespace) -> dict[str, Any]:
    import torch

    from transport.localcluster import ClusterConfig, LocalCluster

    torch.set_num_threads(1)
    rows = []
    with LocalCluster(ClusterConfig(ranks=2, threads=1, device=ns.device, timeout_s=ns.timeout_s / 2)) as cluster:
        for name in ns.models:
            model = loaded(name, ns.device)
            cluster.prepare(model)
            for batch in ns.batches:
                rows += bench_cell(ns, cluster, name, model, batch)
    return {"rows": rows, "ok": True}


RUNNERS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "env": step_env,
    "exact": step_exact,
    "gloo": step_gloo,
    "bench": step_bench,
}


def run_step(ns: argparse.Namespace) -> int:
    """Child process: one step, its result as one line on stdout."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 (exactness is checked in fp32)
    torch.backends.cudnn.allow_tf32 = False
    result = RUNNERS[ns.step](ns)
    print(RESULT + json.dumps(result), flush=True)
    return 0


# -- the parent: run every step, report ----------------------------------------------------------
def spawn(ns: argparse.Namespace, step: str) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--step", step, "--device", ns.device]
    cmd += ["--models", ",".join(ns.models), "--batches", ",".join(map(str, ns.batches))]
    cmd += ["--seq", str(ns.seq), "--cr", str(ns.cr), "--repeat", str(ns.repeat), "--timeout-s", str(ns.timeout_s)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    start = time.monotonic()
    # Its own session, so a step past its timeout goes with every process it started (GLOO ranks).
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=ns.timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return {"step": step, "status": "timeout", "seconds": ns.timeout_s, "ok": False}
    seconds = round(time.monotonic() - start, 1)
    lines = [line for line in stdout.splitlines() if line.startswith(RESULT)]
    if proc.returncode != 0 or not lines:
        tail = (stderr or stdout).strip().splitlines()[-5:]
        status = f"failed (exit {proc.returncode})"
        return {"step": step, "status": status, "seconds": seconds, "ok": False, "error": tail}
    result = json.loads(lines[-1][len(RESULT) :])
    return {"step": step, "status": "ok" if result.get("ok") else "check failed", "seconds": seconds, **result}


def table(rows: list[dict[str, Any]], columns: list[str]) -> list[str]:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1e-2 else f"{v:.2f}"
        return str(v)

    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    out += ["| " + " | ".join(cell(r.get(c, "-")) for c in columns) + " |" for r in rows]
    return out


def report(results: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["## GPU check", ""]
    lines += [f"- {r['step']}: {r['status']} ({r['seconds']} s)" for r in results.values()]
    for r in results.values():
        lines += [f"  - {e}" for e in r.get("error", [])]
    env = results.get("env", {})
    if "torch" in env:
        gpu = env.get("gpu", "none (torch sees no CUDA device)")
        lines += ["", f"torch {env['torch']}, transformers {env['transformers']}, GPU {gpu}, {env['cpus']} CPUs"]
    columns = {
        "exact": ["model", "mode", "logits_diff", "hidden_diff", "overlap_bit_exact", "uint8_vs_float_diff", "ok"],
        "gloo": ["model", "mode", "vs_sim_diff", "bytes_match", "overlap_bit_exact", "staging_ms", "overlap_ms", "ok"],
        "bench": [
            *("model", "batch", "mode", "overlap", "chunks", "local_ms", "split_ms", "speedup"),
            *("compute_ms", "comm_ms", "staging_ms", "overhead_ms", "overlap_ms"),
        ],
    }
    for step, cols in columns.items():
        if results.get(step, {}).get("rows"):
            lines += ["", f"### {step}", "", *table(results[step]["rows"], cols)]
    return lines


def main(argv: list[str] | None = None) -> int:
    ns = parse(argv)
    if ns.step:
        return run_step(ns)
    results: dict[str, dict[str, Any]] = {}
    for step in ns.steps.split(","):
        print(f"{step} ...", file=sys.stderr, flush=True)
        results[step] = spawn(ns, step)
        print(f"{step}: {results[step]['status']} ({results[step]['seconds']} s)", file=sys.stderr, flush=True)
        if step == "env" and not results[step]["ok"]:
            print("no usable device (see env): stopping", file=sys.stderr)
            break
    print("\n".join(report(results)))
    ns.out.parent.mkdir(parents=True, exist_ok=True)
    ns.out.write_text(json.dumps({"dry_run": ns.dry_run, "device": ns.device, "steps": results}, indent=1))
    print(f"\nwrote {ns.out}", file=sys.stderr)
    return 0 if all(r["ok"] for r in results.values()) and len(results) == len(ns.steps.split(",")) else 1


if __name__ == "__main__":
    sys.exit(main())
