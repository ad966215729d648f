"""Zero-copy exchange of CuPy arrays with torch and jax on the same GPU, through DLPack.

The producer's ``__dlpack__`` takes the consumer's stream, so the exchange is ordered
after the work already queued on the array; no copy is made when both sides sit on the
same device (the tests compare data pointers).
"""

from __future__ import annotations

from typing import Any

import cupy as cp

from memcore.errors import MemcoreError

__all__ = ["from_jax", "from_torch", "parse_device", "to_jax", "to_torch"]


def parse_device(device: str | None) -> int:
    """'cuda:N' (or 'cuda', or None for the current device) -> the device ordinal N."""
    count = cp.cuda.runtime.getDeviceCount()
    names = tuple(f"cuda:{i}" for i in range(count))
    if device is None:
        return cp.cuda.Device().id
    if device == "cuda":
        return cp.cuda.Device().id
    if isinstance(device, str) and device in names:
        return int(device.split(":")[1])
    raise MemcoreError(f"`device` must be one of {names} for cupy. Received: device={device!r}")


def _require_cupy(x: Any, name: str) -> None:
    if not isinstance(x, cp.ndarray):
        raise MemcoreError(f"`{name}` must be a cupy.ndarray. Received: {type(x).__module__}.{type(x).__name__}")


def to_torch(x: Any) -> Any:
    """A torch CUDA tensor sharing ``x``'s memory (same shape, dtype and device)."""
    import torch

    _require_cupy(x, "x")
    return torch.from_dlpack(x)


def from_torch(tensor: Any) -> Any:
    """A cupy array sharing a torch CUDA tensor's memory."""
    device = getattr(tensor, "device", None)
    if getattr(device, "type", None) != "cuda":
        raise MemcoreError(
            f"`tensor` must be a torch tensor on a CUDA device. Received: device={device!r}"
        )
    return cp.from_dlpack(tensor)


def to_jax(x: Any) -> Any:
    """A jax array on the same GPU built from ``x`` through DLPack (zero-copy where jax allows)."""
    import jax.dlpack

    _require_cupy(x, "x")
    return jax.dlpack.from_dlpack(x)


def from_jax(array: Any) -> Any:
    """A cupy array sharing a jax GPU array's buffer."""
    devices = getattr(array, "devices", None)
    platforms = {d.platform for d in devices()} if callable(devices) else set()
    if platforms != {"gpu"}:
        raise MemcoreError(
            f"`array` must be a jax array on one GPU. Received: platforms={sorted(platforms)}"
        )
    return cp.from_dlpack(array)
