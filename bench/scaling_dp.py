"""Data-parallel scaling over 1..N devices: the Memformer LM with MRBP and SAB on the copy task.

    python -m bench.scaling_dp --out bench/results/scaling-dp.json   # N = the visible GPUs
    python -m bench.scaling_dp --smoke --out /tmp/dp.json            # CPU (gloo), tiny, N = 1

Weak scaling: each device keeps its batch (``--lm-batch``, ``--sab-batch``), so N devices
train a global batch N times larger. For each N, N processes (one per GPU, NCCL; gloo on
the CPU) time one training step per workload and mode (median of ``--repeat`` after
``--warmup``, synchronized) and measure each device's peak memory:

* ``lm_mrbp``: one MRBP rollout of memcore's MemformerLM (``mrbp_model.mrbp``, eager) over
  ``--segments`` segments of ``--tokens`` tokens. Modes: ``none`` (no communication: the
  single-device baseline, N = 1), ``reduce`` (the gradients as views of one flat buffer,
  all-reduced once after the rollout: ``distributed.GradBuffer``, what ``memcore train``
  does) and ``ddp`` (DistributedDataParallel; segments T-1..1 replay under ``no_sync``).
* ``sab_copy``: ``memcore train``'s compiled SAB step (``fast_torch.TrainStep``: sparse
  replay, clipping, Adam; one CUDA graph on GPUs) on the copy task of ``--sab-config``.
  Modes: ``none`` and ``reduce`` (the all-reduce inside the step and its graph). If a
  graph cannot be captured, the mode is also run without one (``*_eager``).

Tokens/s counts every device's tokens (LM: N B T L tokens; SAB: N B T time steps) over the
step time of rank 0. ``overhead`` is the per-device cost of a wrapper at N = 1,
time(mode) / time(none) - 1 (goal <= 5 %); ``efficiency`` is tokens/s at N over N times the
N = 1 baseline's.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import tempfile
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bench.harness import median_time, peak_memory, run_record, write_json

__all__ = ["main", "parser"]

_ROOT = pathlib.Path(__file__).resolve().parent.parent


def parser() -> argparse.ArgumentParser:
    """The benchmark's arguments (GPU-sized defaults; ``--smoke`` shrinks everything)."""
    p = argparse.ArgumentParser(prog="python -m bench.scaling_dp", description=__doc__)
    p.add_argument("--devices", type=int, default=None,
                   help="largest N (default: the visible GPUs; 1 on the CPU)")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--slots", type=int, default=64)
    p.add_argument("--segments", type=int, default=16, help="T, segments per rollout")
    p.add_argument("--tokens", type=int, default=128, help="L, tokens per segment")
    p.add_argument("--lm-batch", type=int, default=16, help="LM sequences per device")
    p.add_argument("--sab-config", default=str(_ROOT / "configs" / "copy_sab_t100.toml"))
    p.add_argument("--sab-batch", type=int, default=64, help="SAB sequences per device")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (CPU smoke test)")
    p.add_argument("--out", default=None, help="JSON file to write")
    return p  # fmt: skip


def _smoke(args: argparse.Namespace) -> argparse.Namespace:
    small = dict(repeat=1, warmup=1, vocab=32, dim=16, heads=2, layers=1, slots=4, segments=3,
                 tokens=4, lm_batch=2, sab_batch=2)  # fmt: skip
    return argparse.Namespace(**{**vars(args), **small})


def _sab_config(args: argparse.Namespace, world: int) -> Any:
    import attrs

    from memcore.train import parse_config
    from memcore.train.config import load_config

    if args.smoke:
        config = parse_config({
            "task": {"name": "copy", "T": 4, "n_digits": 2, "n_symbols": 3},
            "model": {"kind": "sab", "hidden": 6, "k_top": 2, "k_att": 2},
            "routing": {"method": "sparse_replay", "k_trunc": 3},
            "run": {"steps": 100, "batch_size": 2},
        })  # fmt: skip
    else:
        config = load_config(args.sab_config)
    run = attrs.evolve(config.run, batch_size=args.sab_batch * world)
    return attrs.evolve(config, run=run)


