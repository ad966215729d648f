"""The Pallas memory write against the JAX backend's memory_write, on the CPU through the
Pallas interpreter (interpret=True): output and all six gradients, ragged shapes, errors."""

from __future__ import annotations

import json
import pathlib
import sys

import numpy as np
import pytest

jax = pytest.importorskip("jax", reason="the Pallas write is JAX code")
pytest.importorskip(
    "jax.experimental.pallas.triton",
    reason="this jax has no Pallas Triton API (jax.experimental.pallas.triton), so no kernels",
)

import jax.numpy as jnp

from memcore import MemcoreError
from memcore.backends.jax import pallas_write
from memcore.backends.jax.memory import memory_write
from memcore.backends.jax.pallas_write import pallas_memory_write
from memcore.config import TAU_MIN

NAMES = ("memory", "x", "wq", "wk", "wv", "v_bias")
# bench/ is a folder of scripts at the repository root, not an installed package.
_ROOT = str(pathlib.Path(__file__).resolve().parents[1])


def _inputs(B, K, L, D, dtype, seed=0):
    r = np.random.default_rng(seed)
    shapes = [(B, K, D), (B, L, D), (D, D), (D, D), (D, D), (K, D)]
    scales = [1.0, 1.0, D**-0.5, D**-0.5, D**-0.5, 1.0]
    ins = [jnp.asarray(r.standard_normal(s) * c, dtype) for s, c in zip(shapes, scales)]
    return ins, jnp.asarray(r.standard_normal((B, K, D)), dtype)


def _both(ins, dy, H, tau):
    """(y, grads) of the Pallas write (interpreted) and of memory_write, each one jit."""

    def vjp(fn):
        def run(*a):
            y, pull = jax.vjp(lambda *b: fn(*b, num_heads=H, tau=tau), *a)
            return y, pull(dy)

        return jax.jit(run)(*ins)

    ours = vjp(lambda *a, **k: pallas_memory_write(*a, interpret=True, **k))
    return ours, vjp(memory_write)


def _rel(got, want) -> float:
    g, w = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(g - w) / max(np.linalg.norm(w), 1e-30))


