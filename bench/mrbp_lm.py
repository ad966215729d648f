"""MRBP vs BPTT vs per-segment checkpointing on the Memformer-lite LM (issue 7, benchmark 1).

    python -m bench.mrbp_lm --T 8,32 --precision fp32,bf16 --out bench/results/mrbp-lm-h200.json

Sizes default to the issue's (B=16, L=128, D=512, H=8, K=1024, vocab 8192, 4 layers).
Before anything is timed, every method's gradient is checked against BPTT's in plain float32
(TF32 off) at ``--check-T`` segments; then, at each (precision, T), the gradients of every
method are compared with BPTT's in that same precision and reported. Speed ratios are
BPTT time / method time (> 1: faster than BPTT); memory ratios are method peak / BPTT peak.
``--fit-gib`` also finds the largest T each method fits in that much memory (fp32 only).
"""

from __future__ import annotations

import argparse
import functools
import gc
import math
from collections.abc import Callable
from typing import Any

import torch

from bench.harness import cuda, median_time, peak_memory, rel_error, run_record, write_json
from bench.lm_model import MemformerLM
from bench.lm_routing import METHODS, GraphedBPTT, graphed_mrbp

__all__ = ["build", "main", "make_runner", "random_batch"]

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}
GIB = 1 << 30


def build(args: argparse.Namespace, device: torch.device) -> MemformerLM:
    """The LM with seeded random weights, gradients allocated (zeros) so they count as base."""
    torch.manual_seed(args.seed)
    model = MemformerLM(
        args.vocab, args.D, args.H, args.layers, args.K, fused_write=args.write == "fused"
    ).to(device)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    return model


def random_batch(T: int, args: argparse.Namespace, device: torch.device, seed: int = 1):
    """Random token ids and next-token targets, (T, B, L) each (never zeros)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    stream = torch.randint(0, args.vocab, (args.B, T * args.L + 1), generator=g)
    tokens = stream[:, :-1].reshape(args.B, T, args.L).transpose(0, 1).contiguous()
    targets = stream[:, 1:].reshape(args.B, T, args.L).transpose(0, 1).contiguous()
    return tokens.to(device), targets.to(device)


OPTIONS = {
    "host": ("stash", "host"),
    "layers": ("recompute", "layers"),
    "lean": ("recompute", "lean"),
    "keep": ("recompute", "keep"),
}
"""MRBP method suffixes (the library's ``mrbp`` options): ``mrbp+host`` offloads the stored
memories to pinned host memory (``stash="host"``); ``mrbp+layers`` recomputes each block of
the replayed segment in its backward; ``mrbp+lean`` every block but the write; ``mrbp+keep``
the same with the layers' outputs kept from the no-grad forward (``keep_blocks``; see
``bench.lm_routing.RECOMPUTE``). They combine (``mrbp_graph+host+lean``)."""


def parse_method(name: str) -> tuple[str, dict[str, Any]]:
    """("mrbp_graph", {"stash": "host"}) from "mrbp_graph+host"; options only on MRBP."""
    base, *opts = name.split("+")
    known = set(METHODS) | {"mrbp_graph", "bptt_graph"}
    if base not in known or (opts and not base.startswith("mrbp")):
        raise ValueError(f"unknown method {name!r}: expected one of {sorted(known)}, options "
                         f"+{' +'.join(OPTIONS)} on the mrbp methods only")  # fmt: skip
    bad = [o for o in opts if o not in OPTIONS]
    if sum(o in ("layers", "lean", "keep") for o in opts) > 1:
        bad.append("more than one of layers, lean, keep")
    if bad:
        raise ValueError(f"unknown option(s) {bad} in {name!r}: expected {sorted(OPTIONS)}")
    return base, dict(OPTIONS[o] for o in opts)


def make_runner(name: str, model: MemformerLM, tokens, targets, amp, args) -> Callable[[], Any]:
    """A no-argument callable running one training iteration of method ``name``."""
    base, opts = parse_method(name)
    if base == "mrbp_graph":
        return graphed_mrbp(model, tokens, targets, amp, **opts)
    if base == "bptt_graph":
        graphed_b = GraphedBPTT(model, tokens, targets, amp)
        return lambda: graphed_b(tokens, targets)
    fn = METHODS[base]
    return lambda: fn(model, tokens, targets, amp, **opts)


def _grads(model: MemformerLM, run: Callable[[], Any]) -> list[torch.Tensor]:
    """The gradients of one iteration, copied to the host: held for the comparisons, they
    must not count in the device memory of the methods measured after them."""
    model.zero_grad(set_to_none=False)
    run()
    out = [p.grad.detach().to("cpu", copy=True) for p in model.parameters()]
    model.zero_grad(set_to_none=False)
    return out


def _methods(args: argparse.Namespace) -> list[str]:
    names = [m for m in args.methods.split(",") if m]
    for m in names:
        parse_method(m)  # unknown names fail before anything runs
    if not cuda():
        skipped = [m for m in names if "_graph" in m]
        if skipped:
            print(f"skipping {', '.join(skipped)}: needs CUDA (CUDA graphs)", flush=True)
        names = [m for m in names if "_graph" not in m]
    return names


def check_exact(model: MemformerLM, args: argparse.Namespace, device) -> dict[str, Any]:
    """Every method's gradient vs BPTT's in float32 with TF32 off; asserts rel error < tol.
    ``--check-T 0`` skips it (the per-setting comparisons with BPTT still run). On CUDA a
    method that fails (error or tolerance) is recorded as such and the run goes on: one
    device call must not lose every other method's figures."""
    if args.check_T <= 0:
        return {}
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        tokens, targets = random_batch(args.check_T, args, device, seed=7)
        ref = _grads(model, make_runner("bptt", model, tokens, targets, None, args))
        errors = {}
        for name in _methods(args):
            if name == "bptt":
                continue
            try:
                err = rel_error(
                    _grads(model, make_runner(name, model, tokens, targets, None, args)), ref
                )
                errors[name] = err
                assert err < args.check_tol, f"{name}: gradient rel error {err:.2e} vs BPTT"
            except Exception as exc:
                if not cuda():
                    raise
                errors[name] = f"FAILED {type(exc).__name__}: {str(exc)[:300]}"
                print(f"exact check {name}: {errors[name]}", flush=True)
                model.zero_grad(set_to_none=False)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        _collect()  # the runners' graphs and buffers must not count in the first method's peak
    return errors


