"""``prism-agent submit``: every field of a job from flags, inputs from flags or files, results printed.

The job flags are the job schema's fields (README "MQTT API", its job table; a test walks that
table against this parser), checked by the schema itself. Inputs come from flags (``--text``,
``--image``, ``--token-ids``) or files (``--text-file``, ``--image-dir``), cut into jobs of at
most ``--batch`` inputs; ``--jobs`` reads whole jobs, one JSON object a line. One job is sent as
:func:`agent.client.submit` does; several go over one :func:`agent.client.stream`, and their
results are printed in the order of the jobs as they come (``--json``: one object a line).
A ``generate`` job with ``--stream`` prints its text (or token ids) as it comes, then its result.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from agent.cli import args, cluster_cmds, job_files, output
from transport.schema import METHODS, Mode, Objective

TASKS = ["classify", "features", "embed", "next_token", "loglik", "generate"]
#: Flag dests of a generate job's own fields (transport/gen_fields.py).
GENERATION = ("max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop")
#: Flag dests that set a field of the job (refused with --jobs, whose lines are whole jobs).
JOB_FLAGS = (
    "model", "id", "task", "mode", "cr", "method", "ranks", "peers",
    "min_fidelity", "objective", "deadline_ms", "batch", *GENERATION,
)  # fmt: skip
#: Inputs a job carries at most, when the command line does not say (a stock agent's limit).
DEFAULT_BATCH = 64


def add_parser(sub: Any) -> None:
    """Register ``submit``."""
    sm = sub.add_parser("submit", help="publish jobs over MQTT and print their results")
    cluster_cmds.broker_flags(sm)
    inputs = sm.add_mutually_exclusive_group(required=True)
    inputs.add_argument("--text", action="append", default=None, help="input text (repeat for a batch)")
    inputs.add_argument("--prompt", default=None, help="a generate job's prompt (text)")
    inputs.add_argument(
        "--text-file", dest="text_file", type=args.file_or_stdin, default=None, help="one input a line ('-': stdin)"
    )
    inputs.add_argument("--image", action="append", type=args.existing_file, default=None, help="image file (repeat)")
    inputs.add_argument(
        "--image-dir", dest="image_dir", type=args.existing_dir, default=None, help="every image in a folder (ViT)"
    )
    inputs.add_argument("--token-ids", dest="token_ids", action="append", type=token_ids, default=None, help="1,2,3")
    inputs.add_argument(
        "--jobs", type=args.file_or_stdin, default=None, help="JSON lines: one whole job object a line ('-': stdin)"
    )
    sm.add_argument("--model", type=args.non_blank, default=None, help="model name as the agents serve it")
    sm.add_argument("--id", type=args.job_id, default=None, help="job id (default: random; several jobs: ID-1, ...)")
    sm.add_argument("--task", choices=TASKS, default=None, help="default: what the model has a head for")
    sm.add_argument("--mode", choices=[m.value for m in Mode], default=None, help="where it runs (default auto)")
    sm.add_argument("--cr", type=args.job_cr, default=None, help="compression rate (>= 1) or 'full'")
    sm.add_argument("--method", choices=METHODS, default=None, help="how a split compresses (cr alone: means)")
    sm.add_argument("--ranks", type=args.job_ranks, default=None, help="devices to use (1-64)")
    sm.add_argument("--peers", type=args.job_peers, default=None, help="split over exactly these node ids (a,b)")
    sm.add_argument(
        "--min-fidelity", dest="min_fidelity", type=args.min_fidelity, default=None, help="accuracy floor (0-1)"
    )
    sm.add_argument("--objective", choices=[o.value for o in Objective], default=None, help="what auto minimises")
    sm.add_argument(
        "--deadline-ms", dest="deadline_ms", type=args.deadline_ms, default=None, help="ms from arrival at the agent"
    )
    gen = sm.add_argument_group("generate (task generate)")
    gen.add_argument("--max-new-tokens", dest="max_new_tokens", type=args.positive, default=None, help="default 32")
    gen.add_argument("--temperature", type=args.non_negative_float, default=None, help="0: greedy (default)")
    gen.add_argument("--top-k", dest="top_k", type=args.positive, default=None, help="sample from the k likeliest")
    gen.add_argument("--top-p", dest="top_p", type=args.positive_float, default=None, help="nucleus mass (0, 1]")
    gen.add_argument("--seed", type=args.non_negative, default=None, help="the same seed, the same text")
    gen.add_argument("--stop", type=token_ids, default=None, help="stop token ids 1,2 (default: end of text)")
    gen.add_argument("--stream", action="store_true", help="print the text as it comes")
    sm.add_argument(
        "--batch", type=args.positive, default=None, help=f"inputs per job (default {DEFAULT_BATCH}; more: more jobs)"
    )
    sm.add_argument("--node", type=args.name, default=None, help="send to this node only")
    sm.add_argument("--in-flight", dest="in_flight", type=args.positive, default=4, help="jobs unanswered at once")
    sm.add_argument("--timeout", type=args.seconds, default=60.0, help="seconds to wait for a (next) result")
    sm.add_argument("--json", action="store_true", help="print each result object (one a line)")


def token_ids(text: str) -> list[int]:
    """``1,2,3``: one sample's token ids."""
    try:
        ids = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not ids or min(ids) < 0:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 0, got {text!r}")
    return ids


