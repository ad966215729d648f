"""CUDA source of the slot-attention backward kernels (``slot_bwd_slots``, ``slot_bwd_tokens``).

Kept apart from ``kernels.py`` (which compiles it with the shared preamble, per dtype and
head size, and launches it from :func:`~memcore.backends.cupy.kernels.slot_attention_backward_core`)
so that each module stays small. Two launches, no atomics, deterministic: one warp per
(b, h, slot) row for d[q | k_self] and the direct d memory, then one warp per (b, h, token)
row that sums d[k_x | v_x] over the slots in registers.
"""

SLOT_BWD = r"""
// Backward of slot_fwd from the stored weights a (B, H, K, L + 1) = [self, tokens], c = scale.
// Per (b, h, i), with dO the head slice of d_out, m the raw slot, delta = sum_j a_j da_j:
//   da_self = <dO, m>, da_j = <dO, vx_j>, dl = a (da - delta) c  (exactly 0 where a = 0),
//   dq = dl_self ks + sum_j dl_j kx_j, dk_self = dl_self q, dm_self = a_self dO;
// per (b, h, j): dkx_j = sum_i dl_ij q_i, dvx_j = sum_i a_ij dO_i.

// One warp per (b, h, i), lane owns dims d = lane + 32 r of the head (r < R), as slot_fwd.
// Writes [dq | dk_self] into dqk (B, K, 2D), a_self dO into dms (B, K, D) and the token
// logit gradients into dl (B, H, K, L), which slot_bwd_tokens reads.
extern "C" __global__ void slot_bwd_slots(const T* __restrict__ q, const T* __restrict__ ks,
                                          const T* __restrict__ kx, const T* __restrict__ vx,
                                          const T* __restrict__ mem, const T* __restrict__ a,
                                          const T* __restrict__ dout, T* __restrict__ dqk,
                                          T* __restrict__ dms, T* __restrict__ dl,
                                          int B, int H, int K, int L, T scale) {
    const int lane = threadIdx.x & 31;
    const long wrow = (long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (wrow >= (long)B * H * K) return;  // whole warps leave together
    const int i = wrow % K;
    const int h = (wrow / K) % H;
    const long b = wrow / ((long)K * H);
    const int D = H * DH;
    const long srow = (b * K + i) * D + h * DH;        // (B, K, D) row of slot i, head h
    const long orow = (b * K + i) * (2 * D) + h * DH;  // (B, K, 2D) row of slot i, head h
    const T* arow = a + wrow * (long)(L + 1);          // wrow = (b H + h) K + i
    T* dlrow = dl + wrow * (long)L;
    const T a_self = arow[0];
    T g[R], o[R];
    T part = 0;
#pragma unroll
    for (int r = 0; r < R; ++r) {
        const int d = lane + 32 * r;
        g[r] = d < DH ? dout[srow + d] : (T)0;
        const T mv = d < DH ? mem[srow + d] : (T)0;  // the self value is the raw slot
        o[r] = a_self * mv;
        part += g[r] * mv;
    }
    const T da_self = warp_reduce(part, SumOp());
    // Pass 1: o = a_self m + sum_j a_j vx_j is the forward's output, so delta = <dO, o>
    // without a reduction per token.
    for (int j = 0; j < L; ++j) {
        const T aj = arow[1 + j];
        if (aj == (T)0) continue;  // masked or underflowed token: adds nothing (warp-uniform)
        const long trow = (b * L + j) * D + h * DH;
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const int d = lane + 32 * r;
            if (d < DH) o[r] += aj * vx[trow + d];
        }
    }
    part = 0;
#pragma unroll
    for (int r = 0; r < R; ++r) part += g[r] * o[r];  // both 0 beyond DH
    const T delta = warp_reduce(part, SumOp());
    const T dl_self = a_self * (da_self - delta) * scale;
    T acc[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
        const int d = lane + 32 * r;
        acc[r] = d < DH ? dl_self * ks[srow + d] : (T)0;
    }
    // Pass 2: dl_j = a_j (<dO, vx_j> - delta) c, accumulated into dq against kx_j.
    for (int j = 0; j < L; ++j) {
        const T aj = arow[1 + j];
        if (aj == (T)0) {  // warp-uniform: every lane read the same aj
            if (lane == 0) dlrow[j] = (T)0;
            continue;
        }
        const long trow = (b * L + j) * D + h * DH;
        part = 0;
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const int d = lane + 32 * r;
            part += d < DH ? g[r] * vx[trow + d] : (T)0;
        }
        const T dlj = aj * (warp_reduce(part, SumOp()) - delta) * scale;
        if (lane == 0) dlrow[j] = dlj;
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const int d = lane + 32 * r;
            if (d < DH) acc[r] += dlj * kx[trow + d];
        }
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
        const int d = lane + 32 * r;
        if (d < DH) {
            dqk[orow + d] = acc[r];
            dqk[orow + D + d] = dl_self * q[srow + d];
            dms[srow + d] = a_self * g[r];
        }
    }
}

// One warp per (b, h, j): the sums over the K slots stay in the lanes' registers, so each
// output element has exactly one writer (no atomics, deterministic). Writes [dkx | dvx]
// into dkv (B, L, 2D).
extern "C" __global__ void slot_bwd_tokens(const T* __restrict__ q, const T* __restrict__ a,
                                           const T* __restrict__ dl, const T* __restrict__ dout,
                                           T* __restrict__ dkv, int B, int H, int K, int L) {
    const int lane = threadIdx.x & 31;
    const long wrow = (long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (wrow >= (long)B * H * L) return;
    const int j = wrow % L;
    const int h = (wrow / L) % H;
    const long b = wrow / ((long)L * H);
    const int D = H * DH;
    const long bhk = (b * H + h) * K;  // (b, h, slot 0) row of a and dl
    T dk[R], dv[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
        dk[r] = (T)0;
        dv[r] = (T)0;
    }
    for (int i = 0; i < K; ++i) {
        const T aij = a[(bhk + i) * (L + 1) + 1 + j];
        if (aij == (T)0) continue;  // then dl_ij = 0 too
        const T dlij = dl[(bhk + i) * L + j];
        const long srow = (b * K + i) * D + h * DH;
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const int d = lane + 32 * r;
            if (d < DH) {
                dv[r] += aij * dout[srow + d];
                dk[r] += dlij * q[srow + d];
            }
        }
    }
    const long orow = (b * L + j) * (2 * D) + h * DH;  // (B, L, 2D) row of token j, head h
#pragma unroll
    for (int r = 0; r < R; ++r) {
        const int d = lane + 32 * r;
        if (d < DH) {
            dkv[orow + d] = dk[r];
            dkv[orow + D + d] = dv[r];
        }
    }
}
"""
