"""Fused CuPy kernels against the unfused CuPy path (the reference's code on CuPy arrays)
and against torch on the same inputs (shared through DLPack), ratios from one run.

    python -m bench.cupy_kernels --sizes small,medium,large --dtype float32 \
        --out bench/results/cupy-kernels-h200.json

Every row is checked for agreement before it is timed. A time is the median over
``--trials`` batches of ``--repeat`` calls, wall clock between device synchronizations,
so launch overhead (what fusion saves) is counted as a caller sees it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

__all__ = ["PRESETS", "main", "run"]

# name -> per-kernel sizes: bmn (B, K, D); sparsify (B, N, k_top); slot (B, K, L, H, D)
PRESETS: dict[str, dict[str, tuple[int, ...]]] = {
    "small": {"bmn": (8, 16, 256), "sparsify": (64, 128, 5), "slot": (8, 16, 128, 4, 256)},
    "mid": {"bmn": (32, 64, 512), "sparsify": (256, 500, 5), "slot": (16, 32, 256, 8, 512)},
    "mid2": {"bmn": (32, 64, 512), "sparsify": (256, 500, 5), "slot": (16, 64, 512, 8, 512)},
    "medium": {"bmn": (64, 64, 512), "sparsify": (512, 1000, 5), "slot": (32, 64, 512, 8, 512)},
    "large": {"bmn": (256, 128, 1024), "sparsify": (4096, 2000, 8), "slot": (64, 128, 1024, 8, 1024)},
}


def _timer(cp, torch) -> Callable[[Callable[[], Any], int, int], float]:
    def sync() -> None:
        cp.cuda.Device().synchronize()
        if torch is not None:
            torch.cuda.synchronize()

    def time_it(fn: Callable[[], Any], repeat: int, trials: int) -> float:
        for _ in range(3):
            fn()
        sync()
        samples = []
        for _ in range(trials):
            t0 = time.perf_counter()
            for _ in range(repeat):
                fn()
            sync()
            samples.append((time.perf_counter() - t0) / repeat)
        samples.sort()
        return samples[len(samples) // 2] * 1e6  # microseconds

    return time_it


def _check(name: str, got: Any, want: Any, cp, rtol: float, atol: float) -> None:
    if not isinstance(got, cp.ndarray) and hasattr(got, "__dlpack__"):  # a torch tensor
        got = cp.from_dlpack(got.detach() if hasattr(got, "detach") else got)
    got = cp.asarray(got).astype(cp.float64)
    want = cp.asarray(want).astype(cp.float64)
    err = float(cp.abs(got - want).max())
    bound = atol + rtol * float(cp.abs(want).max())
    if not err <= bound:
        raise AssertionError(f"{name}: max abs error {err:.3e} > {bound:.3e}")


def _case(**fields: Any) -> dict[str, Any]:
    """One benchmark row's definition: kernel, stage, shape, fused/unfused/torch callables, check."""
    return fields


def _cases(cp, torch, sizes: dict[str, tuple[int, ...]], dtype: str, rng) -> list[dict[str, Any]]:
    """Each case: name, shape label, and fused / unfused / torch callables plus a check.

    One builder per kernel, so no closure sees another kernel's arrays.
    """

    def u(*shape: int, scale: float = 1.0):
        return cp.asarray((rng.uniform(-1, 1, shape) * scale).astype(dtype))

    tt = torch.from_dlpack if torch is not None else None
    cases: list[dict[str, Any]] = []
    for build in (_bmn_cases, _sparsify_cases, _slot_cases, _op_cases):
        cases += build(cp, torch, tt, sizes, u)
    return cases


