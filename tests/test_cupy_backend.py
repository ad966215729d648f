"""The CuPy backend against the reference: every op, the fused kernels, DLPack and routing.

Needs a CUDA GPU and cupy; CI (no GPU) skips the whole module with that reason.
"""

from __future__ import annotations

import functools
import os
import zlib

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # jax must not take the GPU

import numpy as np
import pytest

try:
    import cupy as cp

    _GPUS = cp.cuda.runtime.getDeviceCount()
except (ImportError, RuntimeError, OSError):  # no cupy, or cupy without a driver or device
    _GPUS = 0
if not _GPUS:
    pytest.skip("needs CUDA and cupy", allow_module_level=True)

import memcore
from _slot_backward_cases import (
    BWD_SHAPES,
    assert_float32_close,
    core_args,
    kernel_layout_head_grads,
    upcast,
)
from memcore import MemcoreError, reference
from memcore.backends.cupy import CupyBackend, kernels
from memcore.ops import OPS
from memcore.opspec import Sizes
from memcore.reference import attention as ref_attention
from memcore.reference import memory as ref_memory
from memcore.reference import sab as ref_sab

# max |got - want| <= atol + rtol * max |want|, per dtype (float16 computes in float32).
TOL = {"float64": (1e-10, 1e-12), "float32": (3e-4, 1e-5), "float16": (3e-2, 3e-2)}
SMALL = Sizes(B=3, L=5, K=4, H=2, dh=3, I=3, Hd=4, N=6, A=3)
RAGGED = Sizes(B=2, L=37, K=5, H=3, dh=40, I=7, Hd=33, N=45, A=17)


