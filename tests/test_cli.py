"""The ``memcore`` command line: verify, backends, and clean errors (subprocess smoke tests)."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

from memcore.cli import _load
from memcore.ops import OPS


def _memcore(*args: str, cwd: pathlib.Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "memcore.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        check=False,
    )


def test_verify_numpy_passes_and_writes_json(tmp_path):
    """verify on numpy prints the self-check and conformance tables, exits 0, writes the JSON."""
    path = tmp_path / "report.json"
    out = _memcore(
        "verify", "--backend", "numpy", "--profile", "dev", "--json", str(path), cwd=tmp_path
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    text = out.stdout
    assert "finite differences" in text and "verify: PASSED" in text
    for op in OPS:
        assert op in text
    doc = json.loads(path.read_text())
    assert doc["ok"] is True and doc["profile"] == "dev"
    assert [r["name"] for r in doc["self_check"]["finite_differences"]] == list(OPS)
    assert all(r["ok"] and r["max_rel"] < 1e-5 for r in doc["self_check"]["finite_differences"])
    assert {r["name"] for r in doc["self_check"].get("routing", [])} <= {
        "mrbp == bptt",
        "sab_sparse_replay == sab_bptt",
    }
    (b,) = doc["backends"]
    assert b["name"] == "numpy" and b["device"] == "cpu" and b["dtypes"] == ["float64", "float32"]
    assert b["summary"]["failed"] == 0 and b["summary"]["passed"] == len(b["results"]) > 0


def test_verify_fails_on_a_broken_third_party_backend(tmp_path):
    """A 'pkg.module:factory' backend that is wrong fails verify with exit 1 and names the check."""
    out = _memcore(
        "verify",
        "--backend",
        "memcore.conformance.broken:ThresholdOffByOne",
        "--ops",
        "sparsify",
        "--no-routing",
        "--no-self-check",
        "--profile",
        "dev",
        cwd=tmp_path,
    )
    assert out.returncode == 1, out.stdout + out.stderr
    assert "mutant-threshold-off-by-one-cpu-float64-sparsify-forward" in out.stdout
    assert "verify: FAILED" in out.stdout


def test_unknown_backend_is_a_clean_usage_error(tmp_path):
    """An unknown backend prints one line listing the available ones and exits 2, no traceback."""
    out = _memcore("verify", "--backend", "toch", cwd=tmp_path)
    assert out.returncode == 2
    assert "Unknown backend 'toch'. Available:" in out.stderr and "numpy" in out.stderr
    assert "Traceback" not in out.stderr + out.stdout


def test_missing_device_is_a_clean_usage_error(tmp_path):
    """A device the backend lacks prints one line naming the available devices and exits 2."""
    out = _memcore("verify", "--backend", "numpy", "--device", "cuda:0", cwd=tmp_path)
    assert out.returncode == 2
    assert "Device 'cuda:0' is not available for backend 'numpy'. Available: cpu" in out.stderr
    assert "Traceback" not in out.stderr + out.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--ops", "memory_raed"), "Unknown op 'memory_raed'"),
        (("--dtype", "float8"), "`--dtype` must be among"),
        (("--xfails", "no/such/file.txt"), "`xfails` must be an existing file"),
    ],
)
def test_bad_arguments_are_clean_usage_errors(tmp_path, args, message):
    """Unknown ops and dtypes and a missing xfail file exit 2 with one clear line."""
    out = _memcore("verify", "--backend", "numpy", *args, cwd=tmp_path)
    assert out.returncode == 2 and message in out.stderr
    assert "Traceback" not in out.stderr


def test_help_lists_the_options(tmp_path):
    """--help works for the command and for verify, listing every verify option."""
    top = _memcore("--help", cwd=tmp_path)
    assert top.returncode == 0 and "verify" in top.stdout and "backends" in top.stdout
    sub = _memcore("verify", "--help", cwd=tmp_path)
    assert sub.returncode == 0
    for opt in (
        "--backend",
        "--dtype",
        "--device",
        "--profile",
        "--json",
        "--xfails",
        "--ops",
        "--no-routing",
    ):
        assert opt in sub.stdout


def test_backends_lists_registered_backends(tmp_path):
    """`memcore backends` lists every registered backend with its availability."""
    out = _memcore("backends", cwd=tmp_path)
    assert out.returncode == 0
    lines = {line.split()[0]: line for line in out.stdout.splitlines() if line.strip()}
    assert {"numpy", "torch", "jax", "cupy"} <= set(lines)
    assert "available" in lines["numpy"]


def test_all_reports_a_backend_that_fails_to_load():
    """Under `all`, a backend that cannot load is recorded with its message instead of aborting."""
    loaded, code = _load(["numpy", "no_such_module_xyz:Factory"], None, single=False)
    assert code is None
    assert loaded[0][0] == "numpy" and loaded[0][1] is not None and loaded[0][2] == "cpu"
    _, backend, error = loaded[1]
    assert backend is None and "could not be imported" in error


def test_console_script_is_installed():
    """The `memcore` console script next to the interpreter runs (installed by pip install -e)."""
    script = pathlib.Path(sys.executable).parent / "memcore"
    if not script.exists():
        pytest.skip(
            f"no console script at {script}: memcore is not pip-installed in this environment"
        )
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True, check=False)
    assert out.returncode == 0 and "verify" in out.stdout


def test_verify_all_passes_on_cpu_with_the_ci_profile(tmp_path):
    """`memcore verify --backend all --profile ci` passes on this CPU machine: every installed
    backend (numpy, torch, jax, array_api, template in CI), and the torch~jax cross check."""
    pytest.importorskip("torch", reason="the CI environment installs torch; this run lacks it")
    pytest.importorskip("jax", reason="the CI environment installs jax; this run lacks it")
    path = tmp_path / "report.json"
    out = _memcore("verify", "--backend", "all", "--profile", "ci", "--json", str(path), cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-3000:]
    doc = json.loads(path.read_text())
    names = {b["name"] for b in doc["backends"]}
    assert {"numpy", "torch", "jax"} <= names
    assert all(not b["error"] and b["summary"]["failed"] == 0 for b in doc["backends"])
    cross = doc["self_check"]["cross"]
    assert cross and all(r["ok"] for r in cross) and {r["backend"] for r in cross} == {"jax~torch"}
