"""The CuPy slot-attention backward kernels, replayed in NumPy and checked against the reference.

``backends/cupy/kernels.py``'s ``slot_bwd_slots`` and ``slot_bwd_tokens`` need a GPU. This
module emulates their algorithm step for step in the kernels' own dtype: warp rows,
lane registers (dim d = lane + 32 r, zero beyond dh), the two passes over the tokens, the
xor-butterfly warp sum, the skip of zero weights and the loop over slots. It runs on the
CPU, so the math and the recurrences are checked where no GPU is available.

It also loads ``backends/cupy/fused.py`` as shipped with NumPy standing in for CuPy and the
emulation standing in for the launcher, which checks the composition around the kernels
(GEMMs on concatenated weights, the dtype and size gate) without a GPU.
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys
import types
import zlib

import numpy as np
import pytest

from _slot_backward_cases import (
    BWD_SHAPES,
    assert_float32_close,
    core_args,
    kernel_layout_head_grads,
    max_err,
    upcast,
)
from memcore.reference import attention as ref_attention
from memcore.reference import memory as ref_memory
from memcore.reference._xp import merge_heads, split_heads

FUSED_PY = pathlib.Path(__file__).resolve().parents[1] / "backends" / "cupy" / "fused.py"

# ------------------------------------------------------------------ the emulation
def _lanes(t, h: int):
    """(B, S, D) merged heads -> (B, H, S, R, 32) lane registers, zero beyond dh."""
    b, s, d = t.shape
    dh = d // h
    r = -(-dh // 32)
    out = np.zeros((b, h, s, 32 * r), t.dtype)
    out[..., :dh] = split_heads(np, t, h)
    return out.reshape(b, h, s, r, 32)


def _merged(t, dh: int):
    """(B, H, S, R, 32) lane registers -> (B, S, D) merged heads."""
    b, h, s, r, _ = t.shape
    return merge_heads(np, t.reshape(b, h, s, 32 * r)[..., :dh])


def _warp_sum(part):
    """warp_reduce(SumOp) over the last axis (32 lanes): the xor butterfly, offsets 16..1."""
    lane = np.arange(32)
    for o in (16, 8, 4, 2, 1):
        part = part + part[..., lane ^ o]
    assert (part == part[..., :1]).all()  # every lane ends with the same sum
    return part[..., 0]


def _dot(g, v):
    """Per lane ``part += g[r] * v[r]`` over r in order, then the warp sum: (..., R, 32) -> (...)"""
    part = np.zeros(g.shape[:-2] + (32,), g.dtype)
    for r in range(g.shape[-2]):
        part = part + g[..., r, :] * v[..., r, :]
    return _warp_sum(part)


def emulate_slot_backward_core(
    q, ks, kx, vx, memory, weights, d_out, *, num_heads: int, scale: float
):
    """kernels.slot_attention_backward_core in NumPy: (dqk (B, K, 2D), dms (B, K, D),
    dkv (B, L, 2D)), with the kernels' order of floating-point operations.

    All warps of one launch advance together; each loop below is a kernel's loop.
    """
    dtype = q.dtype
    assert all(t.dtype == dtype for t in (ks, kx, vx, memory, weights, d_out))
    c = dtype.type(scale)
    zero = dtype.type(0)
    h = num_heads
    b, k, d = q.shape
    ell, dh = kx.shape[1], d // h
    assert weights.shape == (b, h, k, ell + 1)
    Q, KS, MEM, G = (_lanes(t, h) for t in (q, ks, memory, d_out))  # (B, H, K, R, 32)
    KX, VX = _lanes(kx, h), _lanes(vx, h)  # (B, H, L, R, 32)
    a = weights

    # slot_bwd_slots: one warp per (b, h, i).
    a_self = a[..., 0]
    da_self = _dot(G, MEM)
    o = a_self[..., None, None] * MEM
    for j in range(ell):  # pass 1: o = a_self m + sum_j a_j vx_j
        aj = a[..., 1 + j][..., None, None]
        o = np.where(aj != 0, o + aj * VX[:, :, j : j + 1], o)
    delta = _dot(G, o)
    dl_self = a_self * (da_self - delta) * c
    acc = dl_self[..., None, None] * KS
    dl = np.empty((b, h, k, ell), dtype)
    for j in range(ell):  # pass 2: dl_j = a_j (<dO, vx_j> - delta) c, dq += dl_j kx_j
        aj = a[..., 1 + j]
        da = _dot(G, np.broadcast_to(VX[:, :, j : j + 1], G.shape))
        live = aj != 0
        dlj = np.where(live, aj * (da - delta) * c, zero)
        dl[..., j] = dlj
        acc = np.where(live[..., None, None], acc + dlj[..., None, None] * KX[:, :, j : j + 1], acc)
    dq, dks, dms = acc, dl_self[..., None, None] * Q, a_self[..., None, None] * G

    # slot_bwd_tokens: one warp per (b, h, j), the slots in order.
    dk = np.zeros((b, h, ell) + Q.shape[3:], dtype)
    dv = np.zeros_like(dk)
    for i in range(k):
        aij = a[:, :, i, 1:][..., None, None]  # (B, H, L, 1, 1)
        live = aij != 0
        dv = np.where(live, dv + aij * G[:, :, i : i + 1], dv)
        dk = np.where(live, dk + dl[:, :, i, :][..., None, None] * Q[:, :, i : i + 1], dk)

    dqk = np.concatenate([_merged(dq, dh), _merged(dks, dh)], axis=-1)
    dkv = np.concatenate([_merged(dk, dh), _merged(dv, dh)], axis=-1)
    return dqk, _merged(dms, dh), dkv


# ------------------------------------------------------------------ inputs
def _rng(*key) -> np.random.Generator:
    return np.random.default_rng([zlib.crc32(k.encode()) if isinstance(k, str) else k for k in key])


def _u(rng, shape, dtype, low=0.1):
    """Random values bounded away from zero (magnitudes in [low, 1], random signs)."""
    return (rng.uniform(low, 1.0, shape) * rng.choice([-1.0, 1.0], shape)).astype(dtype)


def slot_inputs(b, k, ell, h, dh, mask, dtype, key="slot-bwd"):
    """(memory, x, wq, wk, wv, token_mask, d_out), drawn as test_cupy_backend draws them."""
    rng = _rng(key, b, k, ell, h, dh, str(mask))
    d = h * dh
    memory, x = _u(rng, (b, k, d), dtype), _u(rng, (b, ell, d), dtype)
    wq, wk, wv = (_u(rng, (d, d), dtype) * np.dtype(dtype).type(1.0 / np.sqrt(d)) for _ in range(3))
    token_mask = None
    if mask == "random":
        token_mask = rng.random((b, ell)) < 0.6
    elif mask == "row-masked":  # batch row 0 has every token masked
        token_mask = rng.random((b, ell)) < 0.6
        token_mask[0] = False
    return memory, x, wq, wk, wv, token_mask, _u(rng, (b, k, d), dtype)


def slot_case(b, k, ell, h, dh, tau, mask, dtype):
    """(cache, d_out): the reference forward's SlotCache and a cotangent."""
    memory, x, wq, wk, wv, token_mask, d_out = slot_inputs(b, k, ell, h, dh, mask, dtype)
    _, cache = ref_attention.slot_attention_forward(
        memory, x, wq, wk, wv, num_heads=h, tau=tau, token_mask=token_mask
    )
    return cache, d_out


