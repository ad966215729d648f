"""Fused Memformer memory write for torch: slot attention + BMN in two Triton kernels.

``fused_memory_write(memory, x, wq, wk, wv, v_bias, num_heads=H, tau=tau)`` computes the same
function as :func:`memcore.backends.torch.memory.memory_write` (Memformer Eq. 4-8 + BMN).
The (D, D) projections stay in cuBLAS (one (D, 2D) GEMM for [q | k_self] from the memory, one
for [k_x | v_x] from the tokens); the rest is fused:

- forward kernel, one program per (batch row, block of BK slots), heads in a loop: self and
  token logits, the softmax over [self; tokens] (online max, no (B, H, K, L+1) tensor in
  memory), the weighted sum, + v_bias, and the L2 normalization over D (BMN). It keeps the
  row log-sum-exp (B, H, K) and 1 / max(||u||, eps) (B, K) for the backward.
- backward kernel, one program per (batch row, head), looping over slot blocks: recomputes
  the softmax from the log-sum-exp (flash-attention style) and produces d[q | k_self],
  the direct d memory, and accumulates d[k_x | v_x] over slots in registers (no atomics).
  BMN's backward, dv_bias and the projection gradients are torch ops around it.

Without Triton, for a device Triton cannot run on, or with a ``token_mask``, the call falls
back to the torch op. On the CPU the kernels run under ``TRITON_INTERPRET=1`` (tests).
Shapes: memory (B, K, D); x (B, L, D); wq, wk, wv (D, D); v_bias (K, D); H heads, dh = D / H.
"""

from __future__ import annotations

import math
import os

