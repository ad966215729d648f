"""The JAX backend's ops against the NumPy reference: forward and jax.vjp per dtype, error
messages, jit compatibility, edge semantics (ties, relu'(0), zero norms), the x64 switch,
the protocol hooks, and a cross-framework check against the torch backend."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

jax = pytest.importorskip("jax", reason="the JAX backend needs jax (pip install 'memcore[jax]')")

import jax.numpy as jnp
from hypothesis import given, settings
from hypothesis import strategies as st

from memcore import MemcoreError, MemoryConfig, SABConfig, reference
from memcore.backends.jax import (
    JaxBackend,
    modules,
    sab,
    steps,
)
from memcore.conformance.compare import compare
from memcore.conformance.strategies import samples, seeds
from memcore.conformance.tolerances import Tol, tolerance
from memcore.ops import OPS, error_cases
from memcore.opspec import Sample, Sizes
from memcore.routing_types import MEMFORMER_PARAMS

BE = JaxBackend()
X64 = BE.x64_enabled()
needs_x64 = pytest.mark.skipif(
    not X64, reason="float64 needs JAX_ENABLE_X64=1 before jax is imported (tests/conftest.py)"
)
TIGHT = Tol(rtol=1e-10, atol=1e-12)  # float64: only summation order differs from the reference
# Fixed shapes, so each (op, dtype) compiles once per size while hypothesis draws the values;
# the second size has no tokens (L = 0) and no memories (N = 0).
FIXED = (
    Sizes(B=2, L=3, K=3, H=2, dh=2, I=3, Hd=4, N=5, A=3),
    Sizes(B=1, L=0, K=2, H=1, dh=2, I=2, Hd=3, N=0, A=2),
)
DTYPES = ("float64", "float32") if X64 else ("float32",)


def _dev(x, dtype=None):
    if isinstance(x, np.ndarray):
        return BE.from_numpy(x, dtype=dtype if x.dtype.kind == "f" else None)
    return x


def _seq(out):
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _check_op(op: str, sample: Sample, dtype: str, seed: int = 0) -> None:
    """Forward and VJP of ``op`` in ``dtype`` against the reference on the rounded inputs."""
    spec = OPS[op]
    ins = tuple(x.astype(dtype).astype(np.float64) for x in sample.inputs)
    ref_out, cache = reference.forward(op, *ins, **sample.attrs)
    rng = np.random.default_rng(seed)
    cts = tuple(
        rng.uniform(-1, 1, size=o.shape).astype(dtype).astype(np.float64) for o in _seq(ref_out)
    )
    ref_grads = reference.backward(op, cache, cts if spec.multi_output else cts[0])
    j_ins = tuple(_dev(x, dtype) for x in ins)
    j_attrs = {k: _dev(v) for k, v in sample.attrs.items()}
    j_cts = tuple(_dev(c, dtype) for c in cts)
    fwd = _seq(BE.forward(op, *j_ins, **j_attrs))
    out, grads = BE.vjp(op, j_ins, j_attrs, j_cts if spec.multi_output else j_cts[0])
    checks = []
    for stage, got, want in (
        ("forward", fwd, _seq(ref_out)),
        ("vjp", _seq(out) + tuple(grads), _seq(ref_out) + tuple(ref_grads)),
    ):
        tol = TIGHT if dtype == "float64" else tolerance(op, dtype, stage)
        for i, (g, w) in enumerate(zip(got, want)):
            assert str(g.dtype) == dtype, f"{op} {stage}[{i}]: dtype {g.dtype} != {dtype}"
            checks.append(compare(f"{op} {stage}[{i}] {dtype}", BE.to_numpy(g), w, tol))
    bad = [c.describe() for c in checks if not c.ok]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", list(OPS))
@given(size=st.sampled_from(FIXED), seed=seeds)
def test_op_matches_reference_on_fixed_shapes(op, dtype, size, seed):
    """Every op's forward and jax.vjp equal the reference (float64 to 1e-10, float32 per table)."""
    _check_op(op, OPS[op].sample(np.random.default_rng(seed), size, "float64"), dtype, seed)


@pytest.mark.parametrize("op", list(OPS))
@settings(max_examples=4)  # every new shape compiles; the fixed-shape test carries the volume
@given(data=st.data())
def test_op_matches_reference_on_drawn_shapes(op, data):
    """On the suite's shared drawn shapes (empties included) every op matches the reference."""
    _check_op(op, data.draw(samples(op)), DTYPES[0])


