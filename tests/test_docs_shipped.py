"""What the repository ships (issue 13, items 9-10): a LICENSE matching pyproject, the
semantic contract in docs/, no citation of files outside the repository, and a quick
start that installs into a venv, its test line being what .ci/run runs."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_license_is_the_one_pyproject_declares() -> None:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert meta["license"] == {"text": "MIT"}
    assert (ROOT / "LICENSE").read_text().startswith("MIT License\n")


def test_the_contract_is_shipped_and_cited() -> None:
    spec = (ROOT / "docs" / "SPEC.md").read_text()
    assert spec.startswith("# aiofused semantic contract (SPEC)")
    for rule in ("R4", "F3", "F13"):
        assert f"**{rule}**" in spec
    readme = (ROOT / "README.md").read_text()
    assert "docs/SPEC.md" in readme
    for path in [ROOT / "README.md", ROOT / "docs" / "SPEC.md", *(ROOT / "src").rglob("*.py")]:
        assert "../shared" not in path.read_text(), path


def test_quick_start_uses_a_venv_and_matches_ci() -> None:
    readme = (ROOT / "README.md").read_text()
    quick = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.*?)\n```", quick, re.S)
    assert len(commands) == 2
    assert all(c.startswith("python3 -m venv .venv && . .venv/bin/activate && ") for c in commands)
    assert commands[1] in (ROOT / ".ci" / "run").read_text()
