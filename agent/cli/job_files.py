"""Inputs of ``submit`` from files: a text file (one input a line), a folder of images, a JSON-lines
file of whole jobs. Every problem is a :class:`~agent.cli.args.UsageError` naming the file (and line)."""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path
from typing import Any, TypeVar

from agent.cli.args import UsageError
from transport.schema import Limits, WireError, parse_job

#: What a folder of images contributes: files with these suffixes (any case), in name order.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
#: The schema's rules without its size limits: an agent applies its own (configurable) limits
#: and answers ``too_large``; what the client refuses is only what no agent could take.
SHAPE_ONLY = Limits(
    max_payload_bytes=2**62, max_batch=2**31, max_seq=2**31, max_text_chars=2**62, max_image_bytes=2**62
)

T = TypeVar("T")


def read_text(source: str) -> str:
    """The whole text of a file, or of standard input for ``-``."""
    if source == "-":
        return sys.stdin.read()
    try:
        return Path(source).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{source}: not UTF-8 text") from None


def text_lines(source: str) -> list[str]:
    """One input a line; blank lines are skipped."""
    lines = [line for line in read_text(source).splitlines() if line.strip()]
    if not lines:
        raise UsageError(f"{source}: no lines of text (one input a line)")
    return lines


def image_files(folder: Path) -> list[Path]:
    """The images of a folder (not its subfolders), by name."""
    found = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not found:
        raise UsageError(f"{folder}: no images ({', '.join(s.lstrip('.') for s in IMAGE_SUFFIXES)})")
    return found


def check(job: dict[str, Any], where: str = "") -> None:
    """Refuse a job that no agent would take, as the agents' schema says it (``where``: the file and line)."""
    try:
        parse_job(json.dumps(job).encode(), SHAPE_ONLY)
    except WireError as exc:
        raise UsageError(f"{where}: {exc}" if where else str(exc)) from None


def job_lines(source: str) -> list[dict[str, Any]]:
    """A JSON-lines file of jobs: one job object a line (blank lines skipped), each checked; a
    line without an ``id`` gets a fresh one."""
    jobs: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(read_text(source).splitlines(), 1):
        if not line.strip():
            continue
        where = f"{source} line {number}"
        try:
            job = json.loads(line)
        except ValueError as exc:
            raise UsageError(f"{where}: not JSON ({exc.args[0].split(':')[0]})") from None
        if not isinstance(job, dict):
            raise UsageError(f"{where}: a job must be a JSON object, got {type(job).__name__}")
        job.setdefault("id", uuid.uuid4().hex[:12])
        check(job, where)
        if job["id"] in seen:
            raise UsageError(f"{where}: job id {job['id']!r} is also on line {seen[job['id']]}")
        seen[job["id"]] = number
        jobs.append(job)
    if not jobs:
        raise UsageError(f"{source}: no jobs (one JSON object a line)")
    return jobs


def batches(items: list[T], size: int) -> list[list[T]]:
    """``items`` cut into runs of at most ``size``, in order."""
    return [items[i : i + size] for i in range(0, len(items), size)]
