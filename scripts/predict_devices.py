"""What the cost model predicts for more devices than we have: per-sample latency at P ranks.

    python scripts/predict_devices.py --map runs/policy/vit-base.map.json --batch 8 --cr 9.9

Per rank, compute = the map's measured local time x (PRISM block MACs of the busiest rank /
one device's block MACs) (engine.cost); the link carries, per layer, that rank's segment rows
to each of the P - 1 others plus its share of the inputs, at the given rate (each host's uplink
shaped, as on the test bed), plus a one-way latency per collective. Measured P = 2 (and 3)
rows from bench_policy.py are the check on this model.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from engine.cost import block_macs_local, block_macs_rank, received_rows  # noqa: E402
from engine.plan import PartitionPlan  # noqa: E402
from engine.segments import Compression, layout  # noqa: E402
from policy.perfmap import load_map  # noqa: E402
from policy.predict import predict  # noqa: E402

#: vit-base / bert-base shapes: hidden size, FFN expansion, layers, input bytes per token
SHAPES = {"vit-base": (768, 4.0, 12, 3 * 16 * 16 * 4), "bert-base": (768, 4.0, 12, 8)}


def per_sample_ms(
    local_ms: float, n: int, ranks: int, cr: float | None, mbps: float, model: str, rtt_ms: float
) -> float:
    d, f, layers, in_bytes = SHAPES[model]
    plan = PartitionPlan.equal(n, ranks)
    comp = Compression(cr=cr)
    rows = received_rows(plan, comp, causal=False)
    busiest = max(range(ranks), key=lambda p: block_macs_rank(plan.sizes[p], rows[p], d, f))
    frac = block_macs_rank(plan.sizes[busiest], rows[busiest], d, f) / block_macs_local(n, d, f)
    mask = torch.ones(1, n, dtype=torch.bool)
    sent = max(layout(plan, p, mask, comp).n_segments for p in range(ranks)) * (ranks - 1) * d * 4 * layers
    io = n * in_bytes * (ranks - 1) / ranks + d * 4 * (ranks - 1)  # inputs out, partial outputs back
    rounds = layers + 2 * ranks
    return local_ms * frac + (sent + io) * 8 / (mbps * 1e3) + rounds * rtt_ms / 2


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--map", type=Path, required=True)
    p.add_argument("--model", default="vit-base")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--cr", type=float, default=9.9)
    p.add_argument("--ranks", default="2,3,4,8")
    p.add_argument("--bandwidths", default="20,50,100,200,1000")
    p.add_argument("--rtt", type=float, default=0.1, help="round-trip time, ms")
    args = p.parse_args()
    perf = load_map(args.map)
    cells = [c for c in perf.for_model(args.model) if c.mode == "local"]
    n = cells[0].seq
    local = predict(perf, args.model, args.batch, n, "local", None, 1)
    assert local is not None
    local_ms = local.ms / args.batch
    ranks = [int(r) for r in args.ranks.split(",")]
    print(f"{args.model}, batch {args.batch}, CR {args.cr:g}: predicted ms per sample (local: {local_ms:.0f} ms)\n")
    print("| link (Mbit/s) | " + " | ".join(f"P = {r}" for r in ranks) + " |")
    print("|---" * (len(ranks) + 1) + "|")
    for mbps in (float(b) for b in args.bandwidths.split(",")):
        cols = [per_sample_ms(local_ms, n, r, args.cr, mbps, args.model, args.rtt) for r in ranks]
        print(f"| {mbps:g} | " + " | ".join(f"{c:.0f} ({local_ms / c:.2f}x)" for c in cols) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
