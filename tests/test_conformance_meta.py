"""Meta-tests of the conformance suite: it passes the reference and catches broken backends."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import attrs
import numpy as np
import pytest

from memcore.backends.numpy import NumpyBackend
from memcore.conformance import broken, report
from memcore.conformance.checks import OP_CHECKS, device_matches
from memcore.conformance.compare import compare
from memcore.conformance.routing_checks import ROUTING_CHECKS
from memcore.conformance.runner import pin_numerics, plan, resolve_device, run_backend
from memcore.conformance.tolerances import OVERRIDES, STAGES, TABLE, Override, Tol, tolerance
from memcore.conformance.xfails import bundled_xfail_file, load_xfails, parse_xfails
from memcore.errors import MemcoreError
from memcore.ops import OPS


def _failed(results):
    return {(r.dtype, r.op, r.check) for r in results if r.status == "failed"}


# ------------------------------------------------------------------ the reference passes
def test_numpy_backend_passes_every_check():
    """The numpy backend (the reference behind the protocol) passes 100% of the suite."""
    results = run_backend(NumpyBackend())
    n_routing = sum(len(c) for c in ROUTING_CHECKS.values())
    assert len(results) == 2 * (len(OPS) * len(OP_CHECKS) + n_routing)
    assert [r.id for r in results if r.status != "passed"] == []
    assert {r.dtype for r in results} == {"float64", "float32"}
    assert all(r.examples > 0 for r in results)


# ------------------------------------------------------------------ mutants are caught
@pytest.mark.parametrize(
    ("mutant", "ops", "routing", "expected"),
    [
        (
            broken.ScaledBackward("memory_read"),
            ["memory_read", "bmn"],
            False,
            {(d, "memory_read", "vjp") for d in ("float64", "float32")},
        ),
        (
            broken.Float32GradientDrift("memory_read"),
            ["memory_read", "bmn"],
            False,
            {("float32", "memory_read", "vjp")},
        ),
        (
            broken.Float32GradientDrift("bmn"),
            ["bmn", "lstm_cell"],
            False,
            {("float32", "bmn", "vjp")},
        ),
        (
            broken.ThresholdOffByOne(),
            ["sab_scores", "sparsify", "sparse_retrieve"],
            False,
            {
                (d, op, c)
                for d in ("float64", "float32")
                for op in ("sparsify", "sparse_retrieve")
                for c in ("forward", "vjp")
            },
        ),
        (
            broken.Mutating("bmn"),
            ["bmn", "memory_init"],
            False,
            {(d, "bmn", "no_mutation") for d in ("float64", "float32")},
        ),
        (broken.WrongDtype("bmn"), ["bmn", "memory_init"], False, {("float32", "bmn", "preserve")}),
        (
            broken.ReplayWithoutChunkCut(),
            [],
            True,
            {
                (d, "sab", c)
                for d in ("float64", "float32")
                for c in ("sparse_replay_vs_own_sab_bptt", "sparse_replay_vs_ref")
            },
        ),
        (
            broken.MrbpIgnoresTruncation(),
            [],
            True,
            {
                (d, "memformer", c)
                for d in ("float64", "float32")
                for c in ("mrbp_vs_own_bptt", "mrbp_vs_ref_bptt")
            },
        ),
    ],
    ids=lambda v: getattr(v, "name", None) if isinstance(v, NumpyBackend) else None,
)
def test_mutant_is_caught_by_the_right_check_only(mutant, ops, routing, expected):
    """Each deliberately broken backend fails exactly the checks meant to catch its bug."""
    results = run_backend(
        mutant, ops=ops, routing=routing, profile="ci", layouts=6 if routing else None
    )
    assert _failed(results) == expected
    for r in results:
        if r.status == "failed":
            assert r.reason and r.failed_example, r.id


def test_failure_reports_errors_and_where():
    """A failed value check names the array, its max abs/rel error, the index and both values."""
    results = run_backend(
        broken.ScaledBackward("bmn", scale=1.5), ops=["bmn"], routing=False, dtypes=["float64"]
    )
    vjp = next(r for r in results if r.check == "vjp")
    assert vjp.status == "failed"
    w = vjp.worst
    assert not w.ok and w.where is not None and w.max_abs > 0 and w.max_rel > 0.3
    assert w.actual_at == pytest.approx(1.5 * w.expected_at)
    assert "grad[" in vjp.reason and "at [" in vjp.reason


def test_missing_routing_method_fails_with_reason():
    """A backend without a routing method fails the routing checks (never passes or skips them)."""

    class NoMrbp(NumpyBackend):
        name = "numpy-without-mrbp"
        mrbp = None

    results = run_backend(NoMrbp(), ops=[], dtypes=["float64"], profile="ci")
    mrbp = [r for r in results if r.op == "memformer"]
    assert {r.status for r in mrbp} == {"failed"}
    assert all("`mrbp`" in r.reason for r in mrbp)
    assert {r.status for r in results if r.op == "sab"} == {"passed"}


def test_missing_float64_is_skipped_with_reason():
    """float64 on a device without it is SKIPPED with the capability as reason; float32 still runs."""
    fake = broken.NoFloat64()
    default = run_backend(fake, ops=["bmn"], routing=False)
    assert {r.dtype for r in default} == {"float32"}
    results = run_backend(fake, ops=["bmn"], routing=True, dtypes=["float64", "float32"])
    f64 = [r for r in results if r.dtype == "float64"]
    assert f64 and {r.status for r in f64} == {"skipped"}
    assert all("float64" in r.reason and "capabilities().dtypes" in r.reason for r in f64)
    assert {r.status for r in results if r.dtype == "float32"} == {"passed"}


def test_unknown_device_is_a_clear_error():
    """Asking for a device the backend lacks raises MemcoreError listing the available ones."""
    with pytest.raises(
        MemcoreError, match=r"Device 'cuda:0' is not available for backend 'numpy'. Available: cpu"
    ):
        resolve_device(NumpyBackend(), "cuda:0")
    assert resolve_device(NumpyBackend(), None) == "cpu"
    assert (
        device_matches("TFRT_CPU_0", "cpu")
        and device_matches("cuda:0", "cuda")
        and not device_matches("cpu", "cuda:0")
    )


def test_pin_numerics_without_hooks_records_that_nothing_was_pinned():
    """A backend with no numerics hook is recorded as such; a hook's settings are recorded."""
    assert pin_numerics(NumpyBackend())["source"].startswith("none")

    class Pinned(NumpyBackend):
        def pin_numerics(self):
            return {"tf32": False}

    assert pin_numerics(Pinned()) == {"source": "backend.pin_numerics", "tf32": False}