# ----------------------------------------------------------------------------- workers
def _measure(name: str, mode: str, fn, tokens: int, repeat: int, warmup: int) -> dict[str, Any]:
    row: dict[str, Any] = {"workload": name, "mode": mode, "tokens_per_device": tokens}
    try:
        dist.barrier()
        row.update(median_time(fn, repeat=repeat, warmup=warmup))
        row["peak_allocated"] = peak_memory(fn)["peak_allocated"]
    except Exception as exc:  # noqa: BLE001 - a failing mode (OOM, capture) is recorded
        row["error"] = f"{type(exc).__name__}: {exc}"[:300]
    return row


def _lm(args, dev: torch.device, rank: int, world: int) -> list[dict[str, Any]]:
    from torch.nn.parallel import DistributedDataParallel

    from memcore.backends.torch.memformer import MemformerLM
    from memcore.backends.torch.mrbp_model import mrbp
    from memcore.models import MemformerConfig
    from memcore.train.distributed import GradBuffer

    torch.manual_seed(0)
    c = MemformerConfig(vocab=args.vocab, dim=args.dim, heads=args.heads, layers=args.layers,
                        slots=args.slots, ffn_mult=4)  # fmt: skip
    model = MemformerLM(c, dtype=getattr(torch, args.dtype), device=dev)
    T, B, L = args.segments, args.lm_batch, args.tokens
    gen = torch.Generator().manual_seed(1 + rank)
    segments = {
        "tokens": torch.randint(0, args.vocab, (T, B, L), generator=gen).to(dev),
        "targets": torch.randint(0, args.vocab, (T, B, L), generator=gen).to(dev),
    }
    buffer = GradBuffer(dict(model.named_parameters()), world)
    ddp = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)

    def none() -> None:
        model.zero_grad(set_to_none=False)
        mrbp(model, model.init_memory(B), segments)

    def reduce() -> None:
        model.zero_grad(set_to_none=False)
        out = mrbp(model, model.init_memory(B), segments)
        buffer.all_reduce(out.loss)

    def with_ddp() -> None:
        model.zero_grad(set_to_none=False)
        mrbp(ddp, model.init_memory(B), segments)  # the DDP step is detected as ddp

    modes = {"none": none, "reduce": reduce, "ddp": with_ddp}
    if world > 1:
        del modes["none"]
    return [
        _measure("lm_mrbp", mode, fn, T * B * L, args.repeat, args.warmup)
        for mode, fn in modes.items()
    ]


def _sab(args, dev: torch.device, rank: int, world: int) -> list[dict[str, Any]]:
    from memcore.train.distributed import DataParallel
    from memcore.train.fast_torch import TrainStep
    from memcore.train.model import init_params
    from memcore.train.optim import AdamState
    from memcore.train.tasks import STREAM_INIT, STREAM_TRAIN, batch_rng, make_batch

    config = _sab_config(args, world)
    params = init_params(config, batch_rng(config.run.seed, STREAM_INIT, 0))
    zeros = {k: np.zeros_like(v) for k, v in params.items()}
    batch = make_batch(config.task, batch_rng(config.run.seed, STREAM_TRAIN, 0),
                       config.run.batch_size)  # fmt: skip
    rows = slice(rank * args.sab_batch, (rank + 1) * args.sab_batch)
    local = type(batch)(batch.xs[:, rows], batch.targets[:, rows], batch.weights)
    tokens = int(local.xs.shape[0] * local.xs.shape[1])
    dp = DataParallel("torch", rank, world)
    out = []
    for mode in (["none"] if world == 1 else []) + ["reduce"]:
        for graph in (None, False):  # None: a CUDA graph on GPUs; False: the eager fallback
            step = TrainStep(config, params, AdamState(0, zeros, dict(zeros)), dtype=args.dtype,
                             device=str(dev), graph=graph, dp=None if mode == "none" else dp)
            name = mode if graph is None else f"{mode}_eager"
            row = _measure("sab_copy", name, lambda s=step: s(local), tokens, args.repeat,
                           args.warmup)  # fmt: skip
            row["graph"] = bool(step.graph)
            out.append(row)
            if "error" not in row or dev.type != "cuda":
                break
    return out


