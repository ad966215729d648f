"""The torch backend's ops against the NumPy reference: forward and autograd VJP per dtype,
error messages, input immutability, and the protocol hooks (devices, arrays, numerics)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip(
    "torch", reason="the torch backend needs torch (pip install 'memcore[torch]')"
)

from hypothesis import given

import memcore
from memcore import MemcoreError, reference
from memcore.backends.torch import TorchBackend
from memcore.conformance.strategies import samples
from memcore.ops import OPS, error_cases
from memcore.opspec import Sizes

BE = TorchBackend()
# max |got - want| <= atol + rtol * max |want| over the array (gradients of sparsify can be
# large where the normalizer is small, so the bound scales with the array's magnitude).
TOL = {
    "float64": (1e-10, 1e-12),
    "float32": (2e-4, 1e-5),
    "bfloat16": (6e-2, 3e-2),
    "float16": (1e-2, 5e-3),
}
SIZES = Sizes(B=2, L=3, K=3, H=2, dh=2, I=3, Hd=4, N=5, A=3)


def _close(got, want, dtype: str, what: str, extra_atol: float = 0.0) -> None:
    got = np.asarray(BE.to_numpy(got), dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"{what} [{dtype}]: shape {got.shape} != {want.shape}"
    if not want.size:
        return
    rtol, atol = TOL[dtype]
    atol += extra_atol
    err = np.abs(got - want)
    bound = atol + rtol * float(np.abs(want).max())
    idx = np.unravel_index(int(err.argmax()), err.shape)
    assert err.max() <= bound, (
        f"{what} [{dtype}]: max abs error {err.max():.3e} at {idx} > {bound:.3e}"
    )


def _to_torch(x, dtype: str | None):
    if isinstance(x, np.ndarray):
        return BE.from_numpy(x, dtype=dtype if x.dtype.kind == "f" else None)
    return x


def _compare(op: str, sample, dtype: str, seed: int = 0) -> None:
    """Forward and VJP of ``op`` in ``dtype`` against the reference on the rounded inputs."""
    spec = OPS[op]
    rounded = tuple(
        x.astype(dtype if dtype in ("float32", "float64") else np.float32).astype(np.float64)
        if isinstance(x, np.ndarray) and x.dtype.kind == "f"
        else x
        for x in sample.inputs
    )
    ins = tuple(_to_torch(x, dtype) for x in sample.inputs)
    if dtype in ("bfloat16", "float16"):  # the reference sees exactly the half-rounded values
        rounded = tuple(BE.to_numpy(t).astype(np.float64) for t in ins)
    attrs = {k: _to_torch(v, None) for k, v in sample.attrs.items()}
    want, cache = reference.forward(op, *rounded, **sample.attrs)
    outs = want if spec.multi_output else (want,)
    rng = np.random.default_rng(seed)
    cts = tuple(rng.uniform(-1, 1, o.shape) for o in outs)
    t_cts = tuple(BE.from_numpy(c, dtype=dtype) for c in cts)
    cts = tuple(BE.to_numpy(c).astype(np.float64) for c in t_cts)
    want_grads = reference.backward(op, cache, cts if spec.multi_output else cts[0])
    got = BE.forward(op, *ins, **attrs)
    got_out, got_grads = BE.vjp(op, ins, attrs, t_cts if spec.multi_output else t_cts[0])
    for stage, value in (("forward", got), ("vjp out", got_out)):
        for i, (g, w) in enumerate(zip(value if spec.multi_output else (value,), outs)):
            assert g.dtype == ins[0].dtype, f"{op} {stage}[{i}] dtype {g.dtype} != {ins[0].dtype}"
            _close(g, w, dtype, f"{op} {stage}[{i}]")
    extra = _cancellation_atol(op, cache, cts, dtype)
    for t, g, w in zip(spec.inputs, got_grads, want_grads):
        if w is None:
            assert g is None, f"{op}: non-differentiable {t.name} got a gradient"
            continue
        assert g.dtype == ins[0].dtype, f"{op} d{t.name} dtype {g.dtype}"
        _close(g, w, dtype, f"{op} d{t.name}", extra)


_DENOMINATORS = {  # where each op's backward divides by a quantity that can be small
    "sparsify": lambda c: c.denom,
    "sparse_retrieve": lambda c: c.sparsify.denom,
    "bmn": lambda c: c.n,
    "memory_write": lambda c: c.bmn.n,
    "memory_init": lambda c: c.n,
    "memory_reset": lambda c: c.init.n,
}


def _cancellation_atol(op: str, cache, cts, dtype: str) -> float:
    """Extra atol below float64 where the backward cancels then divides: sparsify's
    (d_w - <d_w, w>) / (sum z + eps) and normalize's (dy - y <y, dy>) / ||u|| lose
    ~ulp * |cotangent| / denominator in any float32 code, the reference's included."""
    if dtype == "float64" or op not in _DENOMINATORS:
        return 0.0
    denom = _DENOMINATORS[op](cache)
    if not np.size(denom):
        return 0.0
    scale = max(float(np.abs(c).max(initial=0.0)) for c in cts) + 1.0
    return 64 * float(np.finfo(np.float32).eps) * scale / float(np.min(denom))


