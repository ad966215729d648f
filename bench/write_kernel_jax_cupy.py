"""Memory write forward+backward in JAX and CuPy: fused formulations vs straightforward ones.

    python -m bench.write_kernel_jax_cupy --B 16,64 --K 64,1024 \
        --out bench/results/write-kernel-jax-cupy-h200.json
    python -m bench.write_kernel_jax_cupy --frameworks jax   # the JAX group only

Issue 7, benchmark 2's JAX and CuPy columns (the Triton ones are ``bench/write_kernel.py``).

JAX (each timed as one jitted function; f+b = output and all six input gradients):
- ``jax``: memcore's ``memory_write`` (``backends/jax/memory.py``), gradients by autodiff.
- ``fused_ad``: :func:`fused_write`'s forward, gradients by autodiff.
- ``fused``: :func:`fused_write`, forward and a hand-written VJP in one ``custom_vjp``.
  The forward concatenates the projections ([q | k_self] = M [wq | wk], [k_x | v_x] =
  x [wk | wv]), keeps the heads in a (B, K, H, dh) layout (no transposes), never builds
  the (B, H, K, L+1) [self; tokens] logits (self and token parts share one max and one
  sum), and fuses BMN. It saves only the projections, the log-sum-exp (B, K, H) and the
  BMN output and norm; the backward recomputes the token logits. bf16 operands stay bf16
  in the matmuls (float32 accumulation); everything elementwise is float32.
- ``pallas``: ``backends/jax/pallas_write.py``: the same projections and jnp BMN around two
  Pallas kernels (Triton lowering), a forward one per (batch row, slot block, head) that keeps
  the logits on chip and saves only the log-sum-exp, and a backward one per (batch row, head,
  slot chunk) that recomputes the softmax and accumulates the token gradients in registers.
  Without a GPU it runs in the Pallas interpreter (``pallas_interpret`` in the row; smoke
  runs only). It is checked and timed after the others, and any failure (lowering, compile,
  check) is kept as ``pallas_error`` in the row while the other variants keep their numbers.
  ``--jax-variants`` picks the JAX variants (``jax``, the baseline, always runs).

CuPy (float32 only: the CuPy kernels take float32/float64 and the backend has no bf16):
- ``cupy``: the reference's forward and hand-written backward on CuPy arrays (unfused).
- ``cupy_fused``: ``backends/cupy/fused.py`` as the backend ships it (BMN kernels always;
  the slot-attention kernel only when B*H*K*L <= SLOT_KERNEL_MAX_LOGITS).
- ``cupy_fused_forced``: the slot-attention kernel whatever the size, plus the BMN kernels.
The slot-attention backward is the reference's on every CuPy side (no fused backward).

Outputs and gradients are checked against the straightforward version of the same framework
before timing. Times: median of ``--repeat`` calls, each followed by a device sync. Floor:
max(FLOPs / measured matmul rate, bytes / measured copy rate), counts from
``bench.write_kernel.counts``, ceilings measured here in JAX.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import time
from typing import Any

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax
import jax.numpy as jnp
import numpy as np

from memcore.backends.jax.memory import NORM_EPS, memory_write
from memcore.backends.jax.pallas_write import pallas_memory_write, pallas_unavailable_reason

__all__ = ["bench_cupy", "bench_jax", "fused_write", "main"]

F32 = jnp.float32


def _acc(dtype) -> Any:
    """The accumulation dtype: float32 for half types, the dtype itself otherwise."""
    return jnp.promote_types(dtype, F32)


def _mm(a, b):
    return jnp.matmul(a, b, preferred_element_type=_acc(a.dtype))


def _ein(spec, a, b):
    return jnp.einsum(spec, a, b, preferred_element_type=_acc(a.dtype))


def _forward(memory, x, wq, wk, wv, v_bias, num_heads, tau):
    """(y (B, K, D), residuals): the concat-free, transpose-free write with BMN."""
    B, K, D = memory.shape
    L, H = x.shape[1], num_heads
    dh, op = D // H, memory.dtype  # op: the matmul operand dtype
    c = 1.0 / (math.sqrt(dh) * tau)
    qk = _mm(memory, jnp.concatenate([wq, wk], axis=1))  # (B, K, 2D) float32
    kv = _mm(x, jnp.concatenate([wk, wv], axis=1))  # (B, L, 2D)
    q, ks = qk[..., :D].reshape(B, K, H, dh), qk[..., D:].reshape(B, K, H, dh)
    kx, vx = (t.reshape(B, L, H, dh).astype(op) for t in (kv[..., :D], kv[..., D:]))
    s0 = jnp.sum(q * ks, -1) * c  # (B, K, H) self logits
    s = _ein("bkhd,blhd->bkhl", q.astype(op), kx) * c  # (B, K, H, L) token logits
    mx = jax.lax.stop_gradient(jnp.maximum(s0, jnp.max(s, -1)))
    e0, e = jnp.exp(s0 - mx), jnp.exp(s - mx[..., None])
    z = e0 + jnp.sum(e, -1)
    ms = memory.reshape(B, K, H, dh).astype(_acc(op))
    o = (e0[..., None] * ms + _ein("bkhl,blhd->bkhd", e.astype(op), vx)) / z[..., None]
    u = o.reshape(B, K, D) + v_bias.astype(_acc(op))
    sq = jnp.sum(u * u, -1, keepdims=True)
    root = jnp.sqrt(jnp.where(sq > 0, sq, 1.0))
    free = (sq > 0) & (root > NORM_EPS)  # the reference's clamp: u / max(||u||, eps)
    n = jnp.where(free, root, NORM_EPS)
    y = u / n
    return y, (qk, kv, mx + jnp.log(z), y, n, free)


def fused_write_ad(memory, x, wq, wk, wv, v_bias, *, num_heads: int, tau: float = 0.25):
    """The fused forward with JAX autodiff gradients: (B, K, D) in the input dtype."""
    return _forward(memory, x, wq, wk, wv, v_bias, num_heads, tau)[0].astype(memory.dtype)


def _fwd(memory, x, wq, wk, wv, v_bias, num_heads, tau):
    y, res = _forward(memory, x, wq, wk, wv, v_bias, num_heads, tau)
    return y.astype(memory.dtype), ((memory, x, wq, wk, wv, v_bias), res)


def _bwd(num_heads, tau, saved, dy):
    """Hand-written VJP; with A = softmax over [self; tokens] (a0 the self weight):
    du = (dy - y <y, dy>) / n; do = du per head; da0 = <do, m>; dA = do vx^T;
    ds = a (da - <a, da>) c; dq = ds0 ks + dS kx; dks = ds0 q; dkx = dS^T q; dvx = A^T do."""
    (memory, x, wq, wk, wv, _v_bias), (qk, kv, lse, y, n, free) = saved
    B, K, D = memory.shape
    L, H = x.shape[1], num_heads
    dh, op = D // H, memory.dtype
    c = 1.0 / (math.sqrt(dh) * tau)
    dy = dy.astype(_acc(op))
    du = jnp.where(free, (dy - y * jnp.sum(y * dy, -1, keepdims=True)) / n, dy / n)
    q, ks = qk[..., :D].reshape(B, K, H, dh), qk[..., D:].reshape(B, K, H, dh)
    kx, vx = (t.reshape(B, L, H, dh).astype(op) for t in (kv[..., :D], kv[..., D:]))
    a = jnp.exp(_ein("bkhd,blhd->bkhl", q.astype(op), kx) * c - lse[..., None])
    a0 = jnp.exp(jnp.sum(q * ks, -1) * c - lse)
    do = du.reshape(B, K, H, dh)
    ms = memory.reshape(B, K, H, dh).astype(_acc(op))
    da0 = jnp.sum(do * ms, -1)
    da = _ein("bkhd,blhd->bkhl", do.astype(op), vx)
    g = a0 * da0 + jnp.sum(a * da, -1)
    ds0, ds = a0 * (da0 - g) * c, (a * (da - g[..., None]) * c).astype(op)
    dq = ds0[..., None] * ks + _ein("bkhl,blhd->bkhd", ds, kx)
    dqk = jnp.concatenate([dq.reshape(B, K, D), (ds0[..., None] * q).reshape(B, K, D)], -1)
    dkx = _ein("bkhl,bkhd->blhd", ds, q.astype(op)).reshape(B, L, D)
    dvx = _ein("bkhl,bkhd->blhd", a.astype(op), do.astype(op)).reshape(B, L, D)
    dkv = jnp.concatenate([dkx, dvx], -1)
    w_qk, w_kv = jnp.concatenate([wq, wk], 1), jnp.concatenate([wk, wv], 1)
    d_mem = (a0[..., None] * do).reshape(B, K, D) + _mm(dqk.astype(op), w_qk.T)
    dx = _mm(dkv.astype(op), w_kv.T)
    dw_qk = _ein("bkd,bke->de", memory, dqk.astype(op))
    dw_kv = _ein("bld,ble->de", x, dkv.astype(op))
    grads = (d_mem, dx, dw_qk[:, :D], dw_qk[:, D:] + dw_kv[:, :D], dw_kv[:, D:], du.sum(0))
    return tuple(gr.astype(inp.dtype) for gr, inp in zip(grads, saved[0]))


def _fused_impl(memory, x, wq, wk, wv, v_bias, num_heads, tau):
    return _forward(memory, x, wq, wk, wv, v_bias, num_heads, tau)[0].astype(memory.dtype)


_fused = jax.custom_vjp(_fused_impl, nondiff_argnums=(6, 7))
_fused.defvjp(_fwd, _bwd)


def fused_write(memory, x, wq, wk, wv, v_bias, *, num_heads: int, tau: float = 0.25):
    """bmn(slot_attention(memory, x), v_bias) with the hand-written VJP: (B, K, D).

    Args:
        memory: (B, K, D); x: (B, L, D); wq, wk, wv: (D, D); v_bias: (K, D); num_heads: H;
        tau: temperature. No token mask (this formulation is a benchmark, not an op).
    """
    return _fused(memory, x, wq, wk, wv, v_bias, num_heads, tau)


# ----------------------------------------------------------------------------- timing
def _time(fn, sync, repeat: int, warmup: int = 3) -> float:
    """Median seconds of ``repeat`` calls of ``fn``, each followed by ``sync``."""
    for _ in range(warmup):
        sync(fn())
    samples = []
    for _ in range(max(repeat, 1)):
        t0 = time.perf_counter()
        sync(fn())
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def _rel(got, want) -> float:
    num = den = 0.0
    for g, w in zip(got, want, strict=True):
        g64, w64 = np.asarray(g, np.float64), np.asarray(w, np.float64)
        num += float(np.sum((g64 - w64) ** 2))
        den += float(np.sum(w64**2))
    return (num / max(den, 1e-300)) ** 0.5


def _inputs(B, K, L, D, seed=0):
    r = np.random.default_rng(seed)
    sc = D**-0.5
    shapes = [((B, K, D), 1.0), ((B, L, D), 1.0), ((D, D), sc), ((D, D), sc), ((D, D), sc)]
    arrs = [r.standard_normal(s).astype(np.float32) * c for s, c in shapes]
    arrs.append(r.standard_normal((K, D)).astype(np.float32))
    return arrs, r.standard_normal((B, K, D)).astype(np.float32)


def ceilings(dtype) -> dict[str, float]:
    """Measured JAX matmul FLOP/s (8192^3 in ``dtype``) and copy bytes/s (2 GiB float32)."""
    n = 8192
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
    mm = jax.jit(lambda u, v: u @ v)
    t_mm = _time(lambda: mm(a, a), jax.block_until_ready, 10)
    src = jax.random.normal(jax.random.PRNGKey(1), (1 << 29,), F32)
    cp_ = jax.jit(lambda u: u + 1.0)
    t_cp = _time(lambda: cp_(src), jax.block_until_ready, 10)
    return {"matmul_flops_per_s": 2 * n**3 / t_mm, "copy_bytes_per_s": 2 * src.nbytes / t_cp}


# ----------------------------------------------------------------------------- JAX
def _pallas(*a, **k):
    """The Pallas write; interpreted where its GPU lowering is unavailable (CPU smoke runs)."""
    return pallas_memory_write(*a, interpret=pallas_unavailable_reason() is not None, **k)


JAX_FNS = {"jax": memory_write, "fused_ad": fused_write_ad, "fused": fused_write,
           "pallas": _pallas}  # fmt: skip
GUARDED = ("pallas",)  # variants whose failure is recorded in the row instead of raised


def bench_jax(B, K, L, D, H, dtype: str, repeat: int, tol: float,
              variants=tuple(JAX_FNS)) -> dict[str, Any]:  # fmt: skip
    """One size: check each variant against memcore's op, then time forward and f+b.

    ``jax`` always runs (the baseline). A guarded variant (``pallas``) is checked and timed
    last; if it fails to lower, compile, run or pass the check, ``<name>_error`` records why
    and the row keeps the other variants' numbers.
    """
    arrs, dy_np = _inputs(B, K, L, D)
    ins = [jnp.asarray(x, dtype) for x in arrs]
    dy = jnp.asarray(dy_np, dtype)
    at = {"num_heads": H, "tau": 0.25}
    names = ["jax"] + [n for n in JAX_FNS if n != "jax" and n in variants]
    names.sort(key=lambda n: n in GUARDED)  # guarded ones last: a crash there loses nothing
    row: dict[str, Any] = {"framework": "jax", "B": B, "K": K, "L": L, "D": D, "H": H, "dtype": dtype}
    if "pallas" in names:
        row["pallas_interpret"] = pallas_unavailable_reason() is not None
    fwd = {n: jax.jit(lambda *a, f=JAX_FNS[n]: f(*a, **at)) for n in names}

    def fb(f):
        def run(*a):
            y, pull = jax.vjp(lambda *b: f(*b, **at), *a)
            return y, pull(dy)

        return jax.jit(run)

    fwb = {n: fb(JAX_FNS[n]) for n in names}
    want_y, want_g = fwb["jax"](*ins)
    ran = []
    for n in names:
        try:
            if n != "jax":
                y, g = fwb[n](*ins)
                row[f"{n}_out_rel_err"] = _rel([y], [want_y])
                row[f"{n}_grad_rel_err"] = _rel(g, want_g)
                assert row[f"{n}_out_rel_err"] < tol and row[f"{n}_grad_rel_err"] < tol, row
            row[f"{n}_fwd_s"] = _time(lambda n=n: fwd[n](*ins), jax.block_until_ready, repeat)
            row[f"{n}_fwd_bwd_s"] = _time(lambda n=n: fwb[n](*ins), jax.block_until_ready, repeat)
        except Exception as exc:
            if n not in GUARDED:
                raise
            row.pop(f"{n}_fwd_s", None)
            if isinstance(exc, AssertionError):  # the check: its errors are in the row
                msg = (f"check failed: out {row[f'{n}_out_rel_err']:.2e}, grads "
                       f"{row[f'{n}_grad_rel_err']:.2e} (tolerance {tol:g})")  # fmt: skip
            else:
                msg = str(exc)
            row[f"{n}_error"] = f"{type(exc).__name__}: {msg[:300]}"
            print(f"jax {n}: {row[f'{n}_error']}", flush=True)
            continue
        ran.append(n)
    row["variants"] = ran
    return row


# ----------------------------------------------------------------------------- CuPy
def bench_cupy(B, K, L, D, H, repeat: int, tol: float) -> dict[str, Any]:
    """One size in float32: fused (as shipped, and forced) vs the unfused reference on CuPy."""
    import cupy as cp

    from memcore.backends.cupy import fused, kernels
    from memcore.reference import memory as ref_memory

    arrs, dy_np = _inputs(B, K, L, D)
    ins, dy = [cp.asarray(x) for x in arrs], cp.asarray(dy_np)
    at = {"num_heads": H, "tau": 0.25}

    def forced_fwd(*a):
        m, slot = fused.slot_attention_forward(*a[:5], **at)
        y, norm = fused.bmn_forward(m, a[5])
        return y, ref_memory.WriteCache(slot, norm)

    def forced_out(*a):
        return kernels.bmn_forward(fused.slot_attention_output(*a[:5], **at), a[5])[0]

    def _fb(fwd_fn, bwd_fn):
        y, cache = fwd_fn(*ins, **at)
        return y, tuple(bwd_fn(cache, dy))

    variants = {
        "cupy": (lambda: ref_memory.memory_write_forward(*ins, **at)[0],
                 lambda: _fb(ref_memory.memory_write_forward, ref_memory.memory_write_backward)),
        "cupy_fused": (lambda: fused.memory_write_output(*ins, **at),
                       lambda: _fb(fused.memory_write_forward, fused.memory_write_backward)),
        "cupy_fused_forced": (lambda: forced_out(*ins),
                              lambda: _fb(lambda *a, **k: forced_fwd(*a), fused.memory_write_backward)),
    }  # fmt: skip

    row: dict[str, Any] = {"framework": "cupy", "B": B, "K": K, "L": L, "D": D, "H": H,
                           "dtype": "float32", "slot_kernel_gate_open": fused.slot_kernel_pays(
                               ins[0], ins[1], H), "logits": B * H * K * L}  # fmt: skip
    want_y, want_g = variants["cupy"][1]()
    for n in ("cupy_fused", "cupy_fused_forced"):
        y, g = variants[n][1]()
        y_f = variants[n][0]()
        row[f"{n}_out_rel_err"] = max(_rel([y.get()], [want_y.get()]), _rel([y_f.get()], [want_y.get()]))
        row[f"{n}_grad_rel_err"] = _rel([x.get() for x in g], [x.get() for x in want_g])
        assert row[f"{n}_out_rel_err"] < tol and row[f"{n}_grad_rel_err"] < tol, row
    sync = lambda _: cp.cuda.Device().synchronize()
    for n, (f, fb) in variants.items():
        row[f"{n}_fwd_s"] = _time(f, sync, repeat)
        row[f"{n}_fwd_bwd_s"] = _time(fb, sync, repeat)
    return row


# ----------------------------------------------------------------------------- driver
BASE = {"jax": "jax", "cupy": "cupy"}
VARIANTS = {"jax": tuple(JAX_FNS), "cupy": ("cupy", "cupy_fused", "cupy_fused_forced")}


def _derive(row: dict[str, Any], ceil: dict[str, float] | None) -> None:
    """Speedups over the framework's straightforward version and fractions of the floor."""
    from bench.write_kernel import counts  # the same FLOP / byte model as the Triton table

    base = BASE[row["framework"]]
    c = counts(row["B"], row["K"], row["L"], row["D"], 2 if row["dtype"] == "bfloat16" else 4)
    row.update(c)
    for stage in ("fwd", "fwd_bwd"):
        floor = None
        if ceil:
            floor = max(c[f"{stage}_flops"] / ceil["matmul_flops_per_s"],
                        c[f"{stage}_bytes"] / ceil["copy_bytes_per_s"])  # fmt: skip
            row[f"floor_{stage}_s"] = floor
        for n in row.get("variants", VARIANTS[row["framework"]]):
            row[f"{n}_speedup_{stage}"] = row[f"{base}_{stage}_s"] / row[f"{n}_{stage}_s"]
            if floor:
                row[f"{n}_{stage}_floor_fraction"] = floor / row[f"{n}_{stage}_s"]


