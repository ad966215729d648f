"""The JAX LM benchmark's largest-T fit: prediction, bracket and worker mode (CPU, tiny sizes)."""

from __future__ import annotations

import pathlib
import sys

import pytest

jax = pytest.importorskip("jax", reason="the JAX benchmarks need jax")

_ROOT = str(pathlib.Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from bench import mrbp_lm_jax

TINY = ["--B", "2", "--L", "6", "--D", "16", "--H", "2", "--K", "3", "--vocab", "11",
        "--layers", "1", "--repeat", "1", "--warmup", "0"]  # fmt: skip
GIB = 2**30


def test_fit_predicts_T_and_checks_the_bracket(monkeypatch, tmp_path):
    """Peaks 2 GiB at T=8 and 5 GiB at T=32 -> 0.125 GiB/segment -> T=312 in 40 GiB."""
    calls = []

    def fake_spawn(argv, method, precision, work, timeout):
        Ts = [int(t) for t in argv[argv.index("--T", len(TINY)) + 1].split(",")]
        calls.append((method, Ts, "--fit-worker" in argv))
        return [{"method": method, "T": T, "median_s": 1.0,
                 "peak_bytes": int((1 + 0.125 * T) * GIB)} for T in Ts]  # fmt: skip

    monkeypatch.setattr(mrbp_lm_jax, "_spawn", fake_spawn)
    rows = [
        {"method": "mrbp_scan", "precision": "fp32", "T": 8, "peak_bytes": 2 * GIB},
        {"method": "mrbp_scan", "precision": "fp32", "T": 32, "peak_bytes": 5 * GIB},
        {"method": "mrbp_scan", "precision": "bf16", "T": 8, "peak_bytes": 1 * GIB},
        {"method": "checkpoint", "precision": "fp32", "error": "timeout"},
    ]
    a = mrbp_lm_jax.parser().parse_args(TINY + ["--fit-gib", "40"])
    fits = mrbp_lm_jax.fit_memory(TINY, a, ["mrbp_scan", "checkpoint"], rows, str(tmp_path))
    assert calls == [("mrbp_scan", [312, 328], True)]
    fit, skipped = fits
    assert skipped["method"] == "checkpoint" and "needs two" in skipped["error"]
    assert fit["predicted_T"] == 312 and fit["fits"] and fit["above_exceeds"]
    assert fit["tokens_per_s"] == 312 * 2 * 6


def test_fit_worker_runs_without_a_bptt_reference(tmp_path):
    """A fit worker times a T that BPTT never ran at, and says it compared nothing."""
    a = mrbp_lm_jax.parser().parse_args(
        TINY + ["--T", "3", "--precision", "fp32", "--check-T", "0", "--fit-worker"]
    )
    (row,) = mrbp_lm_jax.run_worker(a, "mrbp_scan", "fp32", str(tmp_path))
    assert row["T"] == 3 and row["median_s"] > 0 and row["grad_rel_err_vs_bptt"] is None


def test_fit_repredicts_from_the_largest_measured_T(monkeypatch, tmp_path):
    """When the table's slope underestimates the large-T one, the second round predicts
    from the first round's runs and brackets the largest T."""
    peak = lambda T: int((2.0 + 0.05 * T) * GIB)  # 40 GiB -> largest T = 760
    calls = []

    def fake_spawn(argv, method, precision, work, timeout):
        Ts = [int(t) for t in argv[argv.index("--T", len(TINY)) + 1].split(",")]
        calls.append(Ts)
        return [{"method": method, "precision": "fp32", "T": T, "median_s": 1.0,
                 "peak_bytes": peak(T)} for T in Ts]  # fmt: skip

    monkeypatch.setattr(mrbp_lm_jax, "_spawn", fake_spawn)
    rows = [  # slope 0.04 GiB/segment at small T
        {"method": "mrbp_scan", "precision": "fp32", "T": 8, "peak_bytes": int(2.4 * GIB)},
        {"method": "mrbp_scan", "precision": "fp32", "T": 32, "peak_bytes": int(3.36 * GIB)},
    ]
    a = mrbp_lm_jax.parser().parse_args(TINY + ["--fit-gib", "40"])
    (fit,) = mrbp_lm_jax.fit_memory(TINY, a, ["mrbp_scan"], rows, str(tmp_path))
    assert len(calls) == 2 and calls[0][0] > 760  # round 1 overshoots
    assert fit["fits"] and fit["above_exceeds"] and fit["T"] == 760