def _close(got, want, dtype, what: str) -> None:
    got = cp.asnumpy(got).astype(np.float64) if isinstance(got, cp.ndarray) else np.asarray(got, np.float64)
    want = np.asarray(cp.asnumpy(want) if isinstance(want, cp.ndarray) else want, dtype=np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    rtol, atol = TOL[dtype]
    err = np.abs(got - want)
    bound = atol + rtol * (np.abs(want).max() if want.size else 0.0)
    if err.size and err.max() > bound:
        idx = np.unravel_index(int(err.argmax()), err.shape)
        raise AssertionError(f"{what} [{dtype}]: max abs error {err.max():.3e} at {idx} > {bound:.3e}")


def _rounded(sample, dtype):
    """The sample's float inputs rounded to dtype, as float64 (what the reference sees)."""
    return tuple(x.astype(dtype).astype(np.float64) if x.dtype.kind == "f" else x for x in sample.inputs)


def _rng(*key) -> np.random.Generator:
    """A generator seeded by the key (crc32 of strings: stable across processes)."""
    return np.random.default_rng([zlib.crc32(k.encode()) if isinstance(k, str) else k for k in key])


@pytest.fixture(scope="module", params=[True, False], ids=["fused", "unfused"])
def backend(request):
    return CupyBackend(fused=request.param)


def test_registry_devices_and_capabilities():
    """The registry finds the backend; it names CUDA devices and declares three float dtypes."""
    be = memcore.get_backend("cupy")
    assert be.name == "cupy" and be.fused
    assert be.devices()[0] == "cuda:0"
    caps = be.capabilities("cuda:0")
    assert caps.dtypes == ("float16", "float32", "float64") and caps.autodiff == "hand-written"
    with pytest.raises(MemcoreError, match="`device` must be one of"):
        be.capabilities("cuda:99")


def test_numpy_round_trip():
    """from_numpy/to_numpy copy both ways, honour dtype, and reject unknown devices."""
    be = CupyBackend()
    x = np.random.default_rng(0).uniform(-1, 1, (3, 4))
    g = be.from_numpy(x, dtype="float32", device="cuda:0")
    assert isinstance(g, cp.ndarray) and g.dtype == cp.float32
    back = be.to_numpy(g)
    assert isinstance(back, np.ndarray) and np.array_equal(back, x.astype(np.float32))
    with pytest.raises(MemcoreError, match="Received: device='cpu'"):
        be.from_numpy(x, device="cpu")


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16"])
@pytest.mark.parametrize("sizes", [SMALL, RAGGED], ids=["small", "ragged"])
@pytest.mark.parametrize("op", list(OPS))
def test_op_forward_and_vjp_match_reference(backend, op, sizes, dtype):
    """Forward and VJP of every op equal the float64 reference on the same rounded inputs."""
    spec = OPS[op]
    rng = _rng(op, dtype, sizes.L)
    sample = spec.sample(rng, sizes, "float64")
    exact = _rounded(sample, dtype)
    ins = tuple(cp.asarray(x.astype(dtype)) if x.dtype.kind == "f" else cp.asarray(x) for x in sample.inputs)
    before = [x.copy() for x in ins]
    want_out, cache = reference.forward(op, *exact, **sample.attrs)
    outs = want_out if spec.multi_output else (want_out,)
    cts = tuple(rng.uniform(-1, 1, o.shape).astype(dtype).astype(np.float64) for o in outs)
    want_grads = reference.backward(op, cache, cts if spec.multi_output else cts[0])
    ct_dev = tuple(cp.asarray(c.astype(dtype)) for c in cts)

    got_fwd = backend.forward(op, *ins, **sample.attrs)
    got_out, got_grads = backend.vjp(op, ins, sample.attrs, ct_dev if spec.multi_output else ct_dev[0])
    for got in (got_fwd, got_out):
        for g, w in zip(got if spec.multi_output else (got,), outs):
            assert g.dtype == np.dtype(dtype)
            _close(g, w, dtype, f"{op} out")
    for name, g, w in zip(spec.input_names, got_grads, want_grads):
        assert (g is None) == (w is None), f"{op} grad {name}"
        if g is not None:
            assert g.dtype == np.dtype(dtype)
            _close(g, w, dtype, f"{op} d{name}")
    for x, b in zip(ins, before):
        assert cp.array_equal(x, b), f"{op} mutated an input"


def test_bad_inputs_raise():
    """Host arrays and wrong shapes are refused with a MemcoreError naming the argument."""
    be = CupyBackend()
    m = np.ones((2, 3, 4))
    with pytest.raises(MemcoreError, match=r"`m` must be a cupy.ndarray"):
        be.forward("bmn", m, np.ones((3, 4)))
    with pytest.raises(MemcoreError, match=r"`v_bias` must have shape \(K, D\) = \(3, 4\)"):
        be.forward("bmn", cp.asarray(m), cp.ones((4, 3)))


# ------------------------------------------------------------------ fused kernels vs unfused
def _u(rng, shape, dtype, low=0.1):
    """Random values bounded away from zero (magnitudes in [low, 1], random signs)."""
    mag = rng.uniform(low, 1.0, shape)
    return cp.asarray((mag * rng.choice([-1.0, 1.0], shape)).astype(dtype))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("shape", [(3, 7, 45), (2, 5, 300), (1, 1, 1), (4, 3, 257)])
def test_bmn_kernel_matches_unfused(shape, dtype):
    """Fused BMN forward/backward equal the reference's normalize on ragged widths."""
    rng = _rng("bmn", *shape)
    m, vb, dy = _u(rng, shape, dtype), _u(rng, shape[1:], dtype), _u(rng, shape, dtype)
    y, n = kernels.bmn_forward(m, vb)
    wy, wn = ref_memory.normalize(cp, m + vb)
    _close(y, wy, dtype, "bmn y")
    _close(n, wn, dtype, "bmn n")
    _close(kernels.bmn_backward(y, n, dy), ref_memory.normalize_backward(cp, wy, wn, dy), dtype, "bmn du")


def test_bmn_kernel_clamped_row():
    """A row with m + v_bias = 0 gives y = 0, n = eps and du = dy / eps, as the reference."""
    rng = _rng("bmn-zero")
    m, dy = _u(rng, (2, 3, 5), "float64"), _u(rng, (2, 3, 5), "float64")
    vb = -m[1]
    y, n = kernels.bmn_forward(m, vb)
    assert float(n[1, 0, 0]) == ref_memory.NORM_EPS and not bool(y[1].any())
    wy, wn = ref_memory.normalize(cp, m + vb)
    _close(kernels.bmn_backward(y, n, dy), ref_memory.normalize_backward(cp, wy, wn, dy), "float64", "du")


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("threshold_grad", [False, True])
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
@pytest.mark.parametrize("n,k_top", [(1, 1), (2, 1), (45, 5), (300, 50), (1000, 3), (37, 40)])
def test_sparsify_kernel_matches_unfused(n, k_top, ties, threshold_grad, dtype):
    """Fused sparsify forward/backward equal the reference's, ties and N <= k_top included."""
    rng = _rng("sp", n, k_top, ties)
    if ties:  # few distinct non-zero values: many entries sit exactly at the threshold
        scores = cp.asarray((rng.integers(1, 5, (6, n)) * 0.375 - 1.0).astype(dtype))
    else:
        scores = _u(rng, (6, n), dtype)
    d_w = _u(rng, (6, n), dtype)
    w, cache = ref_sab.sparsify_forward(scores, k_top=k_top, eps=1e-7, threshold_grad=threshold_grad)
    gw, active, at_thr, denom = kernels.sparsify_forward(scores, k_top, 1e-7)
    _close(gw, w, dtype, "sparsify w")
    assert cp.array_equal(active, cache.active) and cp.array_equal(at_thr, cache.at_threshold)
    _close(denom, cache.denom, dtype, "sparsify denom")
    (want,) = ref_sab.sparsify_backward(cache, d_w)
    got = kernels.sparsify_backward(d_w, gw, active, at_thr, denom, threshold_grad)
    _close(got, want, dtype, "sparsify d_scores")


def _slot_inputs(rng, b, k, ell, h, dh, dtype, mask):
    d = h * dh
    memory, x = _u(rng, (b, k, d), dtype), _u(rng, (b, ell, d), dtype)
    ws = tuple(_u(rng, (d, d), dtype) * float(1.0 / np.sqrt(d)) for _ in range(3))  # a Python float keeps dtype
    token_mask = None
    if mask == "random":
        token_mask = cp.asarray(rng.random((b, ell)) < 0.6)
    elif mask == "row-masked":  # batch row 0 has every token masked: its slots must stay put
        keep = rng.random((b, ell)) < 0.6
        keep[0] = False
        token_mask = cp.asarray(keep)
    return memory, x, ws, token_mask


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("mask", [None, "random", "row-masked"])
@pytest.mark.parametrize(
    "b,k,ell,h,dh,tau",
    [(2, 5, 37, 3, 40, 0.25), (3, 7, 1, 1, 24, 0.5), (1, 33, 70, 2, 64, 1e-3), (2, 3, 5, 4, 3, 1.0)],
)
def test_slot_kernel_matches_unfused(b, k, ell, h, dh, tau, mask, dtype):
    """The one-pass slot-attention write equals the reference's output and weights."""
    rng = _rng("slot", b, k, ell, h, dh, str(mask))
    memory, x, (wq, wk, wv), token_mask = _slot_inputs(rng, b, k, ell, h, dh, dtype, mask)
    want, cache = ref_attention.slot_attention_forward(
        memory, x, wq, wk, wv, num_heads=h, tau=tau, token_mask=token_mask
    )
    got, a = kernels.slot_attention_core(
        memory @ wq, memory @ wk, x @ wk, x @ wv, memory,
        num_heads=h, scale=cache.scale, token_mask=token_mask, store_weights=True,
    )
    _close(got, want, dtype, "slot out")
    _close(a, cache.a, dtype, "slot weights")
    if token_mask is not None:  # masked tokens get weight exactly 0
        assert not bool(a[..., 1:][~cp.broadcast_to(token_mask[:, None, None, :], a[..., 1:].shape)].any())
    out_only, none = kernels.slot_attention_core(
        memory @ wq, memory @ wk, x @ wk, x @ wv, memory, num_heads=h, scale=cache.scale, token_mask=token_mask
    )
    assert none is None and cp.array_equal(out_only, got)


def test_fused_write_vjp_matches_unfused_on_ragged_sizes():
    """memory_write's fused VJP (slot kernel + BMN kernels) equals the unfused path."""
    rng = _rng("write-vjp")
    memory, x, (wq, wk, wv), mask = _slot_inputs(rng, 3, 5, 37, 3, 40, "float64", "random")
    vb, ct = _u(rng, (5, 120), "float64"), _u(rng, (3, 5, 120), "float64")
    args, at = (memory, x, wq, wk, wv, vb), {"num_heads": 3, "tau": 0.25, "token_mask": mask}
    out_f, g_f = CupyBackend(fused=True).vjp("memory_write", args, at, ct)
    out_u, g_u = CupyBackend(fused=False).vjp("memory_write", args, at, ct)
    _close(out_f, out_u, "float64", "write out")
    for name, gf, gu in zip(OPS["memory_write"].input_names, g_f, g_u):
        _close(gf, gu, "float64", f"write d{name}")


def test_slot_gate_sends_large_writes_to_the_unfused_path(monkeypatch):
    """Above SLOT_KERNEL_MAX_LOGITS the backend's write keeps the reference slot attention
    (its weights are the reference's own), and still equals the unfused VJP."""
    from memcore.backends.cupy import fused

    rng = _rng("gate")
    memory, x, (wq, wk, wv), mask = _slot_inputs(rng, 2, 4, 6, 2, 8, "float64", "random")
    assert fused.slot_kernel_pays(memory, x, 2)
    monkeypatch.setattr(fused, "SLOT_KERNEL_MAX_LOGITS", 2 * 2 * 4 * 6 - 1)
    assert not fused.slot_kernel_pays(memory, x, 2)
    _, cache = fused.gated_slot_attention_forward(memory, x, wq, wk, wv, num_heads=2, tau=0.5, token_mask=mask)
    _, want = ref_attention.slot_attention_forward(memory, x, wq, wk, wv, num_heads=2, tau=0.5, token_mask=mask)
    assert cp.array_equal(cache.a, want.a)
    vb, ct = _u(rng, (4, 16), "float64"), _u(rng, (2, 4, 16), "float64")
    args, at = (memory, x, wq, wk, wv, vb), {"num_heads": 2, "tau": 0.5, "token_mask": mask}
    _, g_f = CupyBackend(fused=True).vjp("memory_write", args, at, ct)
    _, g_u = CupyBackend(fused=False).vjp("memory_write", args, at, ct)
    for gf, gu in zip(g_f, g_u):
        _close(gf, gu, "float64", "gated write grad")


# ------------------------------------------------------------------ DLPack
def test_dlpack_torch_both_ways_zero_copy():
    """cupy -> torch and torch -> cupy share memory on the same GPU."""
    torch = pytest.importorskip("torch", reason="needs torch for the torch exchange")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA build of torch")
    be = CupyBackend()
    x = cp.arange(12, dtype=cp.float32).reshape(3, 4) + 1
    t = be.to_torch(x)
    assert t.is_cuda and t.data_ptr() == x.data.ptr and tuple(t.shape) == (3, 4)
    t.mul_(2)  # a write through torch is seen by cupy: the same buffer
    torch.cuda.synchronize()
    assert float(x[2, 3]) == 24.0
    s = torch.linspace(1, 2, 10, device="cuda", dtype=torch.float64)
    c = be.from_torch(s)
    assert c.data.ptr == s.data_ptr() and c.dtype == cp.float64
    assert cp.allclose(c, cp.linspace(1, 2, 10))
    with pytest.raises(MemcoreError, match="`tensor` must be a torch tensor on a CUDA device"):
        be.from_torch(torch.ones(2))


def test_dlpack_jax_both_ways_zero_copy():
    """cupy -> jax and jax -> cupy share the buffer on the same GPU."""
    jax = pytest.importorskip("jax", reason="needs jax for the jax exchange")
    if not any(d.platform == "gpu" for d in jax.devices()):
        pytest.skip("needs a CUDA build of jax")
    be = CupyBackend()
    x = cp.linspace(-1, 1, 64, dtype=cp.float32).reshape(8, 8)
    j = be.to_jax(x)
    assert j.unsafe_buffer_pointer() == x.data.ptr
    np.testing.assert_array_equal(np.asarray(j), cp.asnumpy(x))
    y = jax.numpy.arange(10.0, dtype=jax.numpy.float32) * 3 + 1
    c = be.from_jax(y)
    assert c.data.ptr == y.unsafe_buffer_pointer()
    np.testing.assert_array_equal(cp.asnumpy(c), np.asarray(y))
    with pytest.raises(MemcoreError, match=r"`x` must be a cupy.ndarray"):
        be.to_jax(np.ones(3))


def test_split_heads_views_feed_reference_backward():
    """The fused forward's cache (split_heads views of contiguous projections) is valid input
    to the reference backward: slot_attention VJP equals the unfused one."""
    rng = _rng("views")
    memory, x, (wq, wk, wv), _ = _slot_inputs(rng, 2, 5, 9, 2, 40, "float64", None)
    ct = _u(rng, memory.shape, "float64")
    at = {"num_heads": 2, "tau": 0.5}
    _, gf = CupyBackend(fused=True).vjp("slot_attention", (memory, x, wq, wk, wv), at, ct)
    _, gu = CupyBackend(fused=False).vjp("slot_attention", (memory, x, wq, wk, wv), at, ct)
    for a, b in zip(gf, gu):
        _close(a, b, "float64", "slot grad")


# ------------------------------------------------------------------ slot-attention backward kernels
# The backward kernels' shapes, reference gradients and float32 criterion are shared with
# tests/test_cupy_slot_backward_emulation.py (which replays the kernels' algorithm on the CPU):
# see tests/_slot_backward_cases.py. At tau = 1e-3 both float32 backwards lose digits to the
# 1 / tau in dl = a (da - delta) / (sqrt(dh) tau), hence a criterion relative to the reference's.


def _arrays(cache, d_out):
    return [v for v in cache if isinstance(v, cp.ndarray)] + [d_out]


def _count_backward_kernel(monkeypatch):
    """Record the dtype of every call of the backward launcher (fused.py calls it through
    the kernels module, so the patch is seen there)."""
    calls = []
    real = kernels.slot_attention_backward_core

    def counted(*args, **kwargs):
        calls.append(str(args[0].dtype))
        return real(*args, **kwargs)

    monkeypatch.setattr(kernels, "slot_attention_backward_core", counted)
    return calls


def _slot_case(key, b, k, ell, h, dh, tau, mask, dtype, forward):
    rng = _rng(key, b, k, ell, h, dh, str(mask), dtype)
    memory, x, (wq, wk, wv), token_mask = _slot_inputs(rng, b, k, ell, h, dh, dtype, mask)
    d_out = _u(rng, memory.shape, dtype)
    _, cache = forward(memory, x, wq, wk, wv, num_heads=h, tau=tau, token_mask=token_mask)
    return cache, d_out, token_mask


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("mask", [None, "random", "row-masked"])
@pytest.mark.parametrize("b,k,ell,h,dh,tau", BWD_SHAPES)
def test_slot_backward_kernel_matches_reference(b, k, ell, h, dh, tau, mask, dtype):
    """The two backward launches give the reference's gradients w.r.t. q, k_self, kx, vx and
    the direct slot path from the reference forward's cache: inputs untouched, masked tokens
    exactly 0, and bit-identical on a second run (no atomics)."""
    cache, d_out, token_mask = _slot_case(
        "slot-bwd", b, k, ell, h, dh, tau, mask, dtype, ref_attention.slot_attention_forward
    )
    before = [t.copy() for t in _arrays(cache, d_out)]
    run = functools.partial(kernels.slot_attention_backward_core, num_heads=h, scale=cache.scale)
    got = run(*core_args(cache), d_out)
    exact = kernel_layout_head_grads(upcast(cache), d_out.astype(cp.float64))
    ref = kernel_layout_head_grads(cache, d_out)
    for name, g, r, e in zip(("dqk", "dms", "dkv"), got, ref, exact):
        assert g.dtype == np.dtype(dtype) and g.shape == e.shape, name
        if dtype == "float64":
            _close(g, e, dtype, f"slot backward {name}")
        else:
            assert_float32_close(g, r, e, f"slot backward {name}")
    for t, t0 in zip(_arrays(cache, d_out), before):
        assert cp.array_equal(t, t0), "the backward kernels mutated an input"
    if token_mask is not None and not bool(token_mask.all()):
        assert not bool(got[2][~token_mask].any())  # masked tokens: dkx = dvx = 0 exactly
    assert all(cp.array_equal(g1, g2) for g1, g2 in zip(got, run(*core_args(cache), d_out)))


@pytest.mark.parametrize("forward", ["reference", "fused"])
@pytest.mark.parametrize("mask", [None, "random"])
@pytest.mark.parametrize("b,k,ell,h,dh,tau", BWD_SHAPES)
def test_fused_slot_backward_matches_reference(monkeypatch, b, k, ell, h, dh, tau, mask, forward):
    """fused.slot_attention_backward in float32 runs the kernels once and gives the reference's
    five gradients from either forward's cache, without mutating its inputs."""
    from memcore.backends.cupy import fused

    fwd = {"fused": fused.slot_attention_forward, "reference": ref_attention.slot_attention_forward}
    cache, d_out, _ = _slot_case("fused-slot-bwd", b, k, ell, h, dh, tau, mask, "float32",
                                 fwd[forward])
    calls = _count_backward_kernel(monkeypatch)
    before = [t.copy() for t in _arrays(cache, d_out)]
    assert fused.slot_backward_kernel_pays(cache, d_out)
    got = fused.slot_attention_backward(cache, d_out)
    assert calls == ["float32"]
    ref32 = ref_attention.slot_attention_backward(cache, d_out)
    exact = ref_attention.slot_attention_backward(upcast(cache), d_out.astype(cp.float64))
    for name, g, r, e in zip(("dmemory", "dx", "dwq", "dwk", "dwv"), got, ref32, exact):
        assert g.dtype == cp.float32 and g.flags.c_contiguous, name
        assert_float32_close(g, r, e, f"slot backward {name}")
    for t, t0 in zip(_arrays(cache, d_out), before):
        assert cp.array_equal(t, t0), "the fused backward mutated an input"


@pytest.mark.parametrize("b,k,ell,h,dh,tau", BWD_SHAPES[:3])
def test_fused_slot_backward_kernel_path_in_float64(b, k, ell, h, dh, tau):
    """The ungated kernel path also takes float64 and then equals the reference to rounding."""
    from memcore.backends.cupy import fused

    cache, d_out, _ = _slot_case(
        "fused-slot-bwd64", b, k, ell, h, dh, tau, "random", "float64", fused.slot_attention_forward
    )
    got = fused.slot_attention_backward_kernel(cache, d_out)
    want = ref_attention.slot_attention_backward(cache, d_out)
    for name, g, w in zip(("dmemory", "dx", "dwq", "dwk", "dwv"), got, want):
        _close(g, w, "float64", f"slot backward {name}")


def test_slot_backward_gate(monkeypatch):
    """The bounds are 2**22 (forward) and 2**20 (backward) logits, inclusive, as measured;
    above the backward's, or in float64, the backward is the reference's, bit for bit,
    and the kernels are not called."""
    from memcore.backends.cupy import fused

    assert fused.SLOT_KERNEL_MAX_LOGITS == 1 << 22
    assert fused.SLOT_BACKWARD_KERNEL_MAX_LOGITS == 1 << 20
    calls = _count_backward_kernel(monkeypatch)

    def case(dtype):
        fwd = fused.slot_attention_forward
        return _slot_case("bwd-gate", 2, 4, 6, 2, 8, 0.5, "random", dtype, fwd)[:2]

    def same_as_reference(cache, d_out):
        got = fused.slot_attention_backward(cache, d_out)
        want = ref_attention.slot_attention_backward(cache, d_out)
        return all(cp.array_equal(g, w) for g, w in zip(got, want))

    cache, d_out = case("float64")
    assert not fused.slot_backward_kernel_pays(cache, d_out)
    assert same_as_reference(cache, d_out)
    cache, d_out = case("float32")
    monkeypatch.setattr(fused, "SLOT_BACKWARD_KERNEL_MAX_LOGITS", 2 * 2 * 4 * 6 - 1)
    assert not fused.slot_backward_kernel_pays(cache, d_out)
    assert same_as_reference(cache, d_out)
    assert calls == []
    monkeypatch.setattr(fused, "SLOT_BACKWARD_KERNEL_MAX_LOGITS", 2 * 2 * 4 * 6)
    assert fused.slot_backward_kernel_pays(cache, d_out)
    fused.slot_attention_backward(cache, d_out)
    assert calls == ["float32"]


@pytest.mark.parametrize("mask", [None, "random"])
def test_fused_write_vjp_float32_runs_the_backward_kernels(monkeypatch, mask):
    """memory_write's float32 VJP through the backend runs the backward kernels and equals the
    float64 reference on the same rounded inputs (the op tolerance)."""
    calls = _count_backward_kernel(monkeypatch)
    rng = _rng("write-vjp32", str(mask))
    memory, x, (wq, wk, wv), token_mask = _slot_inputs(rng, 3, 5, 37, 3, 40, "float32", mask)
    vb, ct = _u(rng, (5, 120), "float32"), _u(rng, (3, 5, 120), "float32")
    args = (memory, x, wq, wk, wv, vb)
    at = {"num_heads": 3, "tau": 0.25}
    if token_mask is not None:
        at["token_mask"] = token_mask
    _, g_f = CupyBackend(fused=True).vjp("memory_write", args, at, ct)
    assert calls == ["float32"]
    args64 = tuple(t.astype(cp.float64) for t in args)
    _, g_u = CupyBackend(fused=False).vjp("memory_write", args64, at, ct.astype(cp.float64))
    for name, gf, gu in zip(OPS["memory_write"].input_names, g_f, g_u):
        assert gf.dtype == cp.float32, name
        _close(gf, gu, "float32", f"write d{name}")


# ------------------------------------------------------------------ routing
def _routing():
    return pytest.importorskip("memcore.reference.routing", reason="memcore.reference.routing not available yet")


def _memformer_case(rng, T=3, B=2, L=4, K=3, H=2, dh=3):
    from memcore.routing_types import MEMFORMER_PARAMS

    D = H * dh
    params = {n: rng.uniform(-1, 1, (D, D)) / np.sqrt(D) for n in MEMFORMER_PARAMS[:-1]}
    params["v_bias"] = rng.uniform(-1, 1, (K, D))
    xs = rng.uniform(-1, 1, (T, B, L, D))
    m0 = reference.memory_init(params["v_bias"], batch_size=B)
    targets = rng.uniform(-1, 1, (T, B, L, D))
    extra = {"resets": rng.random((T, B)) < 0.3, "token_mask": rng.random((T, B, L)) < 0.7}
    return params, xs, m0, targets, memcore.MemoryConfig(slots=K, dim=D, heads=H, tau=0.5), extra


def _sab_case(rng, T=7, B=2, I=3, Hd=4, A=3, O=2):
    shapes = {"lstm_w": (I + Hd, 4 * Hd), "lstm_b": (4 * Hd,), "w1": (Hd, A), "w2": (Hd, A), "w3": (A,),
              "v1": (Hd, O), "v2": (Hd, O), "b_y": (O,)}
    params = {n: rng.uniform(-1, 1, s) * 0.7 for n, s in shapes.items()}
    state0 = (rng.uniform(-1, 1, (B, Hd)), rng.uniform(-1, 1, (B, Hd)))
    cfg = memcore.SABConfig(k_top=2, k_att=2, k_trunc=3)
    return params, rng.uniform(-1, 1, (T, B, I)), state0, rng.uniform(-1, 1, (T, B, O)), cfg


def _to_dev(x):
    if isinstance(x, dict):
        return {k: _to_dev(v) for k, v in x.items()}
    if isinstance(x, tuple):
        return tuple(_to_dev(v) for v in x)
    return cp.asarray(x)


def _same_result(got, want, what):
    assert abs(float(got.loss) - float(want.loss)) <= 1e-10 * max(1.0, abs(float(want.loss))), what
    for name in want.grads:
        _close(got.grads[name], want.grads[name], "float64", f"{what} d{name}")
    for field in ("d_state0", "final_state"):
        g, w = getattr(got, field), getattr(want, field)
        g, w = (g, w) if isinstance(w, tuple) else ((g,), (w,))
        assert len(g) == len(w), f"{what} {field}"
        for a, b in zip(g, w):
            _close(a, b, "float64", f"{what} {field}")


@pytest.mark.parametrize("driver", ["bptt", "mrbp"])
def test_memformer_routing_on_cupy_equals_reference(driver):
    """bptt and mrbp run on CuPy arrays and equal the reference run on NumPy (float64)."""
    routing = _routing()
    params, xs, m0, targets, cfg, extra = _memformer_case(_rng("mf", driver))
    head = ("memformer",) if driver == "bptt" else ()
    want = getattr(routing, driver)(*head, params, xs, m0, targets, config=cfg, **extra)
    dev_extra = {k: cp.asarray(v) for k, v in extra.items()}
    got = getattr(CupyBackend(), driver)(*head, _to_dev(params), cp.asarray(xs), cp.asarray(m0),
                                         cp.asarray(targets), config=cfg, **dev_extra)
    assert isinstance(got.final_state, cp.ndarray)
    _same_result(got, want, driver)


@pytest.mark.parametrize("driver", ["bptt", "sab_bptt", "sab_sparse_replay"])
def test_sab_routing_on_cupy_equals_reference(driver):
    """SAB bptt, sab_bptt and sparse replay run on CuPy arrays and equal the reference."""
    routing = _routing()
    params, xs, state0, targets, cfg = _sab_case(_rng("sab", driver))
    head = ("sab",) if driver == "bptt" else ()
    want = getattr(routing, driver)(*head, params, xs, state0, targets, config=cfg)
    got = getattr(CupyBackend(), driver)(*head, _to_dev(params), cp.asarray(xs), _to_dev(state0),
                                         cp.asarray(targets), config=cfg)
    _same_result(got, want, driver)
    if driver == "sab_sparse_replay":
        assert sorted(got.replayed_chunks) == sorted(want.replayed_chunks)
