"""The README stays true: its commands run (here or in the test named for them), its examples
parse and run, its tables list what the code has.

Every shell line of the README is looked up in :data:`COVERAGE`, which names the test that runs
it (or the CI script, or why nothing can: systemd and admin commands on a real box). A new
command in the README fails :func:`test_every_readme_command_is_run_somewhere` until it is added.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import re
import shlex
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.base.config import Settings, load_settings
from agent.cli.main import build_parser
from agent.node.metrics import Metrics
from tests.mqtt_env import REPO, agent, mosquitto
from tests.netns import require_netns
from transport.schema import Limits, Result, parse_job

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

README = (REPO / "README.md").read_text()
SELF = "tests/test_readme.py"
#: README command -> the test that runs it ("file::test"), "ci: ..." or "external: why".
COVERAGE = {
    "./scripts/demo.sh": "tests/test_demo.py::test_demo_auto_splits_on_the_fast_link_and_stays_local_on_the_slow_one",
    "./scripts/test.sh": "ci: .ci/run runs it",
    "prism-agent run": "tests/test_netns.py::test_discovery_over_multicast_and_a_job_across_hosts",
    "mosquitto_pub": "tests/test_daemon.py::test_json_jobs_from_mosquitto_pub_come_back",
    "mosquitto_sub": "tests/test_daemon.py::test_json_jobs_from_mosquitto_pub_come_back",
    "./scripts/setup.sh": "ci: scripts/test.sh runs scripts/setup.sh dev",
    "prism-agent install-service": "tests/test_systemd.py::test_install_writes_config_env_and_unit",
    "systemctl": "external: systemd on the target box",
    "journalctl": "external: systemd on the target box",
    "head": "external: an administrator makes the cluster secret on the box",
    "base64": "external: an administrator makes the cluster secret on the box",
    "tee": "external: an administrator makes the cluster secret on the box",
    "chmod": "external: an administrator makes the cluster secret on the box",
    "chown": "external: an administrator makes the cluster secret on the box",
    "export": f"{SELF}::test_the_submit_and_peers_example_runs",
    "prism-agent submit": f"{SELF}::test_the_submit_and_peers_example_runs",
    "prism-agent peers": f"{SELF}::test_the_submit_and_peers_example_runs",
    "prism-agent top": "tests/test_top_agents.py::test_top_once_json_lists_agents_links_and_last_decisions",
    "prism-agent profile": f"{SELF}::test_the_profile_and_map_example_runs",
    "prism-agent map show": f"{SELF}::test_the_profile_and_map_example_runs",
    "prism-agent map decide": f"{SELF}::test_the_profile_and_map_example_runs",
    "prism-agent fidelity": f"{SELF}::test_the_fidelity_example_runs",
    "prism-agent bench engine": "tests/test_headline.py::"
    "test_bert_base_cr128_cuts_communication_99_2_percent_and_compute_51_24",
    "python3": "external: a Jetson; test_jetson_install_installs_what_pyproject_lists checks the rest",
    ".venv/bin/pip": "external: NVIDIA's torch wheel for a Jetson",
    "scripts/setup.sh": f"{SELF}::test_jetson_install_installs_what_pyproject_lists",
    **{f"prism-agent testbed {c}": f"{SELF}::test_the_testbed_example_runs" for c in
       ("up", "status", "submit", "shape", "cut", "restore", "kill", "start", "exec", "down")},
}  # fmt: skip


def blocks(lang: str) -> list[str]:
    """The README's fenced code blocks of one language."""
    return [m.group(1) for m in re.finditer(rf"```{lang}\n(.*?)```", README, re.S)]


def commands(block: str) -> Iterator[list[str]]:
    """Each command of a shell block: continuations joined, comments dropped, split at && | ;
    (a redirection's target is dropped with it)."""
    for line in block.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        tokens = list(lexer)
        words: list[str] = []
        i = 0
        while i < len(tokens):
            token = tokens[i]
            if token in (">", ">>"):
                i += 2
                continue
            if token in ("&&", "|", ";"):
                if words:
                    yield words
                words = []
            else:
                words.append(token)
            i += 1
        if words:
            yield words


def key(words: list[str]) -> str:
    """What COVERAGE knows a command by: ``prism-agent`` and its subcommand(s), else the program."""
    words = words[1:] if words[0] == "sudo" else words
    if words[0].endswith("prism-agent"):
        depth = 3 if words[1] in ("bench", "map", "testbed") else 2
        return " ".join(["prism-agent", *words[1:depth]])
    return words[0]


def readme_commands() -> list[list[str]]:
    return [words for block in blocks("sh") for words in commands(block)]


