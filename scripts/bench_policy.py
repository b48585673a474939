"""The policy benchmark and the Jetson paper's experiment, on a namespace test bed (root).

Hosts are network namespaces on a bridge, each with a real agent (one torch thread); host 0
also runs mosquitto and holds the performance map. For every link rate (``tc tbf`` on every
host's uplink) and batch size, host 0 gets the same job in every mode — local, full exchange,
each exchange method (Segment Means, codes) at each CR, and auto under the accuracy floor —
one after another, and the agent's own end-to-end latency is
recorded (receipt to reply; jobs are sent one at a time, so nothing queues).

    python scripts/bench_policy.py --model vit-base --bandwidths 10,20,50,100,200,0 \\
        --out runs/policy/vit-base

writes ``vit-base.csv`` (every job), ``vit-base.md`` (the tables) and ``vit-base.png``.
A rate of 0 means unshaped. The map is profiled first (``prism-agent profile`` on loopback)
unless ``--map`` names one. Energy is a model, labelled as such: each rank's CPU seconds x
``--core-watts`` plus ``--base-watts`` per device for the job's wall time.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agent.profiling.peers import job_inputs  # noqa: E402
from testbed.bed import Testbed, exit_on_sigterm  # noqa: E402


def inputs_for(model: str, batch: int, seq: int) -> dict[str, Any]:
    vit = "vit" in model
    return job_inputs("vit" if vit else "bert", batch, None if vit else seq)


def option_fields(option: str, ranks: int) -> dict[str, Any]:
    if option == "local":
        return {"mode": "local"}
    if option == "auto":
        return {"mode": "auto"}
    extra = {"ranks": ranks} if ranks > 2 else {}
    if option == "full":
        return {"mode": "distributed", "cr": "full", **extra}
    method, cr = option.split("@")
    return {"mode": "distributed", "method": method, "cr": float(cr), **extra}


def profile(args: argparse.Namespace, path: Path) -> None:
    crs = ",".join(["full", *args.crs.split(",")])
    cmd = [sys.executable, "-m", "agent", "profile", "--model", args.model, "--batches", args.batches]
    cmd += ["--crs", crs, "--methods", args.methods, "--out", str(path), "--repeat", str(args.profile_repeat)]
    if args.seq:
        cmd += ["--seq", str(args.seq)]
    print("profiling:", " ".join(cmd[1:]), file=sys.stderr)
    subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL)


def shape_all(bed: Testbed, mbps: float) -> None:
    for i in range(bed.hosts):
        if mbps:
            bed.shape(i, f"{mbps:g}mbit")
        else:
            bed.unshape(i)


def wait_link(bed: Testbed, mbps: float, hosts: int) -> float:
    """Until host 0's probes see the new rate to every peer; returns what they see."""
    peers = [f"h{i}" for i in range(1, hosts)]

    def settled(h: dict[str, Any]) -> bool:
        links = h.get("links", {})
        seen = [links.get(p, {}).get("mbps") for p in peers]
        if any(s is None for s in seen):
            return False
        return all((0.6 * mbps <= s <= 1.3 * mbps) if mbps else s > 1500 for s in seen)

    with bed.watch(bed.topic("nodes/h0/health")) as w:
        got = w.wait_health("h0", settled, timeout_s=90, after=time.monotonic())
    return float(min(got["links"][p]["mbps"] for p in peers))


def run_job(bed: Testbed, job: dict[str, Any]) -> dict[str, Any]:
    with bed.watch(bed.topic(f"results/{job['id']}")) as w:
        time.sleep(0.05)
        bed.pub(bed.topic("nodes/h0/jobs"), json.dumps(job))
        result = w.result(job["id"], timeout_s=900)
    if not result.get("ok"):
        raise RuntimeError(f"job {job['id']} failed: {result.get('error')}")
    return result


