"""Generated bad inputs across backends and ops (issue 15, op level).

Every backend (numpy, torch, jax, array_api: those installed) times every op: bad
cotangents, foreign arrays, bad ``from_numpy``/``to_numpy``/``vjp`` arguments raise
``MemcoreError`` naming the argument; gradients take the inputs' dtype; extreme but valid
inputs (rows of norm 1e20, tau near its bound, inputs of size 1e4) stay finite and accurate.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import memcore
from memcore import MemcoreError
from memcore import reference as ref
from memcore.opspec import Sizes, Tensor, dtype_name
from memcore.routing_types import Loss

BACKENDS = [
    b
    for b, mod in [
        ("numpy", "numpy"),
        ("torch", "torch"),
        ("jax", "jax"),
        ("array_api", "array_api_strict"),
        ("cupy", "cupy"),  # GPU machines only
    ]
    if importlib.util.find_spec(mod) is not None
]
OPS = list(memcore.OPS)
SMALL = Sizes(B=2, L=2, K=3, H=1, dh=2, I=2, Hd=2, N=3, A=2)


def _backend(name: str):
    if name == "jax":
        import jax

        if not jax.config.jax_enable_x64:
            pytest.skip("needs JAX_ENABLE_X64=1 (float64 samples)")
    return memcore.get_backend(name)


def _call(backend, name: str, dtype: str = "float64", seed: int = 0):
    """(inputs, attrs) of a valid call of ``name`` as ``backend``'s arrays."""
    spec = memcore.get_op(name)
    sample = spec.sample(np.random.default_rng(seed), SMALL, dtype)
    ins = [backend.from_numpy(x) for x in sample.inputs]
    arrays = {a.name for a in spec.attributes if isinstance(a, Tensor)}
    at = {
        k: backend.from_numpy(v) if k in arrays and v is not None else v
        for k, v in sample.attrs.items()
    }
    return ins, at


def _ones_like_outputs(name: str, dtype: str = "float64") -> list[np.ndarray]:
    """A cotangent of ones per output, shaped from the spec (no forward call to compile)."""
    spec = memcore.get_op(name)
    sample = spec.sample(np.random.default_rng(0), SMALL, dtype)
    bound, filled = spec.validate(sample.inputs, sample.attrs)
    return [np.ones(shape, dtype) for shape in spec.output_shapes(bound, filled)]


def _pack(name, cts):
    return tuple(cts) if memcore.get_op(name).multi_output else cts[0]


def _foreign(backend_name: str):
    """A maker of another framework's array, or None when that framework is missing."""
    if backend_name == "torch":
        if importlib.util.find_spec("jax") is None:
            return None
        import jax.numpy as jnp

        return lambda x: jnp.asarray(x)
    if importlib.util.find_spec("torch") is None:
        return None
    import torch

    return lambda x: torch.tensor(np.asarray(x))


def _bad_cotangents(backend, name, good: list[np.ndarray]):
    """(label, cotangent) pairs that must all be refused."""
    cases = []
    for i, g in enumerate(good):
        def swap(v, i=i):
            cts = [backend.from_numpy(c) for c in good]
            cts[i] = v
            return _pack(name, cts)

        cases.append((f"[{i}] None", swap(None)))
        cases.append((f"[{i}] list", swap(g.tolist())))
        cases.append((f"[{i}] rank+1", swap(backend.from_numpy(g[None]))))
        if g.ndim and g.shape[0] > 1:
            cases.append((f"[{i}] broadcastable", swap(backend.from_numpy(g[:1]))))
        if g.ndim:
            cases.append((f"[{i}] short last axis", swap(backend.from_numpy(g[..., :-1]))))
        cases.append((f"[{i}] int", swap(backend.from_numpy(g.astype(np.int64)))))
        cases.append((f"[{i}] bool", swap(backend.from_numpy(g > 0))))
        for bad in (np.nan, np.inf):
            if g.size:
                h = g.copy()
                h.flat[0] = bad
                cases.append((f"[{i}] {bad}", swap(backend.from_numpy(h))))
        foreign = _foreign(backend.name)
        if foreign is not None:
            cases.append((f"[{i}] foreign", swap(foreign(g))))
    cts = [backend.from_numpy(c) for c in good]
    if memcore.get_op(name).multi_output:
        cases += [("one array", cts[0]), ("too short", tuple(cts[:1])), ("too long", tuple(cts) * 2)]
    else:
        cases += [("tuple", (cts[0],))]
    return cases


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("name", OPS)
def test_vjp_refuses_bad_cotangents(backend_name, name):
    """None, lists, wrong rank or shape (broadcastable too), int/bool, NaN/Inf, foreign arrays
    and wrong arity are MemcoreErrors naming `cotangent`, before any computation."""
    backend = _backend(backend_name)
    ins, at = _call(backend, name)
    good = _ones_like_outputs(name)
    for label, ct in _bad_cotangents(backend, name, good):
        with pytest.raises(MemcoreError, match=r"`cotangent.*Received: ") as info:
            backend.vjp(name, ins, at, ct)
        assert "`cotangent" in str(info.value), f"{backend_name} {name} {label}: {info.value}"


