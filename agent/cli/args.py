"""Argument types of the command line: each turns text into a value or says, in one line, why not.

argparse prints ``prism-agent: error: argument --flag: <message>`` for an
:class:`argparse.ArgumentTypeError`, so the messages here only say what was expected.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any, NoReturn

from engine.errors import PrismError


class Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"prism-agent: error: {message}\n")


class UsageError(PrismError):
    """A command line that means nothing, found after parsing (an empty input file, say): exit status 2."""

    code = "usage"


def parse_cr(text: str) -> float | None:
    """``full`` -> None (full exchange); else a number >= 1."""
    if text.strip().lower() == "full":
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--cr must be a number >= 1 or 'full', got {text!r}") from None
    if not math.isfinite(value) or value < 1:
        raise argparse.ArgumentTypeError(f"--cr must be a number >= 1 or 'full', got {text!r}")
    return value


def cr_text(text: str) -> str:
    """A CR for a job: ``full`` or a number >= 1, kept as the text the job carries."""
    value = parse_cr(text)
    return "full" if value is None else f"{value:g}"


def positive(text: str) -> int:
    """An integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def non_negative(text: str) -> int:
    """An integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def ranks(text: str) -> int:
    """A number of devices: an integer >= 2."""
    value = positive(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"--ranks must be >= 2, got {text!r}")
    return value


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def seconds(text: str) -> float:
    """A duration in seconds, > 0."""
    value = _number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """A number > 0."""
    value = _number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    """A number >= 0."""
    value = _number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def fraction(text: str) -> float:
    """A number from 0 to 1 (a cosine floor, say)."""
    value = _number(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, got {text!r}")
    return value


def at_least_one(text: str) -> float:
    """A number >= 1 (a CR ceiling)."""
    value = _number(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {text!r}")
    return value


def non_blank(value: str) -> str:
    """Any non-blank text (a model name as the agents serve it)."""
    if not value.strip():
        raise argparse.ArgumentTypeError("expected a non-empty value")
    return value


def name(text: str) -> str:
    """A node id or cluster name: 1-64 characters without ``/ + #`` or spaces (they are topic levels)."""
    if not text or len(text) > 64 or any(c in text for c in "/+# \t\n"):
        raise argparse.ArgumentTypeError(f"expected 1-64 characters without / + # or spaces, got {text!r}")
    return text


def broker(text: str) -> str:
    """``mqtt://host[:port]`` or ``mqtts://...``, checked now and kept as text."""
    from agent.base.config import ConfigError, parse_broker

    try:
        parse_broker(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def peers(text: str) -> str:
    """``auto`` or comma-separated node ids."""
    if text.strip() == "auto":
        return "auto"
    names = [p.strip() for p in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"expected 'auto' or comma-separated node ids, got {text!r}")
    for n in names:
        name(n)
    return ",".join(names)


def port(text: str) -> int:
    """A TCP port, 0 for off."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number (0 for off), got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number 0-65535, got {text!r}")
    return value


def existing_file(text: str) -> Path:
    """A path to a readable file."""
    path = Path(text).expanduser()
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text!r}")
    return path


def writable_path(text: str) -> Path:
    """A file to write: its directory must exist (checked before any long work starts)."""
    path = Path(text).expanduser()
    if not text.strip() or path.is_dir():
        raise argparse.ArgumentTypeError(f"expected a file path, got {text!r}")
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"the directory of {text!r} does not exist")
    return path


def existing_dir(text: str) -> Path:
    """A path to a directory."""
    path = Path(text).expanduser()
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"no such directory: {text!r}")
    return path


def file_or_stdin(text: str) -> str:
    """A readable file, or ``-`` for standard input (kept as text)."""
    return text if text == "-" else str(existing_file(text))


# Job fields: the value a job will carry, checked by the agents' own schema (transport.schema).


def _job_field(name: str, value: Any, text: str) -> Any:
    from transport.schema import Limits, WireError, parse_job

    probe = {"id": "x", "model": "m", "inputs": {"text": "x"}, name: value}
    try:
        parse_job(json.dumps(probe).encode(), Limits())
    except WireError as exc:
        message = str(exc).removeprefix(f"field '{name}' ")
        raise argparse.ArgumentTypeError(message if "got" in message else f"{message}, got {text!r}") from None
    return value


def job_id(text: str) -> str:
    """A job id as the schema takes it (1-128 of ``A-Za-z0-9._:-``)."""
    return str(_job_field("id", text, text))


def job_cr(text: str) -> float | str:
    """A job's ``cr``: ``full`` or a number from 1 to the schema's ceiling."""
    if text.strip().lower() == "full":
        return "full"
    try:
        value = _number(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a number >= 1 or 'full', got {text!r}") from None
    return float(_job_field("cr", value, text))


def job_ranks(text: str) -> int:
    """A job's ``ranks``: the devices to use, as many as the schema allows."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    return int(_job_field("ranks", value, text))


def job_peers(text: str) -> list[str]:
    """A job's ``peers``: comma-separated, distinct node ids."""
    names = [p.strip() for p in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"expected comma-separated node ids, got {text!r}")
    return list(_job_field("peers", names, text))


def deadline_ms(text: str) -> float:
    """A job's ``deadline_ms``: milliseconds > 0, at most a day."""
    return float(_job_field("deadline_ms", _number(text), text))


def min_fidelity(text: str) -> float:
    """A job's ``min_fidelity``: a cosine floor from 0 to 1."""
    return float(_job_field("min_fidelity", _number(text), text))
