"""Shared benchmark plumbing: device-synchronized timing, peak memory, errors, run records.

Every benchmark times with :func:`median_time` (warm-up, then the median of ``repeat``
synchronized runs), measures memory with :func:`peak_memory`, compares gradients with
:func:`rel_error`, and writes :func:`run_record` (GPU, versions, command) into its JSON.
On a machine without CUDA the same code runs on the CPU (smoke tests), with memory
figures reported as ``None``.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

__all__ = [
    "cuda",
    "median_time",
    "peak_memory",
    "rel_error",
    "run_record",
    "sync",
    "write_json",
]


def cuda() -> bool:
    """True when a CUDA device is there (the numbers that matter are taken on one)."""
    return torch.cuda.is_available()


def sync() -> None:
    """Wait for queued device work (no-op on the CPU)."""
    if cuda():
        torch.cuda.synchronize()


def median_time(fn: Callable[[], Any], *, repeat: int = 5, warmup: int = 2) -> dict[str, Any]:
    """Seconds per call of ``fn``: median of ``repeat`` synchronized calls after ``warmup``.

    Returns:
        {"median_s", "min_s", "max_s", "samples_s"}; the spread shows the noise level.
    """
    for _ in range(warmup):
        fn()
    sync()
    samples = []
    for _ in range(max(repeat, 1)):
        t0 = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - t0)
    return {
        "median_s": statistics.median(samples),
        "min_s": min(samples),
        "max_s": max(samples),
        "samples_s": samples,
    }


def peak_memory(fn: Callable[[], Any]) -> dict[str, int | None]:
    """Peak device memory of one call of ``fn``, measured by the caching allocator.

    Returns:
        {"peak_allocated": max bytes allocated during the call (everything live, parameters
        and inputs included), "base_allocated": bytes allocated before it, "peak_reserved":
        max bytes the allocator held}; ``None`` values on the CPU.
    """
    if not cuda():
        fn()
        return {"peak_allocated": None, "base_allocated": None, "peak_reserved": None}
    sync()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    sync()
    return {
        "peak_allocated": torch.cuda.max_memory_allocated(),
        "base_allocated": base,
        "peak_reserved": torch.cuda.max_memory_reserved(),
    }


def rel_error(got: Iterable[torch.Tensor], want: Iterable[torch.Tensor]) -> float:
    """||got - want|| / ||want|| over the concatenation of all tensors, in float64."""
    num = den = 0.0
    for g, w in zip(got, want, strict=True):
        g64, w64 = g.detach().double(), w.detach().double()
        num += float(((g64 - w64) ** 2).sum())
        den += float((w64**2).sum())
    return (num / max(den, 1e-300)) ** 0.5


def _version(name: str) -> str | None:
    try:
        module = __import__(name)
    except Exception:  # noqa: BLE001 - an absent or broken package is just not recorded
        return None
    return str(getattr(module, "__version__", "?"))


def _tf32_matmul() -> Any:
    """The float32 matmul mode; torch >= 2.9 refuses the legacy ``allow_tf32`` read once the
    new ``fp32_precision`` API was used in the process (the conformance pinning uses it)."""
    matmul = torch.backends.cuda.matmul
    try:
        return matmul.fp32_precision
    except (AttributeError, RuntimeError):
        return matmul.allow_tf32


def run_record(extra_packages: Sequence[str] = ()) -> dict[str, Any]:
    """Where and how the numbers were taken: GPU, driver-visible versions and the command."""
    rec: dict[str, Any] = {
        "command": "python -m " + " ".join([_module_name()] + sys.argv[1:]),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "gpu": torch.cuda.get_device_name() if cuda() else None,
        "gpu_memory_bytes": torch.cuda.get_device_properties(0).total_memory if cuda() else None,
        "tf32_matmul": _tf32_matmul(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    for name in ("numpy", *extra_packages):
        rec[name] = _version(name)
    return rec


def _module_name() -> str:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return spec.name if spec is not None else os.path.basename(sys.argv[0])


def write_json(path: str | None, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` (creating folders); nothing when ``path`` is None."""
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=1, default=str)