def _make_hypothesis_test(dtype: str):
    @pytest.mark.parametrize("op", sorted(OPS))
    def test(op):
        @given(sample=samples(op))
        def inner(sample):
            _compare(op, sample, dtype)

        inner()

    test.__doc__ = (
        f"Forward and autograd VJP of every op match the reference in {dtype} on drawn samples."
    )
    return test


test_ops_match_reference_float64 = _make_hypothesis_test("float64")
test_ops_match_reference_float32 = _make_hypothesis_test("float32")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("op", sorted(OPS))
def test_half_precision_sanity(op, dtype):
    """Half types keep their dtype and agree loosely with the reference (float32 accumulation)."""
    sample = OPS[op].sample(np.random.default_rng(7), SIZES, "float64")
    _compare(op, sample, dtype, seed=1)


def test_half_softmax_accumulates_in_float32():
    """A bfloat16 read over many slots is as accurate as rounding its float32 result."""
    rng = np.random.default_rng(3)
    z = Sizes(B=2, L=4, K=64, H=2, dh=8)
    s = OPS["memory_read"].sample(rng, z, "float64")
    half = [BE.from_numpy(x, dtype="bfloat16") for x in s.inputs]
    out = BE.memory_read(*half, **s.attrs)
    exact = BE.memory_read(*[h.to(torch.float32) for h in half], **s.attrs)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, exact.to(torch.bfloat16))


def _tie_scores():
    return np.array(
        [[1.0, 2.0, 2.0, 3.0, 0.5], [0.3, 0.3, 0.3, 0.3, 0.3], [4.0, 1.0, 1.0, 1.0, -2.0]]
    )


@pytest.mark.parametrize("threshold_grad", [False, True])
@pytest.mark.parametrize("k_top", [1, 2, 4, 5, 9])
def test_sparsify_ties_and_small_n(k_top, threshold_grad):
    """At ties (and N <= k_top) weights and the tie-split threshold gradient equal the reference."""
    sample = memcore.opspec.Sample(
        (_tie_scores(),), {"k_top": k_top, "threshold_grad": threshold_grad}
    )
    _compare("sparsify", sample, "float64", seed=k_top)
    w = BE.sparsify(BE.from_numpy(_tie_scores()), k_top=k_top)
    assert int((w[1] != 0).sum()) == 0, "a row of equal scores has no entry above its threshold"


def test_sparsify_empty_and_single_memory():
    """N = 0 gives an empty result with empty gradients; a single memory gets weight 0."""
    empty = BE.from_numpy(np.zeros((2, 0)))
    out, (g,) = BE.vjp("sparsify", (empty,), {"k_top": 2}, BE.from_numpy(np.zeros((2, 0))))
    assert out.shape == (2, 0) and g.shape == (2, 0)
    one = BE.sparsify(BE.from_numpy(np.array([[0.7], [-1.0]])), k_top=3)
    assert torch.equal(one, torch.zeros_like(one))


