"""Write the JSON Schemas of a job and a result (docs/schema/) from their pydantic models.

tests/test_schema_files.py fails while the checked-in files differ from what the models say:

    python scripts/json_schema.py
"""

from __future__ import annotations

import json
from pathlib import Path

from transport.schema import json_schemas

FOLDER = Path(__file__).resolve().parents[1] / "docs" / "schema"


def main() -> None:
    """Write every schema file, and say which."""
    for name, schema in json_schemas().items():
        path = FOLDER / name
        path.write_text(json.dumps(schema, indent=2, ensure_ascii=False) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
