"""Fused Memformer memory write for torch: slot attention + BMN in three Triton kernels.

``fused_memory_write(memory, x, wq, wk, wv, v_bias, num_heads=H, tau=tau)`` computes the same
function as :func:`memcore.backends.torch.memory.memory_write` (Memformer Eq. 4-8 + BMN).
The (D, D) projections stay in cuBLAS: W = [wq | wk | wv] (D, 3D) is concatenated once per
call, [q | k_self] = memory W[:, :2D] and [k_x | v_x] = x W[:, D:] are GEMMs on its column
slices, and the backward reuses W. The rest is fused:

- forward kernel, one program per (batch row, block of BK slots), heads in a loop: self and
  token logits, the softmax over [self; tokens] (online max, no (B, H, K, L+1) tensor in
  memory), the weighted sum, + v_bias, and the L2 normalization over D (BMN). The softmax
  subtracts the row max of the raw logits before the 1 / (sqrt(dh) tau) scale multiplies
  (docs/semantics.md §2), so no tau down to TAU_MIN overflows. It keeps the raw row max and
  the log of the row's sum (B, H, K) each, and 1 / max(||u||, eps) (B, K) for the backward.
- BMN backward kernel, one program per slot, looping over the batch: the per-slot
  coefficient a = <y, dy> / ||u|| (0 where the norm was clamped) and dv_bias = sum over B of
  du, with du = dy / ||u|| - a y, reduced in registers (no atomics, deterministic).
- backward kernel, one program per (batch row, head), looping over slot blocks: rebuilds du
  from dy, y, 1/||u|| and a, recomputes the softmax from the row max and log-sum
  (flash-attention style, a = exp((l - max) scale - log sum)) and produces d[q | k_self], the direct d memory, and accumulates d[k_x | v_x] over
  slots in registers (no atomics). The projection gradients are cuBLAS GEMMs around it.

Without Triton, for a device Triton cannot run on, or with a ``token_mask``, the call falls
back to the torch op. On the CPU the kernels run under ``TRITON_INTERPRET=1`` (tests). The
backward is once-differentiable: differentiating the gradients (double backward) raises.
Shapes: memory (B, K, D); x (B, L, D); wq, wk, wv (D, D); v_bias (K, D); H heads, dh = D / H.
"""

# Cost of one backward call. A pass is one read or write of B*K*D elements; launches count
# the Triton kernels and the torch ops that run a kernel (views and allocations excluded).
#
#   step                          before (torch ops)              after
#   BMN backward (du)             7 launches (9 in half types:    _bmn_bwd: 1 launch, reads
#                                 2 upcasts), 14 fp32 passes      y, dy: 2 passes
#   dv_bias = sum_B du            1 launch, 1 pass (+1 cast)      in _bmn_bwd: 0 passes
#   du into the backward kernel   reads du: 1 fp32 pass           reads y, dy: 2 passes
#   dqk, dm out of the kernel     fp32 (3 passes), then 3 casts   in the dtype (3 passes), no
#                                 in half types (6 passes)        casts
#   weight concatenations         2 launches (D x 2D each)        0: W from the forward
#   d memory = dm + dqk W^T       GEMM to a temporary + add:      dm.addmm_: 1 launch, reads
#                                 2 launches, 4 passes            and writes dm: 2 passes
#   d x, dwq, dwk, dwv            3 GEMMs + 1 add                 same (skipped if not needed)
#   total launches                17 fp32, 23 bf16/fp16           7 (5 torch ops + 2 kernels)
#   passes (rows above)           23 fp32, 33 in half types       9, all in the input dtype
#                                                                 (2-byte in half types)
#
# The attention part of the backward kernel (reads qk, memory: 3 passes) is unchanged.
# The forward makes one (D, 3D) concatenation instead of two (D, 2D): 4 launches, was 5.
# Caching W across calls is not done: an in-place update through ``.data`` bumps no
# ``_version``, so no key could prove such a cache fresh, and one concatenation is cheap.