def _collect() -> None:
    gc.collect()
    if cuda():
        torch.cuda.empty_cache()


def _footprint(mem: dict[str, Any], pool: int) -> int | None:
    if mem["peak_allocated"] is None:
        return None
    return mem["peak_allocated"] + pool


def bench_config(model, args, device, precision: str, T: int) -> list[dict[str, Any]]:
    """All methods at one (precision, T): time, peak memory, gradient error vs BPTT."""
    amp = PRECISIONS[precision]
    tokens, targets = random_batch(T, args, device)
    rows: list[dict[str, Any]] = []
    ref = None
    for name in _methods(args):
        row: dict[str, Any] = {"precision": precision, "T": T, "method": name}
        try:
            pool = 0
            _collect()
            if cuda():
                before = torch.cuda.memory_reserved() - torch.cuda.memory_allocated()
            run = make_runner(name, model, tokens, targets, amp, args)
            if cuda() and "_graph" in name:
                torch.cuda.empty_cache()
                # Reserved but not allocated after capture: the graphs' private pool, which
                # replays use without the allocator seeing it (live tensors count already).
                pool = torch.cuda.memory_reserved() - torch.cuda.memory_allocated() - before
            grads = _grads(model, run)
            if ref is None:
                ref = grads  # BPTT runs first
            row["grad_rel_err_vs_bptt"] = rel_error(grads, ref)
            grads = None
            tol = args.tol_bf16 if amp is not None else args.tol_fp32
            assert row["grad_rel_err_vs_bptt"] < tol, f"{name} {precision} T={T}: {row}"
            row.update(median_time(run, repeat=args.repeat, warmup=args.warmup))
            mem = peak_memory(run)
            row.update(mem, graph_pool_bytes=pool, footprint_bytes=_footprint(mem, pool))
        except torch.cuda.OutOfMemoryError as exc:
            row["error"] = f"OOM: {str(exc)[:200]}"
        except Exception as exc:
            if not cuda():
                raise
            row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        run = grads = None  # drop the graphs (and their memory pools) before the next method
        gc.collect()
        if cuda():
            torch.cuda.empty_cache()
        model.zero_grad(set_to_none=False)
        rows.append(row)
        print(_fmt(row), flush=True)
    base = rows[0]
    for row in rows:
        if "median_s" in row and "median_s" in base:
            row["speed_vs_bptt"] = base["median_s"] / row["median_s"]
        if row.get("footprint_bytes") and base.get("footprint_bytes"):
            row["memory_vs_bptt"] = row["footprint_bytes"] / base["footprint_bytes"]
        row["tokens_per_s"] = T * args.B * args.L / row["median_s"] if "median_s" in row else None
    return rows