@pytest.mark.parametrize("case", ["tau=1e-3", "fully masked", "zero-norm u"])
def test_edge_cases_match_reference(case):
    """tau = 1e-3, a fully masked segment and a zero-norm BMN input match the reference."""
    rng = np.random.default_rng(11)
    if case == "zero-norm u":
        m = rng.uniform(-1, 1, (2, 3, 4))
        v = -m[0].copy()
        _compare("bmn", memcore.opspec.Sample((m, v)), "float64")
        return
    s = OPS["memory_write"].sample(rng, SIZES, "float64")
    if case == "tau=1e-3":
        s = memcore.opspec.Sample(s.inputs, {**s.attrs, "tau": 1e-3})
    else:
        mask = np.zeros((SIZES.B, SIZES.L), dtype=bool)
        s = memcore.opspec.Sample(s.inputs, {**s.attrs, "token_mask": mask})
    _compare("memory_write", s, "float64")
    _compare("slot_attention", memcore.opspec.Sample(s.inputs[:5], s.attrs), "float64")


@pytest.mark.parametrize("op", sorted(OPS))
def test_error_cases_raise_the_reference_message(op):
    """Every declared error input raises MemcoreError with exactly the reference's message."""
    spec = OPS[op]
    sample = spec.sample(np.random.default_rng(0), SIZES, "float64")
    for case in error_cases(spec, sample):
        with pytest.raises(MemcoreError) as ref_exc:
            reference.forward(op, *case.sample.inputs, **case.sample.attrs)
        ins = tuple(_to_torch(x, None) for x in case.sample.inputs)
        attrs = {k: _to_torch(v, None) for k, v in case.sample.attrs.items()}
        for stage in ("forward", "vjp"):
            with pytest.raises(MemcoreError, match=case.match) as exc:
                if stage == "forward":
                    BE.forward(op, *ins, **attrs)
                else:
                    BE.vjp(op, ins, attrs, None)
            assert str(exc.value) == str(ref_exc.value), f"{op} {case.label} ({stage})"


@pytest.mark.parametrize("op", sorted(OPS))
def test_inputs_not_mutated(op):
    """forward and vjp leave inputs bit-identical, without .grad or requires_grad changes."""
    spec = OPS[op]
    sample = spec.sample(np.random.default_rng(5), SIZES, "float64")
    ins = tuple(_to_torch(x, "float64") for x in sample.inputs)
    attrs = {k: _to_torch(v, None) for k, v in sample.attrs.items()}
    before = [x.clone() for x in ins]
    out = BE.forward(op, *ins, **attrs)
    outs = out if spec.multi_output else (out,)
    ct = tuple(torch.ones_like(o) for o in outs)
    BE.vjp(op, ins, attrs, ct if spec.multi_output else ct[0])
    for x, b in zip(ins, before):
        assert torch.equal(x, b) and x.grad is None and not x.requires_grad


def test_arrays_round_trip_and_protocol():
    """from_numpy copies and casts (bfloat16 included), to_numpy returns float32 for half types."""
    x = np.random.default_rng(0).uniform(-1, 1, (3, 4))
    t = BE.from_numpy(x)
    x[0, 0] = 99.0
    assert t.dtype == torch.float64 and float(t[0, 0]) != 99.0
    b = BE.from_numpy(x, dtype="bfloat16")
    assert b.dtype == torch.bfloat16 and BE.to_numpy(b).dtype == np.float32
    assert BE.from_numpy(np.array([True, False])).dtype == torch.bool
    assert isinstance(BE, memcore.protocol.Backend)
    assert BE.devices()[0] == "cpu"
    caps = BE.capabilities("cpu")
    assert caps.autodiff == "native" and set(caps.dtypes) == {
        "float64",
        "float32",
        "bfloat16",
        "float16",
    }
    with pytest.raises(MemcoreError, match="`device` must be one of"):
        BE.from_numpy(x, device="tpu:0")
    with pytest.raises(MemcoreError, match="`dtype` must be"):
        BE.from_numpy(x, dtype="float8_weird")
    assert type(memcore.get_backend("torch")).__name__ == "TorchBackend"


def test_numerics_hooks():
    """pin_numerics turns TF32 off and numerics_settings reports it."""
    before = BE.numerics_settings()
    assert before["torch_version"] == torch.__version__
    pinned = BE.pin_numerics()
    assert pinned["cuda_matmul_fp32_precision"] in ("ieee", None)
    assert pinned["cuda_matmul_allow_tf32"] in (False, None)
    assert pinned["fp16_reduced_precision_reduction"] is False
