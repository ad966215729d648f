"""Fused CUDA kernels for the CuPy backend's hot paths, compiled on first use.

Each launcher takes and returns CuPy arrays of one dtype, float32 or float64 (float16 is
upcast by the backend before it gets here). The kernels compute exactly the reference's
equations (``memcore.reference``) in one pass where the reference makes several:

* :func:`bmn_forward` / :func:`bmn_backward`: Biased Memory Normalization, one block per
  slot row (add + norm + divide; the projection (I - y y^T) / ||u|| backward).
* :func:`sparsify_forward` / :func:`sparsify_backward`: SAB's sparsifier, one block per
  row: the min(k_top + 1, N)-th largest score by value, ReLU, normalize, and back.
* :func:`slot_attention_core`: Memformer's slot-attention write after the projections,
  one warp per (batch, head, slot): self logit, token logits, softmax and the weighted
  sum in one pass over the tokens (online softmax), optionally storing the weights.
* :func:`slot_attention_backward_core`: its backward from the stored weights, in two
  launches with no atomics: one warp per (batch, head, slot) for the slot-side gradients
  (and the token logit gradients, kept for the second launch), then one warp per
  (batch, head, token) summing the token-side gradients over the slots in registers.

Shapes: rows R = B * K; memory (B, K, D); tokens (B, L, D); scores (B, N).
"""

from __future__ import annotations

import functools
import math
from typing import Any

from memcore.backends.cupy.slot_backward_source import SLOT_BWD

__all__ = [
    "BLOCK_MAX",
    "SLOT_WARPS",
    "bmn_backward",
    "bmn_forward",
    "slot_attention_backward_core",
    "slot_attention_core",
    "sparsify_backward",
    "sparsify_forward",
]

BLOCK_MAX = 256  # threads per block for the row kernels
SLOT_WARPS = 4  # warps (rows of (b, h, i) or (b, h, j)) per block in the slot-attention kernels

_COMMON = r"""
#define NORM_EPS 1e-12
// No math.h under NVRTC: infinity from its bit pattern (a double inf casts to a float inf).
#define MC_INF ((T)__longlong_as_double(0x7ff0000000000000LL))
struct SumOp { template <class U> __device__ U operator()(U a, U b) const { return a + b; } };
struct MaxOp { template <class U> __device__ U operator()(U a, U b) const { return a > b ? a : b; } };

template <class U, class Op>
__device__ __forceinline__ U warp_reduce(U v, Op op) {
    for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Reduce over the whole block (blockDim.x a multiple of 32); every thread gets the result.
template <class U, class Op>
__device__ U block_reduce(U v, U* sh, Op op, U ident) {
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_reduce(v, op);
    __syncthreads();  // sh may still be read by a previous call
    if (lane == 0) sh[wid] = v;
    __syncthreads();
    if (wid == 0) {
        U w = lane < nw ? sh[lane] : ident;
        w = warp_reduce(w, op);
        if (lane == 0) sh[32] = w;
    }
    __syncthreads();
    return sh[32];
}
"""

_BMN = r"""
extern "C" __global__ void bmn_fwd(const T* __restrict__ m, const T* __restrict__ vb,
                                   T* __restrict__ y, T* __restrict__ nrm, int K, int D) {
    __shared__ T sh[33];
    const long row = blockIdx.x;
    const T* mr = m + row * D;
    const T* vr = vb + (long)(row % K) * D;
    // ||u|| = a ||u / a||, a = max|u|: u * u alone overflows float32 at ||u|| ~ 1e19.
    T a = 0;
    for (int d = threadIdx.x; d < D; d += blockDim.x) a = fmax(a, fabs(mr[d] + vr[d]));
    a = block_reduce(a, sh, MaxOp(), (T)0);
    a = a > (T)0 ? a : (T)1;
    T s = 0;
    for (int d = threadIdx.x; d < D; d += blockDim.x) { T u = (mr[d] + vr[d]) / a; s += u * u; }
    s = block_reduce(s, sh, SumOp(), (T)0);
    T n = a * sqrt(s);
    n = n > (T)NORM_EPS ? n : (T)NORM_EPS;  // u / max(||u||, eps)
    for (int d = threadIdx.x; d < D; d += blockDim.x) y[row * D + d] = (mr[d] + vr[d]) / n;
    if (threadIdx.x == 0) nrm[row] = n;
}

extern "C" __global__ void bmn_bwd(const T* __restrict__ y, const T* __restrict__ nrm,
                                   const T* __restrict__ dy, T* __restrict__ du, int D) {
    __shared__ T sh[33];
    const long row = blockIdx.x;
    const T* yr = y + row * D;
    const T* gr = dy + row * D;
    T s = 0;
    for (int d = threadIdx.x; d < D; d += blockDim.x) s += yr[d] * gr[d];
    s = block_reduce(s, sh, SumOp(), (T)0);
    const T n = nrm[row];
    const bool clamped = n <= (T)NORM_EPS;  // constant denominator: du = dy / eps
    for (int d = threadIdx.x; d < D; d += blockDim.x)
        du[row * D + d] = (clamped ? gr[d] : gr[d] - yr[d] * s) / n;
}
"""

