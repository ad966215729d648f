"""The examples of docs/models.md run as a user runs them: each trains (loss goes down) and
check_my_model.py passes (MRBP = BPTT in float64, and torch = JAX).

Each runs in a subprocess with few steps (STEPS) and one CPU thread per process.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("jax")

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"
DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "models.md"


def _run(script: str, steps: int) -> str:
    env = {**os.environ, "STEPS": str(steps), "OMP_NUM_THREADS": "1"}
    env.pop("JAX_ENABLE_X64", None)  # as a user runs them (conftest turns x64 on for tests)
    out = subprocess.run(
        [sys.executable, script], cwd=EXAMPLES, env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


@pytest.mark.parametrize("script", ["torch_mrbp.py", "jax_mrbp.py"])
def test_example_trains(script):
    """41 MRBP steps take the recall task's loss per segment from ~log 8 to well below it."""
    losses = [float(x) for x in re.findall(r"loss per segment ([0-9.]+)", _run(script, 41))]
    assert len(losses) == 3, losses
    assert losses[0] > 1.5 and losses[-1] < 0.75 * losses[0], losses


@pytest.mark.parametrize("script", ["torch_mrbp.py", "jax_mrbp.py"])
def test_example_is_short_and_in_the_docs(script):
    """Each training example is under 40 lines, and docs/models.md shows it whole."""
    text = (EXAMPLES / script).read_text()
    assert len(text.splitlines()) < 40
    assert text.strip() in DOC.read_text()


def test_check_my_model_passes():
    """check_my_model.py: torch and JAX MRBP = BPTT per parameter, and torch = JAX, rel <= 1e-10."""
    out = _run("check_my_model.py", 0)
    assert "check_mrbp: PASSED" in out
    rels = [float(x) for x in re.findall(r"rel ([0-9.e+-]+)", out)]
    assert len(rels) > 40 and max(rels) <= 1e-10
