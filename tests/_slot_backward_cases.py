"""Shared cases of the CuPy slot-backward tests: the GPU tests (test_cupy_backend.py) and the
CPU emulation of the kernels (test_cupy_slot_backward_emulation.py) check the same shapes
against the same reference gradients with the same float32 criterion."""

from __future__ import annotations

import numpy as np

from memcore.reference._xp import array_namespace, concat, merge_heads
from memcore.reference.attention import slot_attention_head_grads

BWD_SHAPES = [  # b, k, ell, h, dh, tau: ragged L, K = 1, H = 1, dh not a power of two, tau = 1e-3
    (2, 5, 37, 3, 40, 0.25),
    (3, 7, 1, 1, 24, 0.5),
    (1, 33, 70, 2, 64, 1e-3),
    (2, 3, 5, 4, 3, 1.0),
    (2, 1, 45, 1, 33, 0.25),
    (1, 4, 100, 2, 96, 0.5),
]

# float32 acceptance: error of the fused result against the float64 backward of the same cache
# <= REF32_FACTOR * the reference float32 backward's own error + RTOL32 * max |exact| + ATOL32.
RTOL32, ATOL32, REF32_FACTOR = 3e-5, 1e-6, 4.0


def kernel_layout_head_grads(cache, d_out):
    """The reference head gradients in the kernels' layout: (dqk (B, K, 2D) = [dq | dk_self],
    dms (B, K, D), dkv (B, L, 2D) = [dkx | dvx])."""
    xp = array_namespace(d_out)
    dq, dks, dkx, dvx, dms = slot_attention_head_grads(cache, d_out)
    return concat(xp, [dq, dks], axis=-1), dms, concat(xp, [dkx, dvx], axis=-1)


def core_args(cache):
    """The backward launcher's array arguments from a SlotCache, as fused.py passes them."""
    xp = array_namespace(cache.q)
    heads = (cache.q, cache.ks, cache.kx, cache.vx, cache.ms)
    return tuple(merge_heads(xp, t) for t in heads) + (cache.a,)


def upcast(cache):
    """The same cache with every array in float64: its backward is the exact one of these values."""
    return cache._replace(
        **{f: v.astype("float64") for f, v in cache._asdict().items() if hasattr(v, "dtype")}
    )


def _host(t):
    return np.asarray(t.get() if hasattr(t, "get") else t, np.float64)  # CuPy arrays: .get()


def max_err(got, want) -> float:
    """max |got - want| in float64 on the host (NumPy or CuPy arrays); shapes must agree."""
    got, want = _host(got), _host(want)
    assert got.shape == want.shape, (got.shape, want.shape)
    return float(np.abs(got - want).max()) if got.size else 0.0


def assert_float32_close(got, ref32, exact, what: str) -> None:
    """The float32 criterion: ``got`` is as accurate as the reference's own float32 backward
    ``ref32``, both measured against ``exact`` (the float64 backward of the same cache)."""
    ref_err = max_err(ref32, exact)
    top = float(np.abs(_host(exact)).max()) if exact.size else 0.0
    bound = ATOL32 + RTOL32 * top + REF32_FACTOR * ref_err
    err = max_err(got, exact)
    assert err <= bound, f"{what}: max abs error {err:.3e} > {bound:.3e} (reference: {ref_err:.3e})"