# ------------------------------------------------------------------ the emulation vs the reference
@pytest.mark.parametrize("mask", [None, "random", "row-masked"])
@pytest.mark.parametrize("b,k,ell,h,dh,tau", BWD_SHAPES)
def test_emulation_matches_reference_in_float64(b, k, ell, h, dh, tau, mask):
    """In float64 the kernels' algorithm gives the reference's head gradients to rounding."""
    cache, d_out = slot_case(b, k, ell, h, dh, tau, mask, "float64")
    got = emulate_slot_backward_core(*core_args(cache), d_out, num_heads=h, scale=cache.scale)
    want = kernel_layout_head_grads(cache, d_out)
    for name, g, w in zip(("dqk", "dms", "dkv"), got, want):
        scale = float(np.abs(w).max()) if w.size else 0.0
        err = max_err(g, w)
        assert err <= 1e-12 + 1e-11 * scale, f"{name}: {err:.3e} (max |want| {scale:.3e})"


@pytest.mark.parametrize("mask", [None, "random", "row-masked"])
@pytest.mark.parametrize("b,k,ell,h,dh,tau", BWD_SHAPES)
def test_emulation_float32_meets_the_gpu_tolerance(b, k, ell, h, dh, tau, mask):
    """In float32 the kernels' order of operations passes the GPU test's criterion."""
    cache, d_out = slot_case(b, k, ell, h, dh, tau, mask, "float32")
    got = emulate_slot_backward_core(*core_args(cache), d_out, num_heads=h, scale=cache.scale)
    ref32 = kernel_layout_head_grads(cache, d_out)
    exact = kernel_layout_head_grads(upcast(cache), d_out.astype(np.float64))
    for name, g, r, e in zip(("dqk", "dms", "dkv"), got, ref32, exact):
        assert g.dtype == np.float32
        assert_float32_close(g, r, e, name)


