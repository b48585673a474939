"""The soak's list of tests stays true: every entry names a test that exists, and the volume
switches on ``PRISM_SOAK`` alone."""

from __future__ import annotations

import ast

import pytest

from tests.mqtt_env import REPO
from tests.volumes import SOAK_ENV, SOAK_TESTS, volume


def test_every_soak_test_exists() -> None:
    for entry in SOAK_TESTS:
        path, _, name = entry.partition("::")
        tree = ast.parse((REPO / path).read_text())
        if name:
            tests = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
            assert name in tests, f"scripts/soak.py would run {entry}, which does not exist"


def test_the_volume_is_the_soak_one_only_under_prism_soak(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SOAK_ENV, raising=False)
    assert volume(5, 50) == 5
    monkeypatch.setenv(SOAK_ENV, "1")
    assert volume(5, 50) == 50
