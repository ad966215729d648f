"""SAB sparse replay vs full BPTT vs LSTM + dense attention BPTT (issue 7, benchmark 4).

    python -m bench.sab_replay --T 1000,2000,5000 --out bench/results/sab-replay-h200.json

SAB-LSTM with hidden Hd=128, batch 64, k_top=5, k_att=10, k_trunc=10 (memcore's torch
routing drivers). Methods, each one training pass (forward + gradient) over a sequence:

- ``sparse_replay``: ``routing.sab_sparse_replay`` (chunk-boundary states + memory vectors
  kept; chunks replayed last to first).
- ``sab_bptt``: ``routing.sab_bptt``, the same truncated gradient from the whole graph.
- ``bptt``: ``routing.bptt("sab")``, no chunk cuts: full BPTT of the same model.
- ``dense_bptt``: LSTM + dense attention, full BPTT: the same cell and scorer, but a softmax
  over all memories instead of the top-k sparsifier (so every memory gets gradient).

Before timing, sparse replay's gradient is checked against ``sab_bptt``'s (the contract's
equivalence) at ``--check-T``. Memory: allocator peak during the timed runs, plus the
stored-state bytes (memory vectors + boundary states) to test "grows no faster than the
stored memories".
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from bench.harness import cuda, median_time, rel_error, run_record, sync, write_json
from memcore.backends.torch.lstm import lstm_cell
from memcore.backends.torch.modules import SABCell
from memcore.backends.torch.routing import bptt, sab_bptt, sab_sparse_replay
from memcore.backends.torch.sab import sab_scores
from memcore.backends.torch.steps import stack_memories
from memcore.config import SABConfig

__all__ = ["dense_bptt", "main", "stored_bytes"]


def dense_bptt(params, xs, state0, targets, *, config: SABConfig) -> dict[str, torch.Tensor]:
    """LSTM + dense (softmax) attention over the SAB memories, full BPTT: grads by name."""
    P = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    h, c = state0
    memories: list[torch.Tensor] = []
    total = xs.new_zeros(())
    for t in range(1, xs.shape[0] + 1):
        h_hat, c = lstm_cell(xs[t - 1], h, c, P["lstm_w"], P["lstm_b"])
        if memories:
            m = stack_memories(memories, h_hat)
            w = torch.softmax(sab_scores(h_hat, m, P["w1"], P["w2"], P["w3"]), dim=-1)
            s = (w.unsqueeze(1) @ m).squeeze(1)
        else:
            s = torch.zeros_like(h_hat)
        h = h_hat + s
        y = h @ P["v1"] + s @ P["v2"] + P["b_y"]
        total = total + ((y - targets[t - 1]) ** 2).mean()
        if t % config.k_att == 0:
            memories.append(h)
    grads = torch.autograd.grad(total, list(P.values()), allow_unused=True)
    return {k: torch.zeros_like(v) if g is None else g for (k, v), g in zip(P.items(), grads)}


def stored_bytes(T: int, B: int, Hd: int, config: SABConfig, itemsize: int = 4) -> int:
    """Bytes sparse replay must keep: memory vectors (B, Hd) every k_att steps, plus (h, c)
    entering each chunk."""
    n_mem = T // config.k_att
    n_chunks = -(-T // config.k_trunc)
    return (n_mem + 2 * n_chunks) * B * Hd * itemsize


def _problem(args: argparse.Namespace, T: int, device, seed: int):
    torch.manual_seed(seed)
    cfg = SABConfig(k_top=args.k_top, k_att=args.k_att, k_trunc=args.k_trunc)
    cell = SABCell(args.I, args.Hd, args.O, args.A, cfg, device=device)
    params = {k: v.detach() for k, v in cell.params().items()}
    xs = torch.randn(T, args.B, args.I, device=device)
    h0 = 0.1 * torch.randn(args.B, args.Hd, device=device)
    state0 = (h0, 0.1 * torch.randn(args.B, args.Hd, device=device))
    targets = torch.randn(T, args.B, args.O, device=device)
    return cfg, params, xs, state0, targets


def _runner(name: str, cfg, params, xs, state0, targets):
    if name == "sparse_replay":
        return lambda: sab_sparse_replay(params, xs, state0, targets, config=cfg).grads
    if name == "sab_bptt":
        return lambda: sab_bptt(params, xs, state0, targets, config=cfg).grads
    if name == "bptt":
        return lambda: bptt("sab", params, xs, state0, targets, config=cfg).grads
    if name == "dense_bptt":
        return lambda: dense_bptt(params, xs, state0, targets, config=cfg)
    raise ValueError(name)


def check(args: argparse.Namespace, device) -> float:
    """Sparse replay's gradient vs sab_bptt's at --check-T; asserts rel error < --check-tol."""
    cfg, params, xs, state0, targets = _problem(args, args.check_T, device, seed=5)
    got = _runner("sparse_replay", cfg, params, xs, state0, targets)()
    want = _runner("sab_bptt", cfg, params, xs, state0, targets)()
    err = rel_error([got[k] for k in want], list(want.values()))
    assert err < args.check_tol, f"sparse replay vs sab_bptt gradient rel error {err:.2e}"
    return err


def bench(args: argparse.Namespace, device, name: str, T: int) -> dict[str, Any]:
    """One method at one T: s/sequence and peak memory (allocator) during the timed runs."""
    cfg, params, xs, state0, targets = _problem(args, T, device, seed=0)
    row: dict[str, Any] = {"method": name, "T": T}
    run = _runner(name, cfg, params, xs, state0, targets)
    try:
        if cuda():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        run()  # warm-up, also sizes the repeat count against the budget
        sync()
        first = time.perf_counter() - t0
        repeat = args.repeat
        if first * (repeat + 1) > args.config_budget_s:
            repeat = max(args.min_repeat, int(args.config_budget_s / first) - 1)
            row["repeat_reduced_to"] = repeat
        if repeat == 0:  # budget forces it: the one run (after the small-T warm-up) is the sample
            row.update(median_s=first, min_s=first, max_s=first, samples_s=[first])
        else:
            row.update(median_time(run, repeat=repeat, warmup=0))
        if cuda():
            row["peak_allocated"] = torch.cuda.max_memory_allocated()
            row["peak_above_base"] = row["peak_allocated"] - base
        if name == "sparse_replay":
            res = sab_sparse_replay(params, xs, state0, targets, config=cfg)
            row["peak_cache_bytes_accounted"] = res.peak_cache_bytes
            row["stored_bytes"] = stored_bytes(T, args.B, args.Hd, cfg)
    except torch.cuda.OutOfMemoryError as exc:
        row["error"] = f"OOM: {str(exc)[:160]}"
    del run
    print(row_text(row), flush=True)
    return row


def row_text(r: dict[str, Any]) -> str:
    if "error" in r:
        return f"T={r['T']} {r['method']}: {r['error']}"
    mib = (r.get("peak_above_base") or 0) / 2**20
    return f"T={r['T']:>5} {r['method']:<14} {r['median_s']:8.3f} s/seq  peak {mib:9.1f} MiB"


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's goals: replay memory growth beyond stored state; replay vs dense memory."""
    by = {(r["method"], r["T"]): r for r in rows if "error" not in r}
    Ts = sorted({r["T"] for r in rows})
    out: dict[str, Any] = {}
    lo, hi = Ts[0], Ts[-1]
    a, b = by.get(("sparse_replay", lo)), by.get(("sparse_replay", hi))
    if a and b and a.get("peak_above_base"):
        grow = (b["peak_above_base"] - b["stored_bytes"]) / (
            a["peak_above_base"] - a["stored_bytes"]
        )
        out["replay_growth_beyond_stored"] = {"from_T": lo, "to_T": hi, "ratio": grow, "goal": 1.3}
    d = by.get(("dense_bptt", hi))
    if b and d and d.get("peak_above_base"):
        out["replay_vs_dense_memory"] = {
            "T": hi,
            "ratio": b["peak_above_base"] / d["peak_above_base"],
            "goal": 0.1,
        }
    for T in Ts:
        base = by.get(("bptt", T))
        for r in rows:
            if r["T"] == T and base and "median_s" in r:
                r["speed_vs_bptt"] = base["median_s"] / r["median_s"]
                if r.get("peak_above_base") and base.get("peak_above_base"):
                    r["memory_vs_bptt"] = r["peak_above_base"] / base["peak_above_base"]
    return out