def test_masked_tokens_and_zero_weights_get_exactly_zero():
    """A token no slot attends to gets dkx = dvx = 0 exactly; in a fully masked row the slots
    keep only the direct path (dq = dk_self = 0, dms = d_out)."""
    cache, d_out = slot_case(2, 5, 37, 3, 40, 0.25, "row-masked", "float32")
    dqk, dms, dkv = emulate_slot_backward_core(
        *core_args(cache), d_out, num_heads=3, scale=cache.scale
    )
    assert not dkv[0].any()  # batch row 0 has every token masked
    dead = ~cache.a[1, :, :, 1:].any(axis=(0, 1))  # tokens of row 1 with zero weight everywhere
    assert dead.any() and not dkv[1, dead].any()
    # Row 0: a_self = 1, so dl_self = (da_self - da_self) c = 0: dq = dk_self = 0, dms = d_out.
    assert not dqk[0].any() and np.array_equal(dms[0], d_out[0])


# ------------------------------------------------------------------ fused.py on NumPy
@pytest.fixture
def fused_np(monkeypatch):
    """backends/cupy/fused.py loaded with NumPy as ``cupy`` and a kernels stub: the emulation
    for the slot backward, NumPy BMN. Its calls are counted in ``mod.calls``."""
    calls = []

    def core(*args, **kwargs):
        calls.append(str(args[0].dtype))
        return emulate_slot_backward_core(*args, **kwargs)

    stub = types.ModuleType("memcore.backends.cupy.kernels")
    stub.slot_attention_backward_core = core
    stub.bmn_forward = lambda m, vb: ref_memory.normalize(np, m + vb)
    stub.bmn_backward = lambda y, n, dy: ref_memory.normalize_backward(np, y, n, dy)
    pkg = types.ModuleType("memcore.backends.cupy")
    pkg.__path__ = []
    pkg.kernels = stub
    # Only for the load: the module keeps its own references; sys.modules is restored after.
    monkeypatch.setitem(sys.modules, "cupy", np)
    monkeypatch.setitem(sys.modules, "memcore.backends.cupy", pkg)
    monkeypatch.setitem(sys.modules, "memcore.backends.cupy.kernels", stub)
    spec = importlib.util.spec_from_file_location("_memcore_cupy_fused_on_numpy", FUSED_PY)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.calls = calls
    return mod


def _snapshot(cache, d_out):
    return [t.copy() for t in cache if isinstance(t, np.ndarray)] + [d_out.copy()]


def _unchanged(cache, d_out, before) -> bool:
    now = [t for t in cache if isinstance(t, np.ndarray)] + [d_out]
    return all(np.array_equal(a, b) for a, b in zip(now, before))


def _same_as_reference(fused_np, cache, d_out) -> bool:
    """The gated backward's five gradients equal the reference's bit for bit."""
    got = fused_np.slot_attention_backward(cache, d_out)
    want = ref_attention.slot_attention_backward(cache, d_out)
    return all(np.array_equal(g, w) for g, w in zip(got, want))


def test_gate_constants(fused_np):
    """The slot-kernel bounds, B*H*K*L logits: 2**22 forward, 2**20 backward (measured)."""
    assert fused_np.SLOT_KERNEL_MAX_LOGITS == 1 << 22
    assert fused_np.SLOT_BACKWARD_KERNEL_MAX_LOGITS == 1 << 20
    assert {
        "SLOT_BACKWARD_KERNEL_MAX_LOGITS",
        "slot_backward_kernel_pays",
        "slot_attention_backward_kernel",
    } <= set(fused_np.__all__)


