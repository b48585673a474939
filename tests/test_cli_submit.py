"""``prism-agent submit``: every field of the README's job table has a flag that puts it in the job;
inputs from files become jobs; a bad file is one error line; against a real broker and agent the
results come back in the order of the jobs, and the job fields reach the agent."""

from __future__ import annotations

import base64
import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from agent.cli import submit_cmd
from agent.cli.main import build_parser, main
from tests.mqtt_env import REPO, agent, mosquitto
from tests.test_cli_walk import leaves
from transport.schema import Job, Limits, Mode, Objective, parse_job

README = (REPO / "README.md").read_text()
#: Table fields whose flags are not ``--field-name`` (the inputs), or that no flag sets.
MAPPED = {"v": [], "inputs": ["--text", "--text-file", "--image", "--image-dir", "--token-ids", "--prompt"]}
#: For each other field of the table: flags that set it, and what the agent then reads.
SAMPLES: dict[str, tuple[list[str], Any]] = {
    "id": (["--id", "j-7"], "j-7"),
    "model": (["--model", "vit"], "vit"),
    "task": (["--task", "embed"], "embed"),
    "mode": (["--mode", "distributed"], Mode.DISTRIBUTED),
    "cr": (["--cr", "12.5"], 12.5),
    "method": (["--method", "codes"], "codes"),
    "ranks": (["--ranks", "3"], 3),
    "peers": (["--peers", "box-b,box-c"], ("box-b", "box-c")),
    "min_fidelity": (["--min-fidelity", "0.995"], 0.995),
    "objective": (["--objective", "energy"], Objective.ENERGY),
    "deadline_ms": (["--deadline-ms", "750"], 750.0),
    "max_new_tokens": (["--task", "generate", "--max-new-tokens", "12"], 12),
    "temperature": (["--task", "generate", "--temperature", "0.7"], 0.7),
    "top_k": (["--task", "generate", "--top-k", "40"], 40),
    "top_p": (["--task", "generate", "--top-p", "0.9"], 0.9),
    "seed": (["--task", "generate", "--seed", "7"], 7),
    "stop": (["--task", "generate", "--stop", "50256,13"], (50256, 13)),
}


def job_table() -> dict[str, str]:
    """The README's job table: field -> its ``submit flag`` cell."""
    section = README[README.index("### MQTT API") : README.index("### No job lost")]
    table = section[section.index("| field | value | `submit` flag |") :].split("\n\n")[0]
    rows = [line.strip("|").split("|") for line in table.splitlines()[2:]]
    return {re.fullmatch(r"\s*`(\w+)`\s*", row[0]).group(1): row[-1] for row in rows}  # type: ignore[union-attr]


def submit_flags() -> set[str]:
    parser = dict(leaves(build_parser()))[("submit",)]
    return set(parser._option_string_actions)


def test_the_job_table_names_every_field_the_schema_reads() -> None:
    inputs = {"text", "images", "token_ids"}
    schema = {f.name for f in dataclasses.fields(Job)} - {"cr_given"} - inputs | {"inputs", "v"}
    assert set(job_table()) == schema


def test_every_field_of_the_job_table_has_a_submit_flag() -> None:
    flags = submit_flags()
    for field, cell in job_table().items():
        wanted = MAPPED.get(field, [f"--{field.replace('_', '-')}"])
        assert set(wanted) <= flags, f"job field {field!r}: submit has no {sorted(set(wanted) - flags)}"
        assert re.findall(r"--[a-z-]+", cell) == wanted, f"the README's flag cell for {field!r} says {cell!r}"
    assert set(SAMPLES) == set(job_table()) - set(MAPPED), "a new job field: add a sample of its flag"


@pytest.mark.parametrize("field", sorted(SAMPLES))
def test_each_job_flag_puts_its_field_in_the_job(field: str) -> None:
    argv, expected = SAMPLES[field]
    ns = build_parser().parse_args(["submit", "--model", "bert", "--text", "hi", *argv])
    (job,) = submit_cmd.build_jobs(ns)
    assert getattr(parse_job(json.dumps(job).encode(), Limits()), field) == expected


def _images(folder: Path, count: int) -> list[Path]:
    folder.mkdir()
    paths = []
    for i in range(count):
        paths.append(folder / f"{i:02d}.png")
        Image.new("RGB", (32, 24), (60 * i, 20, 200)).save(paths[-1])
    (folder / "notes.txt").write_text("not an image")
    return paths


def _jobs(argv: list[str]) -> list[dict[str, Any]]:
    return submit_cmd.build_jobs(build_parser().parse_args(["submit", *argv]))


def test_inputs_from_files_become_jobs_of_at_most_batch(tmp_path: Path) -> None:
    (tmp_path / "q.txt").write_text("one\n\ntwo\nthree\r\nfour\nfive\n")
    jobs = _jobs(["--model", "bert", "--text-file", str(tmp_path / "q.txt"), "--batch", "2", "--id", "q"])
    assert [j["inputs"]["text"] for j in jobs] == [["one", "two"], ["three", "four"], ["five"]]
    assert [j["id"] for j in jobs] == ["q-1", "q-2", "q-3"]

    paths = _images(tmp_path / "photos", 3)
    (job,) = _jobs(["--model", "vit", "--image-dir", str(tmp_path / "photos")])
    assert [base64.b64decode(i) for i in job["inputs"]["image"]] == [p.read_bytes() for p in paths]

    image = base64.b64encode(paths[0].read_bytes()).decode()
    lines = [
        json.dumps({"model": "bert", "inputs": {"text": "a"}, "mode": "local"}),
        "",  # blank lines are skipped
        json.dumps({"id": "k2", "model": "vit", "inputs": {"image": image}, "cr": 4}),
    ]
    (tmp_path / "jobs.jsonl").write_text("\n".join(lines))
    first, second = _jobs(["--jobs", str(tmp_path / "jobs.jsonl")])
    assert (first["mode"], second["id"], second["cr"]) == ("local", "k2", 4)
    assert first["id"] not in ("", "k2")  # a line without an id gets a fresh one


