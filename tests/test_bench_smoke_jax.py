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

from memcore.backends.jax.memory import memory_write

from bench import mrbp_lm_jax, write_kernel_jax_cupy

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


def test_lm_checkpoint_methods_match_bptt():
    """Per-step checkpoint and the checkpointed-scan MRBP give BPTT's gradient on the JAX LM."""
    a = _args()
    params = mrbp_lm_jax.init_params(jax.random.PRNGKey(0), a)
    tokens, targets = mrbp_lm_jax.random_batch(3, a)
    with jax.default_matmul_precision("highest"):
        results = {
            m: mrbp_lm_jax.make_method(m, a, jnp.float32)(params, tokens, targets)
            for m in ("bptt", "checkpoint", "mrbp_scan")
        }
    ref = mrbp_lm_jax._host(results["bptt"][1])
    assert np.abs(ref).sum() > 0
    for m in ("checkpoint", "mrbp_scan"):
        assert float(results[m][0]) == pytest.approx(float(results["bptt"][0]), rel=1e-6)
        assert mrbp_lm_jax._rel(mrbp_lm_jax._host(results[m][1]), ref) < 1e-5, m


def test_lm_main_runs_mrbp_variants_against_bptt(tmp_path):
    """End to end (in-process): both explicit MRBP variants match BPTT and get ratios."""
    out = tmp_path / "lm.json"
    payload = mrbp_lm_jax.main(TINY + ["--T", "2", "--precision", "fp32", "--check-T", "0",
                                       "--methods", "mrbp_vjp,mrbp_replay", "--inprocess",
                                       "--out", str(out)])  # fmt: skip
    rows = json.loads(out.read_text())["rows"]
    assert [r["method"] for r in rows] == ["bptt", "mrbp_vjp", "mrbp_replay"]
    assert all(r["grad_rel_err_vs_bptt"] < 1e-5 and r["median_s"] > 0 for r in rows)
    assert rows[0]["speed_vs_bptt"] == 1.0 and "| mrbp_replay |" in payload["markdown"]


def test_lm_gradient_check_rejects_a_wrong_gradient(tmp_path):
    """The pre-timing check can fail: a gradient off by 5% is refused against the BPTT file."""
    ref = np.linspace(1.0, 2.0, 50, dtype=np.float32)
    path = str(tmp_path / "ref.npy")
    assert mrbp_lm_jax._compare("bptt", [ref], path, 1e-2, "T=1") == 0.0
    assert mrbp_lm_jax._compare("mrbp_vjp", [ref * 1.001], path, 1e-2, "T=1") < 1e-2
    with pytest.raises(AssertionError, match="mrbp_vjp"):
        mrbp_lm_jax._compare("mrbp_vjp", [ref * 1.05], path, 1e-2, "T=1")


def test_random_batch_targets_are_next_tokens():
    """Targets are the token stream shifted by one across segment boundaries, never all zeros."""
    tokens, targets = mrbp_lm_jax.random_batch(3, _args())
    tok, tgt = np.asarray(tokens), np.asarray(targets)
    assert tok.shape == (3, 2, 6) and tok.any()
    assert (tok[:, :, 1:] == tgt[:, :, :-1]).all() and (tok[1:, :, 0] == tgt[:-1, :, -1]).all()
