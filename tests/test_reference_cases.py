"""Deterministic cases of the reference that random draws almost never hit.

Ties, N <= k_top, N = 0, masked and fully masked segments, tau = 1e-3, zero-norm rows in
BMN, the LSTM gate order, memory init/reset, and float32 dtype preservation.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import memcore
from memcore import reference as ref
from memcore.opspec import Sizes

EPS = 1e-7


def _vjp(name, inputs, attrs, cot):
    """(out, grads) of reference op ``name`` for cotangent ``cot``."""
    out, cache = ref.forward(name, *inputs, **attrs)
    return out, ref.backward(name, cache, cot)


def _retrieve_inputs(rng, b=2, n=5, hd=3, a=4):
    h = rng.standard_normal((b, hd))
    m = rng.standard_normal((b, n, hd))
    return h, m, rng.standard_normal((hd, a)), rng.standard_normal((hd, a)), rng.standard_normal(a)


# ------------------------------------------------------------------ ties
@pytest.mark.parametrize("threshold_grad", [False, True])
def test_sparsify_tie_order_changes_nothing(threshold_grad):
    """Permuting tied scores permutes weights and gradients and changes nothing else."""
    scores = np.array([[0.3, 1.2, 1.2, -0.5, 0.7, 0.7], [2.0, 2.0, 1.0, 1.0, 1.0, 0.0]])
    d_w = np.array([[1.0, -2.0, 0.5, 3.0, -1.0, 2.0], [0.5, 1.5, -1.0, 2.0, 0.25, 1.0]])
    at = {"k_top": 3, "threshold_grad": threshold_grad}
    w, (da,) = _vjp("sparsify", (scores,), at, d_w)
    rng = np.random.default_rng(0)
    for _ in range(10):
        p = rng.permutation(scores.shape[1])
        wp, (dap,) = _vjp("sparsify", (scores[:, p],), at, d_w[:, p])
        np.testing.assert_allclose(wp, w[:, p], rtol=1e-14, atol=0)
        np.testing.assert_allclose(dap, da[:, p], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("threshold_grad", [False, True])
@pytest.mark.parametrize("block_score_grad", [False, True])
def test_duplicated_memories_tie_order_changes_nothing(threshold_grad, block_score_grad):
    """Duplicated memories (equal scores) in any order give the same s and gradients."""
    rng = np.random.default_rng(1)
    h, m, w1, w2, w3 = _retrieve_inputs(rng, n=4)
    m = np.concatenate([m, m[:, [1, 2, 1]]], axis=1)  # three duplicates: ties everywhere
    at = {"k_top": 3, "threshold_grad": threshold_grad, "block_score_grad": block_score_grad}
    ds, dweights = rng.standard_normal((2, 3)), rng.standard_normal((2, 7))
    (s, w), g = _vjp("sparse_retrieve", (h, m, w1, w2, w3), at, (ds, dweights))
    for _ in range(8):
        p = rng.permutation(7)
        (sp, wp), gp = _vjp("sparse_retrieve", (h, m[:, p], w1, w2, w3), at, (ds, dweights[:, p]))
        np.testing.assert_allclose(sp, s, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(wp, w[:, p], rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(gp[1], g[1][:, p], rtol=1e-10, atol=1e-13)
        for a, b in zip(gp[:1] + gp[2:], g[:1] + g[2:]):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)


def test_tied_entries_at_threshold_get_zero_weight_and_zero_grad():
    """With the threshold held constant, entries equal to it get weight 0 and gradient 0."""
    scores = np.array([[3.0, 2.0, 1.0, 1.0, 0.0]])
    d_w = np.array([[1.0, -1.0, 5.0, 7.0, 9.0]])
    w, (da,) = _vjp("sparsify", (scores,), {"k_top": 2}, d_w)
    denom = 3.0 + EPS
    np.testing.assert_allclose(w, [[2.0 / denom, 1.0 / denom, 0.0, 0.0, 0.0]], rtol=1e-15)
    assert np.all(w[0, 2:] == 0.0) and np.all(da[0, 2:] == 0.0)
    inner = (2.0 - 1.0) / denom  # <d_w, w>
    np.testing.assert_allclose(da[0, :2], (d_w[0, :2] - inner) / denom, rtol=1e-14)


def test_threshold_grad_splits_equally_among_tied_threshold_entries():
    """threshold_grad: d tau = -sum(d active) is shared equally by the entries equal to tau."""
    scores = np.array([[3.0, 2.0, 1.0, 1.0, 0.0]])
    d_w = np.array([[1.0, -1.0, 5.0, 7.0, 9.0]])
    _, (da,) = _vjp("sparsify", (scores,), {"k_top": 2, "threshold_grad": True}, d_w)
    denom = 3.0 + EPS
    active = (d_w[0, :2] - 1.0 / denom) / denom
    d_tau = -active.sum()
    np.testing.assert_allclose(da[0], [active[0], active[1], d_tau / 2, d_tau / 2, 0.0], rtol=1e-13)
    # Breaking the tie by a hair hands the whole threshold gradient to the one entry left.
    broken = scores - np.array([[0.0, 0.0, 0.0, 1e-9, 0.0]])
    _, (db,) = _vjp("sparsify", (broken,), {"k_top": 2, "threshold_grad": True}, d_w)
    np.testing.assert_allclose(db[0, 2] + db[0, 3], da[0, 2] + da[0, 3], rtol=1e-6)
    assert db[0, 3] == 0.0


def test_more_than_k_top_tied_at_top_all_get_zero():
    """If the (k_top+1)-th largest ties the top scores, all of them sit at the threshold: w = 0."""
    w = ref.sparsify(np.array([[2.0, 2.0, 2.0, 0.0]]), k_top=2)
    assert np.all(w == 0.0)


# ------------------------------------------------------------------ N <= k_top, N = 0
def test_n_at_most_k_top_drops_the_weakest():
    """With N <= k_top the threshold is the minimum: the weakest memory gets 0."""
    scores = np.array([[0.5, -1.0, 2.0], [1.0, 1.0, 3.0]])
    for k_top in (3, 5):
        w = ref.sparsify(scores, k_top=k_top)
        np.testing.assert_allclose(w[0], [1.5, 0.0, 3.0] / np.float64(4.5 + EPS), rtol=1e-15)
        np.testing.assert_allclose(w[1], [0.0, 0.0, 2.0 / (2.0 + EPS)], rtol=1e-15)


@pytest.mark.parametrize("threshold_grad", [False, True])
def test_single_memory_gives_zero_summary_and_zero_grads(threshold_grad):
    """N = 1: the one memory is the threshold, so s = 0, weights 0, and every gradient is 0."""
    rng = np.random.default_rng(2)
    h, m, w1, w2, w3 = _retrieve_inputs(rng, n=1)
    at = {"k_top": 4, "threshold_grad": threshold_grad}
    (s, w), grads = _vjp(
        "sparse_retrieve", (h, m, w1, w2, w3), at, (np.ones((2, 3)), np.ones((2, 1)))
    )
    assert np.all(s == 0.0) and np.all(w == 0.0)
    for g in grads:
        assert np.all(g == 0.0)


def test_no_memories_give_empty_result_and_zero_grads():
    """N = 0: empty weights, s = 0, gradients of the right shapes and all zero."""
    rng = np.random.default_rng(3)
    h, m, w1, w2, w3 = _retrieve_inputs(rng, n=0)
    (s, w), grads = _vjp(
        "sparse_retrieve", (h, m, w1, w2, w3), {"k_top": 2}, (np.ones((2, 3)), np.ones((2, 0)))
    )
    assert s.shape == (2, 3) and np.all(s == 0.0) and w.shape == (2, 0)
    for g, x in zip(grads, (h, m, w1, w2, w3)):
        assert g.shape == x.shape and np.all(g == 0.0)
    w, (da,) = _vjp(
        "sparsify", (np.zeros((2, 0)),), {"k_top": 1, "threshold_grad": True}, np.zeros((2, 0))
    )
    assert w.shape == (2, 0) and da.shape == (2, 0)


# ------------------------------------------------------------------ masks
def _slot_inputs(rng, b=2, k=3, l_tok=4, d=6, scale=1.0):
    m = rng.standard_normal((b, k, d)) * scale
    x = rng.standard_normal((b, l_tok, d)) * scale
    ws = tuple(rng.standard_normal((d, d)) / math.sqrt(d) for _ in range(3))
    return m, x, ws


@pytest.mark.parametrize("name", ["slot_attention", "memory_write"])
def test_masked_tokens_get_no_weight_and_no_gradient(name):
    """Masked tokens do not affect the output and get exactly zero gradient."""
    rng = np.random.default_rng(4)
    m, x, ws = _slot_inputs(rng)
    extra = (rng.standard_normal((3, 6)),) if name == "memory_write" else ()
    mask = np.array([[True, False, True, False], [False, False, True, True]])
    at = {"num_heads": 2, "tau": 0.5, "token_mask": mask}
    d_out = rng.standard_normal((2, 3, 6))
    out, g = _vjp(name, (m, x) + ws + extra, at, d_out)
    x2 = np.where(mask[..., None], x, rng.standard_normal(x.shape) * 10)
    out2, g2 = _vjp(name, (m, x2) + ws + extra, at, d_out)
    np.testing.assert_array_equal(out2, out)
    assert np.all(g[1][~mask] == 0.0), "masked tokens' x must get exactly zero gradient"
    for a, b in zip(g, g2):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-15)


def test_fully_masked_segment_keeps_every_slot():
    """All tokens masked: slot attention returns the slots exactly; gradient passes straight on."""
    rng = np.random.default_rng(5)
    m, x, ws = _slot_inputs(rng)
    at = {"num_heads": 3, "tau": 0.25, "token_mask": np.zeros((2, 4), dtype=bool)}
    d_out = rng.standard_normal(m.shape)
    out, (dm, dx, dwq, dwk, dwv) = _vjp("slot_attention", (m, x) + ws, at, d_out)
    np.testing.assert_array_equal(out, m)
    np.testing.assert_array_equal(dm, d_out)
    for g in (dx, dwq, dwk, dwv):
        assert np.all(g == 0.0)
    v_bias = rng.standard_normal((3, 6))
    written = ref.memory_write(m, x, *ws, v_bias, **at)
    np.testing.assert_array_equal(written, ref.bmn(m, v_bias))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_tau_1e_3_stays_finite(dtype):
    """tau = 1e-3: logits far beyond exp's range still give finite outputs and gradients."""
    rng = np.random.default_rng(6)
    m, x, ws = _slot_inputs(rng, scale=3.0)
    q, kx = m @ ws[0], x @ ws[1]
    raw = np.einsum("bkd,bld->bkl", q, kx) / (math.sqrt(6) * 1e-3)
    assert raw.max() > 800, "the case must overflow exp without the max subtraction"
    cast = lambda t: t.astype(dtype)
    ins = (cast(m), cast(x)) + tuple(cast(w) for w in ws)
    out, grads = _vjp("slot_attention", ins, {"num_heads": 1, "tau": 1e-3}, np.ones_like(ins[0]))
    assert out.dtype == dtype and np.all(np.isfinite(out))
    for g in grads:
        assert g.dtype == dtype and np.all(np.isfinite(g))


