"""Backends as building blocks of trainable models (issue 13, item 1).

torch: ``forward`` and the ``backend.<op>`` shortcuts join autograd, and ``.backward()``
gives the reference's gradient. JAX: every op works under ``jax.jit``, ``jax.grad`` and
``jax.vmap``, with gradients equal to the reference's. Every op of the registry with a
differentiable input is covered, in float64, from its own sample inputs.
"""

from __future__ import annotations

import numpy as np
import pytest

import memcore
from memcore import MemcoreError
from memcore import reference as ref
from memcore.opspec import Sizes, Tensor

DIFF_OPS = [name for name, spec in memcore.OPS.items() if any(spec.differentiable)]
RTOL, ATOL = 1e-10, 1e-12


def _sample(name: str, seed: int = 0):
    spec = memcore.get_op(name)
    return spec, spec.sample(np.random.default_rng(seed), Sizes(), "float64")


def _cotangents(spec, out, seed: int = 1) -> tuple[np.ndarray, ...]:
    outs = out if spec.multi_output else (out,)
    rng = np.random.default_rng(seed)
    return tuple(rng.uniform(-1.0, 1.0, np.shape(o)) for o in outs)


def _reference(name: str, sample) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray | None, ...]]:
    spec = memcore.get_op(name)
    out, cache = ref.forward(name, *sample.inputs, **sample.attrs)
    cts = _cotangents(spec, out)
    grads = ref.backward(name, cache, cts if spec.multi_output else cts[0])
    return cts, grads


def _close(got, want, label: str) -> None:
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    scale = max(1.0, float(np.abs(want).max(initial=0.0)))
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL * scale, err_msg=label)


def _array_attrs(spec) -> set[str]:
    return {a.name for a in spec.attributes if isinstance(a, Tensor)}


# ------------------------------------------------------------------ torch
@pytest.mark.parametrize("name", DIFF_OPS)
def test_torch_forward_backward_gives_the_reference_gradient(name):
    """backend.<op>(...) on requires_grad tensors has a grad_fn; .backward() = reference VJP."""
    torch = pytest.importorskip("torch", reason="needs torch")
    tb = memcore.get_backend("torch")
    spec, sample = _sample(name)
    cts, want = _reference(name, sample)
    leaves = [torch.tensor(x, requires_grad=d) for x, d in zip(sample.inputs, spec.differentiable)]
    out = getattr(tb, name)(*leaves, **sample.attrs)
    outs = out if spec.multi_output else (out,)
    assert all(o.grad_fn is not None for o in outs), f"{name}: output left the graph"
    loss = sum((o * torch.tensor(c)).sum() for o, c in zip(outs, cts))
    loss.backward()
    for t, leaf, g in zip(spec.inputs, leaves, want):
        if not t.differentiable:
            assert leaf.grad is None
            continue
        got = np.zeros_like(g) if leaf.grad is None else leaf.grad.numpy()
        _close(got, g, f"torch {name} d{t.name}")


@pytest.mark.parametrize("name", DIFF_OPS)
def test_torch_forward_keeps_no_graph_without_requires_grad(name):
    """Plain tensors, or grad mode off, give outputs with no grad_fn (nothing is recorded)."""
    torch = pytest.importorskip("torch", reason="needs torch")
    tb = memcore.get_backend("torch")
    spec, sample = _sample(name)
    plain = [torch.tensor(x) for x in sample.inputs]
    wanting = [torch.tensor(x, requires_grad=d) for x, d in zip(sample.inputs, spec.differentiable)]
    with torch.no_grad():
        quiet = tb.forward(name, *wanting, **sample.attrs)
    for out in (tb.forward(name, *plain, **sample.attrs), quiet):
        for o in out if spec.multi_output else (out,):
            assert o.grad_fn is None and not o.requires_grad


def test_torch_vjp_leaves_the_callers_tensors_untouched():
    """vjp differentiates fresh leaves: the caller's .grad stays None and no graph leaks out."""
    torch = pytest.importorskip("torch", reason="needs torch")
    tb = memcore.get_backend("torch")
    _spec, sample = _sample("memory_write")
    leaves = [torch.tensor(x, requires_grad=True) for x in sample.inputs]
    out = tb.forward("memory_write", *leaves, **sample.attrs)
    out2, grads = tb.vjp("memory_write", leaves, sample.attrs, torch.ones_like(out.detach()))
    assert all(leaf.grad is None for leaf in leaves)
    assert out2.grad_fn is None and all(g.grad_fn is None for g in grads)


# ------------------------------------------------------------------ jax
def _jax():
    jax = pytest.importorskip("jax", reason="needs jax")
    if not jax.config.jax_enable_x64:
        pytest.skip("needs JAX_ENABLE_X64=1 for the float64 comparison")
    return jax


def _split_attrs(spec, attrs):
    arrays = {k: v for k, v in attrs.items() if k in _array_attrs(spec) and v is not None}
    static = {k: v for k, v in attrs.items() if k not in arrays}
    return static, arrays


