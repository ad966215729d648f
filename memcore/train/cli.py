"""``memcore train CONFIG.toml [--backend NAME] [--device DEV] [--resume] [--out DIR]``.

:func:`main` takes the arguments that follow ``memcore train`` and returns the exit
status: 0 after training, 2 for a bad setup (unknown backend, missing device, a config
error, a routing the model cannot use, an output folder that cannot be written, a checkpoint
that cannot be resumed, ...), reported in one line on stderr before any training step runs,
and 130 (the shell's code for SIGINT) after an interrupt: the last finished step is
checkpointed and one line says how to continue.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence

from memcore.errors import MemcoreError

__all__ = ["build_parser", "main"]

USAGE_ERROR = 2
INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a Ctrl-C


def build_parser(prog: str = "memcore train") -> argparse.ArgumentParser:
    """The argument parser of ``memcore train``."""
    p = argparse.ArgumentParser(
        prog=prog,
        description="Train a memory-augmented model (SAB or Memformer) from a TOML config; "
        "writes checkpoint.npz, results.json and curves.png to the output folder.",
    )
    p.add_argument("config", metavar="CONFIG.toml", help="training config (see configs/)")
    p.add_argument(
        "--backend",
        default=None,
        help="numpy | torch | jax | cupy | pkg.module:factory (default: MEMCORE_BACKEND, "
        "then backend in ./memcore.toml or [tool.memcore] in ./pyproject.toml, then numpy)",
    )
    p.add_argument(
        "--device", default=None, help="cpu | cuda:0 | ... (default: the backend's default)"
    )
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    p.add_argument(
        "--switch-backend",
        action="store_true",
        help="with --resume: continue on a backend other than the checkpoint's "
        "(recorded in results.json 'backends')",
    )
    p.add_argument("--out", default=None, metavar="DIR", help="output folder (default: [run] out)")
    p.add_argument(
        "--stop-after",
        type=int,
        default=None,
        metavar="N",
        help="checkpoint and stop after N steps of this call (finish later with --resume)",
    )
    p.add_argument(
        "--devices",
        default=None,
        metavar="all|N",
        help="jax: shard the global batch over all (or N) local devices; torch runs "
        "data-parallel under torchrun --nproc-per-node N (docs/distributed.md)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress output")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``memcore train`` with ``argv`` (the arguments after ``train``); returns the exit
    code (0 done, 2 bad setup, 130 interrupted with the last finished step checkpointed)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _main(argv)
    except KeyboardInterrupt as exc:
        print(f"memcore train: {_interrupted(exc, argv)}", file=sys.stderr)
        return INTERRUPTED


def _interrupted(exc: KeyboardInterrupt, argv: list[str]) -> str:
    """The one line printed after an interrupt: what was saved and how to continue."""
    from memcore.train.trainer import CHECKPOINT, TrainingInterrupted

    if not isinstance(exc, TrainingInterrupted) or not exc.saved:
        return "interrupted before the first step finished; nothing was saved"
    again, skip = [], False
    for a in argv:  # the same command, without a stop budget, with --resume
        if skip or a in ("--resume", "--switch-backend") or a.startswith("--stop-after="):
            skip = False
            continue
        skip = a == "--stop-after"
        if not skip:
            again.append(a)
    out = exc.out
    if not any(a == "--out" or a.startswith("--out=") for a in again):
        again += ["--out", str(out)]
    command = " ".join(shlex.quote(a) for a in ["memcore", "train", *again, "--resume"])
    return (
        f"interrupted; step {exc.steps_done} is saved in {out / CHECKPOINT}. "
        f"Continue with: {command}"
    )


def _main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.stop_after is not None and args.stop_after < 1:
        print(
            f"memcore train: error: `--stop-after` must be >= 1. Received: {args.stop_after}",
            file=sys.stderr,
        )
        return USAGE_ERROR
    from memcore.train import distributed
    from memcore.train.config import load_config
    from memcore.train.trainer import PLOT, RESULTS, train

    try:
        config = load_config(args.config)
        results = train(
            config,
            backend=args.backend,
            device=args.device,
            out=args.out,
            resume=args.resume,
            switch_backend=args.switch_backend,
            stop_after=args.stop_after,
            progress=None if args.quiet or distributed.env_rank() else sys.stderr,
            devices=args.devices,
        )
    except MemcoreError as exc:
        print(f"memcore train: error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    finally:
        distributed.shutdown()  # the torchrun process group, if train created it
    if distributed.env_rank():  # torchrun: rank 0 alone reports
        return 0
    out = args.out or config.run.out
    final = ", ".join(f"{k} {v:.4g}" for k, v in results["final_eval"].items())
    base = ", ".join(f"{k} {v:.4g}" for k, v in results["baseline"].items())
    state = "finished" if results["finished"] else "stopped"
    more = "" if results["finished"] else " (continue with --resume)"
    print(
        f"{state} at step {results['steps_done']}/{config.run.steps}{more} "
        f"on {results['backend']}: "
        f"eval {final} (baseline {base}); "
        f"{results['history']['train_time_s']:.1f} s training"
    )
    for T, metrics in results["transfer"].items():
        print(f"transfer T={T}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    print(f"wrote {out}/{RESULTS} and {out}/{PLOT}")
    return 0
