"""Protocol helpers: device listing, the float64 probe, capability flags, protocol gaps and
DLPack transfer with its host-copy fallback, on the numpy and array_api backends and on
small hand-made backends that misbehave on purpose."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from memcore import MemcoreError
from memcore.backends.numpy import NumpyBackend
from memcore.protocol import (
    ROUTING_METHODS,
    Capabilities,
    capability_flags,
    from_dlpack,
    list_devices,
    probe_float64,
    protocol_gaps,
    to_dlpack_capable,
    transfer,
)

xp = pytest.importorskip("array_api_strict", reason="the array_api backend needs array-api-strict")

from memcore.backends.array_api import ArrayApiBackend

NP = NumpyBackend()
AA = ArrayApiBackend(xp)


class SilentFloat32(NumpyBackend):
    """Declares float64 but stores float32, like JAX without jax_enable_x64."""

    name = "silent-float32"

    def from_numpy(self, x, *, dtype=None, device=None):
        return np.asarray(x, dtype="float32" if dtype == "float64" else dtype)


class Float64Rounded(NumpyBackend):
    """Answers float64 but keeps only float32 precision (the dtype alone would pass)."""

    name = "rounded"

    def from_numpy(self, x, *, dtype=None, device=None):
        return np.asarray(x, dtype="float32").astype(dtype or "float64")


class RefusesFloat64(NumpyBackend):
    """Raises on any float64 allocation, like a device with no float64 unit."""

    name = "refuses"

    def from_numpy(self, x, *, dtype=None, device=None):
        if dtype == "float64":
            raise TypeError("float64 is not supported on this device")
        return super().from_numpy(x, dtype=dtype, device=device)


class NoDlpack(NumpyBackend):
    """The numpy backend declaring no DLPack support."""

    name = "no-dlpack"

    def capabilities(self, device: str | None = None) -> Capabilities:
        return Capabilities(dtypes=("float32", "float64"), autodiff="hand-written", dlpack=False)


class Opaque:
    """An array-like that exports no DLPack and converts only through NumPy's ``__array__``."""

    def __init__(self, data: np.ndarray):
        self.data = data

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return np.array(self.data, dtype=dtype, copy=True)


def test_probe_finds_float64_where_it_exists():
    """numpy and array_api_strict's CPU device and device1 really hold float64."""
    assert probe_float64(NP)
    assert probe_float64(AA, "CPU_DEVICE") and probe_float64(AA, "device1")


def test_probe_detects_missing_float64():
    """The no_float64 device, a silent downcast, float32 precision and a refusal all read False."""
    assert not probe_float64(AA, "no_float64")
    assert not probe_float64(SilentFloat32())
    assert not probe_float64(Float64Rounded())
    assert not probe_float64(RefusesFloat64())


def test_capabilities_follow_the_probe_per_device():
    """array_api declares float64 on exactly the devices where the probe finds it."""
    for device in AA.devices():
        caps = AA.capabilities(device)
        assert caps.float64 == probe_float64(AA, device), device
    assert AA.capabilities("no_float64").dtypes == ("float32",)
    assert AA.capabilities("device1").dtypes == ("float32", "float64")


def test_capability_flags_report_declared_probed_and_routing():
    """capability_flags shows a declared-but-missing float64 and lists the routing methods."""
    flags = capability_flags(SilentFloat32())
    assert flags["float64_declared"] is True and flags["float64_probed"] is False
    assert flags["routing"] == list(ROUTING_METHODS)
    aa = capability_flags(AA, "no_float64")
    assert aa["dtypes"] == ["float32"] and aa["float64"] is False
    assert aa["float64_declared"] == aa["float64_probed"] is False
    assert aa["autodiff"] == "hand-written" and aa["dlpack"] is True


def test_list_devices_checks_names():
    """list_devices returns the names; an empty or non-string listing raises MemcoreError."""
    assert list_devices(NP) == ("cpu",)
    assert list_devices(AA)[0] == "CPU_DEVICE" and "no_float64" in list_devices(AA)

    class Empty(NumpyBackend):
        def devices(self):
            return ()

    class NotStrings(NumpyBackend):
        def devices(self):
            return ("cpu", 0)

    for bad in (Empty(), NotStrings()):
        with pytest.raises(MemcoreError, match=r"`devices\(\)` of backend 'numpy' must return"):
            list_devices(bad)


def test_protocol_gaps_name_missing_members():
    """A complete backend has no gaps; an object missing routing methods lists them."""
    assert protocol_gaps(NP) == [] and protocol_gaps(AA) == []

    class Half:
        name = "half"
        version = "0"

        def devices(self):
            return ("cpu",)

    assert protocol_gaps(Half()) == [
        "capabilities",
        "from_numpy",
        "to_numpy",
        "forward",
        "vjp",
        *ROUTING_METHODS,
    ]


def test_transfer_prefers_dlpack_and_keeps_values():
    """numpy -> array_api goes through DLPack onto the asked device, dtype and values kept."""
    x = np.arange(6.0).reshape(2, 3)
    moved = transfer(x, AA, source=NP, device="device1")
    assert moved.route == "dlpack"
    assert AA.device_of(moved.array) == "device1" and str(moved.array.dtype).endswith("float64")
    np.testing.assert_array_equal(AA.to_numpy(moved.array), x)
    back = transfer(moved.array, NP, source=AA)  # numpy has no from_dlpack hook: host copy
    assert back.route == "host" and back.array.dtype == np.float64
    np.testing.assert_array_equal(back.array, x)


def test_transfer_falls_back_to_a_host_copy():
    """No DLPack on the source, or DLPack refused by the target, still moves the values."""
    x = np.linspace(-1.0, 1.0, 5, dtype=np.float32)
    opaque = transfer(Opaque(x), AA, device="device1")
    assert opaque.route == "host" and AA.device_of(opaque.array) == "device1"
    np.testing.assert_array_equal(AA.to_numpy(opaque.array), x)
    # float64 cannot go onto no_float64 either way: the target's from_numpy says why.
    with pytest.raises(MemcoreError, match=r"`dtype` must be supported on device 'no_float64'"):
        transfer(x.astype(np.float64), AA, source=NP, device="no_float64")
    ok = transfer(x, AA, source=NP, device="no_float64")
    assert AA.device_of(ok.array) == "no_float64"


def test_to_dlpack_capable_respects_the_declared_flag():
    """An exporting array is returned as is; a backend without DLPack hands a NumPy copy."""
    a = AA.from_numpy(np.ones(3), device="device1")
    assert to_dlpack_capable(AA, a) is a
    x = np.ones(3)
    copy = to_dlpack_capable(NoDlpack(), x)
    assert copy is not x and isinstance(copy, np.ndarray)
    np.testing.assert_array_equal(copy, x)
    assert from_dlpack(NoDlpack(), x) is not x  # no hook, so a host copy via from_numpy


def test_from_dlpack_hook_imports_without_copy_on_the_host():
    """array_api's from_dlpack hook imports a NumPy array onto the asked device, values kept."""
    x = np.arange(4.0)
    a = from_dlpack(AA, x, device="CPU_DEVICE")
    assert AA.device_of(a) == "CPU_DEVICE"
    np.testing.assert_array_equal(AA.to_numpy(a), x)