def _fit_run(name, model, args, device, T: int, repeat: int) -> dict[str, Any]:
    """One method at T under the memory cap: ``repeat`` timed iterations (no warm-up: the
    main table warmed everything up) and the peaks, or {"oom": True}."""
    tokens, targets = random_batch(T, args, device, seed=3)
    run = None
    try:
        _collect()
        torch.cuda.reset_peak_memory_stats()
        run = make_runner(name, model, tokens, targets, None, args)
        out = median_time(run, repeat=repeat, warmup=0)
        out["peak_reserved"] = torch.cuda.max_memory_reserved()
        out["peak_allocated"] = torch.cuda.max_memory_allocated()
        out["tokens_per_s"] = T * args.B * args.L / out["median_s"]
        return out
    except torch.cuda.OutOfMemoryError:
        return {"oom": True}
    finally:
        run = tokens = targets = None
        _collect()
        model.zero_grad(set_to_none=False)


def _predict_T(first: tuple[int, float], t_a: int, m_a: float, *, cap: float, max_T: int) -> int:
    """T where the line through ``first`` = (T, bytes) and (t_a, m_a) reaches ``cap``."""
    t0, m0 = first
    slope = (m_a - m0) / (t_a - t0)
    return max_T if slope <= 0 else int(t_a + (cap - m_a) / slope)