@pytest.mark.parametrize("mask", [None, "random"])
@pytest.mark.parametrize("b,k,ell,h,dh,tau", BWD_SHAPES)
def test_fused_backward_composition_matches_reference(fused_np, b, k, ell, h, dh, tau, mask):
    """fused.slot_attention_backward (float32, gate open) runs the kernel path once and gives the
    reference's five gradients; the inputs are not mutated."""
    cache, d_out = slot_case(b, k, ell, h, dh, tau, mask, "float32")
    before = _snapshot(cache, d_out)
    assert fused_np.slot_backward_kernel_pays(cache, d_out)
    got = fused_np.slot_attention_backward(cache, d_out)
    assert fused_np.calls == ["float32"]
    ref32 = ref_attention.slot_attention_backward(cache, d_out)
    exact = ref_attention.slot_attention_backward(upcast(cache), d_out.astype(np.float64))
    for name, g, r, e in zip(("dmemory", "dx", "dwq", "dwk", "dwv"), got, ref32, exact):
        assert g.dtype == np.float32 and g.shape == e.shape and g.flags.c_contiguous, name
        assert_float32_close(g, r, e, name)
    assert _unchanged(cache, d_out, before)


def test_fused_backward_float64_composition(fused_np):
    """The ungated kernel path in float64 equals the reference backward to rounding."""
    cache, d_out = slot_case(2, 5, 37, 3, 40, 0.25, "random", "float64")
    got = fused_np.slot_attention_backward_kernel(cache, d_out)
    want = ref_attention.slot_attention_backward(cache, d_out)
    for g, w in zip(got, want):
        assert max_err(g, w) <= 1e-12 + 1e-11 * float(np.abs(w).max())


def test_gate_keeps_float64_and_large_sizes_on_the_reference(fused_np, monkeypatch):
    """float64 and B*H*K*L above the bound take the reference backward (bit-identical);
    the bound itself is inclusive."""
    cache, d_out = slot_case(2, 3, 5, 4, 3, 1.0, "random", "float64")
    assert not fused_np.slot_backward_kernel_pays(cache, d_out)
    assert _same_as_reference(fused_np, cache, d_out)
    cache32, d32 = slot_case(2, 3, 5, 4, 3, 1.0, "random", "float32")
    assert not fused_np.slot_backward_kernel_pays(cache32, d_out)  # a float64 cotangent: reference
    logits = 2 * 4 * 3 * 5
    monkeypatch.setattr(fused_np, "SLOT_BACKWARD_KERNEL_MAX_LOGITS", logits)
    assert fused_np.slot_backward_kernel_pays(cache32, d32)
    monkeypatch.setattr(fused_np, "SLOT_BACKWARD_KERNEL_MAX_LOGITS", logits - 1)
    assert not fused_np.slot_backward_kernel_pays(cache32, d32)
    assert _same_as_reference(fused_np, cache32, d32)
    assert fused_np.calls == []


def test_memory_write_backward_composition(fused_np):
    """fused.memory_write_backward chains BMN's backward into the gated slot backward."""
    memory, x, wq, wk, wv, token_mask, _ = slot_inputs(2, 5, 37, 3, 40, "random", "float32")
    rng = _rng("write-bwd")
    v_bias, d_out = _u(rng, (5, 120), "float32"), _u(rng, (2, 5, 120), "float32")
    _, write = ref_memory.memory_write_forward(
        memory, x, wq, wk, wv, v_bias, num_heads=3, tau=0.25, token_mask=token_mask
    )
    cache, bmn = write
    bmn64 = ref_memory.BmnCache(bmn.y.astype(np.float64), bmn.n.astype(np.float64))
    got = fused_np.memory_write_backward(write, d_out)
    assert fused_np.calls == ["float32"]
    ref32 = ref_memory.memory_write_backward(write, d_out)
    exact = ref_memory.memory_write_backward(
        ref_memory.WriteCache(upcast(cache), bmn64),
        d_out.astype(np.float64),
    )
    assert len(got) == 6
    for i, (g, r, e) in enumerate(zip(got, ref32, exact)):
        assert_float32_close(g, r, e, f"write grad {i}")