ONE = '{"model": "b", "inputs": {"text": "a"}}'


@pytest.mark.parametrize(
    ("files", "argv", "said"),
    [
        ({"q.txt": "\n \n"}, ["--model", "bert", "--text-file", "q.txt"], "q.txt: no lines of text"),
        ({"photos/a.txt": "x"}, ["--model", "vit", "--image-dir", "photos"], "photos: no images"),
        ({"j.jsonl": ONE + '\n{"model": '}, ["--jobs", "j.jsonl"], "line 2: not JSON"),
        ({"j.jsonl": '{"model": "b", "inputs": {"text": "a"}, "cr": 0}'}, ["--jobs", "j.jsonl"], "line 1: field 'cr'"),
        ({"j.jsonl": "[1]"}, ["--jobs", "j.jsonl"], "line 1: a job must be a JSON object"),
        ({"j.jsonl": ONE.replace("{", '{"id": "x", ', 1) + "\n" + ONE.replace("{", '{"id": "x", ', 1)},
         ["--jobs", "j.jsonl"], "also on line 1"),
        ({"j.jsonl": "\n"}, ["--jobs", "j.jsonl"], "no jobs"),
        ({"j.jsonl": ONE}, ["--jobs", "j.jsonl", "--method", "codes"], "set --method in the file's jobs"),
        ({}, ["--text", "hi"], "give --model"),
        ({}, ["--model", "b", "--text", "hi", "--ranks", "2", "--peers", "a,b"], "ranks is peers + 1"),
        ({}, ["--model", "b", "--text", "hi", "--token-ids", "1,2"], "not allowed with argument --text"),
        ({}, ["--model", "b"], "one of the arguments --text"),
    ],
)  # fmt: skip
def test_a_bad_input_file_or_combination_is_one_line_and_exit_2(
    files: dict[str, str],
    argv: list[str],
    said: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PRISM_BROKER", "mqtt://127.0.0.1:1")  # never reached: nothing listens there
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    try:
        status = main(["submit", *argv])
    except SystemExit as exc:  # argparse's own usage errors
        status = exc.code  # type: ignore[assignment]
    out, err = capsys.readouterr()
    assert status == 2
    assert out == ""
    (line,) = err.strip().splitlines()
    assert line.startswith("prism-agent: error: ")
    assert said in line


def _submit(port: int, *argv: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "agent", "submit", "--broker", f"mqtt://127.0.0.1:{port}", "--cluster", "sub"]
    proc = subprocess.run([*cmd, *argv], cwd=REPO, capture_output=True, text=True, timeout=timeout_s, check=False)
    assert "Traceback" not in proc.stderr
    return proc


@pytest.mark.mqtt
def test_files_and_job_fields_reach_a_real_agent(tmp_path: Path) -> None:
    (tmp_path / "q.txt").write_text("the first line\nthe second\nthe third\n")
    _images(tmp_path / "photos", 3)
    lines = [
        {"id": "ok-1", "model": "bert", "inputs": {"text": ["hi"]}, "mode": "local", "objective": "energy"},
        {"id": "bad-2", "model": "nosuch", "inputs": {"text": "x"}},
    ]
    (tmp_path / "jobs.jsonl").write_text("".join(json.dumps(j) + "\n" for j in lines))
    with mosquitto() as port, agent(port, "sub", "a", "bert=tiny-bert", "vit=tiny-vit"):
        text = _submit(port, "--model", "bert", "--text-file", str(tmp_path / "q.txt"), "--batch", "2", "--id", "q",
                       "--method", "codes", "--cr", "8", "--min-fidelity", "0.5", "--json")  # fmt: skip
        images = _submit(port, "--model", "vit", "--image-dir", str(tmp_path / "photos"), "--batch", "2")
        jobs = _submit(port, "--jobs", str(tmp_path / "jobs.jsonl"), "--json")
        late = _submit(port, "--model", "bert", "--text", "hi", "--deadline-ms", "0.001")
        ghost = _submit(port, "--model", "bert", "--text", "hi", "--peers", "ghost")
        nobody = _submit(port, "--model", "bert", "--text", "a", "--text", "b", "--batch", "1", "--node", "gone",
                         "--timeout", "1")  # fmt: skip

    assert text.returncode == 0, text.stderr
    results = [json.loads(line) for line in text.stdout.splitlines()]
    assert [(r["id"], r["ok"], len(r["output"]["label"])) for r in results] == [("q-1", True, 2), ("q-2", True, 1)]

    assert images.returncode == 0, images.stderr
    assert images.stdout.count("answered by a") == 2
    assert "logits 2 x 10 numbers" in images.stdout
    assert "logits 1 x 10 numbers" in images.stdout

    assert jobs.returncode == 1  # one error result
    ok, bad = (json.loads(line) for line in jobs.stdout.splitlines())
    assert (ok["id"], ok["ok"], bad["id"], bad["error"]["code"]) == ("ok-1", True, "bad-2", "unknown_model")

    assert late.returncode == 1
    assert "deadline_exceeded" in late.stdout
    assert ghost.returncode == 1
    assert "peer_unavailable: peer(s) ghost" in ghost.stdout

    assert nobody.returncode == 3
    assert nobody.stdout == ""
    assert nobody.stderr.startswith("prism-agent: error: no result for 2 of 2 jobs within 1 s from node gone")