def _bmn_cases(cp, torch, tt, sizes, u) -> list[dict[str, Any]]:
    from memcore.backends.cupy import fused, kernels
    from memcore.reference import memory as ref_memory

    cases: list[dict[str, Any]] = []
    b, k, d = sizes["bmn"]
    m, vb, dy = u(b, k, d), u(k, d), u(b, k, d)
    y, n = kernels.bmn_forward(m, vb)
    ry, rn = ref_memory.normalize(cp, m + vb)
    cases.append(_case(
        kernel="bmn", stage="forward", shape=f"B={b} K={k} D={d}",
        fused=lambda: kernels.bmn_forward(m, vb),
        unfused=lambda: ref_memory.normalize(cp, m + vb),
        torch=(lambda: torch.nn.functional.normalize(tt(m) + tt(vb), dim=-1, eps=1e-12)) if tt else None,
        check=[(y, ry), (n, rn)] + ([(torch.nn.functional.normalize(tt(m) + tt(vb), dim=-1, eps=1e-12), ry)] if tt else []),
    ))
    tm = tt(m).clone().requires_grad_(True) if tt else None
    t_out = torch.nn.functional.normalize(tm + tt(vb), dim=-1, eps=1e-12) if tt else None
    cases.append(_case(
        kernel="bmn", stage="backward", shape=f"B={b} K={k} D={d}",
        fused=lambda: fused.bmn_backward(ref_memory.BmnCache(y, n), dy),
        unfused=lambda: ref_memory.bmn_backward(ref_memory.BmnCache(ry, rn), dy),
        torch=(lambda: torch.autograd.grad(t_out, tm, tt(dy), retain_graph=True)) if tt else None,
        check=[(kernels.bmn_backward(y, n, dy), ref_memory.normalize_backward(cp, ry, rn, dy))]
        + ([(cp.from_dlpack(torch.autograd.grad(t_out, tm, tt(dy), retain_graph=True)[0]),
             ref_memory.normalize_backward(cp, ry, rn, dy))] if tt else []),
    ))

    return cases


def _sparsify_cases(cp, torch, tt, sizes, u) -> list[dict[str, Any]]:
    """The sparsifier with the threshold a constant in the backward (the default)."""
    from memcore.backends.cupy import fused
    from memcore.reference import sab as ref_sab

    cases: list[dict[str, Any]] = []
    b, nn, k_top = sizes["sparsify"]
    sc, dw = u(b, nn), u(b, nn)
    w, cache = ref_sab.sparsify_forward(sc, k_top=k_top, eps=1e-7)
    fw, fc = fused.sparsify_forward(sc, k_top=k_top, eps=1e-7)

    def torch_sparsify(a):
        thr = torch.topk(a, min(k_top + 1, nn), dim=-1).values[:, -1:].detach()
        z = torch.relu(a - thr)
        return z / (z.sum(-1, keepdim=True) + 1e-7)

    ta = tt(sc).clone().requires_grad_(True) if tt else None
    tw = torch_sparsify(ta) if tt else None
    cases.append(_case(
        kernel="sparsify", stage="forward", shape=f"B={b} N={nn} k_top={k_top}",
        fused=lambda: fused.sparsify_forward(sc, k_top=k_top, eps=1e-7),
        unfused=lambda: ref_sab.sparsify_forward(sc, k_top=k_top, eps=1e-7),
        torch=(lambda: torch_sparsify(tt(sc))) if tt else None,
        check=[(fw, w)] + ([(tw.detach(), w)] if tt else []),
    ))
    cases.append(_case(
        kernel="sparsify", stage="backward", shape=f"B={b} N={nn} k_top={k_top}",
        fused=lambda: fused.sparsify_backward(fc, dw),
        unfused=lambda: ref_sab.sparsify_backward(cache, dw),
        torch=(lambda: torch.autograd.grad(tw, ta, tt(dw), retain_graph=True)) if tt else None,
        check=[(fused.sparsify_backward(fc, dw)[0], ref_sab.sparsify_backward(cache, dw)[0])]
        + ([(torch.autograd.grad(tw, ta, tt(dw), retain_graph=True)[0], ref_sab.sparsify_backward(cache, dw)[0])]
           if tt else []),
    ))

    return cases


