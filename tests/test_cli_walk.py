"""Every subcommand and every flag of ``prism-agent``, given a bad value: one error line, no traceback.

The cases come from the argparse parser itself, so a new flag is walked as soon as it exists;
a flag whose type this file does not know fails the walk until someone says what a bad value
for it is. Commands that would start real work (the daemon, a test bed) are stopped if a bad
value ever gets that far, and the case fails.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.cli import args, demo, main, policy_cmds, submit_cmd
from agent.cli.main import build_parser
from agent.cli.output import result_lines
from tests.mqtt_env import REPO
from transport.localcluster import free_port

#: A valid invocation of each command; the walk spoils one value at a time.
BASE: dict[tuple[str, ...], list[str]] = {
    ("fidelity",): ["--model", "tiny-bert", "--ranks", "2", "--cr", "4"],
    ("bench", "engine"): ["--model", "tiny-bert", "--ranks", "2", "--cr", "4", "--batch", "2"],
    ("run",): ["--model", "m=tiny-bert"],
    ("submit",): ["--model", "bert", "--text", "hi"],
    ("peers",): [],
    ("top",): ["--once"],
    ("install-service",): [],
    ("demo",): [],
    ("profile",): ["--model", "tiny-bert", "--batches", "1", "--crs", "4", "--repeat", "1", "--out", "OUT"],
    ("map", "show"): ["MAP"],
    ("map", "decide"): ["MAP", "--batch", "2", "--bandwidth", "10"],
    ("testbed", "up"): ["--hosts", "2"],
    ("testbed", "shape"): ["walk0", "1", "2mbit"],
    ("testbed", "cut"): ["walk0", "1"],
    ("testbed", "restore"): ["walk0", "1"],
    ("testbed", "kill"): ["walk0", "1"],
    ("testbed", "start"): ["walk0", "1"],
    ("testbed", "status"): [],
    ("testbed", "down"): ["walk0"],
    ("testbed", "exec"): ["walk0", "0", "--", "true"],
    ("testbed", "submit"): ["walk0", "--", "--model", "bert", "--text", "hi"],
}

_NUMBER = ["abc", "-1"]
#: Bad values by argument type: every flag of that type gets them.
BAD_BY_TYPE: dict[Callable[[str], Any], list[str]] = {
    int: _NUMBER,
    float: _NUMBER,
    args.positive: [*_NUMBER, "0"],
    args.non_negative: _NUMBER,
    args.ranks: [*_NUMBER, "1"],
    args.seconds: [*_NUMBER, "0"],
    args.positive_float: [*_NUMBER, "0"],
    args.non_negative_float: _NUMBER,
    args.at_least_one: [*_NUMBER, "0.5"],
    args.port: ["abc", "70000"],
    args.parse_cr: ["abc", "0.5"],
    args.cr_text: ["abc", "0.5"],
    args.name: ["a/b", "has space"],
    args.broker: ["bogus://x", "mqtt://host:notaport"],
    args.peers: ["a/b", "a,,b"],
    args.non_blank: [" "],
    args.existing_file: ["/nonexistent/file"],
    args.writable_path: ["/nonexistent/dir/x"],
    policy_cmds.batch_list: ["abc", "0", "1.5"],
    policy_cmds.cr_list: ["abc", "0.5"],
    policy_cmds.method_list: ["abc", "means,means", "means,"],
    args.fraction: [*_NUMBER, "1.5", "-0.1"],
    demo._crs: ["abc", "0.5"],
    submit_cmd.token_ids: ["a,b", "-1"],
    args.existing_dir: ["/nonexistent/dir"],
    args.file_or_stdin: ["/nonexistent/file"],
    # Job fields, as the agents' schema checks them.
    args.job_id: ["a/b", "x" * 129],
    args.job_cr: ["abc", "0.5", "2e6"],
    args.job_ranks: ["abc", "0", "65"],
    args.job_peers: ["a/b", "a,,b", "a,a"],
    args.deadline_ms: ["abc", "0", "1e9"],
    args.min_fidelity: [*_NUMBER, "1.5"],
}
#: Untyped (string) arguments: a value that is bad for that argument, by command and dest.
BAD_STRINGS: dict[tuple[str, str], list[str]] = {
    ("fidelity", "model"): ["no-such-model", "/no/such/dir"],
    ("bench engine", "model"): ["no-such-model"],
    ("profile", "model"): ["no-such-model"],
    ("demo", "model"): ["no-such-model", "tiny-vit"],
    ("map show", "model"): ["no-such-model"],
    ("map decide", "model"): ["no-such-model"],
    ("testbed up", "model"): ["no-such-model"],
    ("run", "models"): ["noequals", "=tiny-bert"],
    ("run", "interface"): ["nope0"],
}
#: Arguments that take any value, so no value is bad.
FREE = {("submit", "text"), ("submit", "prompt"), ("testbed exec", "cmd"), ("testbed submit", "args")}


def _testbed_types() -> dict[str, list[str]]:
    """The test bed's own argument types, by function name (they are private to testbed.cli)."""
    return {
        "_count": ["0", "abc"],
        "_host": ["x"],
        "_tag": ["!!", "toolongtag"],
        "_tag_like": ["a/b"],
        "_rate": ["fast"],
        "_rate_or_off": ["fast"],
    }


