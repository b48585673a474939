"""Settings layering: defaults < TOML < PRISM_* environment < flags."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from agent.base.config import Broker, ConfigError, ModelSpec, load_settings


def test_layers_override_in_order(tmp_path: Path) -> None:
    toml = tmp_path / "agent.toml"
    toml.write_text(
        'cluster = "lab"\nnode_id = "from-file"\nbroker = "mqtt://10.0.0.1"\nthreads = 2\n'
        '[models]\nbert = "tiny-bert"\ngpt = { source = "/opt/gpt2", task = "loglik" }\n[limits]\nmax_batch = 8\n'
    )
    env = {"PRISM_NODE_ID": "from-env", "PRISM_THREADS": "3", "HOME": "/root"}
    s = load_settings(toml, env, {"threads": 4, "models": ["vit=tiny-vit"], "cluster": None})
    assert (s.cluster, s.node_id, s.threads) == ("lab", "from-env", 4)
    assert s.broker == Broker("10.0.0.1", 1883)
    assert s.limits.max_batch == 8
    assert s.models == (
        ModelSpec("bert", "tiny-bert"),
        ModelSpec("gpt", "/opt/gpt2", "loglik"),
        ModelSpec("vit", "tiny-vit"),
    )
    assert s.topic_root == "prism/v1/lab"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("threads = 'many'", "threads = 'many'"),
        ("threads = 2.5", "valid integer"),
        ("colour = 'blue'", "unknown setting 'colour'"),
        ("broker = 'http://x'", "mqtt://host:port"),
        ("cluster = 'a/b'", "without / + #"),
        ("[limits]\nmax_batch = 0", "limits.max_batch = 0"),
        ("[limits]\nmax_batch = '32'", "valid integer"),
        ("[limits]\nmax_bogus = 1", "unknown limit 'max_bogus'"),
        ("health_interval_s = 0", "greater than or equal to 0.1"),
        ("log_format = 'xml'", "'auto', 'json' or 'console'"),
        ("max_cr = 4", "replaced by min_fidelity"),
        ("[models]\nb = { source = 'tiny-bert', max_cr = 4 }", "replaced by min_fidelity"),
        ("[models]\nb = { source = 'tiny-bert', min_fidelity = 2 }", "less than or equal to 1"),
        ("this is = not toml =", "not valid TOML"),
    ],
)
def test_bad_settings_say_what_is_wrong(tmp_path: Path, text: str, message: str) -> None:
    toml = tmp_path / "agent.toml"
    toml.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_settings(toml, {}, {})


def test_environment_strings_are_parsed_and_checked() -> None:
    s = load_settings(None, {"PRISM_THREADS": "3", "PRISM_HEALTH_INTERVAL_S": "0.5", "PRISM_NODE_ID": "n"}, {})
    assert (s.threads, s.health_interval_s) == (3, 0.5)
    with pytest.raises(ConfigError, match=re.escape("queue_max = 'x' ($PRISM_QUEUE_MAX)")):
        load_settings(None, {"PRISM_QUEUE_MAX": "x", "PRISM_NODE_ID": "n"}, {})


def test_systemd_state_directory_is_the_default_state_dir() -> None:
    s = load_settings(None, {"STATE_DIRECTORY": "/var/lib/prism-agent", "PRISM_NODE_ID": "n"}, {})
    assert s.journal_path() == Path("/var/lib/prism-agent/journal-default-n.sqlite3")


def test_model_flag_needs_name_and_source() -> None:
    with pytest.raises(ConfigError, match="NAME=SOURCE"):
        load_settings(None, {}, {"models": ["just-a-name"]})


def test_device_choice() -> None:
    from agent.base.config import pick_device

    assert pick_device("cpu") == "cpu"
    assert pick_device("auto") in ("cpu", "cuda")
    with pytest.raises(ConfigError, match="auto, cpu or cuda"):
        pick_device("tpu")