def test_every_readme_command_is_run_somewhere() -> None:
    for words in readme_commands():
        where = COVERAGE.get(key(words))
        assert where, f"README command {' '.join(words)!r}: add the test that runs it to COVERAGE"
        if where.startswith(("ci:", "external:")):
            continue
        path, test = where.split("::")
        tree = ast.parse((REPO / path).read_text())
        names = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
        assert test in names, f"{where} does not exist"


def test_every_prism_agent_command_in_the_readme_parses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "minilm.map.json").write_text("{}")  # files the examples read exist by then
    _submit_files(tmp_path)
    parser = build_parser()
    shown = [w[1:] if w[0] == "sudo" else w for w in readme_commands()]
    for words in [w for w in shown if w[0].endswith("prism-agent")]:
        parser.parse_args(words[1:])  # a usage error exits, failing the test with its message
        if words[1:3] == ["testbed", "submit"]:
            parser.parse_args(["submit", *words[words.index("--") + 1 :]])


def _run_block(block: str, cwd: Path, env: dict[str, str], replace: dict[str, str] | None = None) -> list[str]:
    """Run each command of a README shell block (``prism-agent`` as ``python -m agent``); their outputs."""
    outputs = []
    for words in commands(block):
        if words[0] == "export":
            name, _, value = words[1].partition("=")
            env = {**env, name: (replace or {}).get(value, value)}
            continue
        argv = [(replace or {}).get(w, w) for w in words]
        if argv[0] == "prism-agent":
            argv = [sys.executable, "-m", "agent", *argv[1:]]
        proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False)
        assert proc.returncode == 0, f"{' '.join(words)}: {proc.stderr[-2000:]}"
        assert "Traceback" not in proc.stderr
        outputs.append(proc.stdout)
    return outputs


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}


def _block_with(text: str) -> str:
    (found,) = [b for b in blocks("sh") if text in b]
    return found


def test_the_python_example_runs_as_a_script(tmp_path: Path) -> None:
    (example,) = blocks("python")
    script = tmp_path / "example.py"
    script.write_text(example)
    proc = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "torch.Size([8, 384])" in proc.stdout
    cosine = float(re.search(r"cosine vs local ([\d.]+)", proc.stdout).group(1))  # type: ignore[union-attr]
    assert 0.95 < cosine <= 1.0