from __future__ import annotations

import math
import os

import torch
from torch.autograd.function import once_differentiable

from memcore.backends.torch.memory import NORM_EPS, memory_write

try:  # Triton is optional: the fallback is the torch op
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - exercised where triton is absent
    HAVE_TRITON = False

__all__ = ["HAVE_TRITON", "fused_available", "fused_memory_write"]


def fused_available(device: torch.device) -> bool:
    """True when the fused kernels can run on ``device`` (CUDA, or CPU under the interpreter)."""
    if not HAVE_TRITON:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


if HAVE_TRITON:

    @triton.jit
    def _write_fwd(
        qk_ptr, m_ptr, kv_ptr, vb_ptr, y_ptr, mx_ptr, lse_ptr, rn_ptr,
        K, L, scale, eps,
        H: tl.constexpr, DH: tl.constexpr, BK: tl.constexpr, BL: tl.constexpr,
    ):  # fmt: skip
        b = tl.program_id(0)
        offs_k = tl.program_id(1) * BK + tl.arange(0, BK)
        offs_l = tl.arange(0, BL)
        offs_d = tl.arange(0, DH)
        D = H * DH
        mk = offs_k < K
        ml = offs_l < L
        row = b * K + offs_k  # rows of the (B*K, *) memory-side tensors
        tok = b * L + offs_l
        sumsq = tl.zeros([BK], dtype=tl.float32)
        for h in range(H):
            col = h * DH + offs_d
            q = tl.load(qk_ptr + row[:, None] * 2 * D + col[None, :], mask=mk[:, None], other=0.0)
            ks = tl.load(
                qk_ptr + row[:, None] * 2 * D + D + col[None, :], mask=mk[:, None], other=0.0
            )
            kx = tl.load(kv_ptr + tok[:, None] * 2 * D + col[None, :], mask=ml[:, None], other=0.0)
            vx = tl.load(
                kv_ptr + tok[:, None] * 2 * D + D + col[None, :], mask=ml[:, None], other=0.0
            )
            m = tl.load(m_ptr + row[:, None] * D + col[None, :], mask=mk[:, None], other=0.0)
            s_self = tl.sum(q.to(tl.float32) * ks.to(tl.float32), axis=1)  # raw logits
            s_tok = tl.dot(q, tl.trans(kx))
            s_tok = tl.where(ml[None, :], s_tok, float("-inf"))
            # Eq. 7 softmax: the max subtracted first, then the scale (every exponent <= 0)
            mx = tl.maximum(tl.max(s_tok, axis=1), s_self)
            p_tok = tl.exp((s_tok - mx[:, None]) * scale)
            p_self = tl.exp((s_self - mx) * scale)
            den = tl.sum(p_tok, axis=1) + p_self
            o = p_self[:, None] * m.to(tl.float32) + tl.dot(p_tok.to(vx.dtype), vx)
            vb = tl.load(vb_ptr + offs_k[:, None] * D + col[None, :], mask=mk[:, None], other=0.0)
            u = o / den[:, None] + vb.to(tl.float32)
            sumsq += tl.sum(u * u, axis=1)
            tl.store(y_ptr + row[:, None] * D + col[None, :], u, mask=mk[:, None])
            tl.store(mx_ptr + (b * H + h) * K + offs_k, mx, mask=mk)
            tl.store(lse_ptr + (b * H + h) * K + offs_k, tl.log(den), mask=mk)
        rn = 1.0 / tl.maximum(tl.sqrt(sumsq), eps)  # BMN: u / max(||u||, eps)
        tl.store(rn_ptr + row, rn, mask=mk)
        tl.debug_barrier()
        for h in range(H):
            ptr = y_ptr + row[:, None] * D + (h * DH + offs_d)[None, :]
            u = tl.load(ptr, mask=mk[:, None], other=0.0)
            tl.store(ptr, u * rn[:, None], mask=mk[:, None])

    @triton.jit
    def _bmn_bwd(
        y_ptr, dy_ptr, rn_ptr, a_ptr, dvb_ptr,
        B, K, D, inv_eps,
        BB: tl.constexpr, BD: tl.constexpr, NEED_DVB: tl.constexpr,
    ):  # fmt: skip
        # BMN backward (docs/semantics.md 3.3): y = u r, r = 1 / max(||u||, eps), so
        # du = r (dy - y <y, dy>) = r dy - a y with a = r <y, dy>; where the norm was clamped
        # r is a constant and a = 0. One program per slot: dv_bias[k] = sum_b du[b, k].
        k = tl.program_id(0)
        offs_b = tl.arange(0, BB)
        offs_d = tl.arange(0, BD)
        md = offs_d < D
        dvb = tl.zeros([BD], dtype=tl.float32)
        for b0 in range(0, B, BB):
            mb = b0 + offs_b < B
            row = (b0 + offs_b) * K + k
            ptr = row[:, None] * D + offs_d[None, :]
            msk = mb[:, None] & md[None, :]
            y = tl.load(y_ptr + ptr, mask=msk, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + ptr, mask=msk, other=0.0).to(tl.float32)
            rn = tl.load(rn_ptr + row, mask=mb, other=0.0)
            a = tl.where(rn >= inv_eps, 0.0, rn * tl.sum(y * dy, axis=1))
            tl.store(a_ptr + row, a, mask=mb)
            if NEED_DVB:
                dvb += tl.sum(rn[:, None] * dy - a[:, None] * y, axis=0)
        if NEED_DVB:
            tl.store(dvb_ptr + k * D + offs_d, dvb, mask=md)

    @triton.jit
    def _write_bwd(
        qk_ptr, m_ptr, kv_ptr, mx_ptr, lse_ptr, y_ptr, dy_ptr, rn_ptr, a_ptr, dqk_ptr, dm_ptr, dkv_ptr,
        K, L, scale,
        H: tl.constexpr, DH: tl.constexpr, BK: tl.constexpr, BL: tl.constexpr,
    ):  # fmt: skip
        b = tl.program_id(0)
        h = tl.program_id(1)
        D = H * DH
        offs_l = tl.arange(0, BL)
        offs_d = tl.arange(0, DH)
        col = h * DH + offs_d
        ml = offs_l < L
        tok = b * L + offs_l
        kx = tl.load(kv_ptr + tok[:, None] * 2 * D + col[None, :], mask=ml[:, None], other=0.0)
        vx = tl.load(kv_ptr + tok[:, None] * 2 * D + D + col[None, :], mask=ml[:, None], other=0.0)
        kx = kx.to(tl.float32)
        vx = vx.to(tl.float32)
        dkx = tl.zeros([BL, DH], dtype=tl.float32)
        dvx = tl.zeros([BL, DH], dtype=tl.float32)
        for k0 in range(0, K, BK):
            offs_k = k0 + tl.arange(0, BK)
            mk = offs_k < K
            row = b * K + offs_k
            q = tl.load(qk_ptr + row[:, None] * 2 * D + col[None, :], mask=mk[:, None], other=0.0)
            ks = tl.load(
                qk_ptr + row[:, None] * 2 * D + D + col[None, :], mask=mk[:, None], other=0.0
            )
            ptr = row[:, None] * D + col[None, :]
            m = tl.load(m_ptr + ptr, mask=mk[:, None], other=0.0)
            dy = tl.load(dy_ptr + ptr, mask=mk[:, None], other=0.0).to(tl.float32)
            y = tl.load(y_ptr + ptr, mask=mk[:, None], other=0.0).to(tl.float32)
            rn = tl.load(rn_ptr + row, mask=mk, other=0.0)
            a = tl.load(a_ptr + row, mask=mk, other=0.0)
            du = rn[:, None] * dy - a[:, None] * y  # BMN backward, a from _bmn_bwd
            mx = tl.load(mx_ptr + (b * H + h) * K + offs_k, mask=mk, other=0.0)
            lse = tl.load(lse_ptr + (b * H + h) * K + offs_k, mask=mk, other=0.0)
            q = q.to(tl.float32)
            ks = ks.to(tl.float32)
            m = m.to(tl.float32)
            # the forward's softmax: raw logits, the row max subtracted, then the scale
            s_self = tl.sum(q * ks, axis=1)
            s_tok = tl.dot(q, tl.trans(kx))
            p_self = tl.exp((s_self - mx) * scale - lse)
            p_tok = tl.exp((s_tok - mx[:, None]) * scale - lse[:, None])
            p_tok = tl.where(ml[None, :], p_tok, 0.0)
            dp_self = tl.sum(du * m, axis=1)
            dp_tok = tl.dot(du, tl.trans(vx))
            delta = p_self * dp_self + tl.sum(p_tok * dp_tok, axis=1)  # sum_j a_j da_j
            ds_self = p_self * (dp_self - delta) * scale
            ds_tok = p_tok * (dp_tok - delta[:, None]) * scale
            dq = ds_self[:, None] * ks + tl.dot(ds_tok, kx)
            tl.store(dqk_ptr + row[:, None] * 2 * D + col[None, :], dq, mask=mk[:, None])
            dks = ds_self[:, None] * q
            tl.store(dqk_ptr + row[:, None] * 2 * D + D + col[None, :], dks, mask=mk[:, None])
            tl.store(dm_ptr + ptr, p_self[:, None] * du, mask=mk[:, None])
            dvx += tl.dot(tl.trans(p_tok), du)
            dkx += tl.dot(tl.trans(ds_tok), q)
        tl.store(dkv_ptr + tok[:, None] * 2 * D + col[None, :], dkx, mask=ml[:, None])
        tl.store(dkv_ptr + tok[:, None] * 2 * D + D + col[None, :], dvx, mask=ml[:, None])


