"""Fused Memformer memory write for JAX: slot attention in two Pallas kernels (Triton lowering).

``pallas_memory_write(memory, x, wq, wk, wv, v_bias, num_heads=H, tau=tau)`` computes the same
function as :func:`memcore.backends.jax.memory.memory_write` (Memformer Eq. 4-8 + BMN), with a
``jax.custom_vjp``. It is opt-in, like the torch backend's ``triton_write.py``. The (D, D)
projections stay XLA GEMMs (one (D, 2D) GEMM for [q | k_self] from the memory, one for
[k_x | v_x] from the tokens); the attention core runs in Pallas:

- forward kernel, grid (B, K / BK, H): one program per (batch row, block of BK slots, head).
  It computes the self logit <q_i, k_i> and the token logits q_i kx^T, the softmax over
  [self; tokens] with one max and one sum (the (B, H, K, L+1) logits never reach HBM), and the
  weighted sum a_self m_i + a_tok vx. The row max of the raw logits is subtracted before the
  1 / (sqrt(dh) tau) scale multiplies (docs/semantics.md §2), so no tau down to TAU_MIN
  overflows. It writes the head output and the softmax residuals: the raw row max and the log
  of the row's sum (B, H, K) each, a = exp((l - max) scale - log sum).
- backward kernel, grid (B, H, S): one program per (batch row, head, chunk of K / S slots),
  looping over the chunk's slot blocks. It recomputes the softmax from the row max and
  log-sum (flash-attention style), writes d[q | k_self] and the direct d memory (a_self dO), and
  accumulates d[k_x | v_x] over its slots in registers (no atomics). S > 1 only when B * H
  programs would leave the GPU idle; the S partial token gradients are summed by XLA.
- BMN (forward and backward), dv_bias and every projection gradient are ``jnp`` around them.

The heads stay in the projections' (B, K, 2, H, dh) layout (no transposes). The Triton lowering
needs power-of-two tiles, so dh is padded to DH >= 16, L to BL >= 16 (padded tokens get logit
-inf, hence weight 0) and K to a multiple of the slot block (padded slots are sliced off).

Where the Pallas GPU lowering is unavailable (no GPU, or a jax without
``jax.experimental.pallas.triton``) the call raises :class:`MemcoreError` naming why, unless
``interpret=True`` (the Pallas interpreter, which the CPU tests use). Tiles hold all L tokens,
so the kernels suit L up to a few hundred tokens (as ``triton_write.py`` does).
Shapes: memory (B, K, D); x (B, L, D); wq, wk, wv (D, D); v_bias (K, D); H heads, dh = D / H.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from memcore.backends.jax.memory import NORM_EPS, memory_write
from memcore.errors import MemcoreError
from memcore.ops import OPS

try:  # Pallas is experimental: a jax without it still imports this module
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as pl_triton

    _IMPORT_ERROR: str | None = None
except ImportError as exc:  # pragma: no cover - depends on the installed jax
    pl = pl_triton = None
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

__all__ = ["pallas_available", "pallas_memory_write", "pallas_unavailable_reason"]

F32 = jnp.float32
# Backward programs to aim for: about two per SM of an H100 / H200 (132 SMs). Below that,
# each (batch row, head) splits its slots into chunks whose token gradients XLA then sums.
TARGET_PROGRAMS = 256
# Triton launch parameters of the two kernels (the backward's slot loop is software-pipelined).
_FWD_PARAMS = {"num_warps": 4, "num_stages": 1}
_BWD_PARAMS = {"num_warps": 4, "num_stages": 2}
# A squeezed block dimension (one index, dropped from the kernel's view); older jax spells it None.
_SQ = getattr(pl, "squeezed", None)


def pallas_unavailable_reason() -> str | None:
    """Why the compiled (non-interpreted) kernels cannot run here, or None when they can."""
    if _IMPORT_ERROR is not None:
        return (
            f"jax {jax.__version__} cannot import jax.experimental.pallas.triton ({_IMPORT_ERROR})"
        )
    backend = jax.default_backend()
    if backend != "gpu":
        return (
            "the Pallas Triton lowering runs on CUDA or ROCm GPUs only, and the default JAX "
            f"backend here is {backend!r}"
        )
    return None


def pallas_available() -> bool:
    """True when the kernels can be compiled for the default JAX backend (a GPU)."""
    return pallas_unavailable_reason() is None


# ----------------------------------------------------------------------------- tiles
def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


class _Tiles(NamedTuple):
    bk: int  # slots per block (BK)
    bl: int  # padded tokens (BL), all in one tile
    dhp: int  # padded head width (DH)
    splits: int  # slot chunks per (batch row, head) in the backward (S)
    chunk: int  # slots per chunk, a multiple of bk
    kp: int  # padded slots = splits * chunk


def _tiles(B: int, K: int, L: int, H: int, dh: int) -> _Tiles:
    """Power-of-two tiles (Triton's tl.dot needs every side >= 16) and the backward split."""
    dhp, bl = max(16, _pow2(dh)), max(16, _pow2(L))
    # Smaller slot blocks for wide token tiles keep the (BK, BL) logits in registers.
    bk = 16 if K <= 16 or bl * dhp > 128 * 64 else 32
    n_blocks = -(-K // bk)
    want = min(n_blocks, max(1, -(-TARGET_PROGRAMS // (B * H))))
    per = -(-n_blocks // want)
    splits = -(-n_blocks // per)
    return _Tiles(bk, bl, dhp, splits, per * bk, splits * per * bk)


def _pad(a: jax.Array, sizes: dict[int, int]) -> jax.Array:
    """Zero-pad axes of ``a`` up to ``sizes[axis]``; no op when nothing grows."""
    widths = [(0, sizes.get(i, n) - n) for i, n in enumerate(a.shape)]
    return jnp.pad(a, widths) if any(w for _, w in widths) else a


def _compiler_params(params: dict[str, int]) -> Any:
    # Triton's params also pick the Triton lowering: without them jax >= 0.10 lowers
    # pallas_call to Mosaic GPU (jax_pallas_use_mosaic_gpu defaults to True).
    return pl_triton.CompilerParams(**params)


# ----------------------------------------------------------------------------- kernels
def _dot(a, b, acc, contract=((1,), (0,))):
    """2-D matmul accumulating in ``acc``; ``contract`` picks transposed operands."""
    return lax.dot_general(a, b, (contract, ((), ())), preferred_element_type=acc)


def _dot_nt(a, b, acc):  # a b^T
    return _dot(a, b, acc, ((1,), (1,)))


def _dot_tn(a, b, acc):  # a^T b
    return _dot(a, b, acc, ((0,), (0,)))


def _keep_tokens(s, n_tokens: int, fill: float):
    """Columns >= n_tokens (the padding up to BL) become ``fill``."""
    if n_tokens >= s.shape[1]:
        return s
    col = lax.broadcasted_iota(jnp.int32, s.shape, 1)
    return jnp.where(col < n_tokens, s, fill)


def _fwd_kernel(qk_ref, kv_ref, m_ref, o_ref, mx_ref, lse_ref, *, scale: float, n_tokens: int):
    """One (batch row, slot block, head): o = softmax([self; tokens]) [m; vx], the raw row max
    and the log of the row sum."""
    acc = o_ref.dtype  # float32 (float64 for float64 inputs)
    q, ks = qk_ref[:, 0, :], qk_ref[:, 1, :]  # (BK, DH) each
    kx, vx = kv_ref[:, 0, :], kv_ref[:, 1, :]  # (BL, DH) each
    s_self = jnp.sum(q.astype(acc) * ks.astype(acc), axis=1)  # (BK,) raw logits
    s_tok = _keep_tokens(_dot_nt(q, kx, acc), n_tokens, -jnp.inf)  # (BK, BL); padding -inf
    mx = jnp.maximum(jnp.max(s_tok, axis=1), s_self)  # finite: the self entry is never masked
    # Eq. 7: logits divided by tau < 1 (in scale) sharpen the write. The max is subtracted
    # first, then the scale multiplies: every exponent is <= 0, none overflows.
    p_self = jnp.exp((s_self - mx) * scale)
    p_tok = jnp.exp((s_tok - mx[:, None]) * scale)
    den = p_self + jnp.sum(p_tok, axis=1)
    o = p_self[:, None] * m_ref[...].astype(acc) + _dot(p_tok.astype(vx.dtype), vx, acc)
    o_ref[...] = o / den[:, None]
    mx_ref[...] = mx
    lse_ref[...] = jnp.log(den)


def _bwd_kernel(
    qk_ref, kv_ref, m_ref, du_ref, mx_ref, lse_ref, dqk_ref, dm_ref, dkv_ref,
    *, scale: float, n_tokens: int, bk: int, n_blocks: int,
):  # fmt: skip
    """One (batch row, head, slot chunk): recompute a = exp((l - mx) scale - lse), then per block
    da_self = <dO, m>, da_tok = dO vx^T, dl = a (da - <a, da>) scale, dq = dl_self ks +
    dl_tok kx, dks = dl_self q, dm = a_self dO; accumulate dkx += dl_tok^T q, dvx += a_tok^T dO.
    """
    acc = dkv_ref.dtype
    kx = kv_ref[:, 0, :].astype(acc)  # (BL, DH)
    vx = kv_ref[:, 1, :].astype(acc)

    def block(j, carry):
        dkx, dvx = carry
        rows = pl.ds(pl.multiple_of(j * bk, bk), bk)
        q = qk_ref[rows, 0, :].astype(acc)  # (BK, DH)
        ks = qk_ref[rows, 1, :].astype(acc)
        m = m_ref[rows, :].astype(acc)
        do = du_ref[rows, :]
        mx, lse = mx_ref[rows], lse_ref[rows]  # (BK,) each
        # the forward's softmax: raw logits, the row max subtracted, then the scale
        p_self = jnp.exp((jnp.sum(q * ks, axis=1) - mx) * scale - lse)
        # where, not a product: exp of a padded token's logit may overflow to inf.
        s_tok = (_dot_nt(q, kx, acc) - mx[:, None]) * scale - lse[:, None]
        p_tok = _keep_tokens(jnp.exp(s_tok), n_tokens, 0.0)
        dp_self = jnp.sum(do * m, axis=1)
        dp_tok = _dot_nt(do, vx, acc)  # (BK, BL)
        delta = p_self * dp_self + jnp.sum(p_tok * dp_tok, axis=1)  # <a, da> per slot
        ds_self = p_self * (dp_self - delta) * scale
        ds_tok = p_tok * (dp_tok - delta[:, None]) * scale
        dqk_ref[rows, 0, :] = ds_self[:, None] * ks + _dot(ds_tok, kx, acc)
        dqk_ref[rows, 1, :] = ds_self[:, None] * q
        dm_ref[rows, :] = p_self[:, None] * do
        return dkx + _dot_tn(ds_tok, q, acc), dvx + _dot_tn(p_tok, do, acc)

    zeros = jnp.zeros(kx.shape, acc)
    dkx, dvx = lax.fori_loop(np.int32(0), np.int32(n_blocks), block, (zeros, zeros))
    dkv_ref[:, 0, :] = dkx
    dkv_ref[:, 1, :] = dvx


def _attend(lay: _Layout, t: _Tiles, n_tokens: int, scale: float, interpret: bool):
    """Forward kernel: (o (B, Kp, H, DH), mx, lse (B, H, Kp) each), in the accumulation dtype."""
    B, H, acc = lay.qk5.shape[0], lay.qk5.shape[3], _acc(lay.qk5.dtype)
    slot = pl.BlockSpec((_SQ, t.bk, _SQ, t.dhp), lambda b, k, h: (b, k, h, 0))
    row = pl.BlockSpec((_SQ, _SQ, t.bk), lambda b, k, h: (b, h, k))
    return pl.pallas_call(
        functools.partial(_fwd_kernel, scale=scale, n_tokens=n_tokens),
        grid=(B, t.kp // t.bk, H),
        in_specs=[
            pl.BlockSpec((_SQ, t.bk, 2, _SQ, t.dhp), lambda b, k, h: (b, k, 0, h, 0)),
            pl.BlockSpec((_SQ, t.bl, 2, _SQ, t.dhp), lambda b, k, h: (b, 0, 0, h, 0)),
            slot,
        ],
        out_specs=[slot, row, row],
        out_shape=[
            jax.ShapeDtypeStruct((B, t.kp, H, t.dhp), acc),
            jax.ShapeDtypeStruct((B, H, t.kp), acc),
            jax.ShapeDtypeStruct((B, H, t.kp), acc),
        ],
        compiler_params=_compiler_params(_FWD_PARAMS),
        interpret=interpret,
        name="memcore_write_fwd",
    )(lay.qk5, lay.kv5, lay.m4)


def _attend_bwd(lay: _Layout, du4, mx, lse, t: _Tiles, n_tokens: int, scale: float, interpret):
    """Backward kernel: dqk (B, Kp, 2, H, DH), dm (B, Kp, H, DH), dkv (B, S, BL, 2, H, DH)."""
    B, H, acc = lay.qk5.shape[0], lay.qk5.shape[3], du4.dtype
    slots = pl.BlockSpec((_SQ, t.chunk, _SQ, t.dhp), lambda b, h, s: (b, s, h, 0))
    pair = pl.BlockSpec((_SQ, t.chunk, 2, _SQ, t.dhp), lambda b, h, s: (b, s, 0, h, 0))
    rows = pl.BlockSpec((_SQ, _SQ, t.chunk), lambda b, h, s: (b, h, s))
    kernel = functools.partial(
        _bwd_kernel, scale=scale, n_tokens=n_tokens, bk=t.bk, n_blocks=t.chunk // t.bk
    )
    return pl.pallas_call(
        kernel,
        grid=(B, H, t.splits),
        in_specs=[
            pair,
            pl.BlockSpec((_SQ, t.bl, 2, _SQ, t.dhp), lambda b, h, s: (b, 0, 0, h, 0)),
            slots,
            slots,
            rows,
            rows,
        ],
        out_specs=[
            pair,
            slots,
            pl.BlockSpec((_SQ, _SQ, t.bl, 2, _SQ, t.dhp), lambda b, h, s: (b, s, 0, 0, h, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((B, t.kp, 2, H, t.dhp), acc),
            jax.ShapeDtypeStruct((B, t.kp, H, t.dhp), acc),
            jax.ShapeDtypeStruct((B, t.splits, t.bl, 2, H, t.dhp), acc),
        ],
        compiler_params=_compiler_params(_BWD_PARAMS),
        interpret=interpret,
        name="memcore_write_bwd",
    )(lay.qk5, lay.kv5, lay.m4, du4, mx, lse)


# ----------------------------------------------------------------------------- the VJP
def _acc(dtype) -> Any:
    """The accumulation dtype: float32 for half types, the dtype itself otherwise."""
    return jnp.promote_types(dtype, F32)


def _mm(a, b):
    return jnp.matmul(a, b, preferred_element_type=_acc(a.dtype))


class _Layout(NamedTuple):
    """The padded, head-split operands of the kernels, in the inputs' dtype."""

    qk5: jax.Array  # (B, Kp, 2, H, DH): [q | k_self]
    kv5: jax.Array  # (B, BL, 2, H, DH): [k_x | v_x]
    m4: jax.Array  # (B, Kp, H, DH): the raw slots, the self value


def _slots(memory, H: int, t: _Tiles) -> jax.Array:
    B, K, D = memory.shape
    return _pad(memory.reshape(B, K, H, D // H), {1: t.kp, 3: t.dhp})


def _layout(memory, x, wq, wk, wv, H: int, t: _Tiles) -> _Layout:
    B, K, D = memory.shape
    L, dh, op = x.shape[1], D // H, memory.dtype  # op: the kernels' operand dtype
    qk = _mm(memory, jnp.concatenate([wq, wk], axis=1)).astype(op)  # (B, K, 2D)
    kv = _mm(x, jnp.concatenate([wk, wv], axis=1)).astype(op)  # (B, L, 2D)
    return _Layout(
        _pad(qk.reshape(B, K, 2, H, dh), {1: t.kp, 4: t.dhp}),
        _pad(kv.reshape(B, L, 2, H, dh), {1: t.bl, 4: t.dhp}),
        _slots(memory, H, t),
    )


def _unpad(a: jax.Array, rows: int, dh: int) -> jax.Array:
    """(B, R, ..., DH) -> (B, rows, prod(...) * dh): drop padded rows and head columns."""
    a = a[:, :rows, ..., :dh]
    return a.reshape(a.shape[0], rows, math.prod(a.shape[2:]))


def _geometry(memory, x, num_heads: int) -> tuple[_Tiles, int, int, int, float]:
    B, K, D = memory.shape
    L, dh = x.shape[1], D // num_heads
    return _tiles(B, K, L, num_heads, dh), K, L, dh, 1.0 / math.sqrt(dh)


def _forward(memory, x, wq, wk, wv, v_bias, num_heads, tau, interpret):
    """(y (B, K, D), residuals): projections, the forward kernel, then BMN in jnp."""
    t, K, L, dh, c = _geometry(memory, x, num_heads)
    lay = _layout(memory, x, wq, wk, wv, num_heads, t)
    o4, mx, lse = _attend(lay, t, L, c / tau, interpret)
    # BMN: u / max(||u||, eps), the reference's clamp, with a sqrt that never sees 0.
    u = _unpad(o4, K, dh) + v_bias.astype(o4.dtype)
    sq = jnp.sum(u * u, axis=-1, keepdims=True)
    root = jnp.sqrt(jnp.where(sq > 0, sq, 1.0))
    free = (sq > 0) & (root > NORM_EPS)
    n = jnp.where(free, root, NORM_EPS)
    y = u / n
    return y.astype(memory.dtype), (lay.qk5, lay.kv5, mx, lse, y, n, free)


def _write_impl(memory, x, wq, wk, wv, v_bias, num_heads, tau, interpret):
    return _forward(memory, x, wq, wk, wv, v_bias, num_heads, tau, interpret)[0]


def _write_fwd(memory, x, wq, wk, wv, v_bias, num_heads, tau, interpret):
    y, res = _forward(memory, x, wq, wk, wv, v_bias, num_heads, tau, interpret)
    return y, ((memory, x, wq, wk, wv, v_bias), res)


def _write_bwd(num_heads, tau, interpret, saved, dy):
    """BMN: du = (dy - y <y, dy>) / n (du = dy / n where the norm was clamped); the kernel
    gives d[q | k_self], d[k_x | v_x] and a_self du; then dmemory = a_self du + d[q | k_self]
    [wq | wk]^T, dx = d[k_x | v_x] [wk | wv]^T, dw = input^T d(projection), dv_bias = sum_b du.
    """
    (memory, x, wq, wk, wv, _), (qk5, kv5, mx, lse, y, n, free) = saved
    t, K, L, dh, c = _geometry(memory, x, num_heads)
    B, D, op = memory.shape[0], memory.shape[-1], memory.dtype
    dy = dy.astype(y.dtype)
    du = jnp.where(free, dy - y * jnp.sum(y * dy, axis=-1, keepdims=True), dy) / n
    lay = _Layout(qk5, kv5, _slots(memory, num_heads, t))
    du4 = _pad(du.reshape(B, K, num_heads, dh), {1: t.kp, 3: t.dhp})
    dqk5, dm4, dkv6 = _attend_bwd(lay, du4, mx, lse, t, L, c / tau, interpret)
    dqk = _unpad(dqk5, K, dh).astype(op)  # (B, K, 2D): [dq | dk_self]
    dkv = _unpad(jnp.sum(dkv6, axis=1), L, dh).astype(op)  # (B, L, 2D): [dk_x | dv_x]
    w_qk, w_kv = jnp.concatenate([wq, wk], axis=1), jnp.concatenate([wk, wv], axis=1)
    d_mem = _unpad(dm4, K, dh) + _mm(dqk, w_qk.T)
    dx = _mm(dkv, w_kv.T)
    dw_qk = jnp.einsum("bkd,bke->de", memory, dqk, preferred_element_type=_acc(op))
    dw_kv = jnp.einsum("bld,ble->de", x, dkv, preferred_element_type=_acc(op))
    grads = (d_mem, dx, dw_qk[:, :D], dw_qk[:, D:] + dw_kv[:, :D], dw_kv[:, D:], du.sum(0))
    return tuple(g.astype(i.dtype) for g, i in zip(grads, saved[0]))


_write = jax.custom_vjp(_write_impl, nondiff_argnums=(6, 7, 8))
_write.defvjp(_write_fwd, _write_bwd)


def pallas_memory_write(
    memory, x, wq, wk, wv, v_bias, *, num_heads: int, tau: float = 0.25, interpret: bool = False
) -> jax.Array:
    """bmn(slot_attention(memory, x, wq, wk, wv), v_bias) through the Pallas kernels: (B, K, D).

    Args:
        memory: (B, K, D) slots; x: (B, L, D) tokens; wq, wk, wv: (D, D); v_bias: (K, D).
        num_heads: H, dividing D; tau: write temperature in (0, 1].
        interpret: run the kernels in the Pallas interpreter (any platform; slow).

    Returns:
        (B, K, D) in the inputs' dtype; gradients through a hand-written ``custom_vjp``.
        Half inputs stay half in the projection GEMMs and the forward kernel's matmuls
        (float32 accumulation); the softmax, BMN, every reduction and the backward kernel
        are float32. On a GPU, float32 matmuls use TF32 (XLA's and Triton's default), as
        ``memory_write`` does there. No token mask (use ``memory_write``).

    Raises:
        MemcoreError: for invalid inputs, or, unless ``interpret``, where the Pallas GPU
            (Triton) lowering is unavailable.
    """
    inputs = (memory, x, wq, wk, wv, v_bias)
    _, attrs = OPS["memory_write"].validate(inputs, {"num_heads": num_heads, "tau": tau})
    reason = _IMPORT_ERROR if interpret else pallas_unavailable_reason()
    if reason is not None:
        raise MemcoreError(
            "`pallas_memory_write` needs the Pallas GPU (Triton) lowering, or interpret=True. "
            f"Received: {reason}; use memcore.backends.jax.memory.memory_write instead"
        )
    if memory.shape[0] * memory.shape[1] == 0:  # nothing to launch; the op's result is exact
        return memory_write(*inputs, num_heads=num_heads, tau=attrs["tau"])
    return _write(*inputs, int(num_heads), float(attrs["tau"]), bool(interpret))
