"""The published JSON Schemas (docs/schema/) are what the models produce, and name what the
README's job table names."""

from __future__ import annotations

import json

import pytest

from tests.mqtt_env import REPO
from tests.test_cli_submit import job_table
from transport.schema import json_schemas

FOLDER = REPO / "docs" / "schema"


@pytest.mark.parametrize("name", sorted(json_schemas()))
def test_the_checked_in_schema_is_what_the_models_produce(name: str) -> None:
    checked_in = json.loads((FOLDER / name).read_text())
    assert checked_in == json_schemas()[name], f"docs/schema/{name} is stale: run python scripts/json_schema.py"


def test_the_schema_folder_holds_only_generated_files() -> None:
    assert {p.name for p in FOLDER.iterdir()} == set(json_schemas())


def test_the_job_schema_has_the_fields_of_the_readme_table() -> None:
    assert set(json_schemas()["job.json"]["properties"]) == set(job_table())
