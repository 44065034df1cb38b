"""No module of the project may shadow a standard-library or dependency name (issue 18).

Prefect loads a deployment's entrypoint by file path, which puts the entrypoint's folder (``flows/``)
on ``sys.path``: a ``flows/statistics.py`` then *is* ``statistics`` for torch's ``import statistics``.
The rule is applied to every module of the project, so no folder can become such a trap.
"""

from __future__ import annotations

import importlib.metadata as md
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROJECT_FOLDERS = ["flows", "tasks", "t2iedit", "bench", "scripts"]


def _declared_dependency_modules() -> set[str]:
    """Import names of the dependencies pyproject.toml declares (optional extras included)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    reqs = list(project["dependencies"]) + [r for extra in project.get("optional-dependencies", {}).values()
                                           for r in extra]
    names = {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].strip().lower() for r in reqs}
    return {n.replace("-", "_") for n in names}


def _forbidden() -> set[str]:
    return set(sys.stdlib_module_names) | set(md.packages_distributions()) | _declared_dependency_modules()


def project_module_names() -> dict[str, Path]:
    """Each module's or package's own name (the one it would take on sys.path) -> its file."""
    out: dict[str, Path] = {}
    for top in PROJECT_FOLDERS:
        for p in (ROOT / top).rglob("*.py"):
            if p.stem == "__init__":
                if p.parent.name != top:
                    out[p.parent.name] = p.parent
            else:
                out[p.stem] = p
    return out


def test_no_project_module_shadows_stdlib_or_a_dependency():
    forbidden = _forbidden()
    clashes = {name: str(p.relative_to(ROOT)) for name, p in project_module_names().items() if name in forbidden}
    assert not clashes, f"project modules shadowing stdlib/dependency names: {clashes}"


def test_the_check_knows_the_names_that_broke_scheduled_runs():
    forbidden = _forbidden()
    assert {"statistics", "io", "time", "datasets", "torch"} <= forbidden
