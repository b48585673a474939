"""``prism-agent demo``: what ``auto`` mode is for, in under a few minutes on one box.

It profiles a small performance map on this box, starts a broker and two real agents with
it, and submits the same batch in ``auto`` mode on a fast link and then on a slow one (as
root: two network namespaces whose link is shaped with ``tc``; elsewhere: loopback, one
link, and what the map predicts for the slow one). Each job's decision, its reason,
predicted and measured time and its fidelity against a local run of the same job are
printed, then one line on what the run showed. ``--engine`` shows the engine alone.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

from agent.cli import args, output
from engine.errors import PrismError

SLOW_MBIT = 3.0
#: The map holds local and every method at these CRs: kv meets the default floor (0.999) at 4,
#: codes at 8; Segment Means meets it at neither on real weights.
CRS = (4.0, 8.0)
#: The forced split: the faithful option that computes least (K/V codes at 1/4 of the bytes).
SPLIT = {"cr": 4.0, "method": "kv"}
WORDS = 100  # words per text: real passages of about 150 tokens
PROFILE_REPEAT = 5  # timed passes per cell; the options take turns, so passing load hits them alike
COLUMNS = {
    "link": "the link from the coordinating agent to its peer, as its probes measured it (Mbit/s)",
    "job": "auto: the agent chooses; local: the same batch run locally (the reference); split: forced PRISM split",
    "ran": "what ran: local, or the option split with the peer (kv@CR: every row's K and V in low-bit codes, 1/CR "
    "of the bytes; codes@CR: every row in low-bit codes; means@CR: Segment Means of every CR tokens)",
    "predicted": "the engine time the performance map predicted for what ran (with its online corrections)",
    "measured": "the engine time the agent measured",
    "cosine": "mean cosine of the outputs against the local run of the same batch (1.0000: identical)",
    "why": "the decision's reason, as every result carries it",
}


class DemoError(PrismError):
    """The demo could not run (an agent died, a link never settled)."""

    code = "demo_failed"


def add_cli(sub: Any) -> None:
    """Register ``demo``."""
    demo = sub.add_parser("demo", help="profile a map, start two agents with it, watch auto on a fast and a slow link")
    demo.add_argument("--model", default="minilm", help="a text model (default: real all-MiniLM-L6-v2)")
    demo.add_argument("--batch", type=args.positive, default=8, help="texts per job")
    demo.add_argument("--slow", type=args.positive_float, default=SLOW_MBIT, help="the slow link, Mbit/s")
    demo.add_argument("--auto-jobs", dest="auto_jobs", type=args.positive, default=2, help="auto jobs per link")
    demo.add_argument("--loopback", action="store_true", help="run on loopback even where namespaces are available")
    demo.add_argument("--json", action="store_true", help="print the run as one JSON object")
    demo.add_argument("--engine", action="store_true", help="engine only: one process vs 2 GLOO ranks, no daemon")
    demo.add_argument("--crs", type=_crs, default=[4.0, 16.0], help="with --engine: comma-separated CRs to show")


def _crs(text: str) -> list[float]:
    values = [args.parse_cr(x) for x in text.split(",")]
    return [v for v in values if v is not None]


def _texts(model: str, batch: int) -> tuple[list[str], int]:
    """The batch's texts and its length in tokens as the agent will see it."""
    from agent.jobs.inputs import to_tensors
    from engine.corpus import passages
    from engine.models import load
    from transport.schema import Limits, parse_job

    loaded = load(model)
    if loaded.adapter.family == "vit":
        raise DemoError(f"the demo sends text; '{model}' is a ViT (try --model minilm or tiny-bert)")
    texts = passages(batch, words=WORDS)
    if len(texts) < batch:
        raise DemoError(f"only {len(texts)} passages of English text on this box; use --batch {len(texts)}")
    job = parse_job(json.dumps({"id": "x", "model": model, "inputs": {"text": texts}}).encode(), Limits())
    tokens = loaded.adapter.shapes(to_tensors(job, loaded, Limits())).n_tokens
    return texts, int(tokens)


def _cosine(a: Any, b: Any) -> float | None:
    import torch

    if not a or not b:
        return None
    x, y = torch.tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.float32)
    return float(torch.nn.functional.cosine_similarity(x.flatten(1), y.flatten(1), dim=1).mean())


def _vector(result: dict[str, Any]) -> Any:
    out = result.get("output") or {}
    return next((out[k] for k in ("embedding", "features", "logits") if k in out), None)


def _jobs(tag: str, texts: list[str], auto_jobs: int) -> list[tuple[str, dict[str, Any]]]:
    base = {"v": 1, "model": "demo", "inputs": {"text": texts}}
    jobs = [("auto", {**base, "id": f"demo-{tag}-auto{i}", "mode": "auto"}) for i in range(auto_jobs)]
    jobs.append(("local", {**base, "id": f"demo-{tag}-local", "mode": "local"}))
    jobs.append(("split", {**base, "id": f"demo-{tag}-split", "mode": "distributed", **SPLIT}))
    return jobs