def _check(ours, want, tol):
    (y, grads), (y_ref, grads_ref) = ours, want
    assert y.shape == y_ref.shape and y.dtype == y_ref.dtype
    assert _rel(y, y_ref) < tol, ("out", _rel(y, y_ref))
    for name, g, w in zip(NAMES, grads, grads_ref, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype, name
        assert _rel(g, w) < tol, (name, _rel(g, w))


# (B, K, L, D, H, tau): K below, above and not a multiple of the slot block; L not a power
# of two (padded tokens masked); H = 1; dh = 4 and 8 (padded to 16); H = 3.
SHAPES = [
    (2, 5, 4, 16, 2, 0.25),
    (2, 33, 12, 32, 2, 0.5),
    (1, 20, 7, 8, 1, 0.25),
    (2, 6, 5, 12, 3, 0.3),
]


@pytest.mark.parametrize("B,K,L,D,H,tau", SHAPES)
def test_matches_memory_write_float32(B, K, L, D, H, tau):
    """Output and the six gradients equal memory_write's in float32 to 1e-5 (relative)."""
    ins, dy = _inputs(B, K, L, D, jnp.float32)
    _check(*_both(ins, dy, H, tau), tol=1e-5)


@pytest.mark.parametrize("tau,scale", [(1e-3, 1e3), (TAU_MIN, 1.0), (TAU_MIN, 1e3)])
def test_tiny_tau_is_finite_and_matches_memory_write(tau, scale):
    """The softmax subtracts the max before scaling: finite and equal to memory_write's at tiny tau."""
    ins, dy = _inputs(2, 5, 4, 16, jnp.float32, seed=3)
    ins = [a * scale if i < 2 else a for i, a in enumerate(ins)]  # memory, x ~ scale
    ours, want = _both(ins, dy, 2, tau)
    for i, a in enumerate((ours[0], *ours[1])):
        assert bool(jnp.isfinite(a).all()), (tau, scale, i)
    _check(ours, want, tol=1e-5)


def test_slot_loop_and_split_chunks(monkeypatch):
    """Several slot blocks per backward program, and several chunks summed, both match."""
    ins, dy = _inputs(2, 40, 9, 32, jnp.float32, seed=1)
    want = _both(ins, dy, 2, 0.25)[1]
    for target, splits in ((1, 1), (64, 2)):
        monkeypatch.setattr(pallas_write, "TARGET_PROGRAMS", target)
        tiles = pallas_write._tiles(2, 40, 9, 2, 16)
        assert (tiles.splits, tiles.chunk // tiles.bk) == (splits, 2 // splits)
        _check(_both(ins, dy, 2, 0.25)[0], want, tol=1e-5)


def test_no_tokens_attends_to_itself():
    """L = 0: every slot keeps only its self entry; gradients agree to rounding (atol)."""
    ins, dy = _inputs(2, 3, 0, 16, jnp.float32)
    (y, grads), (y_ref, grads_ref) = _both(ins, dy, 2, 0.25)
    np.testing.assert_allclose(y, y_ref, atol=1e-6)
    for name, g, w in zip(NAMES, grads, grads_ref, strict=True):
        assert g.shape == w.shape, name
        np.testing.assert_allclose(g, w, atol=1e-4, err_msg=name)


def test_float64_matches_to_rounding():
    """With x64 on, float64 inputs are computed in float64 throughout (1e-10)."""
    if not jax.config.jax_enable_x64:
        pytest.skip("float64 needs JAX_ENABLE_X64=1 before jax is imported (tests/conftest.py)")
    ins, dy = _inputs(2, 5, 6, 16, jnp.float64)
    _check(*_both(ins, dy, 2, 0.25), tol=1e-10)


def test_bfloat16_keeps_dtype_and_stays_close():
    """bf16 inputs give bf16 output and gradients within 3e-2 of the float32-computed op."""
    ins, dy = _inputs(2, 7, 5, 32, jnp.bfloat16, seed=2)
    _check(*_both(ins, dy, 2, 0.25), tol=3e-2)


def test_tiles_are_powers_of_two():
    """Every tile side is a power of two >= 16 and the padded K covers K in whole chunks."""
    for B, K, L, H, dh in [(1, 1, 1, 1, 1), (2, 33, 12, 2, 16), (64, 1024, 128, 8, 64),
                           (16, 64, 600, 4, 48)]:  # fmt: skip
        t = pallas_write._tiles(B, K, L, H, dh)
        for side in (t.bk, t.bl, t.dhp):
            assert side >= 16 and side & (side - 1) == 0, t
        assert t.bl >= L and t.dhp >= dh and t.kp >= K and t.kp == t.splits * t.chunk
        assert t.chunk % t.bk == 0 and t.kp - K < t.chunk, t


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="on a GPU the lowering is available")
def test_without_gpu_raises_naming_why():
    """Without a GPU (and without interpret=True) the call refuses with a MemcoreError."""
    assert not pallas_write.pallas_available()
    ins, _ = _inputs(1, 2, 3, 16, jnp.float32)
    with pytest.raises(MemcoreError, match=r"interpret=True.*default JAX backend here is 'cpu'"):
        pallas_memory_write(*ins, num_heads=2)


def test_invalid_inputs_raise_before_dispatch():
    """Bad heads and bad shapes get memory_write's MemcoreError messages."""
    ins, _ = _inputs(1, 2, 3, 16, jnp.float32)
    with pytest.raises(MemcoreError, match="`num_heads` must divide"):
        pallas_memory_write(*ins, num_heads=3, interpret=True)
    with pytest.raises(MemcoreError, match="`v_bias` must have shape"):
        pallas_memory_write(*ins[:5], ins[5][:1], num_heads=2, interpret=True)


def _bench():
    if _ROOT not in sys.path:
        sys.path.insert(0, _ROOT)
    from bench import write_kernel_jax_cupy

    return write_kernel_jax_cupy


def test_bench_checks_and_times_the_pallas_variant(tmp_path):
    """The write benchmark's pallas variant passes its check and gets times and a table line."""
    bench = _bench()
    out = tmp_path / "w.json"
    args = "--B 2 --K 3 --L 4 --D 16 --H 2 --dtype float32 --repeat 1 --frameworks jax"
    payload = bench.main(args.split() + ["--jax-variants", "jax,pallas", "--out", str(out)])
    (row,) = json.loads(out.read_text())["rows"]
    assert "pallas_error" not in row and row["variants"] == ["jax", "pallas"]
    assert row["pallas_grad_rel_err"] < 1e-4 and row["pallas_fwd_bwd_s"] > 0
    assert row["pallas_interpret"] is (jax.default_backend() != "gpu")
    assert "| 3 | pallas |" in payload["markdown"]


def test_bench_keeps_other_variants_when_pallas_fails(monkeypatch):
    """A Pallas failure is recorded as pallas_error; jax and fused keep their numbers."""
    bench = _bench()

    def broken(*a, **k):
        raise RuntimeError("Triton lowering failed: demo")

    monkeypatch.setitem(bench.JAX_FNS, "pallas", broken)
    row = bench.bench_jax(2, 3, 4, 16, 2, "float32", repeat=1, tol=1e-4,
                          variants=("fused", "pallas"))  # fmt: skip
    bench._derive(row, None)
    assert row["variants"] == ["jax", "fused"] and row["fused_fwd_bwd_s"] > 0
    assert row["pallas_error"] == "RuntimeError: Triton lowering failed: demo"
    table = bench.markdown([row])
    assert "| fused |" in table and "| pallas | error: 'RuntimeError: Triton" in table
    assert "fused_ad" not in table