_SPARSIFY = r"""
extern "C" __global__ void sparsify_fwd(const T* __restrict__ a, T* __restrict__ w,
                                        bool* __restrict__ active, bool* __restrict__ at_thr,
                                        T* __restrict__ denom, int N, int kth, T eps) {
    __shared__ T sh[33];
    __shared__ int shi[33];
    const long row = blockIdx.x;
    const T* ar = a + row * N;
    // Walk down the distinct values, counting multiplicities, until kth entries are
    // >= the current value: that value is the kth largest by value (ties change nothing).
    T thr = -MC_INF, bound = MC_INF;
    bool first = true;
    int seen = 0;
    while (true) {
        T v = -MC_INF;
        for (int i = threadIdx.x; i < N; i += blockDim.x) {
            const T x = ar[i];
            if ((first || x < bound) && x > v) v = x;
        }
        v = block_reduce(v, sh, MaxOp(), (T)-MC_INF);
        int c = 0;
        for (int i = threadIdx.x; i < N; i += blockDim.x) c += (ar[i] == v);
        c = block_reduce(c, shi, SumOp(), 0);
        seen += c;
        thr = v;
        if (seen >= kth || c == 0) break;  // c == 0 only with NaN scores: stop, never spin
        bound = v;
        first = false;
    }
    T s = 0;
    for (int i = threadIdx.x; i < N; i += blockDim.x) {
        const T z = ar[i] - thr;
        s += z > (T)0 ? z : (T)0;
    }
    s = block_reduce(s, sh, SumOp(), (T)0);
    T den = s + eps;
    den = den > (T)0 ? den : (T)1;  // eps = 0 and every z = 0: weights 0
    for (int i = threadIdx.x; i < N; i += blockDim.x) {
        const T x = ar[i];
        T z = x - thr;
        z = z > (T)0 ? z : (T)0;
        w[row * N + i] = z / den;
        active[row * N + i] = z > (T)0;
        at_thr[row * N + i] = x == thr;
    }
    if (threadIdx.x == 0) denom[row] = den;
}

extern "C" __global__ void sparsify_bwd(const T* __restrict__ dw, const T* __restrict__ w,
                                        const bool* __restrict__ active,
                                        const bool* __restrict__ at_thr,
                                        const T* __restrict__ denom, T* __restrict__ da,
                                        int N, int threshold_grad) {
    __shared__ T sh[33];
    const long row = blockIdx.x;
    const long o = row * N;
    T dot = 0;
    for (int i = threadIdx.x; i < N; i += blockDim.x) dot += dw[o + i] * w[o + i];
    dot = block_reduce(dot, sh, SumOp(), (T)0);
    const T den = denom[row];
    if (!threshold_grad) {
        for (int i = threadIdx.x; i < N; i += blockDim.x)
            da[o + i] = active[o + i] ? (dw[o + i] - dot) / den : (T)0;
        return;
    }
    T s = 0, ties = 0;
    for (int i = threadIdx.x; i < N; i += blockDim.x) {
        if (active[o + i]) s += (dw[o + i] - dot) / den;
        ties += at_thr[o + i] ? (T)1 : (T)0;
    }
    s = block_reduce(s, sh, SumOp(), (T)0);
    ties = block_reduce(ties, sh, SumOp(), (T)0);
    const T d_thr = -s / ties;  // shared equally by the entries at the threshold
    for (int i = threadIdx.x; i < N; i += blockDim.x) {
        const T g = active[o + i] ? (dw[o + i] - dot) / den : (T)0;
        da[o + i] = at_thr[o + i] ? g + d_thr : g;
    }
}
"""