# ------------------------------------------------------------------ bmn, init, reset
def test_bmn_zero_norm_row_is_finite_with_clamped_gradient():
    """u = m + v_bias = 0: output row 0, gradient dy / 1e-12 (the clamped denominator)."""
    rng = np.random.default_rng(7)
    v_bias = rng.standard_normal((3, 4))
    m = rng.standard_normal((2, 3, 4))
    m[0, 1] = -v_bias[1]
    d_out = rng.standard_normal(m.shape)
    out, (dm, dv) = _vjp("bmn", (m, v_bias), {}, d_out)
    assert np.all(np.isfinite(out)) and np.all(out[0, 1] == 0.0)
    np.testing.assert_allclose(dm[0, 1], d_out[0, 1] / 1e-12, rtol=1e-15)
    np.testing.assert_allclose(dv, dm.sum(axis=0), rtol=1e-15)
    np.testing.assert_allclose(
        np.linalg.norm(np.delete(out.reshape(6, 4), 1, axis=0), axis=-1), 1.0, rtol=1e-14
    )


def test_memory_init_is_normalized_fresh_and_zero_row_safe():
    """memory_init: normalize(v_bias) per batch entry, a fresh writable array; zero rows stay 0."""
    v_bias = np.array([[3.0, 4.0], [0.0, 0.0], [-1.0, 0.0]])
    keep = v_bias.copy()
    out = ref.memory_init(v_bias, batch_size=3)
    expected = np.array([[0.6, 0.8], [0.0, 0.0], [-1.0, 0.0]])
    np.testing.assert_allclose(out, np.broadcast_to(expected, (3, 3, 2)), rtol=1e-15)
    assert out.flags.writeable and not np.shares_memory(out, v_bias)
    out[0, 0, 0] = 99.0
    assert out[1, 0, 0] == 0.6 and np.array_equal(v_bias, keep)
    _, (dv,) = _vjp("memory_init", (v_bias,), {"batch_size": 3}, np.ones((3, 3, 2)))
    np.testing.assert_allclose(dv[1], 3.0 / 1e-12)