def test_nan_cotangent_passes_when_check_finite_is_off():
    """With check_finite off, a NaN cotangent is computed with (NaN gradients), not refused."""
    backend = memcore.get_backend("numpy")
    ins, at = _call(backend, "bmn")
    ct = np.full((SMALL.B, SMALL.K, SMALL.D), np.nan)
    with memcore.options(check_finite=False):
        _, (dm, _) = backend.vjp("bmn", ins, at, ct)
    assert np.isnan(dm).all()


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("dtypes", [("float32", "float64"), ("float64", "float32")])
def test_gradients_take_the_inputs_dtype(backend_name, name, dtypes):
    """A cotangent of another float dtype gives gradients (and output) in the inputs' dtype
    (valid cotangents pass the checks of test_vjp_refuses_bad_cotangents)."""
    backend = _backend(backend_name)
    in_dtype, ct_dtype = dtypes
    if backend_name == "jax" and in_dtype == "float64":
        pytest.skip("JAX casts inside the traced VJP: float32 inputs cover it (saves compiles)")
    ins, at = _call(backend, name, in_dtype)
    cts = [backend.from_numpy(c, dtype=ct_dtype) for c in _ones_like_outputs(name)]
    out, grads = backend.vjp(name, ins, at, _pack(name, cts))
    assert all(dtype_name(o) == in_dtype for o in (out if isinstance(out, tuple) else (out,)))
    got = [dtype_name(g) for g in grads if g is not None]
    assert got and all(d == in_dtype for d in got), f"{backend_name} {name}: {got}"


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("name", OPS)
def test_foreign_arrays_are_refused_by_name(backend_name, name):
    """Another framework's array as any input or array attribute is a MemcoreError naming it."""
    backend = _backend(backend_name)
    foreign = _foreign(backend_name)
    if foreign is None:
        pytest.skip("needs the other framework (torch or jax) installed")
    spec = memcore.get_op(name)
    sample = spec.sample(np.random.default_rng(0), SMALL, "float64")
    ins, at = _call(backend, name)
    for i, t in enumerate(spec.inputs):
        bad = list(ins)
        bad[i] = foreign(sample.inputs[i])
        with pytest.raises(MemcoreError, match=rf"`{t.name}` must be .* for the {backend.name} backend"):
            backend.forward(name, *bad, **at)
    for a in spec.attributes:
        if isinstance(a, Tensor) and sample.attrs.get(a.name) is not None:
            with pytest.raises(MemcoreError, match=rf"`{a.name}` must be .*Received: "):
                backend.forward(name, *ins, **{**at, a.name: foreign(sample.attrs[a.name])})


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_array_conversions_refuse_bad_arguments(backend_name):
    """from_numpy with an unknown dtype and to_numpy of None or a foreign array name the argument."""
    backend = _backend(backend_name)
    x = np.ones((2, 3))
    for dtype in ("banana", 5, "float33"):
        with pytest.raises(MemcoreError, match=r"`dtype` must be .*Received: dtype="):
            backend.from_numpy(x, dtype=dtype)
    bad = [None, 3.0, "x", [1.0, 2.0]]
    foreign = _foreign(backend_name)
    if foreign is not None:
        bad.append(foreign(x))
    for value in bad:
        with pytest.raises(MemcoreError, match=r"`x` of to_numpy must be .*Received: "):
            backend.to_numpy(value)


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("name", OPS)
def test_vjp_refuses_bad_attribute_and_input_containers(backend_name, name):
    """vjp(op, inputs, None, ct) and a non-sequence `inputs` are MemcoreErrors naming them."""
    backend = _backend(backend_name)
    ins, at = _call(backend, name)
    cts = _pack(name, [backend.from_numpy(c) for c in _ones_like_outputs(name)])
    for attributes in (None, 5, [("num_heads", 1)]):
        with pytest.raises(MemcoreError, match=r"`attributes` of .* must be a mapping.*Received: "):
            backend.vjp(name, ins, attributes, cts)
    with pytest.raises(MemcoreError, match=r"`inputs` of .* must be a tuple or list.*Received: "):
        backend.vjp(name, ins[0], at, cts)


@given(name=st.one_of(st.integers(), st.floats(), st.binary(), st.lists(st.text(), max_size=2),
                      st.just(""), st.builds(object)))
@settings(max_examples=8)
def test_get_backend_refuses_non_string_names(name):
    """get_backend / use_backend with anything but a non-empty str name a MemcoreError listing choices."""
    with pytest.raises(MemcoreError, match=r"`name` must be a backend name .*Received: .*Available: "):
        memcore.get_backend(name)
    with (
        pytest.raises(MemcoreError, match=r"`name` must be a backend name"),
        memcore.use_backend(name),
    ):
        pass  # pragma: no cover - never entered


