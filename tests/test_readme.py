"""The README is a front page (issue 18 item 7): short, its set-up commands exactly what CI runs, and
every file it points to exists."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"


def _setup_commands() -> list[str]:
    text = README.read_text(encoding="utf-8")
    section = text.split("## Set-up (two commands)", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return block.strip("\n").split("\n")


def test_readme_is_at_most_150_lines():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= 150, f"README.md has {n} lines; reference material belongs in docs/"


def test_setup_commands_are_exactly_what_ci_runs():
    cmds = _setup_commands()
    assert len(cmds) == 2, cmds
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    for cmd in cmds:
        assert cmd in ci, f"README command not run verbatim by .ci/run: {cmd!r}"
    # in the same order, as CI's first two commands
    assert [line for line in ci if line in cmds] == cmds


def test_docs_the_readme_points_to_exist():
    text = README.read_text(encoding="utf-8")
    paths = set(re.findall(r"\bdocs/[A-Z_]+\.md\b", text))
    assert {"docs/DATA.md", "docs/EXPERIMENTS.md", "docs/CLI.md", "docs/BENCHMARKS.md",
            "docs/PREFECT.md"} <= paths
    missing = sorted(p for p in paths if not (REPO / p).is_file())
    assert not missing, f"README points to missing files: {missing}"