def build_jobs(ns: argparse.Namespace) -> list[dict[str, Any]]:
    """The jobs the command line describes, each checked against the schema (else :class:`UsageError`)."""
    if ns.jobs is not None:
        given = [f"--{d.replace('_', '-')}" for d in JOB_FLAGS if getattr(ns, d) is not None]
        if given:
            raise args.UsageError(f"--jobs takes whole jobs: set {', '.join(given)} in the file's jobs instead")
        return job_files.job_lines(ns.jobs)
    if ns.model is None:
        raise args.UsageError("give --model NAME (or --jobs FILE of whole jobs)")
    items: list[Any]
    if ns.text_file is not None:
        kind, items = "text", job_files.text_lines(ns.text_file)
    elif ns.image_dir is not None:
        kind, items = "images", job_files.image_files(ns.image_dir)
    elif ns.image:
        kind, items = "images", ns.image
    elif ns.token_ids:
        kind, items = "token_ids", ns.token_ids
    elif ns.prompt is not None:
        kind, items = "text", [ns.prompt]
    else:
        kind, items = "text", ns.text
    from agent.client import build_job

    runs = job_files.batches(items, ns.batch or DEFAULT_BATCH)
    jobs = []
    for i, run in enumerate(runs, 1):
        job_id = None if ns.id is None else ns.id if len(runs) == 1 else f"{ns.id}-{i}"
        job = build_job(
            ns.model, **{kind: run}, job_id=job_id, mode=ns.mode or "auto", cr=ns.cr, task=ns.task,
            method=ns.method, ranks=ns.ranks, peers=ns.peers, min_fidelity=ns.min_fidelity,
            objective=ns.objective, deadline_ms=ns.deadline_ms,
            generation={d: getattr(ns, d) for d in GENERATION if getattr(ns, d) is not None},
        )  # fmt: skip
        if kind != "images" and ns.task == "generate" and len(run) == 1:
            job["inputs"] = {kind: run[0]}  # one prompt: a string or one list of ids
        job_files.check(job)  # what no flag alone can say: --ranks against --peers
        jobs.append(job)
    return jobs


def run(ns: argparse.Namespace) -> int:
    """Exit 0 when every result is ok, 1 when one is an error, 3 when one did not come in time."""
    from agent.client import client_auth, submit, submit_all

    jobs = build_jobs(ns)
    settings, broker = cluster_cmds.client_settings(ns.broker, ns.cluster)
    auth = client_auth(settings)
    printer = _Printer(ns.json, [str(j["id"]) for j in jobs])
    try:
        if ns.stream and len(jobs) == 1:
            asyncio.run(_stream(ns, jobs[0], (settings.cluster, broker, auth), printer))
        elif len(jobs) == 1:
            one = submit(broker, settings.cluster, jobs[0], node=ns.node, timeout_s=ns.timeout, auth=auth)
            printer.took(asyncio.run(one))
        else:
            asyncio.run(
                submit_all(
                    broker, settings.cluster, jobs, on_result=printer.took, node=ns.node, in_flight=ns.in_flight,
                    idle_s=ns.timeout, auth=auth,
                )
            )  # fmt: skip
    except (asyncio.TimeoutError, TimeoutError):
        printer.flush()
    missing = len(jobs) - printer.received
    if missing:
        where = f"node {ns.node}" if ns.node else f"any agent serving '{ns.model}'" if ns.model else "any agent"
        which = f"job {jobs[0]['id']}" if len(jobs) == 1 else f"{missing} of {len(jobs)} jobs"
        print(
            f"prism-agent: error: no result for {which} within {ns.timeout:g} s from {where} in cluster "
            f"'{settings.cluster}' on {cluster_cmds.broker_text(broker)}",
            file=sys.stderr,
        )
        return 3
    return 0 if printer.all_ok else 1


async def _stream(ns: argparse.Namespace, job: dict[str, Any], where: tuple[str, Any, Any], printer: _Printer) -> None:
    """A generate job's partials as they come (text, else token ids), then its result."""
    from agent.client import generate, is_partial

    cluster, broker, auth = where
    said = False
    async for data in generate(broker, cluster, job, node=ns.node, timeout_s=ns.timeout, auth=auth):
        if not is_partial(data):
            if said and not ns.json:
                print(flush=True)  # end the streamed line
            printer.took(data)
        elif ns.json:
            print(json.dumps(data), flush=True)
        else:
            text = data.get("text")
            shown = text if isinstance(text, str) else "".join(f" {t}" for t in data.get("tokens") or [])
            print(shown, end="", flush=True)
            said = True


class _Printer:
    """Prints results in the order of the jobs, each as soon as those before it are printed."""

    def __init__(self, as_json: bool, order: list[str]) -> None:
        self.as_json = as_json
        self.order = order
        self.waiting: dict[str, dict[str, Any]] = {}
        self.next = 0  # the job whose result is printed next
        self.printed = 0
        self.received = 0
        self.all_ok = True

    def took(self, result: dict[str, Any]) -> None:
        """A result came: print it and those after it that wait, when the jobs before it are printed."""
        self.waiting[str(result.get("id"))] = result
        self.received += 1
        self.all_ok = self.all_ok and bool(result.get("ok"))
        while self.next < len(self.order) and self.order[self.next] in self.waiting:
            self._print(self.waiting.pop(self.order[self.next]))
            self.next += 1

    def flush(self) -> None:
        """No more results will come: print those still waiting for an earlier one, in order."""
        for job_id in self.order[self.next :]:
            if job_id in self.waiting:
                self._print(self.waiting.pop(job_id))

    def _print(self, result: dict[str, Any]) -> None:
        if self.as_json:
            print(json.dumps(result), flush=True)
        else:
            print(("\n" if self.printed else "") + output.result_lines(result), flush=True)
        self.printed += 1