_SLOT = r"""
// One warp per (b, h, i); lane owns dims d = lane + 32 r of the head (r < R).
extern "C" __global__ void slot_fwd(const T* __restrict__ q, const T* __restrict__ ks,
                                    const T* __restrict__ kx, const T* __restrict__ vx,
                                    const T* __restrict__ mem, const bool* __restrict__ mask,
                                    T* __restrict__ out, T* __restrict__ a_out,
                                    int B, int H, int K, int L, T scale) {
    const int lane = threadIdx.x & 31;
    const long wrow = (long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (wrow >= (long)B * H * K) return;  // whole warps leave together
    const int i = wrow % K;
    const int h = (wrow / K) % H;
    const long b = wrow / ((long)K * H);
    const int D = H * DH;
    const long srow = (b * K + i) * D + h * DH;
    T qv[R], acc[R];
    T part = 0;
#pragma unroll
    for (int r = 0; r < R; ++r) {
        const int d = lane + 32 * r;
        qv[r] = d < DH ? q[srow + d] : (T)0;
        part += d < DH ? qv[r] * ks[srow + d] : (T)0;
        acc[r] = d < DH ? mem[srow + d] : (T)0;  // the self value is the raw slot
    }
    // Logits stay unscaled; exponents are (s - mx) * scale <= 0 (docs/semantics.md §2), so
    // no tau in the allowed range overflows, where scale * s first could give inf - inf.
    const T s_self = warp_reduce(part, SumOp());
    T mx = s_self, l = 1;  // running max and sum of exp((logit - mx) * scale); self term = 1
    T* arow = a_out ? a_out + wrow * (long)(L + 1) : nullptr;
    if (arow && lane == 0) arow[0] = s_self;
    for (int j = 0; j < L; ++j) {
        if (mask && !mask[b * L + j]) {  // masked token: weight exactly 0, never in the max
            if (arow && lane == 0) arow[1 + j] = -MC_INF;
            continue;
        }
        const long trow = (b * L + j) * D + h * DH;
        part = 0;
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const int d = lane + 32 * r;
            part += d < DH ? qv[r] * kx[trow + d] : (T)0;
        }
        const T s = warp_reduce(part, SumOp());
        if (arow && lane == 0) arow[1 + j] = s;
        T corr = 1, p;
        if (s > mx) { corr = exp((mx - s) * scale); mx = s; p = 1; } else { p = exp((s - mx) * scale); }
        l = l * corr + p;
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const int d = lane + 32 * r;
            acc[r] = acc[r] * corr + (d < DH ? p * vx[trow + d] : (T)0);
        }
    }
    const T inv = (T)1 / l;
#pragma unroll
    for (int r = 0; r < R; ++r) {
        const int d = lane + 32 * r;
        if (d < DH) out[srow + d] = acc[r] * inv;
    }
    if (arow) {
        __syncwarp();
        for (int j = lane; j <= L; j += 32) arow[j] = exp((arow[j] - mx) * scale) * inv;
    }
}
"""


_SOURCES = {"bmn": _BMN, "sparsify": _SPARSIFY, "slot": _SLOT, "slot_bwd": SLOT_BWD}


def _cp():
    import cupy

    return cupy


def _ctype(dtype: Any) -> str:
    name = str(dtype)
    if name == "float32":
        return "float"
    if name == "float64":
        return "double"
    raise TypeError(f"fused kernels take float32 or float64, got {name}")  # internal invariant


@functools.cache
def _module(family: str, ctype: str, dh: int = 0):
    header = f"typedef {ctype} T;\n"
    # The backward is a module of its own: a change there cannot break the forward's compile.
    if family in ("slot", "slot_bwd"):
        header += f"#define DH {dh}\n#define R {(dh + 31) // 32}\n"
    return _cp().RawModule(code=header + _COMMON + _SOURCES[family], options=("--std=c++14",))


