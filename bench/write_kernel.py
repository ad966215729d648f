"""Memory write (slot attention + BMN): fused Triton kernels vs the batched-matmul torch op.

    python -m bench.write_kernel --B 16,64 --K 64,1024 --out bench/results/write-kernel-h200.json

Baseline: ``memory_write`` from backends/torch/memory.py (projections, (B, H, K, L+1) logits,
softmax, weighted sum, BMN as separate torch ops). Fused: ``fused_memory_write`` from
backends/torch/triton_write.py. Outputs and all six input gradients are checked against the
baseline before timing. The floor of each case is max(FLOPs / measured matmul rate,
bytes / measured copy bandwidth), with both ceilings measured in the same run (a
8192^3 matmul in the case's dtype, TF32 for float32; a 2 GiB device copy), and FLOPs /
bytes counted below (:func:`counts`).
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from bench.harness import cuda, median_time, rel_error, run_record, write_json
from memcore.backends.torch.memory import memory_write
from memcore.backends.torch.triton_write import HAVE_TRITON, fused_available, fused_memory_write

__all__ = ["ceilings", "counts", "main"]


def counts(B: int, K: int, L: int, D: int, itemsize: int) -> dict[str, float]:
    """FLOPs and fewest bytes of forward and forward+backward.

    Forward: [q | k_self] = M (D, 2D): 4BKD^2; [k_x | v_x] = x (D, 2D): 4BLD^2; logits and
    weighted sum: 2BKLD each. Backward: twice each projection (input and weight grads) and,
    with the logits recomputed, five (K, L) x dh products per head: 10BKLD.
    Bytes: every input read once and every output written once (memory, x, 3 weights, v_bias,
    y; plus dy, and d memory, dx, 3 weight grads, dv_bias for the backward).
    """
    proj = 4 * B * K * D * D + 4 * B * L * D * D
    att = 4 * B * K * L * D
    fwd_bytes = (2 * B * K * D + B * L * D + 3 * D * D + K * D) * itemsize
    bwd_bytes = (2 * B * K * D + B * L * D + 3 * D * D + K * D) * itemsize
    return {
        "fwd_flops": proj + att,
        "fwd_bwd_flops": 3 * proj + att + 10 * B * K * L * D,
        "fwd_bytes": fwd_bytes,
        "fwd_bwd_bytes": fwd_bytes + bwd_bytes + (B * K * D + B * L * D) * itemsize,
    }


def ceilings(dtype: torch.dtype) -> dict[str, float]:
    """Measured matmul FLOP/s (8192^3 in ``dtype``, random data) and copy bytes/s (2 GiB)."""
    n = 8192
    a, b = (
        torch.randn(n, n, device="cuda", dtype=dtype),
        torch.randn(n, n, device="cuda", dtype=dtype),
    )
    t_mm = median_time(lambda: a @ b, repeat=10, warmup=3)["median_s"]
    src = torch.randn(1 << 29, device="cuda")  # 2 GiB
    dst = torch.empty_like(src)
    t_cp = median_time(lambda: dst.copy_(src), repeat=10, warmup=3)["median_s"]
    return {"matmul_flops_per_s": 2 * n**3 / t_mm, "copy_bytes_per_s": 2 * src.numel() * 4 / t_cp}


def bench_case(B, K, L, D, H, dtype, device, repeat, ceil) -> dict[str, Any]:
    """One size: correctness check, then forward and forward+backward times of both versions."""
    g = torch.Generator(device="cpu").manual_seed(0)
    mk = lambda *s, sc=1.0: (torch.randn(*s, generator=g) * sc).to(device, dtype)
    ins = [mk(B, K, D), mk(B, L, D), *(mk(D, D, sc=D**-0.5) for _ in range(3)), mk(K, D)]
    ins = [t.requires_grad_(True) for t in ins]
    dy = mk(B, K, D)
    at = {"num_heads": H, "tau": 0.25}
    fns = {"torch": memory_write, "fused": fused_memory_write}
    row: dict[str, Any] = {
        "B": B,
        "K": K,
        "L": L,
        "D": D,
        "H": H,
        "dtype": str(dtype).replace("torch.", ""),
    }
    outs = {n: f(*ins, **at) for n, f in fns.items()}
    grads = {n: torch.autograd.grad(o, ins, dy) for n, o in outs.items()}
    row["out_rel_err"] = rel_error([outs["fused"]], [outs["torch"]])
    row["grad_rel_err"] = rel_error(grads["fused"], grads["torch"])
    tol = 3e-3 if dtype == torch.float32 else 3e-2
    assert row["out_rel_err"] < tol and row["grad_rel_err"] < tol, row
    for n, f in fns.items():
        with torch.no_grad():
            row[f"{n}_fwd_s"] = median_time(lambda f=f: f(*ins, **at), repeat=repeat)["median_s"]
        row[f"{n}_fwd_bwd_s"] = median_time(
            lambda f=f: torch.autograd.grad(f(*ins, **at), ins, dy), repeat=repeat
        )["median_s"]
    c = counts(B, K, L, D, ins[0].element_size())
    row.update(c)
    for stage in ("fwd", "fwd_bwd"):
        row[f"speedup_{stage}"] = row[f"torch_{stage}_s"] / row[f"fused_{stage}_s"]
        if ceil:
            floor = max(
                c[f"{stage}_flops"] / ceil["matmul_flops_per_s"],
                c[f"{stage}_bytes"] / ceil["copy_bytes_per_s"],
            )
            row[f"floor_{stage}_s"] = floor
            row[f"floor_bound_{stage}"] = (
                "compute" if c[f"{stage}_flops"] / ceil["matmul_flops_per_s"] >= floor else "memory"
            )
            for n in fns:
                row[f"{n}_{stage}_floor_fraction"] = floor / row[f"{n}_{stage}_s"]
    print(row, flush=True)
    return row


def markdown(rows: list[dict[str, Any]]) -> str:
    """The results table in Markdown."""
    lines = [
        (
            "| dtype | B | K | torch fwd us | fused fwd us | fwd speedup | torch f+b us "
            "| fused f+b us | f+b speedup | floor f+b us (bound) | fused / floor | torch / floor |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        fl = r.get("floor_fwd_bwd_s")
        lines.append(
            f"| {r['dtype']} | {r['B']} | {r['K']} | {r['torch_fwd_s'] * 1e6:.0f} | "
            f"{r['fused_fwd_s'] * 1e6:.0f} | {r['speedup_fwd']:.2f}x | "
            f"{r['torch_fwd_bwd_s'] * 1e6:.0f} | {r['fused_fwd_bwd_s'] * 1e6:.0f} | "
            f"{r['speedup_fwd_bwd']:.2f}x | "
            + (
                f"{fl * 1e6:.0f} ({r['floor_bound_fwd_bwd']}) | "
                f"{r['fused_fwd_bwd_floor_fraction']:.0%} | {r['torch_fwd_bwd_floor_fraction']:.0%} |"
                if fl
                else "- | - | - |"
            )
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns (and writes to --out) the JSON payload."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--B", default="16,64")
    p.add_argument("--K", default="64,1024")
    p.add_argument("--L", type=int, default=128)
    p.add_argument("--D", type=int, default=512)
    p.add_argument("--H", type=int, default=8)
    p.add_argument("--dtype", default="float32,bfloat16")
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--device", default="cuda" if cuda() else "cpu")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if not fused_available(device):
        reason = "triton is not installed" if not HAVE_TRITON else f"no Triton on {device}"
        raise SystemExit(f"fused write unavailable: {reason} (set TRITON_INTERPRET=1 on the CPU)")
    torch.backends.cuda.matmul.allow_tf32 = True
    rows, ceil_by = [], {}
    for dt in args.dtype.split(","):
        dtype = getattr(torch, dt)
        ceil_by[dt] = ceilings(dtype) if device.type == "cuda" else None
        for B in (int(b) for b in args.B.split(",")):
            for K in (int(k) for k in args.K.split(",")):
                rows.append(
                    bench_case(
                        B, K, args.L, args.D, args.H, dtype, device, args.repeat, ceil_by[dt]
                    )
                )
    extra = ("triton",) if HAVE_TRITON else ()
    payload = {
        "benchmark": "write_kernel",
        "record": run_record(extra),
        "ceilings": ceil_by,
        "rows": rows,
        "markdown": markdown(rows),
    }
    print(payload["markdown"])
    write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
