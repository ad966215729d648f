"""The ``memcore`` command: ``memcore verify``, ``memcore backends`` and ``memcore train``.

``memcore verify`` prints the reference's self-check (every op's finite-difference
error, the routing equivalences), then the conformance table of each backend; it exits
non-zero on any failure. Bad arguments (unknown backend, op, dtype or device, missing
xfail file) print one line and exit 2, never a traceback.

Nothing here imports torch, jax or cupy until a backend is asked for.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from memcore.errors import MemcoreError

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
    v.add_argument("--ops", default=None, help="comma-separated op names (default: every op)")
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


def _split(value: str | None) -> list[str] | None:
    if value is None:
        return None
    return [x.strip() for x in value.split(",") if x.strip()]


def _usage(message: str) -> int:
    print(f"memcore verify: error: {message}", file=sys.stderr)
    return USAGE_ERROR


def _backends_command(args: argparse.Namespace) -> int:
    import json

    from memcore.registry import describe_backends, format_backends

    rows = describe_backends(load=args.load)
    print(json.dumps([r.to_json() for r in rows], indent=2) if args.json else format_backends(rows))
    return 0


def _load(
    names: Sequence[str], device: str | None, single: bool
) -> tuple[list[tuple[str, Any, str]], int | None]:
    """(name, backend or None, error) per name; a usage-error exit code for a lone bad backend."""
    from memcore.conformance.runner import resolve_device
    from memcore.registry import get_backend

    loaded = []
    for name in names:
        try:
            backend = get_backend(name)
            dev = resolve_device(backend, device)
        except MemcoreError as exc:
            if single:
                return [], _usage(str(exc))
            loaded.append((name, None, str(exc)))
            continue
        except Exception as exc:  # noqa: BLE001 - a backend whose import crashes is reported, not raised
            if single:
                return [], _usage(f"backend {name!r} failed to load: {type(exc).__name__}: {exc}")
            loaded.append((name, None, f"failed to load: {type(exc).__name__}: {exc}"))
            continue
        loaded.append((name, backend, dev))
    return loaded, None


def _verify(args: argparse.Namespace, argv: Sequence[str]) -> int:
    # Before any backend import: JAX reads this once, and without it float64 is silently float32.
    os.environ.setdefault("JAX_ENABLE_X64", "1")
    if args.model is not None:
        return _verify_model(args)
    import importlib.util

    if importlib.util.find_spec("hypothesis") is None:
        return _usage("memcore verify needs hypothesis: pip install 'memcore[conformance]'")
    from memcore.conformance import report, selfcheck
    from memcore.conformance.runner import CHECK_DTYPES, pin_numerics, run_backend
    from memcore.conformance.xfails import bundled_xfail_file, load_xfails
    from memcore.ops import get_op
    from memcore.registry import available_backends, resolve_backend_name

    profile = args.profile or "ci"
    try:
        ops = _split(args.ops)
        if ops is not None:
            ops = [get_op(o).name for o in ops]
        dtypes = _split(args.dtype)
        for d in dtypes or ():
            if d not in CHECK_DTYPES:
                raise MemcoreError(
                    f"`--dtype` must be among {', '.join(CHECK_DTYPES)}. Received: {d!r}"
                )
        user_xfails = load_xfails(args.xfails) if args.xfails else None
    except MemcoreError as exc:
        return _usage(str(exc))

    chosen = args.backend or resolve_backend_name()
    names = available_backends() if chosen == "all" else (_split(chosen) or [chosen])
    loaded, code = _load(names, args.device, single=len(names) == 1 and chosen != "all")
    if code is not None:
        return code

    ok = True
    self_check: dict[str, Any] = {}
    if not args.no_self_check:
        fd = selfcheck.fd_rows(ops, profile)
        self_check["finite_differences"] = [r.to_json() for r in fd]
        print(
            selfcheck.format_rows(
                "Reference self-check: each op's hand-written backward vs central finite differences "
                f"(float64 dot-product test, pass when |err| <= {selfcheck.FD_ATOL:g}"
                f" + {selfcheck.FD_RTOL:g} |value|)",
                "op",
                fd,
            )
        )
        ok = ok and all(r.ok for r in fd)
        if not args.no_routing:
            rr = selfcheck.routing_rows(profile)
            self_check["routing"] = [r.to_json() for r in rr]
            if rr:
                print()
                print(
                    selfcheck.format_rows(
                        "Reference routing equivalences (float64, rel < 1e-9)", "equivalence", rr
                    )
                )
            ok = ok and all(r.ok for r in rr)

    records = []
    for name, backend, info in loaded:
        print()
        if backend is None:
            print(f"Backend {name}: FAILED to load: {info}")
            records.append(
                report.backend_record(
                    name,
                    None,
                    device=args.device,
                    dtypes=dtypes or [],
                    numerics={},
                    results=[],
                    error=info,
                    profile=profile,
                )
            )
            ok = False
            continue
        device = info
        numerics = pin_numerics(backend)
        xfail_path = args.xfails or bundled_xfail_file(backend.name)
        xfails = user_xfails if user_xfails is not None else load_xfails(xfail_path)
        # float64 and float32 by default, so a device without float64 shows its skips.
        use = dtypes or ["float64", "float32"]
        shown = ", ".join(f"{k}={v}" for k, v in numerics.items() if k != "source")
        print(
            f"Backend {name} {getattr(backend, 'version', '')} on {device} | "
            f"dtypes {', '.join(use)} | profile {profile}"
        )
        print(f"numerics: {shown or 'framework defaults'} [set by {numerics.get('source')}]")
        print(f"xfails: {xfail_path or 'none'}")
        results = run_backend(
            backend,
            device=device,
            dtypes=use,
            profile=profile,
            ops=ops,
            routing=not args.no_routing,
            xfails=xfails,
            progress=report.Progress(f"{name}:{device}"),
        )
        print(report.format_table(results))
        counts = report.summary(results)
        print("summary: " + ", ".join(f"{v} {k}" for k, v in counts.items() if v))
        for stale in xfails.unmatched():
            print(f"warning: xfail pattern {stale.pattern!r} ({stale.source}) matched no check")
        ok = ok and counts["failed"] == 0
        records.append(
            report.backend_record(
                name,
                backend,
                device=device,
                dtypes=use,
                numerics=numerics,
                results=results,
                profile=profile,
                xfail_file=None if xfail_path is None else str(xfail_path),
            )
        )
    cross = _cross(args, loaded, dtypes, profile)
    if cross:
        print("\nCross-framework agreement (same inputs, tolerance = 2x the dtype's vjp/routing row)")
        print(report.format_table(cross))
        ok = ok and not any(r.failed for r in cross)
        self_check["cross"] = [
            {**report.result_record(r), "ok": not r.failed} for r in cross
        ]
    if args.json:
        report.write_json(
            args.json,
            report.document(
                records, profile=profile, self_check=self_check, command=["memcore", *argv]
            ),
        )
        print(f"\nJSON report: {args.json}")
    print("\nverify: " + ("PASSED" if ok else "FAILED"))
    return 0 if ok else 1


def _verify_model(args: argparse.Namespace) -> int:
    """``verify --model``: check_mrbp on the factory's model; exit 0 / 1, 2 on bad input."""
    from memcore.check_model import load_model_check, run_model_check
    from memcore.conformance.report import write_json

    try:
        result = run_model_check(load_model_check(args.model))
    except MemcoreError as exc:
        return _usage(str(exc))
    except Exception as exc:  # noqa: BLE001 - the user's factory or step failed: one line, not ours
        return _usage(f"`--model` {args.model} raised {type(exc).__name__}: {exc}")
    print(result.text)
    if args.json:
        write_json(args.json, result.to_json())
        print(f"\nJSON report: {args.json}")
    return 0 if result.passed else 1