@pytest.mark.parametrize("name", DIFF_OPS)
def test_jax_ops_under_jit_equal_eager(name):
    """jax.jit over backend.forward, with array attributes traced too, equals the eager call."""
    jax = _jax()
    jb = memcore.get_backend("jax")
    spec, sample = _sample(name)
    static, arrays = _split_attrs(spec, sample.attrs)
    fn = jax.jit(lambda ins, arr: jb.forward(name, *ins, **static, **arr))
    got = fn(tuple(sample.inputs), arrays)
    want = ref.forward(name, *sample.inputs, **sample.attrs)[0]
    for g, w in zip(got if spec.multi_output else (got,), want if spec.multi_output else (want,)):
        _close(g, w, f"jit {name}")


@pytest.mark.parametrize("name", DIFF_OPS)
def test_jax_grad_of_ops_equals_the_reference(name):
    """jax.grad (inside jit) of <out, ct> w.r.t. every differentiable input = reference VJP."""
    jax = _jax()
    jnp = jax.numpy
    jb = memcore.get_backend("jax")
    spec, sample = _sample(name)
    cts, want = _reference(name, sample)
    diff = [i for i, d in enumerate(spec.differentiable) if d]

    def loss(*ins):
        out = getattr(jb, name)(*ins, **sample.attrs)
        outs = out if spec.multi_output else (out,)
        return sum(jnp.sum(o * c) for o, c in zip(outs, cts))

    grads = jax.jit(jax.grad(loss, argnums=tuple(diff)))(*[jnp.asarray(x) for x in sample.inputs])
    for i, g in zip(diff, grads):
        _close(g, want[i], f"grad {name} d{spec.inputs[i].name}")


@pytest.mark.parametrize("name", DIFF_OPS)
def test_jax_vmap_of_ops_equals_each_call(name):
    """jax.vmap over a stack of two samples (masks included) equals the two reference calls."""
    jax = _jax()
    jnp = jax.numpy
    jb = memcore.get_backend("jax")
    spec, first = _sample(name, seed=0)
    _, second = _sample(name, seed=5)
    static, arrays0 = _split_attrs(spec, first.attrs)
    _, arrays1 = _split_attrs(spec, second.attrs)
    stack = lambda a, b: jnp.stack([jnp.asarray(a), jnp.asarray(b)])
    ins = tuple(stack(a, b) for a, b in zip(first.inputs, second.inputs))
    arr = {k: stack(arrays0[k], arrays1[k]) for k in arrays0}
    got = jax.vmap(lambda xs, a: jb.forward(name, *xs, **static, **a))(ins, arr)
    got = got if spec.multi_output else (got,)
    for v, sample in enumerate((first, second)):
        want = ref.forward(name, *sample.inputs, **sample.attrs)[0]
        for g, w in zip(got, want if spec.multi_output else (want,)):
            _close(g[v], w, f"vmap {name} [{v}]")


def test_jax_tracing_skips_finiteness_but_concrete_arrays_are_checked():
    """Under jit a NaN input propagates (no crash); eagerly it is still a MemcoreError."""
    jax = _jax()
    jb = memcore.get_backend("jax")
    _, sample = _sample("memory_read")
    bad = list(sample.inputs)
    bad[0] = bad[0].copy()
    bad[0][0, 0, 0] = np.nan
    with pytest.raises(MemcoreError, match=r"`x` must be finite"):
        jb.memory_read(*bad, **sample.attrs)
    out = jax.jit(lambda *xs: jb.memory_read(*xs, **sample.attrs))(*bad)
    assert np.isnan(np.asarray(out)).any()
    with pytest.raises(MemcoreError, match=r"`x` must have rank 3"):
        jax.jit(lambda *xs: jb.memory_read(*xs, **sample.attrs))(bad[0][0], *bad[1:])


def test_jax_checkify_finite_reports_the_argument():
    """Inside checkify_finite, a traced NaN input becomes a checkify error naming it."""
    jax = _jax()
    from jax.experimental import checkify

    from memcore.backends.jax.backend import checkify_finite

    jb = memcore.get_backend("jax")
    _, sample = _sample("bmn")
    m, v_bias = sample.inputs
    fn = checkify.checkify(lambda a, b: jb.bmn(a, b))
    with checkify_finite():
        err, _ = jax.jit(fn)(m, v_bias)
        assert err.get() is None
        bad = v_bias.copy()
        bad[0, 0] = np.inf
        err, _ = jax.jit(fn)(m, bad)
    assert "`v_bias` must be finite" in str(err.get())


def test_jax_concrete_arrays_closed_over_in_jit_are_still_checked():
    """A concrete input closed over inside jit is checked eagerly: NaN there is a MemcoreError."""
    jax = _jax()
    from memcore.reference._xp import all_finite

    jb = memcore.get_backend("jax")
    _, sample = _sample("memory_read")
    x, memory, *ws = (jax.numpy.asarray(a) for a in sample.inputs)
    fn = jax.jit(lambda x: jb.memory_read(x, memory, *ws, **sample.attrs))
    _close(fn(x), ref.memory_read(*sample.inputs, **sample.attrs), "closed-over memory")
    bad = memory.at[0, 0, 0].set(np.nan)
    with pytest.raises(MemcoreError, match=r"`memory` must be finite"):
        jax.jit(lambda x: jb.memory_read(x, bad, *ws, **sample.attrs))(x)
    # The routing drivers' check (reference helper) behaves the same way.
    seen = []
    jax.jit(lambda t: seen.append((all_finite(t), all_finite(memory), all_finite(bad))) or t)(x)
    assert seen == [(True, True, False)]