def main() -> int:
    exit_on_sigterm()  # a killed run takes its bed down
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit-base")
    p.add_argument("--seq", type=int, default=None, help="text models: tokens per sample")
    p.add_argument("--hosts", type=int, default=2)
    p.add_argument("--bandwidths", default="10,20,50,100,200,0", help="Mbit/s; 0 = unshaped")
    p.add_argument("--batches", default="1,2,4,8,16")
    p.add_argument("--crs", default="8", help="CRs of each method (codes: 1/CR of full exchange's bytes)")
    p.add_argument("--methods", default="means,codes", help="exchange methods at each CR")
    p.add_argument("--no-auto", dest="auto", action="store_false", help="fixed options only")
    p.add_argument("--repeat", type=int, default=1, help="runs per cell (each option once per round, interleaved)")
    p.add_argument(
        "--min-samples",
        dest="min_samples",
        type=int,
        default=1,
        help="at least this many samples per cell: small batches get more runs (batch 1 with 8: 8 runs)",
    )
    p.add_argument(
        "--min-fidelity", dest="min_fidelity", type=float, default=None, help="auto's floor (default: the agent's)"
    )
    p.add_argument("--profile-repeat", type=int, default=3)
    p.add_argument("--map", type=Path, default=None, help="use this map instead of profiling")
    p.add_argument("--core-watts", type=float, default=4.0)
    p.add_argument("--base-watts", type=float, default=2.0)
    p.add_argument("--out", type=Path, required=True, help="output prefix (.csv, .md, .png)")
    p.add_argument("--rows", type=Path, default=None, help="only re-render the outputs from a run's log (JSON lines)")
    args = p.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.rows is not None:
        lines = args.rows.read_text().splitlines()
        logged: list[dict[str, Any]] = [json.loads(line) for line in lines if line.startswith("{")]
        opts = list(dict.fromkeys(r["option"] for r in logged))
        args.model, args.hosts = logged[0]["model"], logged[0]["hosts"]
        seen_b = sorted({r["batch"] for r in logged})
        seen_r = list(dict.fromkeys(r["mbps"] for r in logged))
        complete = [m for m in seen_r if all(any(r["mbps"] == m and r["batch"] == b and r["option"] == "auto"
                                                  for r in logged) for b in seen_b)]  # fmt: skip
        write_outputs(args, [r for r in logged if r["mbps"] in complete], opts, seen_b, complete)
        return 0
    map_path = args.map or args.out.with_suffix(".map.json")
    if args.map is None and args.auto:
        profile(args, map_path)
    split = [f"{m}@{float(c):g}" for m in args.methods.split(",") for c in args.crs.split(",")]
    options = ["local", "full", *split, *(["auto"] if args.auto else [])]
    batches = [int(b) for b in args.batches.split(",")]
    rates = [float(b) for b in args.bandwidths.split(",")]
    seq = args.seq or 197
    rows: list[dict[str, Any]] = []
    bed = Testbed(args.hosts, models=[f"{args.model}={args.model}"], cluster="bench")
    env = {"PRISM_PROBE_INTERVAL_S": "5", "PRISM_HEALTH_INTERVAL_S": "1", "PRISM_GROUP_TIMEOUT_S": "600"}
    with bed:
        bed.start_broker()
        for i in range(args.hosts):
            extra = {"PRISM_MAP_FILE": str(map_path.resolve())} if i == 0 and args.auto else {}
            floor = {"PRISM_MIN_FIDELITY": f"{args.min_fidelity:g}"} if args.min_fidelity is not None else {}
            bed.start_agent(i, env={**env, **extra, **floor})
        bed.wait_cluster([f"h{i}" for i in range(args.hosts)])
        for option in options:  # warm-up: model caches, the GLOO group
            run_job(
                bed,
                {
                    "id": f"warm-{option}".replace("@", "_"),
                    "model": args.model,
                    "inputs": inputs_for(args.model, 1, seq),
                    **option_fields(option, args.hosts),
                },
            )
        for mbps in rates:
            shape_all(bed, mbps)
            seen = wait_link(bed, mbps, args.hosts)
            print(f"link {mbps or 'unshaped'} Mbit/s: probes see {seen:.0f}", file=sys.stderr)
            for batch in batches:
                inputs = inputs_for(args.model, batch, seq)
                for rep in range(max(args.repeat, -(-args.min_samples // batch))):
                    for option in options:
                        job_id = f"b{batch}-{option}-{int(mbps)}-{rep}".replace("@", "_").replace(".", "_")
                        job = {"id": job_id, "model": args.model, "inputs": inputs, **option_fields(option, args.hosts)}
                        r = run_job(bed, job)
                        ranks = 1 + len(r.get("peers") or [])
                        total_ms = r["latency_ms"]["total"]
                        joules = r["energy"]["group_cpu_s"] * args.core_watts + args.base_watts * ranks * total_ms / 1e3
                        rows.append(
                            {
                                "model": args.model,
                                "hosts": args.hosts,
                                "mbps": mbps,
                                "probe_mbps": round(seen, 1),
                                "batch": batch,
                                "option": option,
                                "repeat": rep,
                                "ms": round(total_ms, 2),
                                "ms_per_sample": round(total_ms / batch, 2),
                                "engine_ms": round(r["latency_ms"]["engine"], 2),
                                "comm_ms": round(r["latency_ms"]["comm"], 2),
                                "wire_bytes": r["latency_ms"].get("wire_bytes"),
                                "j_per_sample": round(joules / batch, 4),
                                "ran": r["mode"],
                                "chose": r["decision"].get("option"),
                                "predicted_ms": r["decision"].get("predicted_ms"),
                                "fallback": r.get("fallback", False),
                                "min_fidelity": r["decision"].get("min_fidelity"),
                                "options_fidelity": r["decision"].get("options_fidelity"),
                            }
                        )
                        print(json.dumps(rows[-1]), file=sys.stderr)
    write_outputs(args, rows, options, batches, rates)
    return 0


def name(mbps: float) -> str:
    return "unshaped" if not mbps else f"{mbps:g}"


def write_outputs(
    args: argparse.Namespace, rows: list[dict[str, Any]], options: list[str], batches: list[int], rates: list[float]
) -> None:
    with args.out.with_suffix(".csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    cell: dict[tuple[float, int, str], float] = {}
    energy: dict[tuple[float, int, str], float] = {}
    chose: dict[tuple[float, int], str] = {}
    spread: dict[tuple[float, int, str], float] = {}
    chose_note: dict[tuple[float, int], str] = {}
    grouped: dict[tuple[float, int, str], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        grouped[(r["mbps"], r["batch"], r["option"])].append(r)
    for key, rs in grouped.items():
        cell[key] = statistics.median(r["ms_per_sample"] for r in rs)
        if len(rs) >= 4:  # run-to-run spread: interquartile range over the median
            q1, _, q3 = statistics.quantiles([r["ms_per_sample"] for r in rs], n=4)
            spread[key] = (q3 - q1) / cell[key]
        energy[key] = statistics.median(r["j_per_sample"] for r in rs)
        if key[2] == "auto":  # what it chose most often, and how often when not every time
            picks = Counter(r["chose"] for r in rs)
            chose[key[:2]], times = picks.most_common(1)[0]
            if times < len(rs):
                chose_note[key[:2]] = f" ({times} of {len(rs)})"
    fixed = [o for o in options if o != "auto"]
    # auto may only pick options whose profiled fidelity meets its floor (local and full are
    # exact): its regret is against those, as its own decisions reported them.
    fidelity: dict[str, float] = {}
    floors = {r["min_fidelity"] for r in rows if r["option"] == "auto" and r.get("min_fidelity") is not None}
    for r in rows:
        for o, f in (r.get("options_fidelity") or {}).items():
            if f is not None:
                fidelity[o] = min(f, fidelity.get(o, 1.0))
    floor = min(floors) if floors else None
    allowed = [o for o in fixed if o in ("local", "full") or floor is None or fidelity.get(o, 0.0) >= floor]
    md = [f"### {args.model}, {args.hosts} hosts: per-sample latency (ms) by link (Mbit/s) and batch", ""]
    if floor is not None:
        shown = ", ".join(f"{o} {fidelity[o]:.5f}" for o in fixed if o in fidelity and o not in ("local", "full"))
        note = f"auto's floor: min_fidelity {floor:g}; profiled fidelity: {shown}"
        md += [f"{note}; its regret is against {', '.join(allowed)}", ""]
    md.append(
        "| link | batch | " + " | ".join(options) + " | best allowed | auto chose | auto regret | choice regret |"
    )
    md.append("|---" * (len(options) + 6) + "|")
    regrets, choice = [], []
    for mbps in rates:
        for b in batches:
            vals = {o: cell[(mbps, b, o)] for o in options}
            best = min(allowed, key=lambda o: vals[o])
            line = f"| {name(mbps)} | {b} | " + " | ".join(f"{vals[o]:.0f}" for o in options)
            if "auto" in vals:
                regret = vals["auto"] / vals[best] - 1
                regrets.append(regret)
                picked = chose.get((mbps, b)) or best
                # The chosen option's own measurement against the best: the decision's cost without
                # auto's run-to-run noise.
                choice.append(vals.get(picked, vals[best]) / vals[best] - 1)
                note = chose_note.get((mbps, b), "")
                line += f" | {best} | {picked}{note} | {regret * 100:+.1f} % | {choice[-1] * 100:+.1f} % |"
            else:
                line += f" | {best} | - | - | - |"
            md.append(line)
    if spread:
        md += [
            "",
            (
                f"run-to-run spread (interquartile range / median of a cell's runs): median "
                f"{statistics.median(spread.values()) * 100:.1f} %, largest {max(spread.values()) * 100:.1f} % "
                f"over {len(spread)} cells with >= 4 runs"
            ),
        ]
    if regrets:
        mean, worst = statistics.mean(regrets) * 100, max(regrets) * 100
        md += [
            "",
            f"auto regret vs the best fixed option: mean {mean:+.1f} %, worst {worst:+.1f} % over {len(regrets)} cells",
        ]
        mean, worst = statistics.mean(choice) * 100, max(choice) * 100
        md += [
            "",
            f"choice regret (the chosen option's own fixed run vs the best): mean {mean:+.1f} %, worst {worst:+.1f} %",
        ]
    md += [
        "",
        "Best split (method and CR) vs full exchange, per-sample latency and modelled energy, mean over batches:",
        "",
    ]
    md.append("| link | latency reduction | energy reduction | crossover batch (split beats local) |")
    md.append("|---|---|---|---|")
    prisms = [o for o in fixed if "@" in o]
    for mbps in rates:
        lat = [1 - min(cell[(mbps, b, o)] for o in prisms) / cell[(mbps, b, "full")] for b in batches]
        en = [1 - min(energy[(mbps, b, o)] for o in prisms) / energy[(mbps, b, "full")] for b in batches]
        split = [
            b for b in batches if min(cell[(mbps, b, o)] for o in fixed if o != "local") < cell[(mbps, b, "local")]
        ]
        md.append(
            f"| {name(mbps)} | {statistics.mean(lat) * 100:.0f} % | {statistics.mean(en) * 100:.0f} % | "
            f"{min(split) if split else 'never'} |"
        )
    args.out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    plot(args, cell, options, batches, rates, "ms per sample", "")
    plot(args, energy, options, batches, rates, "J per sample (modelled)", "-energy")


def plot(
    args: argparse.Namespace,
    cell: dict[tuple[float, int, str], float],
    options: list[str],
    batches: list[int],
    rates: list[float],
    what: str,
    suffix: str,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(batches), figsize=(3.2 * len(batches), 3.4), sharey=True, squeeze=False)
    xs = list(range(len(rates)))
    for ax, b in zip(axes[0], batches, strict=True):  # squeeze=False: a row of axes even for one batch
        for o in options:
            style = {"linewidth": 2.5, "color": "black", "linestyle": "--"} if o == "auto" else {}
            ax.plot(xs, [cell[(m, b, o)] for m in rates], marker="o", label=o, **style)
        ax.set_xticks(xs, ["unshaped" if not m else f"{m:g}" for m in rates], rotation=45)
        ax.set_title(f"batch {b}")
        ax.set_xlabel("link (Mbit/s)")
        ax.set_yscale("log")
    axes[0][0].set_ylabel(what)
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(f"{args.model}, {args.hosts} hosts: {what} by mode, link and batch")
    fig.tight_layout()
    fig.savefig(args.out.with_name(args.out.name + suffix + ".png"), dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