@pytest.mark.parametrize("dtype", ("bfloat16", "float16"))
@pytest.mark.parametrize("op", list(OPS))
def test_half_precision_outputs_keep_dtype_and_match(op, dtype):
    """Half inputs give half outputs and gradients, within the table's half-precision rows."""
    sample = OPS[op].sample(np.random.default_rng(7), FIXED[0], "float64")
    ins = tuple(
        BE.to_numpy(BE.from_numpy(x, dtype=dtype)).astype(np.float64) for x in sample.inputs
    )
    ref_out, _ = reference.forward(op, *ins, **sample.attrs)
    j_attrs = {k: _dev(v) for k, v in sample.attrs.items()}
    got = _seq(BE.forward(op, *(BE.from_numpy(x, dtype=dtype) for x in ins), **j_attrs))
    for g, w in zip(got, _seq(ref_out)):
        assert str(g.dtype) == dtype
        c = compare(
            f"{op} {dtype}", BE.to_numpy(g).astype(np.float64), w, tolerance(op, dtype, "forward")
        )
        assert c.ok, c.describe()


@needs_x64
@pytest.mark.parametrize("op", list(OPS))
def test_error_inputs_raise_the_reference_message(op):
    """Every declared bad call raises MemcoreError with exactly the reference's message."""
    sample = OPS[op].sample(np.random.default_rng(0), FIXED[0], "float64")
    for case in error_cases(OPS[op], sample):
        with pytest.raises(MemcoreError) as ref_exc:
            reference.forward(op, *case.sample.inputs, **case.sample.attrs)
        j_ins = tuple(_dev(x) for x in case.sample.inputs)
        j_attrs = {k: _dev(v) for k, v in case.sample.attrs.items()}
        with pytest.raises(MemcoreError, match=case.match) as exc:
            BE.forward(op, *j_ins, **j_attrs)
        assert str(exc.value) == str(ref_exc.value), case.label


def test_relu_derivative_at_zero_and_tied_thresholds():
    """relu'(0) = 0; tied thresholds give the reference's forward and split gradient."""
    assert float(jax.grad(sab.relu0)(0.0)) == 0.0
    assert float(jax.grad(jax.nn.relu)(0.0)) == 0.0  # jax's own relu agrees (checked, not assumed)
    scores = np.array([[0.5, 0.2, 0.2, 0.2, -0.1], [1.0, 1.0, 1.0, 0.0, 0.0]], dtype=DTYPES[0])
    ct = np.array([[0.3, -0.2, 0.5, 0.1, 0.7], [0.2, -0.4, 0.9, 0.3, -0.6]], dtype=DTYPES[0])
    for k_top in (1, 2, 3):
        for threshold_grad in (False, True):
            attrs = dict(k_top=k_top, threshold_grad=threshold_grad)
            want, cache = reference.sparsify_forward(scores.astype(np.float64), **attrs)
            (dwant,) = reference.sparsify_backward(cache, ct.astype(np.float64))
            out, (dgot,) = BE.vjp("sparsify", (BE.from_numpy(scores),), attrs, BE.from_numpy(ct))
            tol = TIGHT if X64 else tolerance("sparsify", "float32", "vjp")
            assert compare("w", BE.to_numpy(out), want, tol).ok
            assert compare("dscores", BE.to_numpy(dgot), dwant, tol).ok, (k_top, threshold_grad)


def test_zero_norm_rows_give_finite_gradients():
    """BMN and memory_init at a zero row follow the clamp rule (dy / eps) with no NaN."""
    dt = DTYPES[0]
    m = np.zeros((1, 2, 3), dtype=dt)
    v = np.zeros((2, 3), dtype=dt)
    v[1] = [0.3, -0.4, 0.0]
    ct = np.full((1, 2, 3), 1e-13, dtype=dt)
    out, (dm, dv) = BE.vjp("bmn", (BE.from_numpy(m), BE.from_numpy(v)), {}, BE.from_numpy(ct))
    want, cache = reference.bmn_forward(m.astype(np.float64), v.astype(np.float64))
    dm_ref, dv_ref = reference.bmn_backward(cache, ct.astype(np.float64))
    assert np.all(np.isfinite(BE.to_numpy(dm))) and np.all(np.isfinite(BE.to_numpy(dv)))
    tol = TIGHT if X64 else Tol(rtol=1e-5, atol=1e-6)
    for got, ref in ((out, want), (dm, dm_ref), (dv, dv_ref)):
        c = compare("bmn zero row", BE.to_numpy(got), ref, tol)
        assert c.ok, c.describe()