def fit_memory(model, args, device, rows, gib: float) -> list[dict[str, Any]]:
    """Largest T per method in ``gib`` GiB (fp32), bracketed by runs under that cap.

    The method runs under ``torch.cuda.set_per_process_memory_fraction``. The first T is
    predicted from the linear fit of the footprints measured at the table's T; each run
    that fits re-predicts T from its own peak reserved memory, each out-of-memory error
    narrows the bracket, until T fits and T * (1 + ``--fit-step``) does not (at most
    ``--fit-rounds`` runs). Tokens/s are then timed at the largest T that fitted. A method
    whose footprint does not grow with T (memories offloaded to the host) is run at
    ``--fit-max-T`` and reported as not bound by device memory there."""
    out = []
    cap = gib * GIB
    step = args.fit_step
    torch.cuda.set_per_process_memory_fraction(
        min(1.0, cap / torch.cuda.get_device_properties(0).total_memory)
    )
    try:
        for name in _methods(args):
            pts = sorted(
                (r["T"], r["footprint_bytes"])
                for r in rows
                if r["method"] == name and r["precision"] == "fp32" and r.get("footprint_bytes")
            )
            if len(pts) < 2 or name == "bptt_graph":
                continue
            (t0, m0), (t1, m1) = pts[0], pts[-1]
            slope = (m1 - m0) / (t1 - t0)
            predict = functools.partial(_predict_T, (t0, m0), cap=cap, max_T=args.fit_max_T)
            T = min(args.fit_max_T, predict(t1, m1))
            flat = args.fit_max_T <= T
            row: dict[str, Any] = {"method": name, "bytes_per_segment": slope, "predicted_T": T}
            fit_T, oom_T, runs = None, None, []
            for _ in range(1 if flat else args.fit_rounds):
                res = _fit_run(name, model, args, device, T, repeat=1)
                runs.append({"T": T, **{k: v for k, v in res.items() if k != "samples_s"}})
                if res.get("oom"):
                    oom_T = T if oom_T is None else min(oom_T, T)
                else:
                    fit_T = T if fit_T is None else max(fit_T, T)
                    peak_at_fit = res["peak_reserved"]
                if flat or (fit_T and oom_T and oom_T <= math.ceil(fit_T * (1 + step))):
                    break
                if fit_T is None:
                    T = int(T * (1 - 2 * step))
                elif oom_T is None:
                    T = max(math.ceil(fit_T * (1 + step)), predict(fit_T, peak_at_fit))
                else:
                    T = max(math.ceil(fit_T * (1 + step)), (fit_T + oom_T) // 2)
                    T = min(T, oom_T - 1)
            row.update(runs=runs, T=fit_T, oom_T=oom_T)
            row["bound"] = "host memory / time (device footprint flat)" if flat else "device"
            row["bracketed"] = bool(fit_T and oom_T and oom_T <= math.ceil(fit_T * (1 + step)))
            if fit_T is not None and args.fit_repeat > 0:
                row.update(_fit_run(name, model, args, device, fit_T, repeat=args.fit_repeat))
            out.append(row)
            print(f"fit {gib} GiB: {({k: v for k, v in row.items() if k != 'samples_s'})}",
                  flush=True)  # fmt: skip
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    return out


def _fmt(row: dict[str, Any]) -> str:
    if "error" in row:
        return f"{row['precision']} T={row['T']} {row['method']}: {row['error']}"
    mb = (row.get("footprint_bytes") or 0) / 2**20
    return (
        f"{row['precision']} T={row['T']:>3} {row['method']:<11} "
        f"{row['median_s'] * 1e3:9.1f} ms  peak {mb:9.0f} MiB  "
        f"grad err {row['grad_rel_err_vs_bptt']:.1e}"
    )


def markdown(rows: list[dict[str, Any]]) -> str:
    """The results table in Markdown."""
    lines = [
        "| precision | T | method | s/iter | speed vs BPTT | peak MiB | memory vs BPTT | grad rel err vs BPTT |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['precision']} | {r['T']} | {r['method']} | {r['error']} | | | | |")
            continue
        mem = r.get("footprint_bytes")
        lines.append(
            f"| {r['precision']} | {r['T']} | {r['method']} | {r['median_s']:.4f} | "
            f"{r.get('speed_vs_bptt', math.nan):.2f}x | "
            f"{'-' if mem is None else f'{mem / 2**20:.0f}'} | "
            f"{r.get('memory_vs_bptt', math.nan):.3f}x | {r['grad_rel_err_vs_bptt']:.1e} |"
        )
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    """Command-line flags (sizes, methods, precisions, repeats, tolerances, output)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    for flag, default in (("B", 16), ("L", 128), ("D", 512), ("H", 8), ("K", 1024)):
        p.add_argument(f"--{flag}", type=int, default=default)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--T", default="8,32", help="comma-separated horizons")
    p.add_argument("--precision", default="fp32,bf16", help="fp32 (TF32 on) and/or bf16 autocast")
    p.add_argument("--methods", default="bptt,checkpoint,mrbp,mrbp_graph,bptt_graph")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--check-T", type=int, default=3, help="0 skips the exact check")
    p.add_argument("--check-tol", type=float, default=1e-4)
    p.add_argument("--tol-fp32", type=float, default=2e-2, help="TF32 rel-error bound vs BPTT")
    p.add_argument("--tol-bf16", type=float, default=1e-1, help="bf16 rel-error bound vs BPTT")
    p.add_argument("--fit-gib", type=float, default=0.0, help="find the largest T in this many GiB")
    p.add_argument("--fit-max-T", type=int, default=2048)
    p.add_argument("--fit-step", type=float, default=0.05, help="bracket width of the fit")
    p.add_argument("--fit-repeat", type=int, default=1, help="timed runs at the fitted T")
    p.add_argument("--fit-rounds", type=int, default=5, help="runs to bracket the largest T")
    p.add_argument(
        "--write",
        choices=("torch", "fused"),
        default="torch",
        help="memory write: the torch op, or the fused Triton kernels",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if cuda() else "cpu")
    p.add_argument("--out", default=None, help="JSON path")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns (and writes to --out) the JSON payload."""
    args = parser().parse_args(argv)
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    model = build(args, device)
    exact = check_exact(model, args, device)
    print(f"gradient check (fp32, TF32 off, T={args.check_T}) rel err vs BPTT: {exact}", flush=True)
    rows: list[dict[str, Any]] = []
    payload: dict[str, Any] = {
        "benchmark": "mrbp_lm",
        "record": run_record(),
        "sizes": {
            k: getattr(args, k) for k in ("B", "L", "D", "H", "K", "vocab", "layers", "write")
        },
        "exact_check": {"T": args.check_T, "rel_err_vs_bptt": exact},
        "rows": rows,
    }
    for precision in args.precision.split(","):
        for T in (int(t) for t in args.T.split(",")):
            rows += bench_config(model, args, device, precision, T)
            write_json(args.out, payload)  # kept config by config: a cut-off run keeps its rows
    payload["markdown"] = markdown(rows)
    print(payload["markdown"], flush=True)
    fits = fit_memory(model, args, device, rows, args.fit_gib) if args.fit_gib and cuda() else []
    payload["fit"] = fits
    write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
