"""The running half of ``memcore verify`` (arguments are checked by :mod:`memcore.verify_cli`).

Prints the reference self-check, then per backend its header, a progress line per unit
(in place on a terminal, one flushed line each in CI logs), the conformance table and its
failures with a replay command, then the cross-framework table, and last the verdict line
naming what failed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs

__all__ = ["RunOptions", "run_verify"]


@attrs.frozen
class RunOptions:
    """What ``memcore verify`` was asked to run (already validated).

    Attributes:
        profile: hypothesis profile (dev, ci, nightly).
        seed: hypothesis seed of the draws (None: the profile's own; ci is derandomized).
        ops: op names (None: all; []: none).
        steps: routing steps (None: all).
        dtypes: dtypes (None: float64 and float32).
        routing: run the routing equivalences.
        self_check: print the reference self-check first.
        device: the device asked for (None: each backend's default).
        xfails_path: ``--xfails`` (None: the backend's declared or bundled file).
        user_xfails: the parsed ``--xfails`` file.
        json_path: where the JSON report goes (None: nowhere).
    """

    profile: str
    seed: int | None
    ops: list[str] | None
    steps: list[str] | None
    dtypes: list[str] | None
    routing: bool
    self_check: bool
    device: str | None
    xfails_path: str | None
    user_xfails: Any
    json_path: str | None


def _self_check(opt: RunOptions) -> tuple[dict[str, Any], list[str]]:
    from memcore.conformance import selfcheck

    out: dict[str, Any] = {}
    failed: list[str] = []
    fd = selfcheck.fd_rows(opt.ops or None, opt.profile)
    out["finite_differences"] = [r.to_json() for r in fd]
    print(
        selfcheck.format_rows(
            "Reference self-check: each op's hand-written backward vs central finite differences "
            f"(float64 dot-product test, pass when |err| <= {selfcheck.FD_ATOL:g}"
            f" + {selfcheck.FD_RTOL:g} |value|)",
            "op",
            fd,
        )
    )
    failed += [f"finite differences of {r.name}" for r in fd if not r.ok]
    if opt.routing:
        rr = selfcheck.routing_rows(opt.profile)
        out["routing"] = [r.to_json() for r in rr]
        if rr:
            print()
            print(
                selfcheck.format_rows(
                    "Reference routing equivalences (float64, rel < 1e-9)", "equivalence", rr
                )
            )
        failed += [r.name for r in rr if not r.ok]
    return out, failed


def _backend(name: str, backend: Any, device: str, opt: RunOptions) -> tuple[Any, list[Any]]:
    from memcore.conformance import report
    from memcore.conformance.runner import pin_numerics, run_backend
    from memcore.conformance.xfails import backend_xfail_file, load_xfails
    from memcore.verify_cli import replay_command

    numerics = pin_numerics(backend)
    xfail_path = opt.xfails_path or backend_xfail_file(backend)
    xfails = opt.user_xfails if opt.user_xfails is not None else load_xfails(xfail_path)
    # float64 and float32 by default, so a device without float64 shows its skips.
    use = opt.dtypes or ["float64", "float32"]
    shown = ", ".join(f"{k}={v}" for k, v in numerics.items() if k != "source")
    print(
        f"Backend {name} {getattr(backend, 'version', '')} on {device} | "
        f"dtypes {', '.join(use)} | profile {opt.profile}"
        + (f" | seed {opt.seed} (replay with --seed {opt.seed})" if opt.seed is not None else "")
    )
    print(f"numerics: {shown or 'framework defaults'} [set by {numerics.get('source')}]")
    print(f"xfails: {xfail_path or 'none'}", flush=True)
    routing: bool | list[str] = opt.routing
    if opt.routing and opt.steps is not None:
        routing = opt.steps
    results = run_backend(
        backend,
        device=device,
        dtypes=use,
        profile=opt.profile,
        ops=opt.ops,
        routing=routing,
        xfails=xfails,
        progress=report.Progress(f"{name}:{device}", enabled=True),
        seed=opt.seed,
    )
    print(report.format_table(results))
    for r in results:
        if r.failed:
            print(f"  replay {r.op} {r.dtype}: {replay_command(r, name, opt.profile, opt.seed)}")
    counts = report.summary(results)
    print("summary: " + ", ".join(f"{v} {k}" for k, v in counts.items() if v))
    for stale in xfails.unmatched():
        print(f"warning: xfail pattern {stale.pattern!r} ({stale.source}) matched no check")
    record = report.backend_record(
        name,
        backend,
        device=device,
        dtypes=use,
        numerics=numerics,
        results=results,
        profile=opt.profile,
        xfail_file=None if xfail_path is None else str(xfail_path),
    )
    return record, results


def _cross(
    pairs: list[tuple[str, str]], loaded: list[tuple[str, Any, str]], opt: RunOptions
) -> list[Any]:
    from memcore.conformance.cross import cross_check

    ready = {name: (b, dev) for name, b, dev in loaded if b is not None}
    out = []
    for x, y in pairs:
        (bx, dx), (by, dy) = ready[x], ready[y]
        both = [
            d
            for d in ("float64", "float32")
            if d in bx.capabilities(dx).dtypes and d in by.capabilities(dy).dtypes
        ]
        use = [d for d in (opt.dtypes or both) if d in both]
        out += cross_check(
            bx,
            by,
            devices=(dx, dy),
            dtypes=use,
            profile=opt.profile,
            ops=opt.ops,
            routing=opt.routing,
            seed=opt.seed,
        )
    return out


def run_verify(
    opt: RunOptions,
    loaded: list[tuple[str, Any, str]],
    pairs: list[tuple[str, str]],
    argv: Sequence[str],
) -> int:
    """Run and print everything; returns 0 when all passed, 1 otherwise."""
    from memcore.conformance import report
    from memcore.verify_cli import failed_summary

    failures: dict[str, list[str]] = {}
    self_check: dict[str, Any] = {}
    if opt.self_check:
        self_check, bad = _self_check(opt)
        if bad:
            failures["reference self-check"] = bad
    records = []
    ran = 0
    for name, backend, info in loaded:
        print()
        if backend is None:
            print(f"Backend {name}: FAILED to load: {info}")
            failures[name] = ["failed to load"]
            records.append(
                report.backend_record(
                    name,
                    None,
                    device=opt.device,
                    dtypes=opt.dtypes or [],
                    numerics={},
                    results=[],
                    error=info,
                    profile=opt.profile,
                )
            )
            continue
        record, results = _backend(name, backend, info, opt)
        records.append(record)
        ran += sum(r.status != "skipped" for r in results)
        bad = [f"{r.dtype} {r.op} {r.check}" for r in results if r.failed]
        if bad:
            failures[f"{name} on {info}"] = bad
    cross = _cross(pairs, loaded, opt)
    if cross:
        names = " and ".join(" vs ".join(p) for p in pairs)
        print(
            f"\nCross-framework agreement of {names} (same inputs; cells: status and the largest "
            "|a - b| over all examples; tolerance = 2x the dtype's vjp/routing row)"
        )
        print(report.format_table(cross))
        self_check["cross"] = [{**report.result_record(r), "ok": not r.failed} for r in cross]
        for r in cross:
            if r.failed:
                failures.setdefault(f"cross {r.backend}", []).append(f"{r.dtype} {r.op} {r.check}")
    if opt.json_path:
        doc = report.document(
            records, profile=opt.profile, self_check=self_check, command=["memcore", *argv]
        )
        report.write_json(opt.json_path, doc)
        print(f"\nJSON report: {opt.json_path}")
    if ran == 0 and not failures:
        print("\nverify: FAILED (nothing ran: every check was skipped)")
        return 1
    if failures:
        print(f"\nverify: FAILED ({failed_summary(failures)})")
        return 1
    print("\nverify: PASSED")
    return 0
