"""CPU smoke tests of the JAX / CuPy issue-7 benchmark code at tiny sizes (numbers come from a GPU)."""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import numpy as np
import pytest

jax = pytest.importorskip("jax", reason="the JAX benchmarks need jax")
import jax.numpy as jnp

# bench/ is a folder of scripts at the repository root, not an installed package.
_ROOT = str(pathlib.Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from bench import mrbp_lm_jax, write_kernel_jax_cupy
from memcore.backends.jax.memory import memory_write

TINY = ["--B", "2", "--L", "6", "--D", "16", "--H", "2", "--K", "3", "--vocab", "11",
        "--layers", "1", "--repeat", "1", "--warmup", "0"]  # fmt: skip


def _args(extra=()) -> argparse.Namespace:
    return mrbp_lm_jax.parser().parse_args(TINY + list(extra))


def _write_inputs(dtype, seed=0):
    arrs, dy = write_kernel_jax_cupy._inputs(2, 5, 4, 16, seed)
    return [jnp.asarray(x, dtype) for x in arrs], jnp.asarray(dy, dtype)


def test_fused_write_matches_memcore_op():
    """The fused JAX write (hand-written VJP) gives memory_write's output and six gradients."""
    ins, dy = _write_inputs(jnp.float32)
    fn = write_kernel_jax_cupy.fused_write
    with jax.default_matmul_precision("highest"):
        y, pull = jax.vjp(lambda *a: fn(*a, num_heads=4, tau=0.25), *ins)
        y_ref, pull_ref = jax.vjp(lambda *a: memory_write(*a, num_heads=4, tau=0.25), *ins)
        grads, want = pull(dy), pull_ref(dy)
    assert write_kernel_jax_cupy._rel([y], [y_ref]) < 1e-5
    for g, w in zip(grads, want, strict=True):
        assert g.dtype == w.dtype and write_kernel_jax_cupy._rel([g], [w]) < 1e-4


def test_fused_write_bf16_stays_close_and_keeps_dtype():
    """In bf16 the fused write returns bf16 output and gradients within 3e-2 of the op."""
    ins, dy = _write_inputs(jnp.bfloat16, seed=1)

    @jax.jit
    def both(*a):
        y, pull = jax.vjp(lambda *b: write_kernel_jax_cupy.fused_write(*b, num_heads=2), *a)
        y_ref, pull_ref = jax.vjp(lambda *b: memory_write(*b, num_heads=2), *a)
        return y, y_ref, pull(dy), pull_ref(dy)

    y, y_ref, grads, want = both(*ins)
    assert y.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
    assert write_kernel_jax_cupy._rel([y], [y_ref]) < 3e-2
    assert write_kernel_jax_cupy._rel(grads, want) < 3e-2


def test_write_bench_runs_jax_and_skips_cupy_without_cuda(tmp_path):
    """The write benchmark checks and times the JAX variants; CuPy is skipped with its reason."""
    out = tmp_path / "w.json"
    payload = write_kernel_jax_cupy.main(["--B", "2", "--K", "3", "--L", "4", "--D", "8", "--H",
                                          "2", "--dtype", "float32", "--repeat", "1", "--out",
                                          str(out)])  # fmt: skip
    (row,) = json.loads(out.read_text())["rows"]
    assert row["fused_grad_rel_err"] < 1e-4 and row["fused_fwd_bwd_s"] > 0
    assert row["jax_speedup_fwd_bwd"] == 1.0
    if write_kernel_jax_cupy._cupy_reason() is not None:
        assert payload["cupy_skipped"] == "needs CUDA and cupy"


@pytest.mark.skipif(write_kernel_jax_cupy._cupy_reason() is not None, reason="needs CUDA and cupy")
def test_cupy_write_variants_agree():
    """Fused CuPy write (gated and forced) matches the unfused reference on CuPy."""
    row = write_kernel_jax_cupy.bench_cupy(2, 3, 4, 16, 2, repeat=1, tol=1e-4)
    assert row["cupy_fused_forced_grad_rel_err"] < 1e-4 and row["cupy_fused_grad_rel_err"] < 1e-4


def test_lm_methods_match_bptt():
    """The library's checkpointed and MRBP drivers give BPTT's loss and gradient on the LM."""
    a = _args()
    params = mrbp_lm_jax.init_params(jax.random.PRNGKey(0), a)
    tokens, targets = mrbp_lm_jax.random_batch(3, a)
    with jax.default_matmul_precision("highest"):
        results = {
            m: mrbp_lm_jax.make_method(m, a, jnp.float32)(params, tokens, targets)
            for m in ("bptt", "checkpoint", "mrbp")
        }
    ref = mrbp_lm_jax._host(results["bptt"][1])
    assert np.abs(ref).sum() > 0
    for m in ("checkpoint", "mrbp"):
        assert float(results[m][0]) == pytest.approx(float(results["bptt"][0]), rel=1e-6)
        assert mrbp_lm_jax._rel(mrbp_lm_jax._host(results[m][1]), ref) < 1e-5, m


def test_lm_main_runs_mrbp_variants_against_bptt(tmp_path):
    """End to end (in-process): MRBP with and without host offload match BPTT; ratios come
    from XLA's plan (the allocator's peak only grows within one process)."""
    out = tmp_path / "lm.json"
    payload = mrbp_lm_jax.main(TINY + ["--T", "2", "--precision", "fp32", "--check-T", "0",
                                       "--methods", "mrbp,mrbp_host", "--inprocess",
                                       "--out", str(out)])  # fmt: skip
    rows = json.loads(out.read_text())["rows"]
    assert [r["method"] for r in rows] == ["bptt", "mrbp", "mrbp_host"]
    assert all(r["grad_rel_err_vs_bptt"] < 1e-5 and r["median_s"] > 0 for r in rows)
    assert rows[0]["speed_vs_bptt"] == 1.0 and "| mrbp_host |" in payload["markdown"]
    assert rows[0]["xla_memory_vs_bptt"] == 1.0 and "memory_vs_bptt" not in rows[1]
    assert rows[1]["xla_peak_bytes"] > 0


def test_lm_gradient_check_rejects_a_wrong_gradient(tmp_path):
    """The pre-timing check can fail: a gradient off by 5% is refused against the BPTT file."""
    ref = np.linspace(1.0, 2.0, 50, dtype=np.float32)
    path = str(tmp_path / "ref.npy")
    assert mrbp_lm_jax._compare("bptt", [ref], path, 1e-2, "T=1") == 0.0
    assert mrbp_lm_jax._compare("mrbp", [ref * 1.001], path, 1e-2, "T=1") < 1e-2
    with pytest.raises(AssertionError, match="mrbp"):
        mrbp_lm_jax._compare("mrbp", [ref * 1.05], path, 1e-2, "T=1")


def test_random_batch_targets_are_next_tokens():
    """Targets are the token stream shifted by one across segment boundaries, never all zeros."""
    tokens, targets = mrbp_lm_jax.random_batch(3, _args())
    tok, tgt = np.asarray(tokens), np.asarray(targets)
    assert tok.shape == (3, 2, 6) and tok.any()
    assert (tok[:, :, 1:] == tgt[:, :, :-1]).all() and (tok[1:, :, 0] == tgt[:-1, :, -1]).all()


# ----------------------------------------------------------------------------- largest-T fit
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
        {"method": "mrbp", "precision": "fp32", "T": 8, "peak_bytes": 2 * GIB},
        {"method": "mrbp", "precision": "fp32", "T": 32, "peak_bytes": 5 * GIB},
        {"method": "mrbp", "precision": "bf16", "T": 8, "peak_bytes": 1 * GIB},
        {"method": "checkpoint", "precision": "fp32", "error": "timeout"},
    ]
    a = mrbp_lm_jax.parser().parse_args(TINY + ["--fit-gib", "40"])
    fits = mrbp_lm_jax.fit_memory(TINY, a, ["mrbp", "checkpoint"], rows, str(tmp_path))
    assert calls == [("mrbp", [312, 328], True)]
    fit, skipped = fits
    assert skipped["method"] == "checkpoint" and "needs two" in skipped["error"]
    assert fit["predicted_T"] == 312 and fit["fits"] and fit["above_exceeds"]
    assert fit["tokens_per_s"] == 312 * 2 * 6