def _slot_cases(cp, torch, tt, sizes, u) -> list[dict[str, Any]]:
    """The slot-attention write, projections included on every side."""
    from memcore.backends.cupy import fused
    from memcore.reference import attention as ref_attention

    cases: list[dict[str, Any]] = []
    b, k, ell, h, d = sizes["slot"]
    mem, x = u(b, k, d), u(b, ell, d)
    wq, wk, wv = (u(d, d, scale=math.sqrt(3.0 / d)) for _ in range(3))
    tau = 0.25
    want, scache = ref_attention.slot_attention_forward(mem, x, wq, wk, wv, num_heads=h, tau=tau)

    def torch_slot():
        tmem, tx = tt(mem), tt(x)
        dh = d // h

        def heads(t):
            return t.reshape(t.shape[0], t.shape[1], h, dh).transpose(1, 2)

        q, ks, kx, vx, ms = (heads(t) for t in (tmem @ tt(wq), tmem @ tt(wk), tx @ tt(wk), tx @ tt(wv), tmem))
        scale = 1.0 / (math.sqrt(dh) * tau)
        logits = torch.cat([(q * ks).sum(-1, keepdim=True), q @ kx.transpose(-1, -2)], dim=-1) * scale
        a = torch.softmax(logits, dim=-1)
        out = a[..., :1] * ms + a[..., 1:] @ vx
        return out.transpose(1, 2).reshape(b, k, d)

    cases.append(_case(
        kernel="slot_attention", stage="forward", shape=f"B={b} K={k} L={ell} H={h} D={d}",
        fused=lambda: fused.slot_attention_output(mem, x, wq, wk, wv, num_heads=h, tau=tau),
        unfused=lambda: ref_attention.slot_attention_forward(mem, x, wq, wk, wv, num_heads=h, tau=tau),
        torch=torch_slot if tt else None,
        check=[(fused.slot_attention_output(mem, x, wq, wk, wv, num_heads=h, tau=tau), want)]
        + ([(torch_slot(), want)] if tt else []),
    ))
    cases.append(_case(
        kernel="slot_attention", stage="forward+weights", shape=f"B={b} K={k} L={ell} H={h} D={d}",
        fused=lambda: fused.slot_attention_forward(mem, x, wq, wk, wv, num_heads=h, tau=tau),
        unfused=lambda: ref_attention.slot_attention_forward(mem, x, wq, wk, wv, num_heads=h, tau=tau),
        torch=None,
        check=[(fused.slot_attention_forward(mem, x, wq, wk, wv, num_heads=h, tau=tau)[1].a, scache.a)],
    ))
    return cases


def _op_cases(cp, torch, tt, sizes, u) -> list[dict[str, Any]]:
    """Whole ops through the backend, fused against unfused (validation in, finite checks off)."""
    import math

    import memcore
    from memcore.backends.cupy import CupyBackend

    cases: list[dict[str, Any]] = []
    b, k, ell, h, d = sizes["slot"]
    tau = 0.25
    mem, x = u(b, k, d), u(b, ell, d)
    wq, wk, wv = (u(d, d, scale=math.sqrt(3.0 / d)) for _ in range(3))
    on, off = CupyBackend(fused=True), CupyBackend(fused=False)
    vb, ct = u(k, d), u(b, k, d)
    w_args, w_at = (mem, x, wq, wk, wv, vb), {"num_heads": h, "tau": tau}

    def vjp(be, op, args, at, cot):
        with memcore.options(check_finite=False):
            return be.vjp(op, args, at, cot)

    cases.append(_case(
        kernel="memory_write", stage="vjp (op)", shape=f"B={b} K={k} L={ell} H={h} D={d}",
        fused=lambda: vjp(on, "memory_write", w_args, w_at, ct),
        unfused=lambda: vjp(off, "memory_write", w_args, w_at, ct),
        torch=None,
        check=list(zip(vjp(on, "memory_write", w_args, w_at, ct)[1], vjp(off, "memory_write", w_args, w_at, ct)[1])),
    ))
    b, nn, k_top = sizes["sparsify"]
    hd, a_dim = 64, 32
    r_args = (u(b, hd), u(b, nn, hd), u(hd, a_dim, scale=0.2), u(hd, a_dim, scale=0.2), u(a_dim))
    r_at, r_ct = {"k_top": k_top}, (u(b, hd), u(b, nn))
    cases.append(_case(
        kernel="sparse_retrieve", stage="vjp (op)", shape=f"B={b} N={nn} Hd={hd} A={a_dim} k_top={k_top}",
        fused=lambda: vjp(on, "sparse_retrieve", r_args, r_at, r_ct),
        unfused=lambda: vjp(off, "sparse_retrieve", r_args, r_at, r_ct),
        torch=None,
        check=list(zip(vjp(on, "sparse_retrieve", r_args, r_at, r_ct)[1],
                       vjp(off, "sparse_retrieve", r_args, r_at, r_ct)[1])),
    ))
    return cases