# ------------------------------------------------------------------ xfails
def test_xfail_file_parsing():
    """Lines are 'pattern  # reason'; comments and blanks are skipped; a missing reason is an error."""
    xf = parse_xfails(
        ["# header", "", "float32-sparsify-vjp   # ties round differently", "  bmn-errors #r  "],
        "f.txt",
    )
    assert [(e.pattern, e.reason, e.source) for e in xf.entries] == [
        ("float32-sparsify-vjp", "ties round differently", "f.txt:3"),
        ("bmn-errors", "r", "f.txt:4"),
    ]
    assert xf.match("torch-cpu-float32-sparsify-vjp").reason == "ties round differently"
    assert xf.match("torch-cpu-float64-sparsify-vjp") is None
    assert [e.pattern for e in xf.unmatched()] == ["bmn-errors"]
    with pytest.raises(MemcoreError, match=r"f.txt:1"):
        parse_xfails(["bmn-vjp"], "f.txt")
    with pytest.raises(MemcoreError, match=r"without spaces"):
        parse_xfails(["bmn vjp # reason"], "f.txt")
    with pytest.raises(MemcoreError, match=r"`xfails` must be an existing file"):
        load_xfails("/nonexistent/xfails.txt")
    assert (
        bundled_xfail_file("numpy") is not None
        and load_xfails(bundled_xfail_file("numpy")).entries == ()
    )