def test_fit_worker_runs_without_a_bptt_reference(tmp_path):
    """A fit worker times a T that BPTT never ran at, and says it compared nothing."""
    a = mrbp_lm_jax.parser().parse_args(
        TINY + ["--T", "3", "--precision", "fp32", "--check-T", "0", "--fit-worker"]
    )
    (row,) = mrbp_lm_jax.run_worker(a, "mrbp", "fp32", str(tmp_path))
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
        {"method": "mrbp", "precision": "fp32", "T": 8, "peak_bytes": int(2.4 * GIB)},
        {"method": "mrbp", "precision": "fp32", "T": 32, "peak_bytes": int(3.36 * GIB)},
    ]
    a = mrbp_lm_jax.parser().parse_args(TINY + ["--fit-gib", "40"])
    (fit,) = mrbp_lm_jax.fit_memory(TINY, a, ["mrbp"], rows, str(tmp_path))
    assert len(calls) == 2 and calls[0][0] > 760  # round 1 overshoots
    assert fit["fits"] and fit["above_exceeds"] and fit["T"] == 760


def test_lm_bench_holds_no_routing_code():
    """The JAX LM bench routes gradients only through memcore's drivers (issue 13)."""
    src = pathlib.Path(mrbp_lm_jax.__file__).read_text()
    for routing in ("lax.scan", "jax.vjp", "jax.checkpoint(", "value_and_grad("):
        assert routing not in src.split('"""', 2)[2], routing


def test_inprocess_failure_becomes_an_error_row(monkeypatch, tmp_path):
    """In one process a failing method is recorded as an error row and later methods still run."""

    def fake_worker(a, method, precision, work):
        if method == "mrbp_host":
            raise RuntimeError("host offload unsupported")
        return [{"method": method, "precision": precision, "T": 2, "median_s": 1.0,
                 "grad_rel_err_vs_bptt": 0.0, "xla_peak_bytes": 10}]  # fmt: skip

    monkeypatch.setattr(mrbp_lm_jax, "run_worker", fake_worker)
    payload = mrbp_lm_jax.main(TINY + ["--T", "2", "--precision", "fp32", "--inprocess",
                                       "--methods", "mrbp_host,mrbp"])  # fmt: skip
    methods = [(r["method"], "error" in r) for r in payload["rows"]]
    assert methods == [("bptt", False), ("mrbp_host", True), ("mrbp", False)]
    assert "host offload unsupported" in payload["rows"][1]["error"]