def markdown(rows: list[dict[str, Any]]) -> str:
    """The results table in Markdown."""
    lines = [
        "| T | method | s/sequence | speed vs BPTT | peak MiB (above inputs) | memory vs BPTT | repeats |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['T']} | {r['method']} | {r['error']} | | | | |")
            continue
        mib = r.get("peak_above_base")
        lines.append(
            f"| {r['T']} | {r['method']} | {r['median_s']:.3f} | {r.get('speed_vs_bptt', 0):.2f}x | "
            f"{'-' if mib is None else f'{mib / 2**20:.1f}'} | {r.get('memory_vs_bptt', 0):.3f}x | "
            f"{len(r['samples_s'])} |"
        )
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    for flag, default in (("B", 64), ("Hd", 128), ("I", 16), ("O", 16), ("A", 32)):
        p.add_argument(f"--{flag}", type=int, default=default)
    for flag, default in (("k-top", 5), ("k-att", 10), ("k-trunc", 10)):
        p.add_argument(f"--{flag}", type=int, default=default)
    p.add_argument("--T", default="1000,2000,5000")
    p.add_argument("--methods", default="bptt,sab_bptt,sparse_replay,dense_bptt")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--min-repeat", type=int, default=3)
    p.add_argument("--config-budget-s", type=float, default=30.0, help="per (method, T)")
    p.add_argument("--warmup-T", type=int, default=0, help="warm every method up at this T first")
    p.add_argument("--check-T", type=int, default=40)
    p.add_argument("--check-tol", type=float, default=1e-4)
    p.add_argument("--device", default="cuda" if cuda() else "cpu")
    p.add_argument(
        "--score-block",
        type=int,
        default=None,
        help="memories x batch x A scored per block in the torch SAB drivers "
        "(memcore.backends.torch.sab.SCORE_BLOCK_ELEMENTS; default: the library's)",
    )
    p.add_argument("--out", default=None)
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns (and writes to --out) the JSON payload."""
    args = parser().parse_args(argv)
    if args.score_block is not None:
        from memcore.backends.torch import sab as torch_sab

        torch_sab.SCORE_BLOCK_ELEMENTS = args.score_block
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False  # tiny matmuls: fp32 keeps the check exact
    err = check(args, device)
    print(f"gradient check: sparse replay vs sab_bptt rel err {err:.2e} (T={args.check_T})")
    payload: dict[str, Any] = {
        "benchmark": "sab_replay",
        "record": run_record(),
        "sizes": {
            k: getattr(args, k) for k in ("B", "Hd", "I", "O", "A", "k_top", "k_att", "k_trunc")
        },
        "check": {"T": args.check_T, "rel_err_replay_vs_sab_bptt": err},
        "score_block_elements": args.score_block,
        "rows": [],
    }
    if args.warmup_T:
        for name in args.methods.split(","):  # kernels, cuBLAS handles: out of the timed runs
            _runner(name, *_problem(args, args.warmup_T, device, seed=0))()
        sync()
    for T in args.T.split(","):
        for name in args.methods.split(","):
            payload["rows"].append(bench(args, device, name, int(T)))
            write_json(args.out, payload)  # kept row by row: a cut-off run keeps its rows
    rows = payload["rows"]
    goals = summarize(rows)
    payload.update(goals=goals, markdown=markdown(rows))
    print(payload["markdown"])
    print(goals)
    write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
