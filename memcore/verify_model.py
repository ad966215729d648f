"""``memcore verify --model pkg.mod:factory``: :func:`memcore.check_mrbp` from the command line.

``factory()`` (no arguments) returns a :class:`~memcore.check_model.ModelCheck`, or a dict
with its fields (:func:`~memcore.check_model.check_mrbp`'s arguments). The module is
imported like ``python -m`` would, the current directory included. Exit status: 0 when
every row passed, 1 when one failed, 2 with one line on stderr for bad input (module or
factory missing, a factory result of the wrong kind, a step that raises).
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Mapping

import attrs

from memcore.check_model import ModelCheck, MRBPReport, check_mrbp
from memcore.errors import MemcoreError

__all__ = ["load_model_check", "run_model_check", "verify_model"]


def load_model_check(target: str) -> ModelCheck:
    """Import ``"pkg.mod:factory"`` (the current directory is searched too) and call it.

    ``factory()`` must return a :class:`ModelCheck` or a dict of its fields.
    """
    module_name, _, attr = str(target).partition(":")
    if not module_name or not attr:
        raise MemcoreError(f"`--model` must be 'package.module:factory'. Received: {target!r}")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # like `python -m`: your own module, where you stand
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise MemcoreError(
            f"`--model` module {module_name!r} could not be imported. Received: {exc}"
        ) from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise MemcoreError(
            f"`--model` factory {attr!r} must be a callable in module {module_name!r}. "
            f"Received: {type(factory).__name__}"
        )
    made = factory()
    if isinstance(made, ModelCheck):
        return made
    fields = {f.name for f in attrs.fields(ModelCheck)}
    if isinstance(made, Mapping) and set(made) <= fields:
        return ModelCheck(**made)
    got = f"dict with keys {sorted(made)}" if isinstance(made, Mapping) else type(made).__name__
    raise MemcoreError(
        f"`--model` factory {target!r} must return a memcore.ModelCheck or a dict with keys among "
        f"{', '.join(sorted(fields))}. Received: {got}"
    )


def run_model_check(check: ModelCheck) -> MRBPReport:
    """:func:`check_mrbp` with a :class:`ModelCheck`'s fields as its arguments."""
    return check_mrbp(**attrs.asdict(check, recurse=False))


def verify_model(target: str, json_path: str | None = None) -> int:
    """``memcore verify --model pkg.mod:factory [--json PATH]``: print the report, return
    0 (passed), 1 (failed) or 2 (bad input: one line on stderr, never a traceback)."""
    # Before the user's module imports jax: without it float64 is silently float32.
    os.environ.setdefault("JAX_ENABLE_X64", "1")

    def usage(message: str) -> int:
        print(f"memcore verify: error: {message}", file=sys.stderr)
        return 2

    folder = os.path.dirname(os.path.abspath(json_path)) if json_path else ""
    if json_path and not os.path.isdir(folder):
        return usage(f"`--json` must be in an existing folder. Received: {json_path!r}")
    try:
        result = run_model_check(load_model_check(target))
    except MemcoreError as exc:
        return usage(str(exc))
    except Exception as exc:  # noqa: BLE001 - the user's factory or step failed: one line
        return usage(f"`--model` {target} raised {type(exc).__name__}: {exc}")
    print(result.text)
    if json_path:
        from memcore.conformance.report import write_json

        try:
            write_json(json_path, result.to_json())
        except OSError as exc:
            return usage(f"`--json` must be a writable file path. Received: {json_path!r} ({exc})")
        print(f"\nJSON report: {json_path}")
    return 0 if result.passed else 1