def test_memory_reset_replaces_flagged_rows_only():
    """Reset rows become memory_init's rows, the others pass bit-identical; gradients split so."""
    rng = np.random.default_rng(8)
    v_bias, memory = rng.standard_normal((3, 4)), rng.standard_normal((3, 3, 4))
    reset = np.array([True, False, True])
    d_out = rng.standard_normal(memory.shape)
    out, (dmem, dv) = _vjp("memory_reset", (memory, v_bias), {"reset": reset}, d_out)
    init = ref.memory_init(v_bias, batch_size=3)
    np.testing.assert_array_equal(out[reset], init[reset])
    np.testing.assert_array_equal(out[~reset], memory[~reset])
    assert np.all(dmem[reset] == 0.0)
    np.testing.assert_array_equal(dmem[~reset], d_out[~reset])
    masked = np.where(reset[:, None, None], d_out, 0.0)
    _, (dv_init,) = _vjp("memory_init", (v_bias,), {"batch_size": 3}, masked)
    np.testing.assert_allclose(dv, dv_init, rtol=1e-15)
    out, (dmem, dv) = _vjp("memory_reset", (memory, v_bias), {"reset": np.zeros(3, bool)}, d_out)
    np.testing.assert_array_equal(out, memory)
    assert np.all(dv == 0.0)


