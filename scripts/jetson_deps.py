"""Print prism-agent's dependencies from pyproject.toml, one requirement a line, without torch.

``scripts/setup.sh jetson`` installs these around NVIDIA's own torch build (with torch pinned to
the installed one), so the list is always pyproject's. Runs on JetPack's Python 3.10 before
anything is installed: it reads TOML with ``tomllib`` (3.11+), ``tomli``, or the copy pip vendors.

    python scripts/jetson_deps.py [--extra plot] [PYPROJECT]
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def _toml_loads(text: str) -> dict[str, Any]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ModuleNotFoundError:
            from pip._vendor import tomli as tomllib  # type: ignore[no-redef]
    data: dict[str, Any] = tomllib.loads(text)
    return data


def requirements(pyproject: Path, extras: list[str]) -> list[str]:
    """The project's dependencies and those of ``extras``, torch left out."""
    project = _toml_loads(pyproject.read_text(encoding="utf-8"))["project"]
    found = list(project["dependencies"])
    for extra in extras:
        found += project["optional-dependencies"][extra]
    return [r for r in found if re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0].lower() != "torch"]


def main() -> None:
    """Print the list."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("pyproject", nargs="?", type=Path, default=REPO / "pyproject.toml")
    parser.add_argument("--extra", action="append", default=[], help="an optional-dependencies group to add")
    ns = parser.parse_args()
    print("\n".join(requirements(ns.pyproject, ns.extra)))


if __name__ == "__main__":
    main()