def test_xfail_turns_failure_into_xfail_and_warns_on_stale_patterns():
    """A matching pattern makes a failing check 'xfailed', a passing one 'xpassed'; unused ones warn."""
    xf = parse_xfails(
        ["memory_read-vjp  # scaled on purpose", "bmn-forward  # stale", "nothing-matches  # gone"]
    )
    results = run_backend(
        broken.ScaledBackward("memory_read"),
        ops=["memory_read", "bmn"],
        routing=False,
        dtypes=["float64"],
        xfails=xf,
    )
    status = {r.check if r.op == "memory_read" else f"bmn-{r.check}": r.status for r in results}
    assert status["vjp"] == "xfailed" and status["bmn-forward"] == "xpassed"
    assert not [r for r in results if r.failed]
    with pytest.warns(UserWarning, match="nothing-matches"):
        stale = xf.warn_unmatched()
    assert [e.pattern for e in stale] == ["nothing-matches"]


# ------------------------------------------------------------------ tolerances and comparisons
def test_tolerance_table_requires_rtol_and_atol():
    """Every dtype has forward/vjp/routing rows with both rtol and atol; overrides state a reason."""
    with pytest.raises(TypeError):
        Tol(rtol=1e-3)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        Tol(atol=1e-3)  # type: ignore[call-arg]
    with pytest.raises(MemcoreError, match="rtol"):
        Tol(rtol=-1.0, atol=0.0)
    assert set(TABLE) == {"float64", "float32", "bfloat16", "float16"}
    for rows in TABLE.values():
        assert set(rows) == set(STAGES)
        assert all(t.rtol > 0 and t.atol > 0 for t in rows.values())
    assert TABLE["float64"]["routing"].rtol <= 1e-9
    for o in OVERRIDES:
        assert o.op in OPS and o.dtype in TABLE and o.stage in STAGES and len(o.reason) > 20
        assert tolerance(o.op, o.dtype, o.stage) == o.tol
    with pytest.raises(MemcoreError, match="reason"):
        Override("bmn", "float32", "vjp", Tol(rtol=1.0, atol=1.0), " ")
    with pytest.raises(MemcoreError, match="dtype"):
        tolerance("bmn", "int8", "forward")


def test_compare_reports_max_errors_and_where():
    """compare gives max abs and rel error, the worst index and both values, never just a bool."""
    tol = Tol(rtol=1e-6, atol=1e-9)
    expected = np.arange(12.0).reshape(3, 4)
    actual = expected.copy()
    actual[2, 1] += 1e-3
    c = compare("x", actual.astype(np.float32), expected, tol)
    assert not c.ok and c.where == (2, 1) and c.expected_at == 9.0
    assert c.max_abs == pytest.approx(1e-3, rel=1e-3) and c.max_rel == pytest.approx(
        1e-3 / 9, rel=1e-3
    )
    assert "at [2, 1]" in c.describe()
    assert compare("x", expected, expected, tol).ok
    assert "shape" in compare("x", expected[:2], expected, tol).reason
    nan = expected.copy()
    nan[0, 0] = np.nan
    assert not compare("x", nan, expected, tol).ok
    assert compare("x", nan, nan, tol).ok
    assert "None" in compare("x", None, expected, tol).reason


# ------------------------------------------------------------------ reports
def test_report_json_schema(tmp_path):
    """The JSON report carries versions, device, dtypes, numerics and every error figure per check."""
    backend = NumpyBackend()
    results = run_backend(backend, ops=["bmn"], routing=False)
    record = report.backend_record(
        "numpy",
        backend,
        device="cpu",
        dtypes=["float64", "float32"],
        numerics=pin_numerics(backend),
        results=results,
        profile="dev",
    )
    path = tmp_path / "r.json"
    report.write_json(
        str(path), report.document([record], profile="dev", self_check={"routing": []})
    )
    doc = json.loads(path.read_text())
    assert {
        "memcore_version",
        "spec_version",
        "python",
        "numpy",
        "platform",
        "profile",
        "self_check",
        "backends",
        "ok",
    } <= set(doc)
    assert doc["ok"] is True
    b = doc["backends"][0]
    assert {
        "name",
        "version",
        "device",
        "devices",
        "dtypes",
        "numerics",
        "summary",
        "results",
        "error",
    } <= set(b)
    assert b["summary"]["passed"] == len(results) == len(b["results"])
    fwd = next(r for r in b["results"] if r["check"] == "forward")
    assert {"id", "status", "examples", "worst", "dtype", "op", "device"} <= set(fwd)
    assert {
        "max_abs",
        "max_rel",
        "ratio",
        "where",
        "rtol",
        "atol",
        "actual_at",
        "expected_at",
    } <= set(fwd["worst"])


