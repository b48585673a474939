"""Human output of the command line: numbers with units, tables, a job's result in a few lines.

Nothing here prints a Python repr: no ``None``, ``[]`` or ``{...}`` reaches a person
(``--json`` is there for programs).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any


def ms(value: Any) -> str:
    """Milliseconds for people: ``0.44 ms``, ``29.4 ms``, ``301 ms``; ``-`` when unknown."""
    if value is None:
        return "-"
    v = float(value)
    if v < 10:
        return f"{v:.2f} ms" if v < 1 else f"{v:.1f} ms"
    return f"{v:,.0f} ms"


def size(value: Any) -> str:
    """Bytes for people: ``512 B``, ``3.0 KiB``, ``1.4 MiB``."""
    v = float(value or 0)
    for unit in ("B", "KiB", "MiB"):
        if v < 1024 or unit == "MiB":
            return f"{v:.0f} {unit}" if unit == "B" else f"{v:.1f} {unit}"
        v /= 1024
    return f"{v:.1f} GiB"  # pragma: no cover - unreachable


def number(value: Any) -> str:
    """Any value as text: 4 significant digits for floats, ``-`` for nothing, lists comma-joined."""
    if value is None or value == [] or value == ():
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(number(v) for v in value)
    if isinstance(value, Mapping):
        return ", ".join(f"{k} {number(v)}" for k, v in value.items()) or "-"
    return str(value)


def table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """Rows as aligned columns (values through :func:`number` unless already text)."""
    if not rows:
        return ""
    cols = list(columns or rows[0])
    cells = [[v if isinstance(v := r.get(c), str) else number(v) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    return "\n".join(lines)


def pairs(data: Mapping[str, Any]) -> str:
    """``key  value`` lines (a flat result such as fidelity's or bench's)."""
    width = max((len(k) for k in data), default=0)
    return "\n".join(f"{k.ljust(width)}  {number(v)}" for k, v in data.items())


def _shape(value: Any) -> str:
    dims = []
    while isinstance(value, list) and value:
        dims.append(len(value))
        value = value[0]
    return " x ".join(str(d) for d in dims)


def _output(output: Mapping[str, Any]) -> str:
    parts = []
    for key, value in output.items():
        flat = isinstance(value, list) and all(isinstance(v, (int, float)) for v in value)
        if flat and len(value) <= 8:
            parts.append(f"{key} {number(value)}")
        else:
            parts.append(f"{key} {_shape(value)} numbers")
    return "; ".join(parts) + " (--json prints the values)"


def result_lines(result: Mapping[str, Any]) -> str:
    """A job's result for people (``submit`` without ``--json``)."""
    if not result.get("ok"):
        error = result.get("error") or {}
        node = f" (node {result['node']})" if result.get("node") else ""
        return f"job {result.get('id')} failed{node}: {error.get('code')}: {error.get('message')}"
    decision = result.get("decision") or {}
    lat = result.get("latency_ms") or {}
    peers = result.get("peers") or []
    ran = str(result.get("mode"))
    if ran == "distributed":
        names = {"codes": "row codes", "kv": "K/V codes"}  # means: PRISM's Segment Means
        method = names.get(str(result.get("method")), "PRISM")
        how = "full exchange" if result.get("cr") == "full" else f"{method} at CR {number(result.get('cr'))}"
        ran += f", {how}, with {', '.join(peers)}"
    rows: list[tuple[str, str]] = [
        ("job", f"{result.get('id')} answered by {result.get('node')}"),
        ("ran", ran + (f" (asked: {decision['requested']})" if decision.get("requested") else "")),
    ]
    if decision.get("reason"):
        rows.append(("why", str(decision["reason"])))
    if result.get("fallback"):
        code = f" ({result['fallback_reason']})" if result.get("fallback_reason") else ""
        why = decision.get("fallback_reason") or "no peer could take it"
        rows.append(("fallback", f"ran locally instead{code}: {why}"))
    if decision.get("predicted_ms") is not None:
        rows.append(("predicted", f"{ms(decision['predicted_ms'])} engine time ({decision.get('option')})"))
    parts = [k for k in ("queue", "compute", "comm", "staging") if k in lat and (lat[k] or k in ("queue", "compute"))]
    breakdown = ", ".join(f"{k} {ms(lat[k])}" for k in parts)
    rows.append(("latency", f"{ms(lat.get('total'))} total, engine {ms(lat.get('engine'))} ({breakdown})"))
    if lat.get("exchange_bytes"):
        rows.append(
            (
                "exchanged",
                (
                    f"{size(lat['exchange_bytes'])} between ranks, {size(lat.get('wire_bytes'))} on the wire, "
                    f"{number(int(lat.get('rounds') or 0))} rounds"
                ),
            )
        )
    energy = result.get("energy") or {}
    if energy.get("joules") is not None:
        rows.append(
            (
                "energy",
                (
                    f"{energy['joules']:.3f} J ({energy.get('per_sample_j', 0):.3f} J per sample, "
                    f"{energy.get('source')}, {energy.get('scope', 'this node')})"
                ),
            )
        )
    out = result.get("output") or {}
    if result.get("final") and "reason" in out:  # a generation: its text, why it ended, its pace
        text = out.get("text")
        ids = "token ids " + " ".join(map(str, out.get("tokens") or []))
        rows.append(("wrote", json.dumps(text, ensure_ascii=False) if isinstance(text, str) else ids))
        pace = f"first token {ms(lat.get('first_token'))} (prefill {ms(lat.get('prefill'))})"
        count = len(out.get("tokens") or [])
        rows.append(
            ("ended", f"{out['reason']} after {count} tokens; {pace}, {lat.get('tokens_per_s', 0):.1f} tokens/s")
        )
    elif out:
        rows.append(("output", _output(out)))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)
