"""Transfer test of the SAB paper (Table 6): a copy model trained at T = 100, evaluated at
longer delays, from its checkpoint (so a run need not have finished).

Usage (repository root; memcore installed or ``source scripts/device_shim.sh``)::

    python scripts/sab_transfer_eval.py RUN_DIR [RUN_DIR ...] [--T 200 300 400 2000 5000]
        [--device cuda:0] [--size 512] [--batch 512]

Each RUN_DIR holds ``checkpoint.npz`` (from ``memcore train``); the model is evaluated
with the torch key-bank forward (``memcore.train.fast_torch.evaluate``: the run's held-out
stream at each T, last-n_digits accuracy and CE) and the result is written to
``RUN_DIR/transfer.json``: {"step": ..., "T": {"100": {...}, "200": {...}, ...}, "seconds"}.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import attrs

__all__ = ["evaluate_run", "main"]


def evaluate_run(run_dir: pathlib.Path, Ts: list[int], *, device: str, size: int, batch: int,
                 dtype: str = "float32") -> dict:  # fmt: skip
    """Evaluate the checkpoint in ``run_dir`` at every T in ``Ts`` (plus the trained T)."""
    import torch

    from memcore.backends.torch._common import torch_dtype
    from memcore.train.checkpoint import load_checkpoint
    from memcore.train.config import parse_config
    from memcore.train.fast_torch import evaluate

    ckpt = load_checkpoint(run_dir / "checkpoint.npz")
    params = {k: torch.as_tensor(v, dtype=torch_dtype(dtype), device=device)
              for k, v in ckpt.params.items()}  # fmt: skip
    config = parse_config(ckpt.config)
    config = attrs.evolve(config, run=attrs.evolve(config.run, eval_size=size, eval_batch=batch))
    out: dict = {"step": ckpt.step, "device": device, "eval_size": size, "T": {}}
    t0 = time.perf_counter()
    for T in [config.task.T, *Ts]:
        t1 = time.perf_counter()
        metrics = evaluate(config, params, T=T, dtype=dtype, device=device)
        out["T"][str(T)] = {**metrics, "seconds": time.perf_counter() - t1}
        print(f"{run_dir.name}: T={T} step={ckpt.step} {metrics}", flush=True)
    out["seconds"] = time.perf_counter() - t0
    (run_dir / "transfer.json").write_text(json.dumps(out, indent=1))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=pathlib.Path)
    p.add_argument("--T", nargs="+", type=int, default=[200, 300, 400, 2000, 5000])
    p.add_argument("--device", default="cpu")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--batch", type=int, default=512)
    args = p.parse_args(argv)
    for run in args.runs:
        if not (run / "checkpoint.npz").is_file():
            print(f"{run}: no checkpoint.npz, skipped", file=sys.stderr)
            continue
        evaluate_run(run, args.T, device=args.device, size=args.size, batch=args.batch)
    return 0


if __name__ == "__main__":
    sys.exit(main())