def test_table_and_progress_bar():
    """The table says what its cells hold, has a column per dtype with status and max error;
    the bar draws on its stream."""
    results = run_backend(broken.ScaledBackward("bmn"), ops=["bmn"], routing=False)
    text = report.format_table(results)
    assert text.splitlines()[0].startswith("cells: status and max |actual - expected|")
    assert "float64" in text.splitlines()[1] and "float32" in text.splitlines()[1]
    assert "FAIL" in text and "mutant-scaled-bmn-cpu-float64-bmn-vjp" in text
    stream = io.StringIO()
    unit = plan(["bmn"], ["float64"], False)[0]
    bar = report.Progress("numpy:cpu", stream, enabled=True)
    bar(0, 2, unit)
    bar(2, 2, unit)
    assert (
        "[" + "." * 30 + "] 0/2 float64 bmn" in stream.getvalue()
        and "2/2 done" in stream.getvalue()
    )


def test_results_are_frozen_records():
    """CheckResults are immutable (reports cannot rewrite a verdict)."""
    r = run_backend(NumpyBackend(), ops=["bmn"], routing=False, dtypes=["float64"])[0]
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        r.status = "failed"  # type: ignore[misc]


# ------------------------------------------------------------------ the pytest plugin
def test_plugin_import_is_cheap():
    """Loading the plugin (done by every pytest run) imports no framework and no suite module."""
    code = (
        "import sys, memcore.conformance.plugin; "
        "print(sorted(m for m in ('torch', 'jax', 'cupy', 'memcore.conformance.runner')"
        " if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_plugin_adds_no_tests_to_other_runs(tmp_path):
    """A pytest run outside the suite collects only its own tests."""
    (tmp_path / "test_one.py").write_text("def test_one():\n    pass\n")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "--collect-only",
            "-q",
            "-p",
            "no:cacheprovider",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 test collected" in out.stdout


def test_pytest_pyargs_runs_the_suite(tmp_path):
    """pytest --pyargs memcore.conformance runs every check on the numpy backend and writes the JSON."""
    path = tmp_path / "p.json"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "--pyargs",
            "memcore.conformance",
            "--memcore-backend",
            "numpy",
            "--memcore-dtype",
            "float64",
            "--memcore-profile",
            "dev",
            f"--memcore-json={path}",
            "-q",
            "-p",
            "no:cacheprovider",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=False,
    )
    n = len(OPS) * len(OP_CHECKS) + sum(len(c) for c in ROUTING_CHECKS.values())
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert f"{n} passed" in out.stdout
    doc = json.loads(path.read_text())
    assert doc["backends"][0]["summary"]["passed"] == n


def test_runner_leaves_the_global_hypothesis_profile_alone():
    """Running the suite under a profile does not change the hypothesis profile of other tests."""
    from hypothesis import settings

    before = settings().max_examples
    run_backend(
        NumpyBackend(), ops=["bmn"], routing=False, dtypes=["float64"], profile="nightly", layouts=1
    )
    assert settings().max_examples == before


def test_pin_numerics_falls_back_to_pinning_torch_itself():
    """A torch backend without the hooks still gets TF32 disabled by the runner, and it is recorded."""
    pytest.importorskip("torch", reason="the fallback pins torch; torch is not installed")
    import torch

    from memcore.backends.torch import TorchBackend

    class Hookless(TorchBackend):
        pin_numerics = None
        numerics_settings = None

    settings = pin_numerics(Hookless())
    assert settings["source"].startswith("runner")
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        assert matmul.fp32_precision == "ieee" and settings["cuda_matmul_fp32_precision"] == "ieee"
    else:  # pragma: no cover - torch < 2.9
        assert matmul.allow_tf32 is False and settings["cuda_matmul_allow_tf32"] is False
