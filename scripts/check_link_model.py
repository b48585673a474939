"""How well a loopback map plus the link model predicts cells measured over a real link.

    python scripts/check_link_model.py LOOPBACK.map.json MEASURED.map.json [--model NAME]

MEASURED comes from ``prism-agent profile --peers`` (its cells carry the link they were
measured over). For every distributed cell, the loopback map predicts it at that link; the
table shows both and the error, then the link efficiency ``e`` fitted from both maps together.
The two maps may name the model differently; they must hold the same weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from policy.perfmap import PerfMap, load_map
from policy.predict import fit_link_efficiency, predict


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("loopback", type=Path)
    p.add_argument("measured", type=Path)
    args = p.parse_args()
    base, real = load_map(args.loopback), load_map(args.measured)
    (name, fp), (real_name, real_fp) = next(iter(base.models.items())), next(iter(real.models.items()))
    if abs(fp - real_fp) > 1e-6 * max(1.0, abs(fp)):
        print("error: the maps hold different weights", file=sys.stderr)
        return 1
    base.corrections = {}
    rows, errors = [], []
    for c in sorted(real.for_model(real_name), key=lambda c: (c.batch, c.mode, c.cr or 0)):
        est = predict(base, name, c.batch, c.seq, c.kind, c.cr, c.ranks, mbps=c.mbps)
        if est is None:
            continue
        error = est.ms / c.median_ms - 1
        if c.mode != "local":
            errors.append(abs(error))
        per = c.batch
        link = "-" if c.mbps is None else f"{c.mbps:.0f}"
        rows.append(
            f"| {c.batch} | {c.option} | {link} | {c.median_ms / per:.0f} | {est.ms / per:.0f} | {error * 100:+.1f} % |"
        )
    print("| batch | option | link seen (Mbit/s) | measured ms/sample | predicted from loopback | error |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    both = PerfMap(base.hardware, base.models, base.energy_source, base.cells)
    both.cells += [dataclasses.replace(c, model=name) for c in real.for_model(real_name)]
    print()
    print(f"distributed cells: mean |error| {statistics.mean(errors) * 100:.1f} %, largest {max(errors) * 100:.1f} %")
    print(f"link efficiency e fitted from both maps: {fit_link_efficiency(both):.2f} (1.0: the loopback map's)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