def _kernel(family: str, name: str, dtype: Any, dh: int = 0):
    return _module(family, _ctype(dtype), dh).get_function(name)


def _one_dtype(*arrays: Any) -> Any:
    """The common dtype; mixed dtypes would make a kernel read memory as the wrong type."""
    dtypes = {str(a.dtype) for a in arrays}
    if len(dtypes) != 1:
        raise TypeError(f"fused kernels need one float dtype, got {sorted(dtypes)}")  # internal invariant
    return arrays[0].dtype


def _threads(n: int) -> int:
    """A multiple of 32, at most BLOCK_MAX, no larger than the row needs."""
    return max(32, min(BLOCK_MAX, 32 * math.ceil(n / 32)))


def _i32(value: int):
    """Kernel ints are C ``int``: a bare Python int would travel as 64 bits."""
    import numpy as np

    return np.int32(value)


def _scalar(dtype: Any, value: float):
    return _cp().dtype(dtype).type(value)


def bmn_forward(m: Any, v_bias: Any) -> tuple[Any, Any]:
    """(y (B, K, D), n (B, K, 1)): y = (m + v_bias) / max(||m + v_bias||, 1e-12), n the clamped norm."""
    cp = _cp()
    m = cp.ascontiguousarray(m)
    v_bias = cp.ascontiguousarray(v_bias)
    _one_dtype(m, v_bias)
    b, k, d = m.shape
    y = cp.empty_like(m)
    n = cp.empty((b, k, 1), dtype=m.dtype)
    if m.size:
        _kernel("bmn", "bmn_fwd", m.dtype)((b * k,), (_threads(d),), (m, v_bias, y, n, _i32(k), _i32(d)))
    return y, n


def bmn_backward(y: Any, n: Any, dy: Any) -> Any:
    """du (B, K, D) = (dy - y <y, dy>) / n, or dy / n on rows clamped at eps."""
    cp = _cp()
    y = cp.ascontiguousarray(y)
    dy = cp.ascontiguousarray(dy)
    n = cp.ascontiguousarray(n)
    _one_dtype(y, n, dy)
    b, k, d = y.shape
    du = cp.empty_like(y)
    if y.size:
        _kernel("bmn", "bmn_bwd", y.dtype)((b * k,), (_threads(d),), (y, n, dy, du, _i32(d)))
    return du


def sparsify_forward(scores: Any, k_top: int, eps: float) -> tuple[Any, Any, Any, Any]:
    """(w, active, at_threshold, denom) for scores (B, N), N >= 1; denom is (B, 1)."""
    cp = _cp()
    scores = cp.ascontiguousarray(scores)
    b, n = scores.shape
    w = cp.empty_like(scores)
    active = cp.empty((b, n), dtype=cp.bool_)
    at_thr = cp.empty((b, n), dtype=cp.bool_)
    denom = cp.empty((b, 1), dtype=scores.dtype)
    if b:
        kth = min(k_top + 1, n)
        args = (scores, w, active, at_thr, denom, _i32(n), _i32(kth), _scalar(scores.dtype, eps))
        _kernel("sparsify", "sparsify_fwd", scores.dtype)((b,), (_threads(n),), args)
    return w, active, at_thr, denom


def sparsify_backward(d_w: Any, w: Any, active: Any, at_thr: Any, denom: Any, threshold_grad: bool) -> Any:
    """d_scores (B, N) from d_weights (B, N) and the forward's records."""
    cp = _cp()
    d_w = cp.ascontiguousarray(d_w)
    _one_dtype(d_w, w, denom)
    b, n = d_w.shape
    da = cp.empty_like(d_w)
    if b and n:
        args = (d_w, cp.ascontiguousarray(w), cp.ascontiguousarray(active),
                cp.ascontiguousarray(at_thr), cp.ascontiguousarray(denom), da, _i32(n), _i32(threshold_grad))
        _kernel("sparsify", "sparsify_bwd", d_w.dtype)((b,), (_threads(n),), args)
    return da