import torch
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
        qk_ptr, m_ptr, kv_ptr, vb_ptr, y_ptr, lse_ptr, rn_ptr,
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
            s_self = tl.sum(q.to(tl.float32) * ks.to(tl.float32), axis=1) * scale
            s_tok = tl.dot(q, tl.trans(kx)) * scale
            s_tok = tl.where(ml[None, :], s_tok, float("-inf"))
            mx = tl.maximum(tl.max(s_tok, axis=1), s_self)  # Eq. 7 softmax, max-subtracted
            p_tok = tl.exp(s_tok - mx[:, None])
            p_self = tl.exp(s_self - mx)
            den = tl.sum(p_tok, axis=1) + p_self
            o = p_self[:, None] * m.to(tl.float32) + tl.dot(p_tok.to(vx.dtype), vx)
            vb = tl.load(vb_ptr + offs_k[:, None] * D + col[None, :], mask=mk[:, None], other=0.0)
            u = o / den[:, None] + vb.to(tl.float32)
            sumsq += tl.sum(u * u, axis=1)
            tl.store(y_ptr + row[:, None] * D + col[None, :], u, mask=mk[:, None])
            tl.store(lse_ptr + (b * H + h) * K + offs_k, mx + tl.log(den), mask=mk)
        rn = 1.0 / tl.maximum(tl.sqrt(sumsq), eps)  # BMN: u / max(||u||, eps)
        tl.store(rn_ptr + row, rn, mask=mk)
        tl.debug_barrier()
        for h in range(H):
            ptr = y_ptr + row[:, None] * D + (h * DH + offs_d)[None, :]
            u = tl.load(ptr, mask=mk[:, None], other=0.0)
            tl.store(ptr, u * rn[:, None], mask=mk[:, None])

    @triton.jit
    def _write_bwd(
        qk_ptr, m_ptr, kv_ptr, lse_ptr, du_ptr, dqk_ptr, dm_ptr, dkv_ptr,
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
            m = tl.load(m_ptr + row[:, None] * D + col[None, :], mask=mk[:, None], other=0.0)
            du = tl.load(du_ptr + row[:, None] * D + col[None, :], mask=mk[:, None], other=0.0)
            lse = tl.load(lse_ptr + (b * H + h) * K + offs_k, mask=mk, other=0.0)
            q = q.to(tl.float32)
            ks = ks.to(tl.float32)
            m = m.to(tl.float32)
            s_self = tl.sum(q * ks, axis=1) * scale
            s_tok = tl.dot(q, tl.trans(kx)) * scale
            p_self = tl.exp(s_self - lse)
            p_tok = tl.where(ml[None, :], tl.exp(s_tok - lse[:, None]), 0.0)
            dp_self = tl.sum(du * m, axis=1)
            dp_tok = tl.dot(du, tl.trans(vx))
            delta = p_self * dp_self + tl.sum(p_tok * dp_tok, axis=1)  # sum_j a_j da_j
            ds_self = p_self * (dp_self - delta) * scale
            ds_tok = p_tok * (dp_tok - delta[:, None]) * scale
            dq = ds_self[:, None] * ks + tl.dot(ds_tok, kx)
            tl.store(dqk_ptr + row[:, None] * 2 * D + col[None, :], dq, mask=mk[:, None])
            dks = ds_self[:, None] * q
            tl.store(dqk_ptr + row[:, None] * 2 * D + D + col[None, :], dks, mask=mk[:, None])
            tl.store(
                dm_ptr + row[:, None] * D + col[None, :], p_self[:, None] * du, mask=mk[:, None]
            )
            dvx += tl.dot(tl.trans(p_tok), du)
            dkx += tl.dot(tl.trans(ds_tok), q)
        tl.store(dkv_ptr + tok[:, None] * 2 * D + col[None, :], dkx, mask=ml[:, None])
        tl.store(dkv_ptr + tok[:, None] * 2 * D + D + col[None, :], dvx, mask=ml[:, None])


def _blocks(L: int, dh: int) -> tuple[int, int]:
    BL = max(16, triton.next_power_of_2(L))
    return (32 if BL * dh <= 128 * 64 else 16), BL


class _FusedWrite(torch.autograd.Function):
    @staticmethod
    def forward(ctx, memory, x, wq, wk, wv, v_bias, num_heads: int, tau: float):
        B, K, D = memory.shape
        L, dh = x.shape[1], D // num_heads
        if dh < 16 or dh & (dh - 1):
            raise ValueError(f"fused write needs dh = D / H a power of two >= 16, got {dh}")
        memory, x, v_bias = memory.contiguous(), x.contiguous(), v_bias.contiguous()
        qk = memory @ torch.cat([wq, wk], dim=1)  # (B, K, 2D): [q | k_self]
        kv = x @ torch.cat([wk, wv], dim=1)  # (B, L, 2D): [k_x | v_x]
        y = torch.empty_like(memory)
        lse = torch.empty(B, num_heads, K, device=memory.device, dtype=torch.float32)
        rn = torch.empty(B, K, device=memory.device, dtype=torch.float32)
        scale = 1.0 / (math.sqrt(dh) * tau)
        BK, BL = _blocks(L, dh)
        _write_fwd[(B, triton.cdiv(K, BK))](
            qk, memory, kv, v_bias, y, lse, rn, K, L, scale, NORM_EPS,
            H=num_heads, DH=dh, BK=BK, BL=BL,
        )  # fmt: skip
        ctx.save_for_backward(memory, x, wq, wk, wv, qk, kv, lse, rn, y)
        ctx.num_heads, ctx.scale = num_heads, scale
        return y

    @staticmethod
    def backward(ctx, dy):
        memory, x, wq, wk, wv, qk, kv, lse, rn, y = ctx.saved_tensors
        B, K, D = memory.shape
        L, H = x.shape[1], ctx.num_heads
        dyf, yf = dy.float(), y.float()
        # BMN backward: y = u r, r = 1 / ||u||: du = r (dy - y <y, dy>); where the norm was
        # clamped at eps, r is a constant and du = r dy.
        clamped = (rn >= 1.0 / NORM_EPS)[..., None]
        proj = yf * (yf * dyf).sum(-1, keepdim=True)
        du = (torch.where(clamped, dyf, dyf - proj) * rn[..., None]).contiguous()
        dqk = torch.empty(B, K, 2 * D, device=y.device, dtype=torch.float32)
        dm = torch.empty(B, K, D, device=y.device, dtype=torch.float32)
        dkv = torch.empty(B, L, 2 * D, device=y.device, dtype=torch.float32)
        BK, BL = _blocks(L, D // H)
        _write_bwd[(B, H)](
            qk, memory, kv, lse, du, dqk, dm, dkv, K, L, ctx.scale,
            H=H, DH=D // H, BK=BK, BL=BL,
        )  # fmt: skip
        dt = memory.dtype
        dqk, dkv = dqk.to(dt), dkv.to(dt)
        d_memory = dm.to(dt) + dqk @ torch.cat([wq, wk], dim=1).T
        d_x = dkv @ torch.cat([wk, wv], dim=1).T
        dw_m = memory.reshape(-1, D).T @ dqk.reshape(-1, 2 * D)  # (D, 2D): [dwq | dwk part]
        dw_x = x.reshape(-1, D).T @ dkv.reshape(-1, 2 * D)  # (D, 2D): [dwk part | dwv]
        d_wk = dw_m[:, D:] + dw_x[:, :D]
        d_vb = du.sum(0).to(dt)
        return d_memory, d_x, dw_m[:, :D], d_wk, dw_x[:, D:], d_vb, None, None


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