def _cross(
    args: argparse.Namespace, loaded: list[tuple[str, Any, str]], dtypes: list[str] | None, profile: str
) -> list[Any]:
    """Cross-framework results for the pairs asked for (see ``--cross``)."""
    from memcore.conformance.cross import cross_check

    if args.cross == "none":
        return []
    ready = {name: (b, dev) for name, b, dev in loaded if b is not None}
    if args.cross:
        names = _split(args.cross) or []
        pairs = [(names[0], names[1])] if len(names) == 2 else []
        missing = [n for n in names if n not in ready]
        if len(names) != 2 or missing:
            print(f"--cross: needs two verified backends; received {args.cross!r}", file=sys.stderr)
            return []
    elif len(ready) > 1:
        # Pairs of backends whose gradients come from their own autodiff (torch, jax):
        # the hand-written ones all run the reference's backward.
        native = sorted(n for n, (b, d) in ready.items() if b.capabilities(d).autodiff == "native")
        pairs = [(x, y) for i, x in enumerate(native) for y in native[i + 1 :]]
    else:
        return []
    out = []
    for x, y in pairs:
        (bx, dx), (by, dy) = ready[x], ready[y]
        common = [d for d in ("float64", "float32") if d in bx.capabilities(dx).dtypes and d in by.capabilities(dy).dtypes]
        use = [d for d in (dtypes or common) if d in common]
        out += cross_check(bx, by, devices=(dx, dy), dtypes=use, profile=profile, ops=_split(args.ops), routing=not args.no_routing)
    return out


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
        return _verify(args, argv)
    _parser().print_help()
    return USAGE_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