def test_ops_and_steps_are_jit_compatible_with_frozen_configs():
    """Configs hash as static arguments: jitted steps equal eager ones and do not retrace."""
    rng = np.random.default_rng(3)
    cfg = MemoryConfig(slots=3, dim=4, heads=2, tau=0.5)
    names = ("read_wq", "read_wk", "read_wv", "read_wo", "write_wq", "write_wk", "write_wv")
    params = {n: jnp.asarray(rng.uniform(-1, 1, (4, 4)), jnp.float32) for n in names}
    params["v_bias"] = jnp.asarray(rng.uniform(-1, 1, (3, 4)), jnp.float32)
    x = jnp.asarray(rng.uniform(-1, 1, (2, 5, 4)), jnp.float32)
    m = jnp.asarray(rng.uniform(-1, 1, (2, 3, 4)), jnp.float32)
    traces = []

    def step(p, x, m, config):
        traces.append(config)
        return steps.memformer_step(p, x, m, config=config)

    jitted = jax.jit(step, static_argnames=("config",))
    eager = steps.memformer_step(params, x, m, config=cfg)
    for _ in range(2):
        got = jitted(params, x, m, config=MemoryConfig(slots=3, dim=4, heads=2, tau=0.5))
    assert len(traces) == 1  # an equal frozen config hits the cache
    for g, e in zip(got, eager):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-6, atol=1e-6)
    scfg = SABConfig(k_top=2, threshold_grad=True)
    h = jnp.asarray(rng.uniform(-1, 1, (2, 3)), jnp.float32)
    mem = jnp.asarray(rng.uniform(-1, 1, (2, 4, 3)), jnp.float32)
    w1, w2, w3 = (jnp.asarray(rng.uniform(-1, 1, s), jnp.float32) for s in ((3, 2), (3, 2), (2,)))

    def retrieve(h, mem, config):
        return sab.sparse_retrieve(
            h, mem, w1, w2, w3, k_top=config.k_top, threshold_grad=config.threshold_grad
        )[0].sum()

    g_jit = jax.jit(jax.grad(retrieve, argnums=(0, 1)), static_argnames=("config",))(
        h, mem, config=scfg
    )
    g_eager = jax.grad(retrieve, argnums=(0, 1))(h, mem, scfg)
    for a, b in zip(g_jit, g_eager):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_modules_init_and_apply_are_pure_and_differentiable():
    """Reader, writer and SAB cell: init shapes, agreement with the ops, grads under jit."""
    key = jax.random.PRNGKey(0)
    r, w = modules.init_reader(key, 4), modules.init_writer(jax.random.PRNGKey(1), 3, 4)
    m0 = modules.writer_initial_memory(w, 2)
    x = jax.random.normal(key, (2, 5, 4), dtype=jnp.float32)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(m0), axis=-1), 1.0, rtol=1e-6)
    read = modules.reader(r, x, m0, num_heads=2)
    want = BE.forward("memory_read", x, m0, r["wq"], r["wk"], r["wv"], r["wo"], num_heads=2)
    np.testing.assert_allclose(np.asarray(read), np.asarray(want), rtol=1e-6, atol=1e-6)
    grads = jax.jit(jax.grad(lambda p: modules.writer(p, m0, x + read, num_heads=2).sum()))(w)
    assert set(grads) == {"wq", "wk", "wv", "v_bias"} and all(
        np.all(np.isfinite(np.asarray(g))) for g in grads.values()
    )
    assert tuple(sorted(modules.memformer_params(r, w))) == tuple(sorted(MEMFORMER_PARAMS))
    cell = modules.init_sab_cell(key, 2, 3, 2, 2)
    (h, c), y = modules.sab_cell(
        cell,
        jnp.ones((2, 2)),
        (jnp.zeros((2, 3)), jnp.zeros((2, 3))),
        jnp.ones((2, 4, 3)),
        config=SABConfig(k_top=2),
    )
    assert h.shape == c.shape == (2, 3) and y.shape == (2, 2)
    with pytest.raises(MemcoreError, match="`dim` must be an integer >= 1"):
        modules.init_reader(key, 0)


