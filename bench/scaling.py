"""Scaling curves of the Memformer-lite LM: time and memory against T and against K.

    python -m bench.scaling --T 4,8,16,32,64 --K 64,256,1024,2048 --png-dir bench/results

For each method (default BPTT, MRBP and CUDA-graphed MRBP) one training iteration is timed
(median of ``--repeat`` after a warm-up) and its peak footprint measured, first against T at
the issue's K, then against K at ``--T-for-K``. MRBP's gradient is checked against BPTT's
at the first point of each sweep. Writes a JSON and two PNGs (time and memory panels).
"""

from __future__ import annotations

import gc
import os
from typing import Any

import torch

from bench.harness import cuda, median_time, peak_memory, rel_error, run_record, write_json
from bench.mrbp_lm import build, make_runner, random_batch
from bench.mrbp_lm import parser as lm_parser

__all__ = ["main", "plot"]


def _point(model, args, device, name: str, T: int) -> dict[str, Any]:
    tokens, targets = random_batch(T, args, device)
    row: dict[str, Any] = {"method": name, "T": T, "K": args.K}
    try:
        pool = 0
        if cuda():
            gc.collect()
            torch.cuda.empty_cache()
            before = torch.cuda.memory_reserved() - torch.cuda.memory_allocated()
        run = make_runner(name, model, tokens, targets, None, args)
        if cuda() and name.endswith("_graph"):
            torch.cuda.empty_cache()  # what stays reserved but unallocated: the graph pool
            pool = torch.cuda.memory_reserved() - torch.cuda.memory_allocated() - before
        row.update(median_time(run, repeat=args.repeat, warmup=1))
        mem = peak_memory(run)
        row["footprint_bytes"] = (
            None if mem["peak_allocated"] is None else mem["peak_allocated"] + pool
        )
        del run
    except torch.cuda.OutOfMemoryError:
        row["error"] = "OOM"
    model.zero_grad(set_to_none=False)
    print(row, flush=True)
    return row


def _check(model, args, device, T: int) -> float:
    tokens, targets = random_batch(T, args, device, seed=9)
    out = []
    for name in ("bptt", "mrbp"):
        model.zero_grad(set_to_none=False)
        make_runner(name, model, tokens, targets, None, args)()
        out.append([p.grad.clone() for p in model.parameters()])
    model.zero_grad(set_to_none=False)
    err = rel_error(out[1], out[0])
    assert err < args.tol_fp32, f"MRBP vs BPTT gradient rel error {err:.2e}"
    return err


def plot(rows: list[dict[str, Any]], key: str, path: str, title: str) -> None:
    """Two panels (s/iter, peak GiB) against ``key`` ('T' or 'K'), one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
    for name in dict.fromkeys(r["method"] for r in rows):
        pts = sorted((r[key], r) for r in rows if r["method"] == name and "median_s" in r)
        xs = [p[0] for p in pts]
        ax_t.plot(xs, [p[1]["median_s"] for p in pts], "o-", label=name)
        if all(p[1].get("footprint_bytes") for p in pts):
            ax_m.plot(xs, [p[1]["footprint_bytes"] / 2**30 for p in pts], "o-", label=name)
    for ax, ylabel in ((ax_t, "s / iteration"), (ax_m, "peak memory (GiB)")):
        ax.set_xlabel(key)
        ax.set_ylabel(ylabel)
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run both sweeps; returns (and writes) the JSON payload; draws PNGs into --png-dir."""
    p = lm_parser()
    p.set_defaults(T="4,8,16,32,64", methods="bptt,mrbp,mrbp_graph", repeat=3)
    p.add_argument("--K-list", default="64,256,1024,2048")
    p.add_argument("--T-for-K", type=int, default=8)
    p.add_argument("--png-dir", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    methods = [m for m in args.methods.split(",") if cuda() or not m.endswith("_graph")]
    model = build(args, device)
    Ts = [int(t) for t in args.T.split(",")]
    checks = {"T": _check(model, args, device, Ts[0])}
    rows_T = [_point(model, args, device, m, T) for T in Ts for m in methods]
    rows_K = []
    for K in (int(k) for k in args.K_list.split(",")):
        args.K = K
        model = build(args, device)
        if not rows_K:
            checks["K"] = _check(model, args, device, args.T_for_K)
        rows_K += [_point(model, args, device, m, args.T_for_K) for m in methods]
    pngs: list[str] = []
    payload = {
        "benchmark": "scaling",
        "record": run_record(),
        "grad_check_rel_err": checks,
        "rows_T": rows_T,
        "rows_K": rows_K,
        "pngs": pngs,
    }
    write_json(args.out, payload)  # before plotting: the numbers survive a plotting failure
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("matplotlib is not installed: no PNGs drawn")
        args.png_dir = None
    if args.png_dir:
        os.makedirs(args.png_dir, exist_ok=True)
        sizes = f"B={args.B} L={args.L} D={args.D} H={args.H} fp32/TF32"
        for rows, key, name, extra in (
            (rows_T, "T", "scaling-T.png", "K=1024"),
            (rows_K, "K", "scaling-K.png", f"T={args.T_for_K}"),
        ):
            path = f"{args.png_dir}/{name}"
            plot(rows, key, path, f"Memformer-lite LM, {sizes}, {extra}")
            pngs.append(path)
    write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