def markdown(rows: list[dict[str, Any]]) -> str:
    """One line per (framework, dtype, B, K, variant); times in microseconds."""
    lines = [
        (
            "| framework | dtype | B | K | variant | fwd us | fwd speedup | f+b us | f+b speedup | "
            "floor f+b us | of floor |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['framework']} | {r.get('dtype')} | {r.get('B')} | {r.get('K')} | "
                         f"error: {r['error'][-80:]!r} | | | | | | |")  # fmt: skip
            continue
        fl = r.get("floor_fwd_bwd_s")
        for n in VARIANTS[r["framework"]]:
            if f"{n}_error" in r:
                lines.append(f"| {r['framework']} | {r['dtype']} | {r['B']} | {r['K']} | {n} | "
                             f"error: {r[f'{n}_error'][-80:]!r} | | | | | |")  # fmt: skip
                continue
            if n not in r.get("variants", VARIANTS[r["framework"]]):
                continue
            frac = r.get(f"{n}_fwd_bwd_floor_fraction")
            lines.append(
                f"| {r['framework']} | {r['dtype']} | {r['B']} | {r['K']} | {n} | "
                f"{r[f'{n}_fwd_s'] * 1e6:.0f} | {r[f'{n}_speedup_fwd']:.2f}x | "
                f"{r[f'{n}_fwd_bwd_s'] * 1e6:.0f} | {r[f'{n}_speedup_fwd_bwd']:.2f}x | "
                f"{'-' if fl is None else f'{fl * 1e6:.0f}'} | "
                f"{'-' if frac is None else f'{frac:.0%}'} |"
            )
    return "\n".join(lines)


def _cupy_reason() -> str | None:
    try:
        import cupy as cp

        return None if cp.cuda.runtime.getDeviceCount() > 0 else "needs CUDA and cupy"
    except Exception:  # noqa: BLE001 - no cupy, or a cupy without a usable CUDA
        return "needs CUDA and cupy"


def _record(argv: list[str]) -> dict[str, Any]:
    rec = {"command": "python -m bench.write_kernel_jax_cupy " + " ".join(argv),
           "python": platform.python_version(), "jax": jax.__version__, "numpy": np.__version__,
           "jax_device": jax.devices()[0].device_kind,
           "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}  # fmt: skip
    if _cupy_reason() is None:
        import cupy as cp

        rec.update(cupy=cp.__version__, cuda_runtime=cp.cuda.runtime.runtimeGetVersion(),
                   CUPY_TF32=os.environ.get("CUPY_TF32", "0"))  # fmt: skip
    return rec


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns (and writes to --out) the JSON payload."""
    import json
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--B", default="16,64")
    p.add_argument("--K", default="64,1024")
    for flag, default in (("L", 128), ("D", 512), ("H", 8), ("repeat", 20)):
        p.add_argument(f"--{flag}", type=int, default=default)
    p.add_argument("--dtype", default="float32,bfloat16", help="JAX dtypes (CuPy: float32 only)")
    p.add_argument("--frameworks", default="jax,cupy")
    p.add_argument("--jax-variants", default=",".join(JAX_FNS),
                   help="JAX variants to check and time (jax, the baseline, always runs)")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    unknown = sorted(set(a.jax_variants.split(",")) - set(JAX_FNS))
    if unknown:
        p.error(f"unknown --jax-variants {unknown}. Available: {', '.join(JAX_FNS)}")
    gpu = jax.default_backend() == "gpu"
    sizes = [(int(b), int(k)) for b in a.B.split(",") for k in a.K.split(",")]
    rows: list[dict[str, Any]] = []
    payload: dict[str, Any] = {"benchmark": "write_kernel_jax_cupy", "record": _record(argv),
                               "ceilings": {}, "rows": rows}  # fmt: skip
    for fw in a.frameworks.split(","):
        reason = _cupy_reason() if fw == "cupy" else None
        if reason:
            payload["cupy_skipped"] = reason
            print(f"cupy: skipped ({reason})", flush=True)
            continue
        for dt in a.dtype.split(",") if fw == "jax" else ["float32"]:
            ceil = payload["ceilings"].setdefault(dt, ceilings(getattr(jnp, dt)) if gpu else None)
            print(f"ceilings {dt}: {ceil}", flush=True)
            tol = 3e-3 if dt == "float32" else 3e-2
            for B, K in sizes:
                try:
                    if fw == "jax":
                        row = bench_jax(B, K, a.L, a.D, a.H, dt, a.repeat, tol,
                                        variants=tuple(a.jax_variants.split(",")))
                    else:
                        row = bench_cupy(B, K, a.L, a.D, a.H, a.repeat, tol)
                    _derive(row, ceil)
                except Exception as exc:
                    if not gpu:
                        raise
                    row = {"framework": fw, "dtype": dt, "B": B, "K": K,
                           "error": f"{type(exc).__name__}: {str(exc)[:300]}"}  # fmt: skip
                rows.append(row)
                print(json.dumps(row, default=str), flush=True)
                _save(a.out, payload)
    payload["markdown"] = markdown(rows)
    print(payload["markdown"], flush=True)
    _save(a.out, payload)
    return payload


def _save(path: str | None, payload: dict[str, Any]) -> None:
    """Write the payload as JSON (kept row by row: a cut-off run keeps what it finished)."""
    import json

    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(payload, f, indent=1, default=str)


if __name__ == "__main__":
    main()
