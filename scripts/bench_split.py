"""Local vs split on P namespace hosts, overlap on and off, per link rate (root).

    sudo .venv/bin/python scripts/bench_split.py --model vit-base --out runs/split/vit-base
    sudo .venv/bin/python scripts/bench_split.py --model vit-base --hosts 4 --cap 0.5 --batches 8 --rates 0 \
        --modes means-fp16,kv,codes --codes-cr 8 --runs 16 --out runs/p4/vit-base

``--hosts P`` hosts of the test bed (testbed/bed.py; default 2), each running one GLOO rank of
``scripts/split_rank.py`` with one torch thread; no agent, broker or policy. For every link
rate (``tc tbf`` on every uplink; 0 = unshaped) and batch, every option runs once per round,
rounds interleaved (the order rotates), ``--runs`` rounds after one untimed warm-up round:

- ``local``: the plain model on host 0 (rank 0's process);
- ``full``, ``means@CR``, ``codes@CR``, ``kv@CR``: split over all P hosts, each with overlap on and off
  (``--weights`` adds weighted plans of each split, overlap on).

Per cell: median per-sample ms and spread (IQR / median). For ``--bound-cell`` (default
50 Mbit/s, batch 8) each split run is set against max(compute / P, bytes / bandwidth) from its
own trace: compute summed over ranks / P, bytes the busiest uplink carried (exchange + inputs).

Beside every split figure, per (hosts, cap, link, batch), the cost model's prediction:

    predicted ms = max(local ms x busiest rank's block MACs / one device's, bytes / bandwidth)
    predicted x  = local ms / predicted ms

per sample, with the MACs of ``engine.cost.rank_macs`` / ``block_macs_local`` under the run's own
plan (rank 0 sends them with its answer; each rank's scaled by rank 0's CPU share over its own,
which matters under ``--half-speed`` only) and bytes / bandwidth the link term of the bound
above (0 unshaped). It leaves out what MACs do not count (codecs' O(n·D) work, Python and GLOO
overheads, every layer waiting for the slowest rank, TCP's ramp-up), so a measured speed-up
below it says how much those cost.

``--cap F`` puts every rank's process, rank 0 included (so ``local`` too), in a CPU cgroup of
its own capped at F of one CPU (testbed/cpucap.py: cgroup v2 ``cpu.max`` or v1 cfs quota, per
10 ms period, or ``--cap-period-us``): P boxes of that speed, each against local on one such box.
A capped rank runs its quota at full speed and then waits out the period. A 2 ms period,
tried so that a rank waiting on a throttled peer would lose less at each exchange, made
local 9 % and the P = 4 splits 18-26 % slower (docs/benchmarks.md §10), so 10 ms stays. ``--half-speed``
caps host 1's rank alone at half a CPU; with it, ``--weights`` defaults to 2 for every host
but host 1, which gets 1. Every row of the jsonl names the cgroups in force (``cgroups``: rank,
path, quota, and how many periods the kernel has throttled it so far).

Every rank process, rank 0's ``local`` runs included, takes the agent's glibc settings
(agent/base/memory.py) unless ``--malloc default``.

Writes ``OUT.jsonl`` (every run) and ``OUT.md`` (the tables).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import IO, Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from testbed.bed import Testbed, exit_on_sigterm  # noqa: E402
from testbed.cpucap import CPU_PERIOD_US, CpuCap, cpu_cap  # noqa: E402

RANK = str(REPO / "scripts" / "split_rank.py")
ENV = {"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def options(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every option of a round: name plus the request rank 0 gets."""
    out: list[dict[str, Any]] = [{"name": "local", "op": "local"}]
    modes: dict[str, dict[str, Any]] = {
        "full": {"cr": None},
        "means": {"cr": args.cr},
        "means-fp16": {"cr": args.cr, "wire_dtype": "fp16"},  # beside fp32 means, interleaved
        "codes": {"cr": args.codes_cr, "method": "codes"},
        "kv": {"cr": args.kv_cr, "method": "kv"},
    }
    for mode in args.modes.split(","):
        req = {"op": "split", **modes[mode]}
        if mode in ("full", "means") and args.wire_dtype:
            req["wire_dtype"] = args.wire_dtype
        label = mode if mode == "full" else f"{mode}@{req['cr']:g}"
        chunk_counts = [int(c) for c in args.chunks.split(",")] if args.chunks else [None]
        for count in chunk_counts:  # several: each a variant of its own, named for its count
            name = f"{label} on" if len(chunk_counts) == 1 else f"{label} on c{count}"
            out.append({**req, "name": name, "overlap": True, **({"chunks": count} if count else {})})
        on = {"overlap": True, **({"chunks": chunk_counts[0]} if chunk_counts[0] else {})}
        if not args.overlap_only:
            out.append({**req, "name": f"{label} off", "overlap": False})
        if args.weights:
            out.append({**req, "name": f"{label} on w={args.weights}", **on, "weights": args.weight_list})
    return out