def slot_attention_core(
    q: Any, ks: Any, kx: Any, vx: Any, memory: Any, *, num_heads: int, scale: float,
    token_mask: Any = None, store_weights: bool = False,
) -> tuple[Any, Any]:
    """The write after the projections, merged-head layout.

    Args:
        q, ks, memory: (B, K, D) slot queries, slot keys, raw slots; kx, vx: (B, L, D).
        num_heads: H; scale: 1 / (sqrt(dh) tau); token_mask: (B, L) bool or None.
        store_weights: also return the softmax weights (B, H, K, L + 1), [self, tokens].

    Returns:
        (out (B, K, D), weights or None).
    """
    cp = _cp()
    q, ks, kx, vx, memory = (cp.ascontiguousarray(t) for t in (q, ks, kx, vx, memory))
    _one_dtype(q, ks, kx, vx, memory)
    b, k, d = q.shape
    ell = kx.shape[1]
    dh = d // num_heads
    out = cp.empty_like(q)
    a = cp.empty((b, num_heads, k, ell + 1), dtype=q.dtype) if store_weights else None
    mask = None if token_mask is None else cp.ascontiguousarray(cp.asarray(token_mask, dtype=cp.bool_))
    rows = b * num_heads * k
    if rows:
        kern = _kernel("slot", "slot_fwd", q.dtype, dh)
        grid = (math.ceil(rows / SLOT_WARPS),)
        dims = tuple(_i32(v) for v in (b, num_heads, k, ell))
        args = (q, ks, kx, vx, memory, mask, out, a) + dims + (_scalar(q.dtype, scale),)
        kern(grid, (32 * SLOT_WARPS,), args)
    return out, a


def slot_attention_backward_core(
    q: Any, ks: Any, kx: Any, vx: Any, memory: Any, weights: Any, d_out: Any, *,
    num_heads: int, scale: float,
) -> tuple[Any, Any, Any]:
    """The slot-attention backward up to the projections' GEMMs, merged-head layout.

    Two launches, no atomics: :data:`SLOT_WARPS` warps per block, one warp per (b, h, i)
    (slot side, two passes over the tokens), then one per (b, h, j) (token side, a loop
    over the slots). The softmax is not recomputed: ``weights`` holds it.

    Args:
        q, ks, memory: (B, K, D) slot queries, slot keys, raw slots; kx, vx: (B, L, D).
        weights: (B, H, K, L + 1) the forward's softmax, [self, tokens]; masked tokens 0.
        d_out: (B, K, D) the output's cotangent; num_heads: H; scale: 1 / (sqrt(dh) tau).

    Returns:
        (dqk (B, K, 2D) = [dq | dk_self], dms (B, K, D) = a_self d_out per head,
        dkv (B, L, 2D) = [dkx | dvx]): the gradients w.r.t. the projections' outputs.
    """
    cp = _cp()
    arrays = tuple(cp.ascontiguousarray(t) for t in (q, ks, kx, vx, memory, weights, d_out))
    q, ks, kx, vx, memory, weights, d_out = arrays
    dtype = _one_dtype(*arrays)
    b, k, d = q.shape
    ell = kx.shape[1]
    dh = d // num_heads
    assert weights.shape == (b, num_heads, k, ell + 1), weights.shape  # internal invariant
    dqk = cp.empty((b, k, 2 * d), dtype=dtype)
    dms = cp.empty_like(q)
    dkv = cp.empty((b, ell, 2 * d), dtype=dtype)
    dl = cp.empty((b, num_heads, k, ell), dtype=dtype)  # every entry written by slot_bwd_slots
    dims = tuple(_i32(v) for v in (b, num_heads, k, ell))
    slot_rows, token_rows = b * num_heads * k, b * num_heads * ell
    block = (32 * SLOT_WARPS,)
    if slot_rows and dh:
        args = (q, ks, kx, vx, memory, weights, d_out, dqk, dms, dl) + dims
        kern = _kernel("slot_bwd", "slot_bwd_slots", dtype, dh)
        kern((math.ceil(slot_rows / SLOT_WARPS),), block, args + (_scalar(dtype, scale),))
    if token_rows and dh:  # after the slot launch on the same stream: dl is complete
        kern = _kernel("slot_bwd", "slot_bwd_tokens", dtype, dh)
        kern((math.ceil(token_rows / SLOT_WARPS),), block, (q, weights, dl, d_out, dkv) + dims)
    return dqk, dms, dkv
