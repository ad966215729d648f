"""The array_api backend: the reference's forward and backward on array-api-strict passes the
conformance suite on its devices, a device without float64 gets float64 checks skipped with
the reason (never passed), arrays stay on their device, and bad construction is refused."""

from __future__ import annotations

import numpy as np
import pytest

import memcore
from memcore import MemcoreError, reference
from memcore.conformance.runner import run_backend
from memcore.conformance.xfails import XfailList
from memcore.ops import OPS
from memcore.opspec import Sizes
from memcore.reference.routing.samples import memformer_sample, sab_sample

xp = pytest.importorskip("array_api_strict", reason="the array_api backend needs array-api-strict")

from memcore.backends.array_api import ArrayApiBackend, default_backend

AA = ArrayApiBackend(xp)
# Two drawn layouts per unit keep the whole file to a few seconds under every profile.
LAYOUTS = 2


def _statuses(results, dtype):
    return {r.status for r in results if r.dtype == dtype}


@pytest.mark.parametrize("device", ["CPU_DEVICE", "device1"])
def test_suite_passes_on_array_api_strict(device):
    """Every op and routing check passes in float64 and float32 on a float64-capable device."""
    results = run_backend(
        AA, device=device, dtypes=["float64", "float32"], profile="ci", layouts=LAYOUTS
    )
    failed = [f"{r.id}: {r.reason}" for r in results if r.status != "passed"]
    assert not failed, "\n".join(failed)
    assert {r.op for r in results} == set(OPS) | {"memformer", "sab"}


def test_no_float64_device_skips_float64_with_the_reason():
    """On no_float64, float64 checks are all skipped (reason given), float32 checks all pass."""
    results = run_backend(
        AA, device="no_float64", dtypes=["float64", "float32"], profile="ci", layouts=LAYOUTS
    )
    f64 = [r for r in results if r.dtype == "float64"]
    assert f64 and _statuses(results, "float64") == {"skipped"}
    for r in f64:
        assert "does not support float64" in r.reason and "no_float64" in r.reason, r.reason
        assert r.examples == 0 and r.worst is None
    assert _statuses(results, "float32") == {"passed"}
    assert len(f64) == len([r for r in results if r.dtype == "float32"])


def test_default_dtypes_follow_the_probed_capabilities():
    """Without explicit dtypes the runner checks float32 only on no_float64, both elsewhere."""
    only = run_backend(AA, device="no_float64", ops=["bmn"], routing=False, layouts=1)
    assert {r.dtype for r in only} == {"float32"}
    both = run_backend(AA, device="device1", ops=["bmn"], routing=False, layouts=1)
    assert {r.dtype for r in both} == {"float64", "float32"}


def test_ops_match_the_numpy_reference_bit_for_bit_in_float64():
    """Forward and backward on array_api_strict equal the NumPy reference exactly (same algorithm)."""
    rng = np.random.default_rng(3)
    for name, spec in OPS.items():
        sample = spec.sample(rng, Sizes(), "float64")
        conv = [AA.from_numpy(x) if isinstance(x, np.ndarray) else x for x in sample.inputs]
        attrs = {
            k: AA.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in sample.attrs.items()
        }
        out, cache = reference.forward(name, *sample.inputs, **sample.attrs)
        ct = tuple(np.ones_like(o) for o in out) if spec.multi_output else np.ones_like(out)
        ct_a = tuple(AA.from_numpy(c) for c in ct) if spec.multi_output else AA.from_numpy(ct)
        got_out, got_grads = AA.vjp(name, conv, attrs, ct_a)
        want_grads = reference.backward(name, cache, ct)
        outs = zip(got_out, out) if spec.multi_output else [(got_out, out)]
        for g, w in list(outs) + list(zip(got_grads, want_grads)):
            if w is None:
                assert g is None, name
                continue
            np.testing.assert_array_equal(AA.to_numpy(g), w, err_msg=name)


def test_routing_keeps_arrays_on_their_device():
    """mrbp and sparse replay on device1 return device1 arrays and the reference's numbers."""
    rng = np.random.default_rng(5)
    for sample, method in ((memformer_sample(rng), "mrbp"), (sab_sample(rng), "sab_sparse_replay")):

        def conv(v):
            if isinstance(v, tuple):
                return tuple(conv(a) for a in v)
            return AA.from_numpy(v, device="device1")

        params = {k: conv(v) for k, v in sample.params.items()}
        got = getattr(AA, method)(
            params,
            conv(sample.xs),
            conv(sample.state0),
            conv(sample.targets),
            config=sample.config,
            loss=sample.loss,
        )
        want = getattr(memcore.get_backend("numpy"), method)(
            sample.params,
            sample.xs,
            sample.state0,
            sample.targets,
            config=sample.config,
            loss=sample.loss,
        )
        assert got.loss == pytest.approx(want.loss, rel=1e-12)
        for k, g in got.grads.items():
            assert AA.device_of(g) == "device1", (method, k)
            np.testing.assert_allclose(AA.to_numpy(g), want.grads[k], rtol=1e-10, atol=1e-12)
        assert got.peak_cache_bytes > 0


def test_devices_and_conversion_errors():
    """Devices are listed by name; an unknown device or float64 on no_float64 raises MemcoreError."""
    assert AA.devices() == ("CPU_DEVICE", "device1", "device2", "no_float64", "no_x64")
    with pytest.raises(MemcoreError, match=r"`device` must be one of .*Received: device='gpu'"):
        AA.from_numpy(np.ones(2), device="gpu")
    with pytest.raises(MemcoreError, match=r"must be supported on device 'no_float64'.*float64"):
        AA.from_numpy(np.ones(2), dtype="float64", device="no_float64")
    with pytest.raises(MemcoreError, match=r"`device` must be one of"):
        ArrayApiBackend(xp, device="nowhere")
    assert ArrayApiBackend(xp, device="device1").devices()[0] == "device1"


def test_namespace_without_required_functions_is_refused():
    """A namespace missing functions the reference calls is named with what it lacks."""

    class Partial:
        __name__ = "partial_ns"
        asarray = staticmethod(np.asarray)

    with pytest.raises(MemcoreError, match=r"'partial_ns' lacks abs, all, .*matmul"):
        ArrayApiBackend(Partial())


def test_numpy_namespace_also_works():
    """NumPy >= 2 is an Array API namespace: the same backend class runs on it."""
    be = ArrayApiBackend(np, name="array_api_numpy")
    assert be.devices() == ("cpu",) and be.capabilities().float64
    res = run_backend(be, ops=["memory_write"], routing=False, layouts=1, xfails=XfailList())
    assert {r.status for r in res} == {"passed"}


def test_registered_factory_uses_array_api_strict():
    """get_backend('array_api') is an ArrayApiBackend over array_api_strict."""
    be = default_backend()
    assert be.xp is xp and be.name == "array_api"
    assert isinstance(memcore.get_backend("array_api"), ArrayApiBackend)