class Ranks:
    """Rank r > 0 spawned on host r (logged by the bed), rank 0 on host 0 with a request pipe."""

    def __init__(self, bed: Testbed, args: argparse.Namespace) -> None:
        port = random.randint(29600, 29900)
        ranks = str(bed.hosts)
        base = [sys.executable, RANK, "--ranks", ranks, "--master", f"{bed.address(0)}:{port}", "--model", args.model]
        base += ["--malloc", args.malloc]
        pin = (lambda rank: ["--cpu", str(rank % (os.cpu_count() or 1))]) if args.pin else (lambda rank: [])
        self.followers = {
            f"rank{r}": bed.spawn(f"rank{r}", r, [*base, "--rank", str(r), *pin(r)], ENV) for r in range(1, bed.hosts)
        }
        log = (bed.workdir / "rank0.log").open("ab")
        self.proc = subprocess.Popen(
            bed.run(0, *base, "--rank", "0", *pin(0)),
            cwd=REPO,
            env={**os.environ, **ENV},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
        self.bed = bed
        ready = self._read(args.start_timeout_s)
        if not ready.get("ready"):
            raise RuntimeError(f"rank 0 did not start: {ready}; see {bed.workdir}/rank0.log")

    def pid(self, rank: int) -> int:
        """The process id of ``rank`` (``ip netns exec`` execs it, so the id is the rank's own)."""
        return self.proc.pid if rank == 0 else self.followers[f"rank{rank}"].pid

    def _read(self, timeout_s: float) -> dict[str, Any]:
        out: IO[str] | None = self.proc.stdout
        assert out is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            line = out.readline()
            if line:
                return dict(json.loads(line))
            if self.proc.poll() is not None or not all(self.bed.alive(key) for key in self.followers):
                raise RuntimeError(
                    f"a rank exited; see rank0.log .. rank{self.bed.hosts - 1}.log in {self.bed.workdir}"
                )
        raise RuntimeError(f"no answer from rank 0 in {timeout_s} s")

    def ask(self, req: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        answer = self._read(timeout_s)
        if "error" in answer:
            raise RuntimeError(f"{req.get('name')}: {answer['error']}")
        return answer

    def stop(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            assert self.proc.stdin is not None
            self.proc.stdin.write(json.dumps({"op": "stop"}) + "\n")
            self.proc.stdin.flush()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=30)


def shape(bed: Testbed, mbps: float) -> None:
    for i in range(bed.hosts):
        bed.shape(i, f"{mbps:g}mbit") if mbps else bed.unshape(i)


def bound(row: dict[str, Any], mbps: float) -> dict[str, float]:
    """max(compute / P, busiest uplink bytes / bandwidth) from the run's own trace, in ms."""
    traces = row["traces"]
    compute_ms = sum(t["compute_s"] for t in traces) / len(traces) * 1e3
    uplink = max(t["exchange_bytes_sent"] + t["io_bytes_sent"] for t in traces)
    link_ms = uplink * 8 / (mbps * 1e6) * 1e3 if mbps else 0.0
    return {"compute_over_p_ms": compute_ms, "link_ms": link_ms, "bound_ms": max(compute_ms, link_ms)}


def pace(macs: dict[str, Any], share: dict[int, float], hosts: int) -> float:
    """The busiest rank's block MACs over one device's (rank 0's, where ``local`` runs), each rank's
    scaled by how much smaller its CPU share is than rank 0's (uncapped: 1 CPU)."""
    slowness = [share.get(0, 1.0) / share.get(r, 1.0) for r in range(hosts)]
    return max(m * s for m, s in zip(macs["ranks"], slowness, strict=True)) / float(macs["local"])


def cap_state(caps: dict[int, CpuCap]) -> list[dict[str, Any]]:
    """The cgroups in force, per rank, with the periods each has been throttled so far."""
    return [{"rank": r, **cap.as_dict(), "throttled": cap.throttled()} for r, cap in sorted(caps.items())]


def run_cell(
    ranks: Ranks, args: argparse.Namespace, caps: dict[int, CpuCap], mbps: float, batch: int, out: IO[str]
) -> list[dict[str, Any]]:
    opts = options(args)
    rows = []
    for rnd in range(-1, args.runs):  # round -1 warms up every option (TCP, caches), untimed
        shift = max(rnd, 0) % len(opts)
        for opt in opts[shift:] + opts[:shift]:
            req = {k: v for k, v in opt.items() if k != "name"}
            if args.task == "generate":
                req.update(task="generate", new=args.new, seq=args.seq)
            answer = ranks.ask({**req, "name": opt["name"], "batch": batch, "seed": rnd + 1}, args.run_timeout_s)
            if rnd < 0:
                continue
            row = {"mbps": mbps, "batch": batch, "option": opt["name"], "round": rnd, **answer}
            row.update(hosts=args.hosts, cap=args.cap, malloc=args.malloc, cgroups=cap_state(caps))
            row["per_sample_ms"] = answer["ms"] / batch
            if opt["op"] == "split":
                row.update(bound(row, mbps))
                row["macs_ratio"] = pace(answer["macs"], shares(args), args.hosts)
            rows.append(row)
            out.write(json.dumps(row) + "\n")
            out.flush()
    return rows


def summary(rows: list[dict[str, Any]]) -> dict[tuple[float, int, str], dict[str, float]]:
    groups: dict[tuple[float, int, str], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[(r["mbps"], r["batch"], r["option"])].append(r)
    out = {}
    for key, rs in groups.items():
        ms = sorted(r["per_sample_ms"] for r in rs)
        q = statistics.quantiles(ms, n=4) if len(ms) >= 2 else [ms[0]] * 3
        cell = {"median": statistics.median(ms), "spread": (q[2] - q[0]) / statistics.median(ms), "n": len(ms)}
        if "bound_ms" in rs[0]:
            cell["wall_over_bound"] = statistics.median(r["ms"] / r["bound_ms"] for r in rs)
            cell["bound_ms"] = statistics.median(r["bound_ms"] for r in rs)
            cell["compute_over_p_ms"] = statistics.median(r["compute_over_p_ms"] for r in rs)
            cell["link_ms"] = statistics.median(r["link_ms"] for r in rs)
            cell["wall_ms"] = statistics.median(r["ms"] for r in rs)
            cell["macs_ratio"] = statistics.median(r["macs_ratio"] for r in rs)
        out[key] = cell
    return out


def ms(value: float) -> str:
    return f"{value:.0f}" if value >= 10 else f"{value:.2f}"


def shares(args: argparse.Namespace) -> dict[int, float]:
    """The CPU share each capped rank gets (ranks left out run uncapped)."""
    if args.cap:
        return dict.fromkeys(range(args.hosts), args.cap)
    return {1: 0.5} if args.half_speed else {}


def capped(args: argparse.Namespace) -> str:
    """How the hosts' CPUs were capped, in words."""
    period = "" if args.cap_period_us == CPU_PERIOD_US else f" (a {args.cap_period_us / 1e3:g} ms period)"
    if args.cap:
        return f"every rank capped at {args.cap:g} CPU{period}"
    return f"host 1 capped at half a CPU{period}" if args.half_speed else "no cap"


def predicted(args: argparse.Namespace, cells: dict[tuple[float, int, str], dict[str, float]]) -> list[str]:
    """A table per (hosts, cap, link, batch): every option measured beside the cost model's figure."""
    names = [o["name"] for o in options(args)]
    lines = []
    for mbps, batch in sorted({(m, b) for m, b, _ in cells}, key=lambda k: (k[0] == 0, k)):
        local = cells.get((mbps, batch, "local"))
        if local is None:
            continue
        where = "unshaped" if not mbps else f"{mbps:g} Mbit/s"
        lines += ["", f"P = {args.hosts}, {capped(args)}, {where}, batch {batch}: measured and predicted, per sample"]
        lines += ["", "| option | ms (spread) | speed-up | MACs busiest / local | bytes / bandwidth ms |"]
        lines[-1] += " predicted ms | predicted x |"
        lines.append("|---|---|---|---|---|---|---|")
        lines.append(f"| local | {ms(local['median'])} ({100 * local['spread']:.0f} %) | 1.00x | 1 | - | - | - |")
        for n in names[1:]:
            c = cells.get((mbps, batch, n))
            if c is None:
                continue
            link_ms = c["link_ms"] / batch
            pred_ms = max(local["median"] * c["macs_ratio"], link_ms)
            lines.append(
                f"| {n} | {ms(c['median'])} ({100 * c['spread']:.0f} %) | {local['median'] / c['median']:.2f}x | "
                f"{c['macs_ratio']:.3f} | {ms(link_ms)} | {ms(pred_ms)} | {local['median'] / pred_ms:.2f}x |"
            )
    return lines


def report(args: argparse.Namespace, cells: dict[tuple[float, int, str], dict[str, float]]) -> list[str]:
    names = [o["name"] for o in options(args)]
    link = {m: ("unshaped" if not m else f"{m:g}") for m, _, _ in cells}
    lines = [f"{args.model}, P = {args.hosts}, {capped(args)}: per-sample ms, median (spread = IQR / median), "]
    lines[0] += f"{args.runs} interleaved runs a cell"
    lines += ["", "| link | batch | " + " | ".join(names) + " | best split | local / best |"]
    lines.append("|---|---|" + "---|" * (len(names) + 2))
    for mbps, batch in sorted({(m, b) for m, b, _ in cells}, key=lambda k: (k[0] == 0, k)):
        row = [cells.get((mbps, batch, n)) for n in names]
        cols = [f"{ms(c['median'])} ({100 * c['spread']:.0f} %)" if c else "-" for c in row]
        splits = {n: c["median"] for n, c in zip(names, row, strict=True) if c and n != "local"}
        best = min(splits, key=lambda n: splits[n]) if splits else "-"
        local = cells.get((mbps, batch, "local"))
        ratio = f"{local['median'] / splits[best]:.2f}x" if local and splits else "-"
        lines.append(f"| {link[mbps]} | {batch} | " + " | ".join(cols) + f" | {best} | {ratio} |")
    mbps, batch = (float(x) for x in args.bound_cell.split(","))
    picked = [(n, cells[(mbps, int(batch), n)]) for n in names if (mbps, int(batch), n) in cells and n != "local"]
    if picked:
        where = f"{link.get(mbps, mbps)} Mbit/s, batch {int(batch)}"
        lines += ["", f"At {where}: wall time against max(compute / P, bytes / bandwidth)"]
        lines += ["", "| option | wall ms | compute / P ms | bytes / bandwidth ms | bound ms | wall / bound |"]
        lines.append("|---|---|---|---|---|---|")
        for n, c in picked:
            lines.append(
                f"| {n} | {ms(c['wall_ms'])} | {ms(c['compute_over_p_ms'])} | {ms(c['link_ms'])} | "
                f"{ms(c['bound_ms'])} | {c['wall_over_bound']:.2f} |"
            )
    return lines + predicted(args, cells)


def decode_report(rows: list[dict[str, Any]]) -> list[str]:
    """Generate runs: time to first token and decode tokens/s per option (median, IQR / median),
    and whether each option wrote local's tokens (same prompt, same round)."""
    local = {(r["mbps"], r["round"]): r["tokens"] for r in rows if r["option"] == "local"}
    lines = [
        "",
        "| link | option | TTFT ms (spread) | decode tok/s (spread) | same tokens as local |",
        "|---|---|---|---|---|",
    ]
    for key in sorted({(r["mbps"], r["option"]) for r in rows}):
        mine = [r for r in rows if (r["mbps"], r["option"]) == key]
        cells = [_median_spread([r[f] for r in mine]) for f in ("ms", "tok_s")]
        same = sum(r["tokens"] == local.get((r["mbps"], r["round"])) for r in mine)
        lines.append(f"| {key[0]:g} | {key[1]} | {cells[0]} | {cells[1]} | {same}/{len(mine)} |")
    return lines


def _median_spread(values: list[float]) -> str:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    med = statistics.median(values)
    return f"{med:.1f} ({(q[2] - q[0]) / med * 100:.0f} %)" if med else "-"


def main() -> None:
    exit_on_sigterm()  # a killed run takes its bed down
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit-base")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--rates", default="20,50,100,0", help="Mbit/s per uplink; 0 = unshaped")
    p.add_argument("--modes", default="full,means,codes", help="of full, means, means-fp16, codes, kv")
    p.add_argument("--cr", type=float, default=9.9, help="Segment Means CR")
    p.add_argument("--codes-cr", type=float, default=9.9, help="codes byte budget (1/CR of full)")
    p.add_argument("--kv-cr", type=float, default=4.0, help="kv byte budget (1/CR of full)")
    p.add_argument("--wire-dtype", choices=["fp16", "bf16"], default=None, help="segment rows (full, means)")
    p.add_argument("--runs", type=int, default=16, help="timed rounds per cell")
    p.add_argument(
        "--chunks", default=None, help="batch pieces with overlap (default: engine's); several (2,4): one variant each"
    )
    p.add_argument("--overlap-only", action="store_true", help="only the overlapped runs (no 'off' variants)")
    p.add_argument("--weights", default=None, help="add weighted plans, one weight a host, e.g. 2,1")
    p.add_argument("--hosts", type=int, default=2, help="P: namespace hosts, one rank each")
    cpu = p.add_mutually_exclusive_group()
    cpu.add_argument("--half-speed", action="store_true", help="cap host 1's rank at half a CPU")
    cpu.add_argument("--cap", type=float, default=None, help="cap every rank (local too) at this fraction of a CPU")
    p.add_argument(
        "--cap-period-us",
        type=int,
        default=CPU_PERIOD_US,
        help="the caps' period: a capped rank runs its quota, then waits out the period (default 10000)",
    )
    p.add_argument("--pin", action="store_true", help="each host's rank on a CPU of its own (rank r on CPU r)")
    p.add_argument(
        "--malloc", choices=["agent", "default"], default="agent", help="ranks' glibc settings: the agent's, or glibc's"
    )
    p.add_argument("--bound-cell", default="50,8", help="link,batch of the bound table")
    p.add_argument("--run-timeout-s", type=float, default=600.0)
    p.add_argument("--start-timeout-s", type=float, default=300.0)
    p.add_argument("--out", type=Path, default=Path("runs/split/bench"))
    p.add_argument("--task", choices=["default", "generate"], default="default", help="generate: GPT-2, batch 1")
    p.add_argument("--seq", type=int, default=None, help="prompt tokens (text models)")
    p.add_argument("--new", type=int, default=32, help="tokens written per generate run (greedy)")
    args = p.parse_args()
    if args.hosts < 2:
        p.error("--hosts: a split needs 2 or more")
    if args.half_speed and not args.weights:
        args.weights = ",".join("1" if h == 1 else "2" for h in range(args.hosts))
    args.weight_list = [float(w) for w in args.weights.split(",")] if args.weights else None
    if args.weight_list and len(args.weight_list) != args.hosts:
        p.error(f"--weights: one a host, {args.hosts} of them")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    with Testbed(hosts=args.hosts) as bed, (args.out.with_suffix(".jsonl")).open("a") as out:
        ranks = Ranks(bed, args)
        try:
            with contextlib.ExitStack() as stack:
                caps = {
                    r: stack.enter_context(cpu_cap(ranks.pid(r), f, f"prism-cap-{bed.tag}-r{r}", args.cap_period_us))
                    for r, f in shares(args).items()
                }
                for r, cap in caps.items():
                    print(f"rank {r} capped at {cap.fraction:g} CPU ({cap.group})", file=sys.stderr)
                for mbps in (float(r) for r in args.rates.split(",")):
                    shape(bed, mbps)
                    for batch in (int(b) for b in args.batches.split(",")):
                        start = time.monotonic()
                        rows += run_cell(ranks, args, caps, mbps, batch, out)
                        took = time.monotonic() - start
                        print(f"{mbps:g} Mbit/s, batch {batch}: {took:.0f} s", file=sys.stderr, flush=True)
        finally:
            ranks.stop()
    text = "\n".join(report(args, summary(rows)) + (decode_report(rows) if args.task == "generate" else []))
    print(text)
    args.out.with_suffix(".md").write_text(text + "\n")


if __name__ == "__main__":
    main()