def _condition(site: Any, mbit: float | None, tag: str, texts: list[str], auto_jobs: int) -> dict[str, Any]:
    """Shape the link, wait for the probes to see it, run the jobs."""
    site.shape(mbit)
    label = "unshaped" if mbit is None else f"{mbit:g} Mbit/s"
    print(f"link {label}: waiting for {site.nodes[0]}'s probes to see it ...", file=sys.stderr)
    probed = site.wait_link(mbit)
    results = []
    for role, job in _jobs(tag, texts, auto_jobs):
        result = site.submit(job)
        if not result.get("ok"):
            error = result.get("error") or {}
            raise DemoError(f"job {job['id']} failed: {error.get('code')}: {error.get('message')}")
        results.append({**result, "role": role})
    reference = _vector(next(r for r in results if r["role"] == "local"))
    for r in results:
        r["cosine_vs_local"] = _cosine(_vector(r), reference)
    return {"link": label, "shaped_mbit": mbit, "probed_mbps": probed, "results": results}


def run_demo(model: str, batch: int, slow: float, auto_jobs: int, loopback: bool) -> dict[str, Any]:
    """Profile, start the agents, run the jobs on each link; the whole run as a dict."""
    from agent.cli.demo_sites import LoopbackSite, NamespaceSite, Site
    from agent.profiling.loopback import Grid, profile_loopback
    from policy.decide import Policy
    from policy.perfmap import save_map
    from policy.report import decide_at
    from testbed.bed import TestbedError, netns_unavailable

    why_loopback = "asked for (--loopback)" if loopback else netns_unavailable()
    texts, tokens = _texts(model, batch)
    with tempfile.TemporaryDirectory(prefix="prism-demo-") as tmp:
        map_file = Path(tmp) / f"{model.replace('/', '_')}.map.json"
        crs = " and ".join(f"{cr:g}" for cr in CRS)
        options = f"local, and means, codes and kv at CR {crs} over 2 local GLOO ranks"
        print(f"1/3 profiling a performance map of {model} on this box (batches {batch // 2 or 1} and {batch}, "
              f"{tokens} tokens, {options}) ...", file=sys.stderr)  # fmt: skip
        grid = Grid(model, 2, tuple(sorted({max(1, batch // 2), batch})), CRS, tokens, repeat=PROFILE_REPEAT)
        perf = profile_loopback(grid)
        save_map(perf, map_file)
        site: Site = LoopbackSite() if why_loopback else NamespaceSite()
        if why_loopback:
            print(f"namespaces unavailable ({why_loopback}): running on loopback, one link", file=sys.stderr)
        print(f"2/3 starting a broker and two agents with the map: {site.where} ...", file=sys.stderr)
        try:
            site.start(model, map_file)
            print("3/3 submitting the same batch on each link", file=sys.stderr)
            links: list[float | None] = [None] if why_loopback else [None, slow]
            conditions = [_condition(site, mbit, f"l{i}", texts, auto_jobs) for i, mbit in enumerate(links)]
        except TestbedError as exc:  # the bed could not be built or driven: one line, like any demo failure
            raise DemoError(f"the namespace bed failed: {exc}") from exc
        finally:
            site.close()
    not_run = None
    if why_loopback:
        got = decide_at(perf, model, batch, tokens, slow, Policy()).as_dict()
        not_run = {"link": f"{slow:g} Mbit/s", "option": got["option"], "options": got["options"]}
    run = {
        "model": model,
        "batch": batch,
        "tokens": tokens,
        "site": "loopback" if why_loopback else "netns",
        "loopback_reason": why_loopback,
        "nodes": list(site.nodes),
        "conditions": conditions,
        "not_run": not_run,
    }
    run["summary"] = summary(run)
    return run


def _autos(condition: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in condition["results"] if r["role"] == "auto"]


def _engine_ms(condition: dict[str, Any], role: str) -> float:
    return float(next(r for r in condition["results"] if r["role"] == role)["latency_ms"]["engine"])


def _chose(condition: dict[str, Any]) -> str:
    options = {str((r.get("decision") or {}).get("option") or r.get("mode")) for r in _autos(condition)}
    return " and ".join(sorted(options))


def _split_part(c: dict[str, Any], peer: str, autos: list[dict[str, Any]], where: str) -> str:
    # The first split also formed the GLOO group and ran each shape for the first time: it is
    # named apart, and the jobs after it are what a split costs once the group is up.
    later = autos[1:] or autos
    auto_ms = sum(r["latency_ms"]["engine"] for r in later) / len(later)
    local_ms = _engine_ms(c, "local")
    cos = min(r["cosine_vs_local"] or 0.0 for r in autos)
    text = (
        f"{where} auto split the batch with {peer} ({_chose(c)}: {output.ms(auto_ms)} vs {output.ms(local_ms)} "
        f"run locally, cosine {cos:.4f}"
    )
    if len(autos) > 1:
        first = autos[0]["latency_ms"]
        text += f"; the first split, which formed the group, took {output.ms(first['engine'])}"
    text += ")"
    if auto_ms > local_ms:  # say so: the corrections learn from it, and the reader should know
        text += ", though here it ran no faster than local (other work on the cores?)"
    return text


def summary(run: dict[str, Any]) -> str:
    """One line on what the run showed, from its results (it says so when auto did not differ)."""
    peer = run["nodes"][1]
    parts = []
    for c in run["conditions"]:
        autos = _autos(c)
        where = f"at {output.number(round(c['probed_mbps'], 1))} Mbit/s"
        if all(r["mode"] == "distributed" for r in autos):
            parts.append(_split_part(c, peer, autos, where))
        elif all(r["mode"] == "local" for r in autos):
            auto_ms = sum(r["latency_ms"]["engine"] for r in autos) / len(autos)
            forced = output.ms(_engine_ms(c, "split"))
            parts.append(f"{where} auto kept it local ({output.ms(auto_ms)}; a forced split took {forced})")
        else:
            parts.append(f"{where} auto chose {_chose(c)} (its corrections moved the choice between jobs)")
    text = "; ".join(parts)
    if run["not_run"] is not None:
        nr = run["not_run"]
        predicted = ", ".join(f"{k} {output.ms(v)}" for k, v in nr["options"].items())
        text += (
            f"; the {nr['link']} link was not run (shaping needs root and ip netns), the map predicts {predicted} "
            f"there, so auto would pick {nr['option']}"
        )
    first = [_autos(c)[0]["mode"] for c in run["conditions"]]
    if len(first) > 1 and first[0] != first[-1]:
        text += ": one performance map, two links, two different choices"
    elif len(first) > 1:
        text += (
            ": auto chose alike on both links, because the map profiled on this box just now predicted no gain "
            "from splitting even on the fast link (are other processes using the cores?)"
        )
    return f"What it showed: {text}."


def print_run(run: dict[str, Any]) -> None:
    """The human view: the table, what its columns mean, and the summary line."""
    where = "network namespaces" if run["site"] == "netns" else "loopback"
    print(f"{run['model']}, {run['batch']} texts of {run['tokens']} tokens per job, two agents on {where}, jobs to "
          f"{run['nodes'][0]}")  # fmt: skip
    rows = []
    for c in run["conditions"]:
        for r in c["results"]:
            d = r.get("decision") or {}
            ran = "local" if r["mode"] == "local" else f"{d.get('option') or 'split'} with {', '.join(r['peers'])}"
            rows.append(
                {
                    "link": f"{c['probed_mbps']:,.1f}",
                    "job": r["role"],
                    "ran": ran + (" (fallback)" if r.get("fallback") else ""),
                    "predicted": output.ms(d.get("predicted_ms")),
                    "measured": output.ms(r["latency_ms"]["engine"]),
                    "cosine": "-" if r["cosine_vs_local"] is None else f"{r['cosine_vs_local']:.4f}",
                    "why": d.get("reason", ""),
                }
            )
    print(output.table(rows, list(COLUMNS)))
    print()
    width = max(len(k) for k in COLUMNS)
    for key, meaning in COLUMNS.items():
        print(f"{key.ljust(width)}  {meaning}")
    print()
    print(run["summary"])


def _engine_demo(ns: argparse.Namespace) -> int:
    from agent.cli import engine_cmds

    rows = engine_cmds.demo(ns.model, ns.batch, ns.crs)
    if ns.json:
        print(json.dumps(rows))
        return 0
    full = next((r["exchange_bytes"] for r in rows if r["mode"] == "full"), 0) or 1
    table = [
        {
            "mode": r["mode"] if r["cr"] is None else f"prism cr={r['cr']:g}",
            "ranks": r["ranks"],
            "latency": output.ms(r["ms"]),
            "exchanged": output.size(r["exchange_bytes"]),
            "vs_full": "-" if r["mode"] == "local" else f"{100 * r['exchange_bytes'] / full:.1f}%",
            "cosine_vs_local": f"{r['mean_cosine']:.4f}",
            "top1_agree": "-" if r["top1_agreement"] is None else f"{r['top1_agreement']:.3f}",
        }
        for r in rows
    ]
    print(f"{rows[0]['model']} ({rows[0]['task']}), batch {ns.batch}: one process vs 2 GLOO ranks on loopback")
    print(output.table(table))
    return 0


def run_cli(ns: argparse.Namespace) -> int:
    """``prism-agent demo``."""
    if ns.engine:
        return _engine_demo(ns)
    from agent.base import logs

    logs.configure("console", level=logging.WARNING)
    run = run_demo(ns.model, ns.batch, ns.slow, ns.auto_jobs, ns.loopback)
    if ns.json:
        print(json.dumps(run))
    else:
        print_run(run)
    return 0
