"""Backend hooks and capabilities the conformance runner consults.

Hooks a backend may define (all optional; the lead's protocol does not require them):

* ``pin_numerics() -> dict``: make float results reproducible and return the settings in
  force, e.g. torch: TF32 off (``torch.backends.cuda.matmul.fp32_precision = "ieee"``,
  cudnn too) and reduced-precision reductions off; jax: ``jax_default_matmul_precision =
  "highest"``, reporting ``jax_enable_x64``. Called once before a backend's checks run;
  the dict goes into the report.
* ``numerics_settings() -> dict``: the same settings, read only; recorded when
  ``pin_numerics`` is absent.
* ``device_of(array) -> str``: the device an array lives on, in ``devices()`` spelling
  (default: ``str(array.device)``, where any name containing "cpu" counts as "cpu").

Without ``pin_numerics`` the runner pins torch or jax itself (recognised by the module of
the arrays ``from_numpy`` returns) and records "runner" as the source. float64 support is
read from ``capabilities(device).dtypes``: a dtype outside it is skipped with that reason.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from memcore.errors import MemcoreError

__all__ = ["dtype_skip_reason", "pin_numerics", "resolve_device"]


def resolve_device(backend: Any, device: str | None) -> str:
    """``device`` checked against ``backend.devices()`` (default: "cpu", else the first).

    Raises:
        MemcoreError: the device is not available, listing the ones that are.
    """
    devices = tuple(backend.devices())
    if device is None:
        return "cpu" if "cpu" in devices else devices[0]
    name = "cuda:0" if device == "cuda" and "cuda:0" in devices else device
    if name not in devices:
        raise MemcoreError(
            f"Device {device!r} is not available for backend {backend.name!r}. "
            f"Available: {', '.join(devices)}"
        )
    return name


def pin_numerics(backend: Any) -> dict[str, Any]:
    """Pin the backend's numerics through its hook, or pin torch/jax directly; return what is in force."""
    if callable(getattr(backend, "pin_numerics", None)):
        return {"source": "backend.pin_numerics", **dict(backend.pin_numerics() or {})}
    recorded: dict[str, Any] = {}
    if callable(getattr(backend, "numerics_settings", None)):
        recorded = {
            "source": "backend.numerics_settings",
            **dict(backend.numerics_settings() or {}),
        }
    # Which framework: the module of the arrays the backend makes (e.g. "torch", "jaxlib").
    try:
        module = type(backend.from_numpy(np.zeros(1, dtype=np.float32))).__module__.split(".")[0]
    except Exception:  # noqa: BLE001 - no pinning is possible, recorded below
        module = ""
    if module == "torch" and "torch" in sys.modules:
        matmul = sys.modules["torch"].backends.cuda.matmul
        cudnn = sys.modules["torch"].backends.cudnn
        if hasattr(matmul, "fp32_precision"):
            # torch >= 2.9: the new API only (mixing it with allow_tf32 raises there).
            matmul.fp32_precision = "ieee"
            cudnn.conv.fp32_precision = "ieee"
            pinned = {"cuda_matmul_fp32_precision": "ieee", "cudnn_conv_fp32_precision": "ieee"}
        else:
            matmul.allow_tf32 = False
            cudnn.allow_tf32 = False
            pinned = {"cuda_matmul_allow_tf32": False, "cudnn_allow_tf32": False}
        recorded.update(source="runner (backend has no pin_numerics)", **pinned)
    if module in ("jax", "jaxlib") and "jax" in sys.modules:
        jax = sys.modules["jax"]
        jax.config.update("jax_default_matmul_precision", "highest")
        recorded.update(
            source="runner (backend has no pin_numerics)",
            jax_default_matmul_precision="highest",
            jax_enable_x64=bool(jax.config.read("jax_enable_x64")),
        )
    return recorded or {"source": "none: the backend has no numerics hooks"}


def dtype_skip_reason(backend: Any, device: str, dtype: str) -> str:
    """Why ``dtype`` cannot run on ``device`` ("" when it can)."""
    supported = tuple(backend.capabilities(device).dtypes)
    if dtype in supported:
        return ""
    return (
        f"backend {backend.name!r} on {device} does not support {dtype} "
        f"(capabilities().dtypes = {supported})"
    )