@given(weights=st.one_of(
    st.integers(), st.text(min_size=1), st.dictionaries(st.text(), st.floats(), min_size=1),
    st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=1).filter(
        lambda w: not all(np.isfinite(w))),
    st.lists(st.one_of(st.none(), st.text(), st.booleans()), min_size=1),
))
@settings(max_examples=20)
def test_loss_refuses_bad_weights(weights):
    """Loss weights that are not a sequence of finite reals (5, 'ab', NaN, None entries) are refused."""
    with pytest.raises(MemcoreError, match=r"`loss.weights` must be None or a sequence of finite"):
        Loss("mse", weights)


def test_loss_accepts_good_weights_and_is_exported():
    """Lists, tuples, NumPy arrays and NumPy scalars become a tuple of floats; memcore.Loss exists."""
    assert memcore.Loss is Loss and "Loss" in memcore.__all__
    assert Loss("mse", np.array([1.0, 0.5])).weights == (1.0, 0.5)
    assert Loss("xent", [1, np.float32(2)]).weights == (1.0, 2.0)
    assert Loss().weights is None


# ------------------------------------------------------------------ extreme but valid inputs
@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("scale", [1e-10, 1e19, 1e20, 1e30, 1e38])
def test_bmn_rows_of_extreme_norm_stay_on_the_unit_sphere(backend_name, scale):
    """float32 rows of norm up to 1e38 (u * u overflows) and down to 1e-10 normalize to norm 1."""
    backend = _backend(backend_name)
    rng = np.random.default_rng(0)
    m = (rng.uniform(-1, 1, (2, 3, 8)) * scale).astype(np.float32)
    v = np.zeros((3, 8), np.float32)
    for name, args, kw in (("bmn", (m, v), {}), ("memory_init", (m[0],), {"batch_size": 2})):
        out = backend.to_numpy(backend.forward(name, *[backend.from_numpy(a) for a in args], **kw))
        norms = np.linalg.norm(out.astype(np.float64), axis=-1)
        np.testing.assert_allclose(norms, 1.0, rtol=1e-6, err_msg=f"{backend_name} {name} {scale}")
        want = ref.forward(name, *[a.astype(np.float64) for a in args], **kw)[0]
        np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6, err_msg=f"{backend_name} {name}")


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # (s - max) * c -> -inf
@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("name", ["slot_attention", "memory_write"])
@pytest.mark.parametrize(
    "scale, tau", [(1e4, 1e-3), (1.0, 3e-10), (30.0, 2.0**-126)]
)
def test_slot_write_stays_finite_at_small_tau_and_large_inputs(backend_name, name, scale, tau):
    """float32, no token mask: tau down to 2**-126 and inputs of size 1e4 give finite outputs,
    equal to the float32 reference (the softmax subtracts the max before scaling)."""
    backend = _backend(backend_name)
    spec = memcore.get_op(name)
    sample = spec.sample(np.random.default_rng(3), Sizes(), "float32")
    ins = [(x * scale).astype(np.float32) if i < 2 else x for i, x in enumerate(sample.inputs)]
    at = {"num_heads": sample.attrs["num_heads"], "tau": tau}
    out = backend.to_numpy(backend.forward(name, *[backend.from_numpy(x) for x in ins], **at))
    want = ref.forward(name, *ins, **at)[0]
    assert np.isfinite(out).all() and np.isfinite(want).all()
    np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def _read_grad_error(backend, ins, ct) -> float:
    """Max gradient error relative to the largest float64-reference gradient entry."""
    _, cache = ref.memory_read_forward(*[x.astype(np.float64) for x in ins], num_heads=2)
    want = ref.memory_read_backward(cache, ct.astype(np.float64))
    if backend is None:  # the reference's own float32 error
        _, c32 = ref.memory_read_forward(*ins, num_heads=2)
        got = ref.memory_read_backward(c32, ct)
    else:
        _, got = backend.vjp(
            "memory_read", [backend.from_numpy(x) for x in ins], {"num_heads": 2}, backend.from_numpy(ct)
        )
        got = [backend.to_numpy(g) for g in got]
    big = max(np.abs(w).max() for w in want)
    return max(np.abs(np.asarray(g, np.float64) - w).max() for g, w in zip(got, want)) / big


@pytest.mark.parametrize("backend_name", [b for b in ("torch", "jax") if b in BACKENDS])
@pytest.mark.parametrize("scale", [1e2, 1e3, 1e4])
def test_memory_read_float32_gradients_stay_accurate_at_large_input_scale(backend_name, scale):
    """float32 read gradients at input scale 1e2-1e4 stay within 10x the reference's own
    float32 error (relative to the largest gradient entry), as at unit scale."""
    backend = memcore.get_backend(backend_name)
    for b, l_tok, k, d in ((2, 8, 8, 16), (2, 16, 4, 64)):
        rng = np.random.default_rng(int(scale))
        ins = [rng.uniform(-1, 1, s) for s in [(b, l_tok, d), (b, k, d)] + [(d, d)] * 4]
        ins = [(x * (scale if i < 2 else 1.0)).astype(np.float32) for i, x in enumerate(ins)]
        ct = rng.uniform(-1, 1, (b, l_tok, d)).astype(np.float32)
        floor = max(_read_grad_error(None, ins, ct), 1e-6)
        assert _read_grad_error(backend, ins, ct) <= 10 * floor, (backend_name, scale, (b, l_tok, k, d))
