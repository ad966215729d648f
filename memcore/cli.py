"""The ``memcore`` command: ``memcore verify``, ``memcore backends`` and ``memcore train``.

``memcore verify`` prints the reference's self-check (every op's finite-difference
error, the routing equivalences), then the conformance table of each backend; it exits
non-zero on any failure. Bad arguments (unknown backend, op, dtype or device, missing
xfail file, ...) print one line and exit 2, never a traceback; the checks are in
:mod:`memcore.verify_cli`, the run in :mod:`memcore.verify_run`.

Nothing here imports torch, jax or cupy until a backend is asked for.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["main"]

USAGE_ERROR = 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="memcore", description="memcore: reference checks and backend conformance."
    )
    sub = p.add_subparsers(dest="command", metavar="{verify,backends,train}")
    v = sub.add_parser(
        "verify",
        help="self-check the reference and run the conformance suite on backends",
        description="Self-check the reference, then run the conformance suite on backends.",
    )
    v.add_argument(
        "--backend",
        default=None,
        help="numpy | torch | jax | cupy | all | pkg.module:factory, or a comma-separated list "
        "(default: the configured backend; 'all' = every installed one)",
    )
    v.add_argument(
        "--dtype",
        default=None,
        help="comma-separated dtypes (default: float64,float32; ones the backend lacks are skipped with the reason)",
    )
    v.add_argument("--device", default=None, help="cpu | cuda:0 | ... (default cpu)")
    v.add_argument(
        "--profile",
        default=None,
        choices=("dev", "ci", "nightly"),
        help="examples per check: dev (fast), ci (derandomized, default), nightly (many)",
    )
    v.add_argument(
        "--json", default=None, metavar="PATH", help="write the full JSON report to PATH"
    )
    v.add_argument(
        "--xfails",
        default=None,
        metavar="FILE",
        help="xfail file (default: conformance/xfails/<backend>.txt when it exists)",
    )
    v.add_argument(
        "--ops",
        default=None,
        help="comma-separated op names and/or routing steps (memformer, sab); naming a routing "
        "step runs only the named steps (default: every op and step)",
    )
    v.add_argument("--no-routing", action="store_true", help="skip the routing equivalences")
    v.add_argument(
        "--cross",
        default=None,
        metavar="A,B",
        help="also compare two backends with each other on the same inputs "
        "(default when several backends are verified: every pair of native-autodiff backends; "
        "'none' to skip)",
    )
    v.add_argument(
        "--no-self-check", action="store_true", help="skip the reference self-check tables"
    )
    v.add_argument(
        "--seed",
        type=int,
        default=None,
        metavar="N",
        help="hypothesis seed of the drawn examples: the same seed draws the same examples, so a "
        "failure printed with its seed replays with --seed N (default: ci draws a fixed set; dev "
        "and nightly draw from a random seed printed in the backend's header)",
    )
    v.add_argument(
        "--model",
        default=None,
        metavar="PKG.MOD:FACTORY",
        help="instead: check your own model's MRBP gradients against BPTT in float64; "
        "factory() returns a memcore.ModelCheck (docs/models.md)",
    )
    sub.add_parser(
        "train",
        help="train a model from a TOML config (memcore train CONFIG.toml --help)",
        add_help=False,
    )
    b = sub.add_parser("backends", help="list registered backends: availability, version, devices")
    b.add_argument("--load", action="store_true", help="import each available backend to list its devices")
    b.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return p


def _backends_command(args: argparse.Namespace) -> int:
    import json

    from memcore.registry import describe_backends, format_backends

    rows = describe_backends(load=args.load)
    print(json.dumps([r.to_json() for r in rows], indent=2) if args.json else format_backends(rows))
    return 0


def _load(
    names: Sequence[str], device: str | None, single: bool
) -> tuple[list[tuple[str, Any, str]], int | None]:
    """(name, backend or None, error) per name (see :func:`memcore.verify_cli._load`)."""
    from memcore.verify_cli import _load as load

    return load(names, device, single)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``memcore`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train":
        from memcore.train.cli import main as train_main

        return train_main(argv[1:])
    args = _parser().parse_args(argv)
    if args.command == "backends":
        return _backends_command(args)
    if args.command == "verify":
        if args.model is not None:  # check_mrbp on the user's model (docs/models.md)
            from memcore.verify_model import verify_model

            return verify_model(args.model, args.json)
        from memcore.verify_cli import verify

        return verify(args, argv)
    _parser().print_help()
    return USAGE_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