def leaves(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """Every runnable (sub)command and its parser."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
    for action in subs:
        for name, sub in action.choices.items():
            yield from leaves(sub, (*path, name))


def _bad_values(path: tuple[str, ...], action: argparse.Action) -> list[str]:
    command = " ".join(path)
    if (command, action.dest) in FREE:
        return []
    if action.choices is not None:
        return ["bogus"]
    if action.type is None or action.type is str:
        key = (command, action.dest)
        assert key in BAD_STRINGS, f"{command} {action.dest}: say what a bad value is (BAD_STRINGS) or mark it FREE"
        return BAD_STRINGS[key]
    if action.type in BAD_BY_TYPE:
        return BAD_BY_TYPE[action.type]
    by_name = _testbed_types().get(getattr(action.type, "__name__", ""))
    assert by_name, f"{command} {action.dest}: add bad values for type {action.type} to BAD_BY_TYPE"
    return by_name


def cases() -> Iterator[Any]:
    for path, parser in leaves(build_parser()):
        assert path in BASE, f"{' '.join(path)}: add a valid invocation to BASE"
        for action in parser._actions:
            if action.nargs == 0 or isinstance(action, argparse._HelpAction):
                continue  # flags without a value
            flag = action.option_strings[0] if action.option_strings else None
            for bad in _bad_values(path, action):
                yield pytest.param(path, flag, action.dest, bad, id=f"{' '.join(path)} {flag or action.dest}={bad}")


def _argv(path: tuple[str, ...], flag: str | None, dest: str, bad: str, files: dict[str, str]) -> list[str]:
    base = [files.get(x, x) for x in BASE[path]]
    if flag is None:  # a positional: replace the first valid one of its kind
        positional = [a for a in build_parser_for(path)._actions if not a.option_strings and a.dest != "help"]
        index = [a.dest for a in positional].index(dest)
        tail = [x for x in base if not x.startswith("-")]
        if index < len(tail):
            base[base.index(tail[index])] = bad
        else:
            base.append(bad)
        return [*path, *base]
    if flag in base:
        i = base.index(flag)
        return [*path, *base[:i], f"{flag}={bad}", *base[i + 2 :]]
    split = base.index("--") if "--" in base else len(base)
    return [*path, *base[:split], f"{flag}={bad}", *base[split:]]


def build_parser_for(path: tuple[str, ...]) -> argparse.ArgumentParser:
    return dict(leaves(build_parser()))[path]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("walk")
    cell = {"model": "tiny-bert", "batch": 1, "seq": 8, "samples": 1, "median_ms": 2.0, "p90_ms": 2.0}
    cells = [
        {**cell, "mode": "local", "cr": None, "ranks": 1},
        {**cell, "mode": "prism", "cr": 4.0, "ranks": 2, "wire_bytes": 1000, "rounds": 4},
    ]
    perf = {"version": 1, "hardware": {}, "models": {"tiny-bert": 0.5}, "energy_source": "cpu-model", "cells": cells}
    (tmp / "map.json").write_text(json.dumps(perf))
    return {"MAP": str(tmp / "map.json"), "OUT": str(tmp / "out.json")}


@pytest.mark.parametrize(("path", "flag", "dest", "bad"), list(cases()))
def test_a_bad_value_is_one_error_line(
    path: tuple[str, ...],
    flag: str | None,
    dest: str,
    bad: str,
    files: dict[str, str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PRISM_BROKER", f"mqtt://127.0.0.1:{free_port()}")  # nothing listens there

    def reached(*_: object, **__: object) -> None:
        raise AssertionError(f"{' '.join(path)} {flag}={bad!r} was accepted: it started real work")

    monkeypatch.setattr("agent.node.main.main_async", reached)
    monkeypatch.setattr("testbed.bed.Testbed.up", reached)
    argv = _argv(path, flag, dest, bad, files)
    try:
        status = main(argv)
    except SystemExit as exc:  # argparse usage errors
        status = exc.code  # type: ignore[assignment]
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert status not in (0, None), f"{argv} exited 0: {out[-300:]}"
    assert len(lines) == 1, f"{argv}: {err}"
    assert lines[0].startswith("prism-agent: error: "), lines[0]
    named = (flag or dest).lstrip("-")
    assert named in lines[0] or bad.strip() in lines[0] or dest in lines[0], f"{argv}: says neither: {lines[0]}"
    assert "Traceback" not in err
    assert "internal error" not in err  # the last-resort handler hides a bug: fail on it
    assert out == ""


def test_every_command_is_walked() -> None:
    walked = {path for path, _ in leaves(build_parser())}
    assert walked == set(BASE)
    assert len(list(cases())) > 100


def test_output_piped_into_head_ends_quietly(files: dict[str, str], tmp_path: Path) -> None:
    data = json.loads(Path(files["MAP"]).read_text())
    cells = data["cells"]
    data["cells"] = [{**c, "batch": b, "seq": 8 * k} for b in range(1, 41) for k in range(1, 26) for c in cells]
    big = tmp_path / "big.json"
    big.write_text(json.dumps(data))
    for extra in ([], ["--json"]):
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "map", "show", str(big), *extra],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert proc.stdout is not None
        assert proc.stderr is not None
        proc.stdout.read(100)  # what `head -c 100` reads, then it goes away
        proc.stdout.close()
        err = proc.stderr.read().decode()
        assert proc.wait(timeout=60) == 141  # 128 + SIGPIPE, as a shell tool ends
        assert err == ""


RESULT_LOCAL = {
    "v": 1,
    "id": "j1",
    "ok": True,
    "error": None,
    "output": {"embedding": [[0.1] * 4] * 2},
    "mode": "local",
    "cr": None,
    "peers": [],
    "latency_ms": {"total": 0.44, "queue": 0.01, "engine": 0.4, "compute": 0.4, "comm": 0.0, "staging": 0.0},
    "decision": {
        "mode": "local",
        "option": "local",
        "cr": None,
        "peers": [],
        "predicted_ms": 0.3,
        "reason": "r",
        "options": {"local": 0.44, "codes@4": 1.2},
        "requested": "auto",
    },
    "fallback": False,
    "node": "a",
    "energy": {"joules": 0.01, "per_sample_j": 0.005, "source": "cpu-model", "scope": "this node"},
}


@pytest.mark.parametrize(
    "result",
    [
        RESULT_LOCAL,
        {**RESULT_LOCAL, "mode": "distributed", "cr": 8.0, "peers": ["b"], "output": {"label": [1, 0]}},
        {**RESULT_LOCAL, "decision": None, "energy": None, "latency_ms": {}, "output": None},
        {"v": 1, "id": "j2", "ok": False, "error": {"code": "busy", "message": "queue full"}, "node": "a"},
        {
            **RESULT_LOCAL,
            "final": True,
            "seq": 3,
            "output": {"text": None, "tokens": [5, 6, 7], "reason": "length", "prompt_tokens": 4},
            "latency_ms": {**RESULT_LOCAL["latency_ms"], "prefill": 0.44, "first_token": 0.9, "tokens_per_s": 120.0},
        },
    ],
)
def test_a_result_reads_as_text_not_python(result: dict[str, Any]) -> None:
    text = result_lines(result)
    for repr_bit in ("None", "[]", "{", "}", "'"):
        assert repr_bit not in text, text
    assert not re.search(r"(?<![\d.])0 ms", text), text
    if result["ok"]:
        assert "0.44 ms" in text or result["latency_ms"] == {}


def test_a_fallback_reads_with_its_reason_code_and_its_words() -> None:
    fell = {
        **RESULT_LOCAL,
        "fallback": True,
        "fallback_reason": "peer_silent",
        "decision": {**RESULT_LOCAL["decision"], "fallback_reason": "b was silent for 3.2 s"},
    }
    assert "ran locally instead (peer_silent): b was silent for 3.2 s" in result_lines(fell)