@pytest.mark.gloo
def test_the_profile_and_map_example_runs(tmp_path: Path) -> None:
    shown, plotted, decided = _run_block(_block_with("prism-agent profile --model minilm"), tmp_path, _env())
    assert "codes@8" in shown
    assert "means@8" in shown
    assert (tmp_path / "minilm-map.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "plot: minilm-map.png" in plotted
    assert re.search(r"predicted [\d.,]+ ms", decided)
    for text in (shown, plotted, decided):
        assert "None" not in text


def test_the_fidelity_example_runs(tmp_path: Path) -> None:
    (out,) = _run_block(_block_with("prism-agent fidelity"), tmp_path, _env())
    values = dict(line.split(None, 1) for line in out.splitlines())
    assert float(values["mean_cosine"]) > 0.95
    assert "None" not in out


def _submit_files(folder: Path) -> None:
    """The input files the submit example names: a sentence a line, and the job line it shows."""
    (folder / "questions.txt").write_text("Which box runs this?\nCan two boxes share it?\nAnd a third?\n")
    shown = re.search(r"`(\{\"model\".*?\})`", README)
    assert shown, "the README shows a job line for jobs.jsonl"
    (folder / "jobs.jsonl").write_text(shown.group(1) + "\n")


@pytest.mark.mqtt
def test_the_submit_and_peers_example_runs(tmp_path: Path) -> None:
    _submit_files(tmp_path)
    with mosquitto() as port, agent(port, "default", "readme-a", "minilm=minilm"):
        broker = f"mqtt://127.0.0.1:{port}"  # the README's port 1883 may be taken here
        submitted, from_file, from_jobs, listed = _run_block(
            _block_with("prism-agent submit"), tmp_path, _env(), {"mqtt://127.0.0.1:1883": broker}
        )
    assert "answered by readme-a" in submitted
    assert "embedding 2 x 384 numbers" in submitted
    file_results = [json.loads(line) for line in from_file.splitlines()]
    assert [len(r["output"]["embedding"]) for r in file_results] == [2, 1]  # --batch 2: three lines, two jobs
    (job_result,) = [json.loads(line) for line in from_jobs.splitlines()]
    assert (job_result["ok"], job_result["mode"]) == (True, "local")
    assert re.search(r"readme-a\s+online\s+127\.0\.0\.1", listed)
    for text in (submitted, listed):
        for repr_bit in ("None", "[]", "{'"):
            assert repr_bit not in text


@pytest.mark.netns
def test_the_testbed_example_runs(tmp_path: Path) -> None:
    require_netns()
    tag = uuid.uuid4().hex[:6]
    block = _block_with("prism-agent testbed up")
    try:
        outputs = _run_block(block, REPO, _env(), {"demo": tag})
    finally:
        subprocess.run([sys.executable, "-m", "agent", "testbed", "down", tag], cwd=REPO, env=_env(), check=False)
    submitted = next(o for o in outputs if "answered by h0" in o)
    assert "distributed" in submitted
    statuses = next(o for o in outputs if "/nodes/h0/status" in o)  # the exec'd mosquitto_sub
    assert "prism/v1/tb/nodes/h0/status online" in statuses
    assert "prism/v1/tb/nodes/h1/status" in statuses  # online again, or still offline after its kill


def test_the_toml_and_json_examples_are_what_the_agent_reads(tmp_path: Path) -> None:
    (toml,) = blocks("toml")
    config = tmp_path / "agent.toml"
    config.write_text(toml)
    settings = load_settings(config, {}, {})
    assert settings.cluster == "lab"
    job, result = blocks("json")
    assert parse_job(job.encode(), Limits()).id == "j1"
    shown = json.loads(result)
    assert set(shown) == set(Result(id="x", ok=True).to_dict())


def test_the_configuration_table_lists_every_setting() -> None:
    table = README[README.index("### Configuration") : README.index("### MQTT API")]
    rows = [line.split("|")[1] for line in table.splitlines() if line.startswith("| `")]
    named = set(re.findall(r"`\[?([a-z_]+)\]?", " ".join(rows)))
    fields = {f.name for f in dataclasses.fields(Settings)} - {"models", "broker", "limits"}
    assert fields <= named, f"settings missing from the README table: {sorted(fields - named)}"
    assert {"broker", "models", "limits"} <= named


def test_the_metrics_table_lists_every_metric() -> None:
    section = README[README.index("### Metrics") : README.index("### Cluster admission")]
    shown = set(re.findall(r"^\| `(prism_[a-z0-9_]+)`", section, re.M))
    registry = Metrics("n", "1").registry
    exported = {m.name + ("_total" if m.type == "counter" else "") for m in registry.collect()}
    exported = {"prism_agent_info" if n == "prism_agent" else n for n in exported}
    assert shown == exported
    for query in blocks("promql")[0].splitlines():
        for name in re.findall(r"prism_[a-z0-9_]+", query):
            assert name.removesuffix("_bucket") in exported, query


def test_the_json_flag_sentence_names_every_command_that_has_it() -> None:
    from tests.test_cli_walk import leaves

    with_json = {" ".join(p) for p, parser in leaves(build_parser()) if "--json" in parser._option_string_actions}
    sentence = README[README.index("Every command that prints data") : README.index("the JSON keys named here")]
    assert with_json == {n for n in re.findall(r"`([a-z -]+)`", sentence) if not n.startswith("-")}


def test_jetson_install_installs_what_pyproject_lists(monkeypatch: pytest.MonkeyPatch) -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = [d for d in project["dependencies"] if not d.startswith("torch")]
    wanted += project["optional-dependencies"]["plot"]
    proc = subprocess.run(
        [sys.executable, "scripts/jetson_deps.py", "--extra", "plot"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    assert proc.stdout.splitlines() == wanted
    sys.path.insert(0, str(REPO / "scripts"))
    try:  # JetPack's Python 3.10 has no tomllib and maybe no tomli: pip's own copy must do
        import jetson_deps

        monkeypatch.setitem(sys.modules, "tomllib", None)
        monkeypatch.setitem(sys.modules, "tomli", None)
        assert jetson_deps.requirements(REPO / "pyproject.toml", ["plot"]) == wanted
    finally:
        sys.path.remove(str(REPO / "scripts"))
    setup = (REPO / "scripts/setup.sh").read_text()
    jetson = setup[setup.index('if [ "$extra" = jetson ]; then\n    # NVIDIA') :]
    assert "--no-deps -e ." in jetson
    assert "-c .venv/torch-pin.txt -r .venv/jetson-requirements.txt" in jetson
    assert "scripts/jetson_deps.py --extra plot" in jetson
    assert "scripts/setup.sh jetson" in _block_with("linux_aarch64.whl")


def test_the_quickstart_installs_the_plot_extra() -> None:
    setup = (REPO / "scripts/setup.sh").read_text()
    assert '"${pip[@]}" -e ".[plot]"' in setup
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert any(d.startswith("matplotlib") for d in project["optional-dependencies"]["plot"])
    assert project["name"] == "prism-edge"  # what the missing-matplotlib error names
