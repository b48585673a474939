"""Made-up performance maps whose winners are known, for the policy tests.

Model "m" at seq 128, per sample: local 100 ms. Split over 2 ranks on loopback, per sample:

    option     ms    compute  wire bytes  cosine   J
    full       60    50       1_000_000   exact    0.7
    means@4    55    50         250_000   0.97     0.6
    means@8    53    50         125_000   0.95     0.95
    codes@4    58    52         250_000   0.99995  0.8
    codes@8    57    52         125_000   0.9993   0.85
    codes@16   56.5  52          62_500   0.998    0.9

So at B Mbit/s an option adds wire * 8 / (1000 * B) ms per sample: at 100 Mbit/s full is 140,
means@8 63, codes@8 67, codes@16 61.5; at 1000 Mbit/s means@8 54, codes@16 57, codes@8 58.
"""

from __future__ import annotations

from policy.decide import PeerLink
from policy.perfmap import Cell, PerfMap

HW = {"cpu": "x", "cores": 2, "threads": 1, "device": "cpu", "gpu": None}
#: (mode, method, cr) -> (ms per sample, compute ms per sample, wire bytes per sample, cosine, joules per sample)
OPTIONS: dict[tuple[str, str | None, float | None], tuple[float, float, int, float | None, float]] = {
    ("local", None, None): (100.0, 100.0, 0, None, 1.0),
    ("full", None, None): (60.0, 50.0, 1_000_000, None, 0.7),
    ("prism", "means", 4.0): (55.0, 50.0, 250_000, 0.97, 0.6),
    ("prism", "means", 8.0): (53.0, 50.0, 125_000, 0.95, 0.95),
    ("prism", "codes", 4.0): (58.0, 52.0, 250_000, 0.99995, 0.8),
    ("prism", "codes", 8.0): (57.0, 52.0, 125_000, 0.9993, 0.85),
    ("prism", "codes", 16.0): (56.5, 52.0, 62_500, 0.998, 0.9),
}
BATCHES = (1, 2, 4, 8, 16)


def synthetic_map(*, fidelity: bool = True, methods: tuple[str, ...] = ("means", "codes")) -> PerfMap:
    """The map above; ``fidelity=False`` leaves the cosines out, as a version-1 map has them."""
    perf = PerfMap(hardware=dict(HW), models={"m": 1.0}, energy_source="cpu-model")
    for batch in BATCHES:
        for (mode, method, cr), (ms, compute, wire, cosine, joules) in OPTIONS.items():
            if method is not None and method not in methods:
                continue
            cell = Cell("m", batch, 128, mode, cr, 1 if mode == "local" else 2, ms * batch, ms * batch * 1.1, 5)
            cell.compute_ms = compute * batch
            cell.wire_bytes = wire * batch
            cell.rounds = 15
            cell.energy_j = joules
            cell.method = method
            if fidelity and cosine is not None:
                cell.cosine, cell.cosine_min, cell.top1 = cosine, cosine - 0.01, 1.0
            perf.cells.append(cell)
    return perf


def peer(
    mbps: float | None, load1: float = 0.0, queue: int = 0, ms_per_token: float | None = None, node: str = "p"
) -> list[PeerLink]:
    """One peer at ``mbps``."""
    return [PeerLink(node, mbps, 0.0, load1, 1, queue, ms_per_token)]
