"""``memcore verify``: the reference self-check, then the conformance suite per backend.

Every argument is checked before any check runs (unknown backend, op, dtype or device,
an xfail file that is missing or not UTF-8, a ``--json`` path that cannot be written,
a ``--cross`` that names no verified pair, a selection under which nothing would run):
one line on stderr and exit 2. After the run the last line says ``verify: PASSED`` or
``verify: FAILED`` with what failed; each failure is listed with the command that
replays its examples (``--seed`` fixes the draws; the ``ci`` profile always draws the same).

Nothing here imports torch, jax or cupy until a backend is asked for.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import random
import shlex
import sys
from collections.abc import Sequence
from typing import Any

from memcore.errors import MemcoreError

__all__ = ["failed_summary", "replay_command", "verify"]

USAGE_ERROR = 2


def _split(value: str | None) -> list[str] | None:
    if value is None:
        return None
    return [x.strip() for x in value.split(",") if x.strip()]


def _usage(message: str) -> int:
    print(f"memcore verify: error: {message}", file=sys.stderr)
    return USAGE_ERROR


def _check_json_path(path: str) -> None:
    """``--json`` must be a file that can be written, in a folder that exists."""
    p = pathlib.Path(path)
    if p.is_dir():
        raise MemcoreError(f"`--json` must be a file path. Received: {path!r} is a folder")
    if not p.parent.is_dir():
        raise MemcoreError(
            f"`--json` must be in an existing folder. Received: {path!r} "
            f"(no folder {str(p.parent)!r})"
        )
    existed = p.exists()
    try:
        with open(p, "a", encoding="utf-8"):
            pass
    except OSError as exc:
        raise MemcoreError(
            f"`--json` must be a file memcore can write. Received: {path!r} ({exc.strerror})"
        ) from None
    if not existed:
        p.unlink()


def _selection(ops_arg: str | None) -> tuple[list[str] | None, list[str] | None]:
    """``--ops`` as (op names, routing step names); None = every op / every step."""
    from memcore.conformance.routing_checks import ROUTING_CHECKS
    from memcore.ops import OPS, get_op

    names = _split(ops_arg)
    if names is None:
        return None, None
    if not names:
        raise MemcoreError(
            "`--ops` must name at least one op or routing step "
            f"({', '.join([*OPS, *ROUTING_CHECKS])}). Received: {ops_arg!r}"
        )
    steps = [n for n in names if n in ROUTING_CHECKS]
    ops = [get_op(n).name for n in names if n not in ROUTING_CHECKS]
    return ops, (steps or None)


def replay_command(r: Any, backend: str, profile: str, seed: int | None) -> str:
    """The ``memcore verify`` command that reruns the examples of failed check ``r`` of
    ``backend`` (the name as given to ``--backend``)."""
    from memcore.conformance.routing_checks import ROUTING_CHECKS

    args = ["memcore", "verify", "--backend", backend, "--device", r.device]
    args += ["--dtype", r.dtype, "--ops", r.op, "--no-self-check", "--profile", profile]
    if r.op not in ROUTING_CHECKS:
        args.append("--no-routing")
    if seed is not None:
        args += ["--seed", str(seed)]
    return " ".join(shlex.quote(a) for a in args)


def failed_summary(failures: dict[str, list[str]], limit: int = 6) -> str:
    """``torch: float32 memory_read vjp, ...; self-check: ...`` (``limit`` items per part)."""
    parts = []
    for where, items in failures.items():
        more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
        shown = ", ".join(items[:limit]) + more
        parts.append(f"{where}: {shown}")
    return "; ".join(parts)


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
        except Exception as exc:  # noqa: BLE001 - a backend whose import crashes is reported
            if single:
                return [], _usage(f"backend {name!r} failed to load: {type(exc).__name__}: {exc}")
            loaded.append((name, None, f"failed to load: {type(exc).__name__}: {exc}"))
            continue
        loaded.append((name, backend, dev))
    return loaded, None


def _cross_pairs(
    cross: str | None, loaded: list[tuple[str, Any, str]]
) -> list[tuple[str, str]]:
    """The backend pairs to cross-check (see ``--cross``); MemcoreError for a bad value."""
    ready = {name: (b, dev) for name, b, dev in loaded if b is not None}
    if cross == "none":
        return []
    if cross is not None:
        names = _split(cross) or []
        if len(names) != 2 or names[0] == names[1] or any(n not in ready for n in names):
            raise MemcoreError(
                "`--cross` must be 'none' or two different verified backends as A,B "
                f"(verified: {', '.join(ready) or 'none'}). Received: {cross!r}"
            )
        return [(names[0], names[1])]
    if len(ready) < 2:
        return []
    # Pairs of backends whose gradients come from their own autodiff (torch, jax):
    # the hand-written ones all run the reference's backward.
    native = sorted(n for n, (b, d) in ready.items() if b.capabilities(d).autodiff == "native")
    return [(x, y) for i, x in enumerate(native) for y in native[i + 1 :]]


def _idle_reasons(loaded: list[tuple[str, Any, str]], dtypes: list[str] | None) -> list[str]:
    """Why nothing would run, per backend (empty when some backend runs some dtype)."""
    from memcore.conformance.runner import dtype_skip_reason

    reasons = []
    for name, backend, device in loaded:
        if backend is None:
            return []  # reported as a load failure, which fails the run
        skips = [dtype_skip_reason(backend, device, d) for d in dtypes or ["float64", "float32"]]
        if not all(skips):
            return []
        reasons.append(f"{name} on {device}: {'; '.join(dict.fromkeys(skips))}")
    return reasons


def _not_installed(chosen: str) -> list[str]:
    """Under ``--backend all``: one line per registered backend that is not installed."""
    from memcore.extras import install_hint
    from memcore.registry import registered_backends

    if chosen != "all":
        return []
    lines = []
    for name, entry in sorted(registered_backends().items()):
        if not entry.importable():
            hint = install_hint(name)
            lines.append(f"Backend {name}: skipped, not installed{f' ({hint})' if hint else ''}")
    return lines


def verify(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Run ``memcore verify`` with parsed ``args``; returns the exit code (0, 1 or 2)."""
    # Before any backend import: JAX reads this once, and without it float64 is silently float32.
    os.environ.setdefault("JAX_ENABLE_X64", "1")
    import importlib.util

    if importlib.util.find_spec("hypothesis") is None:
        return _usage("memcore verify needs hypothesis: pip install 'memcore[conformance]'")
    from memcore.conformance.jax_cache import enable_jax_compile_cache
    from memcore.conformance.runner import CHECK_DTYPES
    from memcore.conformance.xfails import load_xfails
    from memcore.registry import available_backends, resolve_backend_name

    profile = args.profile or "ci"
    seed = args.seed
    if seed is None and profile != "ci":  # ci is derandomized; others get a printed seed
        seed = random.SystemRandom().randrange(2**32)
    try:
        ops, steps = _selection(args.ops)
        dtypes = _split(args.dtype)
        if dtypes is not None and not dtypes:
            raise MemcoreError(f"`--dtype` must name at least one dtype. Received: {args.dtype!r}")
        for d in dtypes or ():
            if d not in CHECK_DTYPES:
                raise MemcoreError(
                    f"`--dtype` must be among {', '.join(CHECK_DTYPES)}. Received: {d!r}"
                )
        if seed is not None and not 0 <= seed < 2**32:
            raise MemcoreError(f"`--seed` must be in [0, 2**32). Received: {seed}")
        user_xfails = load_xfails(args.xfails) if args.xfails else None
        if args.json:
            _check_json_path(args.json)
        chosen = args.backend or resolve_backend_name()
        names = available_backends() if chosen == "all" else (_split(chosen) or [chosen])
        loaded, code = _load(names, args.device, single=len(names) == 1 and chosen != "all")
        if code is not None:
            return code
        pairs = _cross_pairs(args.cross, loaded)
        if ops == [] and (steps is None or args.no_routing):
            raise MemcoreError(
                "The selection must run at least one check. Received: "
                f"--ops {args.ops!r} names only routing steps, with --no-routing"
            )
        idle = _idle_reasons(loaded, dtypes)
        if idle:
            raise MemcoreError(
                "The selection must run at least one check. Received: every check would be "
                f"skipped ({'; '.join(idle)})"
            )
    except MemcoreError as exc:
        return _usage(str(exc))
    if any(b is not None and b.name == "jax" for _, b, _ in loaded):
        enable_jax_compile_cache()

    from memcore.verify_run import RunOptions, run_verify

    options = RunOptions(
        profile=profile,
        seed=seed,
        ops=ops,
        steps=steps,
        dtypes=dtypes,
        routing=not args.no_routing,
        self_check=not args.no_self_check,
        device=args.device,
        xfails_path=args.xfails,
        user_xfails=user_xfails,
        json_path=args.json,
    )
    for line in _not_installed(chosen):
        print(line)
    return run_verify(options, loaded, pairs, argv)