def _worker(rank: int, world: int, init_file: str, args: argparse.Namespace, out: str) -> None:
    """One rank: join the group, time every workload and mode, write rank<r>.json."""
    cuda = torch.cuda.is_available()
    dev = torch.device(f"cuda:{rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(dev)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{init_file}",
                            rank=rank, world_size=world)  # fmt: skip
    try:
        rows = _lm(args, dev, rank, world) + _sab(args, dev, rank, world)
    finally:
        dist.destroy_process_group()
    pathlib.Path(out, f"rank{rank}.json").write_text(json.dumps(rows))


# ----------------------------------------------------------------------------- main
def _merge(world: int, per_rank: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Rank 0's times; peak memory per device = the largest over the ranks."""
    merged = []
    for i, row in enumerate(per_rank[0]):
        row = {"devices": world, **row}
        peaks = [r[i].get("peak_allocated") for r in per_rank]
        row["peak_allocated"] = None if None in peaks else max(peaks)
        if "median_s" in row:
            row["tokens_per_s"] = world * row["tokens_per_device"] / row["median_s"]
        merged.append(row)
    return merged


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    base = {r["workload"]: r for r in rows if r["devices"] == 1 and r["mode"] == "none"
            and "median_s" in r}  # fmt: skip
    overhead, efficiency = {}, {}
    for r in rows:
        b = base.get(r["workload"])
        if b is None or "median_s" not in r or r["mode"] == "none":
            continue
        key = f"{r['workload']}/{r['mode']}"
        if r["devices"] == 1:
            overhead[key] = r["median_s"] / b["median_s"] - 1.0
        else:
            ratio = r["tokens_per_s"] / (r["devices"] * b["tokens_per_s"])
            efficiency[f"{key}/N={r['devices']}"] = ratio
    return {"overhead_at_1": overhead, "efficiency": efficiency}


def _table(rows: list[dict[str, Any]]) -> str:
    head = f"{'workload':9} {'mode':12} {'N':>2} {'step ms':>9} {'tokens/s':>12} {'peak MiB':>9}"
    lines = [head]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['workload']:9} {r['mode']:12} {r['devices']:>2} error {r['error']}")
            continue
        mib = "-" if r["peak_allocated"] is None else f"{r['peak_allocated'] / 2**20:.1f}"
        lines.append(f"{r['workload']:9} {r['mode']:12} {r['devices']:>2} "
                     f"{1e3 * r['median_s']:9.2f} {r['tokens_per_s']:12.0f} {mib:>9}")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run N = 1..--devices, print the table and the overheads, write ``--out``."""
    args = parser().parse_args(argv)
    if args.smoke:
        args = _smoke(args)
    n_max = args.devices or (torch.cuda.device_count() if torch.cuda.is_available() else 1)
    rows: list[dict[str, Any]] = []
    for world in range(1, n_max + 1):
        with tempfile.TemporaryDirectory() as tmp:
            mp.spawn(_worker, args=(world, f"{tmp}/init", args, tmp), nprocs=world, join=True)
            per_rank = [json.loads(pathlib.Path(tmp, f"rank{r}.json").read_text())
                        for r in range(world)]  # fmt: skip
        rows += _merge(world, per_rank)
        print(_table([r for r in rows if r["devices"] == world]), flush=True)
    summary = _summary(rows)
    for key, value in summary["overhead_at_1"].items():
        print(f"overhead at N=1 {key}: {100 * value:+.1f} % (goal <= 5 %)")
    for key, value in summary["efficiency"].items():
        print(f"scaling efficiency {key}: {value:.2f}")
    result = {"record": run_record(), "args": vars(args), "rows": rows, **summary}
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
