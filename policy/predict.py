"""Predictions from the performance map, for sizes and links it did not measure.

A prediction starts from the measured cells of one option (model, kind, CR, ranks; the kind
is local, full, or the exchange method, means or codes): the
nearest sequence length, the nearest measured bandwidth, interpolated linearly over batch
size. It then moves the link term to the target link:

    ms(B) = ms(B0) + e * wire_bits * (1/B - 1/B0) + rounds * rtt/2

(``e`` is the link efficiency fitted over cells measured at several bandwidths, 1 when there
are none; loopback counts as B0 = infinity) and applies the online correction for its kind and
link band (observed / predicted, EWMA). Energy moves with the wait: every rank idles at
``idle_w`` for the extra link time. The cells' wire bytes are what the run measured, so the
link model holds for either method: codes' payloads are packed bytes, counted as sent.

Fidelity is predicted from the same family of cells (:func:`predict_fidelity`), and a node's
speed is summed up in one figure, local milliseconds per token (:func:`ms_per_token`).
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from dataclasses import dataclass

from engine.segments import Method
from policy.perfmap import Cell, PerfMap

#: Corrections stay within these factors: one odd observation never hides an option.
CORRECTION_RANGE = (0.25, 4.0)
#: The batch a node's speed figure is taken at (ms_per_token): one both sides can predict.
SPEED_BATCH = 8


def _kind(kind: str) -> str:
    """``prism`` (maps and callers from before methods) is Segment Means."""
    return Method.MEANS.value if kind == "prism" else kind


def correction_key(model: str, kind: str, ranks: int, mbps: float | None = None) -> str:
    """The key corrections are kept under, e.g. ``vit-base/codes/2/64``: split options per link
    band (powers of two in Mbit/s), since what the link model gets wrong depends on the link.
    Each method shares one correction over its CRs: what the map misses (the box's drift, the
    link's efficiency) misses them all alike, and a CR the policy never ran is corrected as
    well. Means and codes keep their own: their compute differs (codes compute K/V of every
    remote row, and code and decode them)."""
    kind = _kind(kind)
    if kind == "local":
        return f"{model}/local/1"
    band = "lo" if mbps is None or math.isinf(mbps) or mbps > 4096 else str(2 ** round(math.log2(max(mbps, 1.0))))
    return f"{model}/{kind}/{ranks}/{band}"


@dataclass(frozen=True, slots=True)
class Estimate:
    """Predicted cost of one option for one request."""

    ms: float
    compute_ms: float
    link_ms: float
    energy_j: float  # per sample
    basis: str  # which cells it came from, for the reason text


def _inv(mbps: float | None) -> float:
    return 0.0 if mbps is None or math.isinf(mbps) else 1.0 / mbps


def _link_ms(wire_bytes: float, mbps: float | None, efficiency: float) -> float:
    """Milliseconds to push ``wire_bytes`` through ``mbps`` (0 for loopback)."""
    return efficiency * wire_bytes * 8 * _inv(mbps) / 1e3


def _same_cr(a: float | None, b: float | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and abs(a - b) < 1e-6)


def _interp(cells: list[Cell], batch: int, attr: str) -> float:
    """``attr`` at ``batch``: linear between measured batches, extended along the end segments."""
    pts = sorted((c.batch, float(getattr(c, attr))) for c in cells)
    if len(pts) == 1:
        b0, v0 = pts[0]
        return v0 * batch / b0
    if batch <= pts[0][0]:
        (b0, v0), (b1, v1) = pts[0], pts[1]
    elif batch >= pts[-1][0]:
        (b0, v0), (b1, v1) = pts[-2], pts[-1]
    else:
        i = next(i for i in range(1, len(pts)) if pts[i][0] >= batch)
        (b0, v0), (b1, v1) = pts[i - 1], pts[i]
    slope = max(0.0, (v1 - v0) / (b1 - b0))
    value = v0 + slope * (batch - b0)
    # Never below the per-sample cost of the smallest measured batch times this batch.
    return max(value, pts[0][1] * batch / pts[0][0] if batch < pts[0][0] else 0.0)


def _nearest(values: list[float | None], target: float | None) -> float | None:
    def dist(v: float | None) -> float:
        a = math.log(v) if v else 30.0  # loopback ~ e^30 Mbit/s
        b = math.log(target) if target else 30.0
        return abs(a - b)

    return min(values, key=dist)


def _family(perf: PerfMap, model: str, seq: int, kind: str, cr: float | None, ranks: int) -> list[Cell]:
    """The option's cells at the profiled sequence length nearest ``seq`` (any batch, link)."""
    cells = [
        c
        for c in perf.for_model(model)
        if c.kind == kind and (kind == "local" or (c.ranks == ranks and _same_cr(c.cr, cr)))
    ]
    if not cells:
        return []
    seq0 = min({c.seq for c in cells}, key=lambda s: abs(math.log(s / max(seq, 1))))
    return [c for c in cells if c.seq == seq0]


def _base(
    perf: PerfMap,
    model: str,
    batch: int,
    seq: int,
    kind: str,
    cr: float | None,
    ranks: int,
    mbps: float | None,
    rtt_ms: float,
    idle_w: float,
) -> Estimate | None:
    """One option's cost from its own cells, before any correction."""
    cells = _family(perf, model, seq, kind, cr, ranks)
    if not cells:
        return None
    seq0 = cells[0].seq
    local = kind == "local"
    measured_at = None if local else _nearest(list({c.mbps for c in cells}), mbps)
    cells = [c for c in cells if c.mbps == measured_at]
    scale = seq / seq0  # a rough correction for another length; profile the lengths you serve
    ms = _interp(cells, batch, "median_ms") * scale
    compute = _interp(cells, batch, "compute_ms") * scale
    energy = _interp(cells, batch, "energy_j") * batch  # stored per sample
    link = 0.0
    if not local:
        wire = _interp(cells, batch, "wire_bytes") * scale
        rounds = max(c.rounds for c in cells)
        link = _link_ms(wire, mbps, perf.link_efficiency) - _link_ms(wire, measured_at, perf.link_efficiency)
        link += rounds * rtt_ms / 2
        ms = max(ms + link, compute)
        energy += idle_w * ranks * link / 1e3
    where = "loopback" if measured_at is None else f"{measured_at:g} Mbit/s"
    basis = f"{len(cells)} cell(s) at seq {seq0}" + ("" if local else f", {where}")
    return Estimate(ms, compute, link, max(0.0, energy / batch), basis)


def predict(
    perf: PerfMap,
    model: str,
    batch: int,
    seq: int,
    kind: str,
    cr: float | None,
    ranks: int,
    *,
    mbps: float | None = None,
    rtt_ms: float = 0.0,
    idle_w: float = 0.0,
) -> Estimate | None:
    """Latency and energy of one option (``kind``: local, full, means or codes; ``prism`` is
    read as means), or None when the map has no such option.

    A method at a higher CR sends fewer bytes for no more compute (Segment Means attend over
    fewer means; codes spend fewer bits on the same rows), so it is never slower than the
    same method at a lower CR: where the map says otherwise that is measurement noise, and
    the option is predicted at the best of the lower CRs instead (then the correction
    learned at this link applies)."""
    kind = _kind(kind)
    est = _base(perf, model, batch, seq, kind, cr, ranks, mbps, rtt_ms, idle_w)
    if est is None:
        return None
    if kind not in ("local", "full") and cr is not None:
        lower = {c.cr for c in perf.for_model(model) if c.kind == kind and c.ranks == ranks}
        for other in sorted(c for c in lower if c is not None and c < cr - 1e-6):
            cheaper = _base(perf, model, batch, seq, kind, other, ranks, mbps, rtt_ms, idle_w)
            if cheaper is not None and cheaper.ms < est.ms:
                note = f"{est.basis}; no slower than {kind}@{other:g}"
                est = Estimate(cheaper.ms, min(est.compute_ms, cheaper.compute_ms), est.link_ms, est.energy_j, note)
            if cheaper is not None and cheaper.energy_j < est.energy_j:
                est = dataclasses.replace(est, energy_j=cheaper.energy_j)
    correction = perf.corrections.get(correction_key(model, kind, ranks, mbps), 1.0)
    return dataclasses.replace(est, ms=est.ms * correction, compute_ms=est.compute_ms * correction)


def predict_fidelity(
    perf: PerfMap, model: str, batch: int, seq: int, kind: str, cr: float | None, ranks: int
) -> float | None:
    """The cosine to expect of one option: 1.0 for local and full exchange (exact); for a
    method at a CR, the profiled cell's at this batch, else the least over every profiled
    batch (conservative). None when the map has no such option or a cell lacks fidelity
    (a map from before fidelity was measured): such an option never meets a floor."""
    kind = _kind(kind)
    cells = _family(perf, model, seq, kind, cr, ranks)
    if not cells:
        return None
    if kind in ("local", "full"):
        return 1.0
    cells = [c for c in cells if c.batch == batch] or cells
    values = [c.cosine for c in cells]
    if any(v is None for v in values):
        return None
    return min(v for v in values if v is not None)


def ms_per_token(perf: PerfMap, model: str) -> float | None:
    """A node's speed for ``model`` in one figure: its local time per token at batch
    ``SPEED_BATCH`` and the profiled length, online correction included (None: no local
    cells). Every node computes it the same way from its own map, so two nodes' figures
    compare: their ratio is how much slower one computes than the other."""
    local = [c for c in perf.for_model(model) if c.mode == "local"]
    if not local:
        return None
    seq = max(c.seq for c in local)
    est = predict(perf, model, SPEED_BATCH, seq, "local", None, 1)
    return None if est is None else est.ms / (SPEED_BATCH * seq)


def fit_link_efficiency(perf: PerfMap) -> float:
    """Least-squares ``e`` in  ms(B) - ms(B_fast) = e * bits * (1/B - 1/B_fast)  over every
    option measured at more than one bandwidth; 1.0 when there is nothing to fit."""
    groups: dict[tuple[object, ...], list[Cell]] = defaultdict(list)
    for c in perf.cells:
        if c.mode != "local":
            groups[(c.model, c.batch, c.seq, c.kind, c.cr, c.ranks)].append(c)
    sxy = sxx = 0.0
    for cells in groups.values():
        fast = min(cells, key=lambda c: _inv(c.mbps))
        for c in cells:
            x = c.wire_bytes * 8 * (_inv(c.mbps) - _inv(fast.mbps)) / 1e3
            if x > 0:
                sxy += x * (c.median_ms - fast.median_ms)
                sxx += x * x
    if sxx == 0:
        return 1.0
    return min(5.0, max(0.5, sxy / sxx))


def refine(perf: PerfMap, key: str, predicted_ms: float, observed_ms: float, alpha: float = 0.2) -> float:
    """Fold one observation into the option's correction (EWMA of observed/predicted)."""
    if predicted_ms <= 0 or observed_ms <= 0 or not math.isfinite(observed_ms):
        return perf.corrections.get(key, 1.0)
    old = perf.corrections.get(key, 1.0)
    ratio = observed_ms / (predicted_ms / old)  # the prediction already carried the old factor
    low, high = CORRECTION_RANGE
    new = min(high, max(low, (1 - alpha) * old + alpha * ratio))
    perf.corrections[key] = new
    return new
