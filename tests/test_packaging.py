"""Packaging facts: every subpackage is listed, py.typed ships, and the README's two
quick-start commands are what CI runs.
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess

import pytest
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]
README = (ROOT / "README.md").read_text()


def _folder_packages() -> set[str]:
    """Import names of every folder holding an __init__.py under the mapped roots."""
    found = set()
    for package, folder in SETUPTOOLS["package-dir"].items():
        base = ROOT / folder
        for init in base.rglob("__init__.py"):
            rel = init.parent.relative_to(base)
            if "__pycache__" in rel.parts:
                continue
            found.add(".".join((package,) + rel.parts))
    return found


def test_every_package_folder_is_listed():
    """Each folder with an __init__.py maps to an entry of [tool.setuptools] packages, and back."""
    listed = set(SETUPTOOLS["packages"])
    on_disk = _folder_packages()
    assert on_disk - listed == set(), (
        f"add to pyproject [tool.setuptools] packages: {sorted(on_disk - listed)}"
    )
    assert listed - on_disk == set(), (
        f"listed but no folder with __init__.py: {sorted(listed - on_disk)}"
    )


def test_package_dir_maps_the_four_roots():
    """memcore, reference, backends, conformance map onto memcore.* import names."""
    assert SETUPTOOLS["package-dir"] == {
        "memcore": "memcore",
        "memcore.reference": "reference",
        "memcore.backends": "backends",
        "memcore.conformance": "conformance",
    }


def test_py_typed_ships():
    """memcore/py.typed exists and is declared as package data."""
    assert (ROOT / "memcore" / "py.typed").is_file()
    assert "py.typed" in SETUPTOOLS["package-data"]["memcore"]


def test_core_dependencies_are_numpy_and_attrs_only():
    """The core needs numpy and attrs only; torch is pinned in constraints.txt, not pyproject."""
    deps = {re.split(r"[<>=!~ \[]", d, maxsplit=1)[0] for d in PYPROJECT["project"]["dependencies"]}
    assert deps == {"numpy", "attrs"}
    assert not any(
        "==" in r for rs in PYPROJECT["project"]["optional-dependencies"].values() for r in rs
    )
    assert re.search(r"^torch==2\.13\.0$", (ROOT / "constraints.txt").read_text(), re.M)


def _block_after(marker: str) -> str:
    """The body of the first fenced block after ``<!-- marker -->`` in the README."""
    m = re.search(rf"<!-- {marker} -->\s*```[^\n]*\n(.*?)\n```", README, re.S)
    assert m, f"README has no fenced block after <!-- {marker} -->"
    return m.group(1).strip()


def test_readme_has_the_two_quick_start_commands():
    """Main command: venv, install with constraints, memcore verify; test command: venv, pytest."""
    main, test = _block_after("main-command"), _block_after("test-command")
    for cmd in (main, test):
        assert "\n" not in cmd, "each quick-start command is one line"
        assert cmd.startswith("python3 -m venv ") and "-c constraints.txt" in cmd
    assert "memcore verify" in main
    assert "-m pytest" in test and "MEMCORE_HYPOTHESIS_PROFILE=ci" in test


@pytest.mark.skipif(shutil.which("awk") is None, reason="needs awk, which .ci/run itself uses")
def test_ci_run_extracts_the_readme_test_command():
    """The awk program in .ci/run, run on the README, yields exactly the README's test command."""
    script = (ROOT / ".ci" / "run").read_text()
    m = re.search(r"awk '(.*?)' README\.md", script)
    assert m, ".ci/run must extract the command from README.md with awk"
    done = subprocess.run(
        ["awk", m.group(1), "README.md"], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == _block_after("test-command")
    assert os.access(ROOT / ".ci" / "run", os.X_OK), ".ci/run must be executable"
    assert 'eval "$cmd"' in script


def test_ci_run_gates_on_ruff_after_the_tests():
    """.ci/run lints with ruff after the test command, and the test extra installs a pinned ruff."""
    script = (ROOT / ".ci" / "run").read_text()
    lines = [ln.strip() for ln in script.splitlines()]
    assert "set -euo pipefail" in lines, "a failing step must stop .ci/run"
    assert lines.index(".venv-test/bin/ruff check .") > lines.index('eval "$cmd"')
    test_extra = PYPROJECT["project"]["optional-dependencies"]["test"]
    assert any(re.fullmatch(r"ruff>=[\d.]+,<[\d.]+", r) for r in test_extra), test_extra
    assert re.search(r"^ruff==[\d.]+$", (ROOT / "constraints.txt").read_text(), re.M)