def _blocks(L: int, dh: int) -> tuple[int, int]:
    BL = max(16, triton.next_power_of_2(L))
    return (32 if BL * dh <= 128 * 64 else 16), BL


def _bmn_blocks(B: int, D: int) -> tuple[int, int]:
    """(BB, BD): batch rows per step of _bmn_bwd and D padded to a power of two."""
    BD = triton.next_power_of_2(D)
    return min(triton.next_power_of_2(B), max(1, 4096 // BD)), BD


def _bmn_backward(y, dy, rn, need_dvb: bool):
    """BMN's backward in one pass over y, dy (B, K, D): (a (B, K) fp32, dv_bias (K, D) or None).

    du = rn dy - a y is rebuilt by the consumer (``_write_bwd``); dv_bias = sum over B of du
    comes in y's dtype.
    """
    B, K, D = y.shape
    a = torch.empty(B, K, device=y.device, dtype=torch.float32)
    dvb = torch.empty(K, D, device=y.device, dtype=y.dtype) if need_dvb else None
    BB, BD = _bmn_blocks(B, D)
    _bmn_bwd[(K,)](
        y, dy, rn, a, a if dvb is None else dvb, B, K, D, 1.0 / NORM_EPS,
        BB=BB, BD=BD, NEED_DVB=need_dvb,
    )  # fmt: skip
    return a, dvb


class _FusedWrite(torch.autograd.Function):
    @staticmethod
    def forward(ctx, memory, x, wq, wk, wv, v_bias, num_heads: int, tau: float):
        B, K, D = memory.shape
        L, dh = x.shape[1], D // num_heads
        if dh < 16 or dh & (dh - 1):
            raise ValueError(f"fused write needs dh = D / H a power of two >= 16, got {dh}")
        memory, x, v_bias = memory.contiguous(), x.contiguous(), v_bias.contiguous()
        # One concatenation per call, kept for the backward: [q | k_self] and [k_x | v_x] are
        # GEMMs on column slices of it (cuBLAS takes the row stride 3D, no copy).
        w = torch.cat([wq, wk, wv], dim=1)  # (D, 3D)
        qk = memory @ w[:, : 2 * D]  # (B, K, 2D): [q | k_self]
        kv = x @ w[:, D:]  # (B, L, 2D): [k_x | v_x]
        y = torch.empty_like(memory)
        mx = torch.empty(B, num_heads, K, device=memory.device, dtype=torch.float32)
        lse = torch.empty_like(mx)  # log of the row sum, in scaled units (mx is raw)
        rn = torch.empty(B, K, device=memory.device, dtype=torch.float32)
        scale = 1.0 / (math.sqrt(dh) * tau)
        BK, BL = _blocks(L, dh)
        _write_fwd[(B, triton.cdiv(K, BK))](
            qk, memory, kv, v_bias, y, mx, lse, rn, K, L, scale, NORM_EPS,
            H=num_heads, DH=dh, BK=BK, BL=BL,
        )  # fmt: skip
        # wq, wk, wv are saved only for autograd's version check: updating them in place
        # before the backward raises, as it does for the torch op.
        ctx.save_for_backward(memory, x, w, qk, kv, mx, lse, rn, y, wq, wk, wv)
        ctx.num_heads, ctx.scale = num_heads, scale
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        memory, x, w, qk, kv, mx, lse, rn, y = ctx.saved_tensors[:9]
        need = ctx.needs_input_grad
        B, K, D = memory.shape
        L, H, dt = x.shape[1], ctx.num_heads, memory.dtype
        dy = dy.contiguous()
        a, d_vb = _bmn_backward(y, dy, rn, need[5])
        # The kernel stores in the input dtype: no casts after it.
        dqk = torch.empty(B * K, 2 * D, device=y.device, dtype=dt)
        dm = torch.empty(B * K, D, device=y.device, dtype=dt)
        dkv = torch.empty(B * L, 2 * D, device=y.device, dtype=dt)
        BK, BL = _blocks(L, D // H)
        _write_bwd[(B, H)](
            qk, memory, kv, mx, lse, y, dy, rn, a, dqk, dm, dkv, K, L, ctx.scale,
            H=H, DH=D // H, BK=BK, BL=BL,
        )  # fmt: skip
        d_memory = d_x = d_wq = d_wk = d_wv = None
        if need[0]:  # d memory = direct part + dqk [wq | wk]^T, accumulated in place
            d_memory = dm.addmm_(dqk, w[:, : 2 * D].T).view(B, K, D)
        if need[1]:
            d_x = (dkv @ w[:, D:].T).view(B, L, D)
        if need[2] or need[3]:
            dw_m = memory.view(-1, D).T @ dqk  # (D, 2D): [dwq | dwk part]
            d_wq = dw_m[:, :D]
        if need[3] or need[4]:
            dw_x = x.view(-1, D).T @ dkv  # (D, 2D): [dwk part | dwv]
            d_wv = dw_x[:, D:]
        if need[3]:
            d_wk = dw_m[:, D:] + dw_x[:, :D]
        return d_memory, d_x, d_wq, d_wk, d_wv, d_vb, None, None


def fused_memory_write(
    memory, x, wq, wk, wv, v_bias, *, num_heads: int, tau: float = 0.25, token_mask=None
) -> torch.Tensor:
    """memory_write through the fused kernels where possible, else the torch op: (B, K, D).

    Args:
        memory: (B, K, D); x: (B, L, D); wq, wk, wv: (D, D); v_bias: (K, D); num_heads: H;
        tau: write temperature; token_mask: (B, L) bool or None (None only is fused).
    """
    dh = memory.shape[-1] // num_heads
    if token_mask is not None or not fused_available(memory.device) or dh < 16 or dh & (dh - 1):
        return memory_write(
            memory, x, wq, wk, wv, v_bias, num_heads=num_heads, tau=tau, token_mask=token_mask
        )
    return _FusedWrite.apply(memory, x, wq, wk, wv, v_bias, num_heads, tau)