def test_devices_capabilities_and_numerics_hooks():
    """cpu is listed; float64 is offered exactly when x64 is on; numerics hooks report and pin."""
    assert BE.devices()[0] == "cpu"
    caps = BE.capabilities("cpu")
    assert caps.autodiff == "native" and caps.float64 == X64
    assert {"bfloat16", "float16", "float32"} <= set(caps.dtypes)
    with pytest.raises(MemcoreError, match="`device` must be one of"):
        BE.capabilities("tpu:7")
    before = jax.config.jax_default_matmul_precision
    try:
        settings_ = BE.pin_numerics()
        assert settings_["jax_default_matmul_precision"] == "highest"
        assert settings_["jax_enable_x64"] == X64
    finally:
        jax.config.update("jax_default_matmul_precision", before)
    x = np.arange(6.0).reshape(2, 3)
    y = BE.from_numpy(x, dtype="float32", device="cpu")
    assert str(y.dtype) == "float32" and np.array_equal(BE.to_numpy(y), x)


def test_float32_only_process_works_and_reports_no_float64():
    """With JAX_ENABLE_X64=0 float64 is not offered, is refused clearly, and float32 runs."""
    code = textwrap.dedent(
        """
        import numpy as np
        from memcore import MemcoreError, reference
        from memcore.backends.jax import JaxBackend
        from memcore.ops import OPS
        from memcore.opspec import Sizes
        be = JaxBackend()
        assert not be.x64_enabled()
        assert "float64" not in be.capabilities().dtypes, be.capabilities()
        try:
            be.from_numpy(np.zeros(3))
        except MemcoreError as e:
            assert "jax_enable_x64" in str(e)
        else:
            raise SystemExit("float64 was accepted without x64")
        s = OPS["memory_write"].sample(np.random.default_rng(0), Sizes(), "float32")
        ins = [be.from_numpy(x) for x in s.inputs]
        attrs = {k: be.from_numpy(v) if isinstance(v, np.ndarray) else v
                 for k, v in s.attrs.items()}
        ct = be.from_numpy(np.ones((2, 4, 6), np.float32))
        out, grads = be.vjp("memory_write", ins, attrs, ct)
        ins64 = (x.astype(np.float64) for x in s.inputs)
        want, cache = reference.memory_write_forward(*ins64, **s.attrs)
        assert out.dtype == np.float32 and np.abs(be.to_numpy(out) - want).max() < 1e-5
        print("ok")
        """
    )
    env = dict(os.environ, JAX_ENABLE_X64="0", JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]


def _torch_backend():
    pytest.importorskip("torch", reason="the cross-framework check needs torch")
    try:
        from memcore.backends.torch import TorchBackend
    except ImportError as exc:  # pragma: no cover - depends on the parallel torch work
        pytest.skip(f"memcore.backends.torch does not import yet: {exc}")
    return TorchBackend()


@needs_x64
@pytest.mark.parametrize("op", list(OPS))
def test_torch_and_jax_agree_on_every_op(op):
    """Cross-framework: torch autograd and jax.vjp give the same outputs and gradients (float64)."""
    tb = _torch_backend()
    sample = OPS[op].sample(np.random.default_rng(11), FIXED[0], "float64")
    spec = OPS[op]
    ref_out, _ = reference.forward(op, *sample.inputs, **sample.attrs)
    cts = tuple(np.random.default_rng(12).uniform(-1, 1, size=o.shape) for o in _seq(ref_out))
    results = []
    for be in (BE, tb):
        ins = [be.from_numpy(x) for x in sample.inputs]
        attrs = {
            k: be.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in sample.attrs.items()
        }
        ct = tuple(be.from_numpy(c) for c in cts)
        out, grads = be.vjp(op, ins, attrs, ct if spec.multi_output else ct[0])
        results.append([be.to_numpy(a) for a in _seq(out) + tuple(grads)])
    for i, (j, t) in enumerate(zip(*results)):
        c = compare(f"{op}[{i}] jax vs torch", j, t, TIGHT)
        assert c.ok, c.describe()


@needs_x64
def test_threshold_entry_gets_exactly_zero_weight_under_xla_fusion():
    """A threshold score that XLA could fuse into an FMA still gets weight 0 and no gradient
    (regression: a sub-ulp z at the threshold once gave its memory a 0.03 gradient)."""
    sizes = Sizes(B=2, L=2, K=2, H=2, dh=2, I=3, Hd=1, N=4, A=1)
    sample = OPS["sparse_retrieve"].sample(np.random.default_rng(802589407), sizes, "float64")
    _check_op("sparse_retrieve", sample, "float64")
    out = BE.forward("sparse_retrieve", *(BE.from_numpy(x) for x in sample.inputs), **sample.attrs)
    want, _ = reference.sparse_retrieve_forward(*sample.inputs, **sample.attrs)
    assert np.array_equal(BE.to_numpy(out[1]) == 0, want[1] == 0)
