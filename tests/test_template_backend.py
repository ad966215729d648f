"""The third-party template (examples/template_backend) is installed, found by its entry point
and passes ``memcore verify``; the verify JSON report records memcore.SPEC_VERSION; and the
CLI reports float64 checks as skipped on array-api-strict's no_float64 device."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys

import pytest

import memcore
from memcore import registry

DIST = "memcore-template-backend"
INSTALL = "pip install -e examples/template_backend (the README's test command does this)"


def _verify(tmp_path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    report = tmp_path / "report.json"
    done = subprocess.run(
        [sys.executable, "-m", "memcore.cli", "verify", *args, "--json", str(report)],
        check=False,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert report.is_file(), done.stdout[-2000:] + done.stderr[-2000:]
    return done, json.loads(report.read_text())


def test_template_is_installed_and_registered_by_entry_point():
    """The template distribution is installed and registers 'template' -> memcore_template."""
    try:
        dist = importlib.metadata.distribution(DIST)
    except importlib.metadata.PackageNotFoundError:
        pytest.fail(f"{DIST} is not installed: {INSTALL}")
    eps = {ep.name: ep.value for ep in dist.entry_points if ep.group == registry.ENTRY_POINT_GROUP}
    assert eps == {"template": "memcore_template:TemplateBackend"}
    entry = registry.registered_backends()["template"]
    assert entry.source == f"entry point ({DIST})" and entry.importable()
    row = {r.name: r for r in registry.describe_backends()}["template"]
    assert row.available and row.version == dist.version


def test_memcore_verify_passes_on_the_template(tmp_path):
    """`memcore verify --backend template --profile dev` exits 0 with every check passed."""
    done, report = _verify(tmp_path, "--backend", "template", "--profile", "dev")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    (backend,) = report["backends"]
    assert backend["name"] == "template" and backend["error"] == ""
    counts = backend["summary"]
    assert counts["failed"] == 0 and counts["passed"] == len(backend["results"]) > 0
    assert report["ok"] is True


def test_report_records_the_spec_version(tmp_path):
    """The verify JSON report carries memcore.SPEC_VERSION and the memcore version."""
    done, report = _verify(tmp_path, "--backend", "numpy", "--profile", "dev", "--ops", "bmn")
    assert done.returncode == 0, done.stdout[-3000:]
    assert report["spec_version"] == memcore.SPEC_VERSION
    assert report["memcore_version"] == memcore.__version__


def test_cli_skips_float64_on_a_device_without_it(tmp_path):
    """verify on no_float64 with float64 asked: those checks are skipped with the reason."""
    pytest.importorskip("array_api_strict", reason="needs array-api-strict")
    done, report = _verify(
        tmp_path,
        "--backend",
        "array_api",
        "--device",
        "no_float64",
        "--dtype",
        "float64,float32",
        "--profile",
        "dev",
        "--no-self-check",
    )
    assert done.returncode == 0, done.stdout[-3000:]
    results = report["backends"][0]["results"]
    f64 = [r for r in results if r["dtype"] == "float64"]
    assert f64 and {r["status"] for r in f64} == {"skipped"}
    assert all("does not support float64" in r["reason"] for r in f64)
    assert {r["status"] for r in results if r["dtype"] == "float32"} == {"passed"}
    assert "skip" in done.stdout and "does not support float64" in done.stdout
