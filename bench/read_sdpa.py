"""Memory read: torch SDPA vs the batched-matmul formulation (issue 7, benchmark 3).

    python -m bench.read_sdpa --B 16 --L 128 --K 64,1024 --out bench/results/read-sdpa-h200.json

``memory_read`` (backends/torch/attention.py) projects with (D, D) matmuls and then attends
with ``F.scaled_dot_product_attention``. Here that attention step is timed against the
explicit ``softmax(q k^T * scale) v`` in batched matmuls, forward and forward+backward, with
the projections included (the whole op as callers see it), and with SDPA restricted to each
of its kernels (flash, efficient, math) to show which one torch picks. Outputs and
gradients of every variant are checked against the matmul version before timing.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from bench.harness import cuda, median_time, rel_error, run_record, write_json
from memcore.backends.torch._common import merge_heads, split_heads

__all__ = ["main", "read_matmul", "read_sdpa"]


def read_matmul(x, memory, wq, wk, wv, wo, *, num_heads: int) -> torch.Tensor:
    """The reference formulation: explicit (B, H, L, K) scores, softmax, then @ v."""
    scale = 1.0 / math.sqrt(x.shape[-1] // num_heads)
    q = split_heads(x @ wq, num_heads)
    k = split_heads(memory @ wk, num_heads)
    v = split_heads(memory @ wv, num_heads)
    a = torch.softmax((q @ k.transpose(-1, -2)) * scale, dim=-1)
    return merge_heads(a @ v) @ wo


def read_sdpa(x, memory, wq, wk, wv, wo, *, num_heads: int, backend=None) -> torch.Tensor:
    """The same read through SDPA, optionally restricted to one SDPA ``backend``."""
    scale = 1.0 / math.sqrt(x.shape[-1] // num_heads)
    q = split_heads(x @ wq, num_heads)
    k = split_heads(memory @ wk, num_heads)
    v = split_heads(memory @ wv, num_heads)
    if backend is None:
        o = F.scaled_dot_product_attention(q, k, v, scale=scale)
    else:
        from torch.nn.attention import sdpa_kernel

        with sdpa_kernel([backend]):
            o = F.scaled_dot_product_attention(q, k, v, scale=scale)
    return merge_heads(o) @ wo


def _variants() -> dict[str, Callable[..., torch.Tensor]]:
    out: dict[str, Callable[..., torch.Tensor]] = {"matmul": read_matmul, "sdpa": read_sdpa}
    try:
        from torch.nn.attention import SDPBackend
    except ImportError:  # older torch: only the default dispatch is measured
        return out
    for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH"):
        be = getattr(SDPBackend, name)
        out[f"sdpa[{name.lower()}]"] = lambda *a, _be=be, **k: read_sdpa(*a, backend=_be, **k)
    return out


def bench_case(B, L, K, D, H, dtype, device, repeat) -> list[dict[str, Any]]:
    """Every variant at one size: forward and forward+backward times, errors vs matmul."""
    g = torch.Generator(device="cpu").manual_seed(0)
    mk = lambda *s, sc=1.0: (torch.randn(*s, generator=g) * sc).to(device, dtype)
    x, mem = mk(B, L, D), mk(B, K, D)
    ws = [mk(D, D, sc=D**-0.5) for _ in range(4)]
    leaves = [t.requires_grad_(True) for t in (x, mem, *ws)]
    dy = mk(B, L, D)

    def fwd_bwd(fn):
        out = fn(*leaves, num_heads=H)
        return torch.autograd.grad(out, leaves, dy)

    ref_out = read_matmul(*leaves, num_heads=H).detach()
    ref_grads = fwd_bwd(read_matmul)
    rows = []
    for name, fn in _variants().items():
        row: dict[str, Any] = {
            "variant": name,
            "B": B,
            "L": L,
            "K": K,
            "D": D,
            "H": H,
            "dtype": str(dtype).replace("torch.", ""),
        }
        try:
            with torch.no_grad():
                row["out_rel_err"] = rel_error([fn(*leaves, num_heads=H)], [ref_out])
            row["grad_rel_err"] = rel_error(fwd_bwd(fn), ref_grads)
            tol = 2e-2 if dtype != torch.float32 else 5e-3
            assert row["out_rel_err"] < tol and row["grad_rel_err"] < tol, row
            with torch.no_grad():
                fwd = lambda f=fn: f(*leaves, num_heads=H)
                row["fwd_s"] = median_time(fwd, repeat=repeat)["median_s"]
            row["fwd_bwd_s"] = median_time(lambda f=fn: fwd_bwd(f), repeat=repeat)["median_s"]
        except RuntimeError as exc:  # a kernel that does not support this dtype / size
            row["error"] = f"{type(exc).__name__}: {str(exc)[:160]}"
        rows.append(row)
    base = rows[0]
    for r in rows:
        if "fwd_s" in r:
            r["fwd_speed_vs_matmul"] = base["fwd_s"] / r["fwd_s"]
            r["fwd_bwd_speed_vs_matmul"] = base["fwd_bwd_s"] / r["fwd_bwd_s"]
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    """The results table in Markdown."""
    lines = [
        "| B | K | dtype | variant | fwd us | fwd+bwd us | fwd vs matmul | fwd+bwd vs matmul |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(
                f"| {r['B']} | {r['K']} | {r['dtype']} | {r['variant']} | {r['error']} | | | |"
            )
            continue
        lines.append(
            f"| {r['B']} | {r['K']} | {r['dtype']} | {r['variant']} | {r['fwd_s'] * 1e6:.1f} | "
            f"{r['fwd_bwd_s'] * 1e6:.1f} | {r['fwd_speed_vs_matmul']:.2f}x | "
            f"{r['fwd_bwd_speed_vs_matmul']:.2f}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns (and writes to --out) the JSON payload."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--B", default="16,64")
    p.add_argument("--L", type=int, default=128)
    p.add_argument("--K", default="64,1024")
    p.add_argument("--D", type=int, default=512)
    p.add_argument("--H", type=int, default=8)
    p.add_argument("--dtype", default="float32,bfloat16")
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--device", default="cuda" if cuda() else "cpu")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = True
    device = torch.device(args.device)
    rows = []
    for dt in args.dtype.split(","):
        for B in (int(b) for b in args.B.split(",")):
            for K in (int(k) for k in args.K.split(",")):
                rows += bench_case(
                    B, args.L, K, args.D, args.H, getattr(torch, dt), device, args.repeat
                )
    choice = {}
    for r in rows:
        if r["variant"] in ("matmul", "sdpa") and "fwd_bwd_s" in r:
            key = f"B={r['B']} K={r['K']} {r['dtype']}"
            choice.setdefault(key, {})[r["variant"]] = r["fwd_bwd_s"]
    winners = {k: min(v, key=v.get) for k, v in choice.items()}
    payload = {
        "benchmark": "read_sdpa",
        "record": run_record(),
        "rows": rows,
        "winner_fwd_bwd": winners,
        "markdown": markdown(rows),
    }
    print(payload["markdown"])
    print("winner (fwd+bwd):", winners)
    write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