# ------------------------------------------------------------------ lstm
def test_lstm_gate_order_matches_hand_computation():
    """Gates are laid out (i, f, g, o) along the 4 Hd axis of [x, h] w + b."""
    sig = lambda z: 1.0 / (1.0 + math.exp(-z))
    x, h, c = 0.7, -0.4, 1.3
    w = np.array([[0.5, -1.1, 0.9, 0.2], [1.7, 0.3, -0.6, -1.4]])
    b = np.array([0.1, 2.0, -0.3, -0.8])
    z = [x * w[0, j] + h * w[1, j] + b[j] for j in range(4)]
    c_new = sig(z[1]) * c + sig(z[0]) * math.tanh(z[2])
    h_new = sig(z[3]) * math.tanh(c_new)
    h_hat, c_out = ref.lstm_cell(np.array([[x]]), np.array([[h]]), np.array([[c]]), w, b)
    assert h_hat[0, 0] == pytest.approx(h_new, rel=1e-14)
    assert c_out[0, 0] == pytest.approx(c_new, rel=1e-14)


def test_lstm_saturated_gates_pick_the_documented_slices():
    """Forget gate shut and input gate open: c' = tanh(g), whatever the incoming c."""
    hd = 2
    b = np.concatenate([np.full(hd, 40.0), np.full(hd, -40.0), [0.5, -0.25], np.full(hd, 40.0)])
    w = np.zeros((1 + hd, 4 * hd))
    h_hat, c_new = ref.lstm_cell(np.zeros((1, 1)), np.zeros((1, hd)), np.array([[5.0, -5.0]]), w, b)
    np.testing.assert_allclose(c_new[0], np.tanh([0.5, -0.25]), rtol=1e-12)
    np.testing.assert_allclose(h_hat[0], np.tanh(np.tanh([0.5, -0.25])), rtol=1e-12)


# ------------------------------------------------------------------ dtypes
@pytest.mark.parametrize("name", list(memcore.OPS))
def test_float32_runs_and_keeps_dtype(name):
    """float32 inputs give float32 outputs and gradients, even with NumPy-scalar attributes."""
    spec = memcore.get_op(name)
    s = spec.sample(np.random.default_rng(9), Sizes(), "float32")
    attrs = dict(s.attrs)
    for a in spec.attributes:
        if a.name in ("tau", "eps"):
            attrs[a.name] = np.float64(0.5 if a.name == "tau" else 1e-7)
        if a.name in ("k_top", "num_heads", "batch_size"):
            attrs[a.name] = np.int64(attrs[a.name])
    out, cache = ref.forward(name, *s.inputs, **attrs)
    outs = out if isinstance(out, tuple) else (out,)
    cot = tuple(np.ones_like(o) for o in outs)
    grads = ref.backward(name, cache, cot if spec.multi_output else cot[0])
    for t in outs + tuple(g for g in grads if g is not None):
        assert t.dtype == np.float32, f"{name}: got {t.dtype}"
