"""Cross-framework agreement checks (conformance/cross.py)."""

from __future__ import annotations

import pytest

from memcore.backends.numpy import NumpyBackend
from memcore.conformance.broken import ScaledBackward
from memcore.conformance.cross import cross_check


def test_identical_backends_agree_on_every_op_and_driver():
    """Two numpy backends pass every cross check, ops and routing, in both dtypes."""
    results = cross_check(NumpyBackend(), NumpyBackend(), devices=("cpu", "cpu"),
                          dtypes=["float64", "float32"], profile="dev")
    assert results and all(r.status == "passed" for r in results), [r.reason for r in results if r.failed]
    assert {r.check for r in results} == {"cross_vjp", "cross_mrbp", "cross_sab_sparse_replay"}


def test_a_wrong_backward_is_caught_by_the_cross_check_of_its_op_only():
    """A backend with one mis-scaled backward fails that op's cross_vjp and nothing else."""
    bad = ScaledBackward()
    results = cross_check(NumpyBackend(), bad, devices=("cpu", "cpu"), dtypes=["float64"],
                          profile="dev", routing=False)
    failed = {r.op for r in results if r.failed}
    assert failed == {bad.target}


def test_torch_and_jax_agree():
    """torch and jax (each with its own autodiff) agree on the same inputs."""
    torch_b = pytest.importorskip("memcore.backends.torch", reason="needs torch").TorchBackend()
    jax_b = pytest.importorskip("memcore.backends.jax", reason="needs jax").JaxBackend()
    results = cross_check(torch_b, jax_b, devices=("cpu", "cpu"), dtypes=["float64"], profile="dev",
                          ops=["memory_write", "sparse_retrieve"])
    assert all(r.status == "passed" for r in results), [r.reason for r in results if r.failed]