def run(sizes: list[str], dtype: str, repeat: int, trials: int, use_torch: bool = True) -> dict[str, Any]:
    """Run every case of every preset; returns the report (also printed as a table)."""
    import cupy as cp
    import numpy as np

    torch = None
    if use_torch:
        try:
            import torch as _torch

            torch = _torch if _torch.cuda.is_available() else None
        except ImportError:
            torch = None
    time_it = _timer(cp, torch)
    rtol, atol = {"float32": (2e-4, 1e-5), "float64": (1e-10, 1e-12)}[dtype]
    rows = []
    for preset in sizes:
        rng = np.random.default_rng(0)
        for case in _cases(cp, torch, PRESETS[preset], dtype, rng):
            for i, (got, want) in enumerate(case["check"]):
                _check(f"{case['kernel']} {case['stage']} #{i}", got, want, cp, rtol, atol)
            t_f = time_it(case["fused"], repeat, trials)
            t_u = time_it(case["unfused"], repeat, trials)
            t_t = time_it(case["torch"], repeat, trials) if case["torch"] is not None else None
            rows.append({
                "preset": preset, "kernel": case["kernel"], "stage": case["stage"], "shape": case["shape"],
                "dtype": dtype, "fused_us": round(t_f, 2), "unfused_us": round(t_u, 2),
                "torch_us": None if t_t is None else round(t_t, 2),
                "unfused_over_fused": round(t_u / t_f, 2),
                "torch_over_fused": None if t_t is None else round(t_t / t_f, 2),
            })
            print(_row(rows[-1]), flush=True)
    props = cp.cuda.runtime.getDeviceProperties(0)
    return {
        "command": "python -m bench.cupy_kernels " + " ".join(sys.argv[1:]),
        "gpu": props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"]),
        "versions": {
            "python": platform.python_version(), "cupy": cp.__version__, "numpy": np.__version__,
            "torch": None if torch is None else torch.__version__,
            "cuda_runtime": cp.cuda.runtime.runtimeGetVersion(), "cuda_driver": cp.cuda.runtime.driverGetVersion(),
        },
        "timing": f"median of {trials} batches of {repeat} calls, wall clock between device syncs",
        "rows": rows,
    }


def _row(r: dict[str, Any]) -> str:
    torch_us = "-" if r["torch_us"] is None else f"{r['torch_us']:.1f}"
    torch_ratio = "-" if r["torch_over_fused"] is None else f"{r['torch_over_fused']:.2f}x"
    return (f"| {r['preset']} | {r['kernel']} | {r['stage']} | {r['shape']} | {r['dtype']} | {r['fused_us']:.1f} | "
            f"{r['unfused_us']:.1f} | {torch_us} | {r['unfused_over_fused']:.2f}x | {torch_ratio} |")


HEADER = ("| preset | kernel | stage | shape | dtype | fused us | unfused CuPy us | torch us | "
          "unfused/fused | torch/fused |\n|---|---|---|---|---|---|---|---|---|---|")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="small,mid,medium", help=f"comma-separated presets: {', '.join(PRESETS)}")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--out", default=None, help="write the JSON report here")
    args = parser.parse_args(argv)
    sizes = [s for s in args.sizes.split(",") if s]
    unknown = [s for s in sizes if s not in PRESETS]
    if unknown:
        parser.error(f"--sizes must be among {', '.join(PRESETS)}. Received: {', '.join(unknown)}")
    print(HEADER)
    report = run(sizes, args.dtype, args.repeat, args.trials, use_torch=not args.no_torch)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(report, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
