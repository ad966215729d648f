"""The authors' release semantics of SAB retrieval, next to memcore's (issue 14, item 4).

Ops (forward and hand-written backward side by side):

* :func:`release_scores_forward` / :func:`release_scores_backward`: the release scorer
  ``a_i = w_score . tanh([h_hat; m_i])`` = ``tanh(h_hat) . w_h + tanh(m_i) . w_m`` with
  ``w_score = [w_h; w_m]`` (2 Hd,) (``layers_torch.py``'s ``w_t`` (2H, 1) as a vector).
* :func:`release_sparsify_forward` / :func:`release_sparsify_backward`: threshold = the
  k_top-th largest score + eps, ``w = relu(a - thr) / (sum + eps)`` (k_top - 1 memories);
  the raw scores when N <= k_top; with ``threshold_grad`` all of the threshold's gradient
  goes to the index :func:`threshold_index` names.
* :func:`retrieve_forward` / :func:`retrieve_backward`: the read ``s = sum_i w_i m_i`` with
  the scorer and sparsifier that ``config.scorer`` / ``config.sparsify`` select ("memcore"
  uses :mod:`memcore.reference.sab`), parameters as a dict (:func:`scorer_params`).

Shapes: h_hat (B, Hd); memories (B, N, Hd); w_score (2 Hd,); scores, weights (B, N).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from memcore.reference._xp import array_namespace
from memcore.reference.sab import (
    sab_scores_backward,
    sab_scores_forward,
    sparsify_backward,
    sparsify_forward,
)

__all__ = [
    "MEMCORE_SCORER_PARAMS",
    "RELEASE_EPS",
    "RELEASE_SCORER_PARAMS",
    "release_scores_backward",
    "release_scores_forward",
    "release_sparsify_backward",
    "release_sparsify_forward",
    "retrieve_backward",
    "retrieve_forward",
    "scorer_params",
    "threshold_index",
]

RELEASE_EPS = 1e-7  # the release's ``eps = 10e-8``
MEMCORE_SCORER_PARAMS = ("w1", "w2", "w3")
RELEASE_SCORER_PARAMS = ("w_score",)


def scorer_params(config: Any) -> tuple[str, ...]:
    """The scorer's parameter names for ``config.scorer``: (w1, w2, w3) or (w_score,)."""
    return RELEASE_SCORER_PARAMS if config.scorer == "release" else MEMCORE_SCORER_PARAMS


# ------------------------------------------------------------------ release scorer
class ReleaseScoresCache(NamedTuple):
    w_score: Any
    th: Any  # (B, Hd) tanh(h_hat)
    tm: Any  # (B, N, Hd) tanh(m_i)


def release_scores_forward(h_hat, memories, w_score):
    """a_i = tanh(h_hat) . w_score[:Hd] + tanh(m_i) . w_score[Hd:]: (B, N).

    The h_hat term is the same for every memory, so it cancels in ``a_i - threshold``:
    when N > k_top the release's weights do not depend on the query.
    """
    xp = array_namespace(h_hat)
    hd = h_hat.shape[-1]
    th, tm = xp.tanh(h_hat), xp.tanh(memories)
    a = xp.matmul(tm, w_score[hd:]) + xp.matmul(th, w_score[:hd])[:, None]
    return a, ReleaseScoresCache(w_score, th, tm)


def release_scores_backward(cache: ReleaseScoresCache, d_scores):
    """(dh_hat, dmemories, dw_score).

    dh_hat = (sum_i da_i) w_h (1 - tanh(h_hat)^2); dm_i = da_i w_m (1 - tanh(m_i)^2);
    dw_h = sum_b (sum_i da_i) tanh(h_hat); dw_m = sum_{b,i} da_i tanh(m_i).
    """
    k = cache
    xp = array_namespace(d_scores)
    hd = k.th.shape[-1]
    b, n = d_scores.shape
    dq = xp.sum(d_scores, axis=1)  # (B,)
    dh = dq[:, None] * k.w_score[:hd] * (1.0 - k.th * k.th)
    dm = d_scores[:, :, None] * k.w_score[hd:] * (1.0 - k.tm * k.tm)
    dw_h = xp.matmul(dq, k.th)
    dw_m = xp.matmul(xp.reshape(d_scores, (b * n,)), xp.reshape(k.tm, (b * n, hd)))
    return dh, dm, xp.concatenate([dw_h, dw_m])


# ------------------------------------------------------------------ release sparsifier
class ReleaseSparsifyCache(NamedTuple):
    raw: bool  # N <= k_top: the weights are the scores
    w: Any
    active: Any  # (B, N) z > 0
    denom: Any  # (B, 1)
    pick: Any  # (B, N) one-hot of the threshold index (zeros when raw)
    threshold_grad: bool


def threshold_index(scores, k_top: int):
    """(B,) the index whose score the release's threshold copies: position k_top (1-based)
    of a **stable** descending sort, i.e. among scores tied there the lowest index first.

    ``torch.topk`` gives no tie order (docs/semantics.md, "Release-compatible mode"); this
    is the order ``jax.lax.top_k`` documents and ``torch.sort(stable=True)`` gives.
    """
    xp = array_namespace(scores)
    order = xp.argsort(-scores, axis=-1, kind="stable")
    return order[:, k_top - 1]


def release_sparsify_forward(
    scores, *, k_top: int, eps: float = RELEASE_EPS, threshold_grad: bool = True
):
    """The release's ``Sparse_attention.forward``, per row.

    N <= k_top: w = scores (raw: any sign, not normalised). Otherwise thr = a_p + eps with
    p = :func:`threshold_index`; z = max(a - thr, 0) (relu'(0) = 0); w = z / (sum z + eps)
    (0 where that denominator is 0). At most k_top - 1 entries are non-zero.
    """
    xp = array_namespace(scores)
    n = scores.shape[-1]
    if n <= k_top:
        zero = xp.zeros_like(scores)
        return scores, ReleaseSparsifyCache(True, scores, zero > 0, None, zero, threshold_grad)
    p = threshold_index(scores, k_top)
    pick = xp.where(xp.arange(n)[None, :] == p[:, None], 1.0, 0.0).astype(scores.dtype)
    thr = xp.sum(scores * pick, axis=-1, keepdims=True) + eps
    z = xp.maximum(scores - thr, 0.0)
    denom = xp.sum(z, axis=-1, keepdims=True) + eps
    denom = xp.where(denom > 0, denom, xp.ones_like(denom))
    w = z / denom
    return w, ReleaseSparsifyCache(False, w, z > 0, denom, pick, threshold_grad)


def release_sparsify_backward(cache: ReleaseSparsifyCache, d_w):
    """(d_scores,).

    raw: d_a = d_w. Otherwise dz = (d_w - <d_w, w>) / (sum z + eps); d_a = dz where z > 0;
    with threshold_grad, d thr = -sum(d_a) goes whole to the threshold index.
    """
    k = cache
    xp = array_namespace(d_w)
    if k.raw:
        return (d_w,)
    dz = (d_w - xp.sum(d_w * k.w, axis=-1, keepdims=True)) / k.denom
    da = xp.where(k.active, dz, xp.zeros_like(dz))
    if k.threshold_grad:
        da = da - k.pick * xp.sum(da, axis=-1, keepdims=True)
    return (da,)


# ------------------------------------------------------------------ the read, either rule
class RetrieveCache(NamedTuple):
    scorer: str
    sparsify: str
    scores: Any
    weights: Any
    memories: Any
    w: Any
    block_score_grad: bool


def retrieve_forward(h_hat, memories, params: Mapping[str, Any], config: Any):
    """s = sum_i w_i m_i with ``config``'s scorer and sparsifier.

    Args:
        h_hat: (B, Hd); memories: (B, N, Hd); params: the scorer's entries
            (:func:`scorer_params`); config: a SABConfig (k_top, eps, threshold_grad,
            block_score_grad, scorer, sparsify).

    Returns:
        ((s (B, Hd), weights (B, N)), cache).
    """
    xp = array_namespace(h_hat)
    if config.scorer == "release":
        a, sc = release_scores_forward(h_hat, memories, params["w_score"])
    else:
        a, sc = sab_scores_forward(h_hat, memories, params["w1"], params["w2"], params["w3"])
    kw = {"k_top": config.k_top, "eps": config.eps, "threshold_grad": config.threshold_grad}
    if config.sparsify == "release":
        w, sp = release_sparsify_forward(a, **kw)
    else:
        w, sp = sparsify_forward(a, **kw)
    s = xp.matmul(w[:, None, :], memories)[:, 0, :]
    cache = RetrieveCache(config.scorer, config.sparsify, sc, sp, memories, w,
                          config.block_score_grad)  # fmt: skip
    return (s, w), cache


def retrieve_backward(cache: RetrieveCache, grad_out):
    """(dh_hat, dmemories, d_params) from (ds, dweights); d_params keyed like the scorer's.

    dw = dweights + memories ds; dm_i = w_i ds (value path) + the score path, which
    block_score_grad stops (the scorer's own parameters keep their gradient).
    """
    ds, d_weights = grad_out
    k = cache
    xp = array_namespace(ds)
    dw = d_weights + xp.matmul(k.memories, ds[:, :, None])[:, :, 0]
    dmem = k.w[:, :, None] * ds[:, None, :]
    back = release_sparsify_backward if k.sparsify == "release" else sparsify_backward
    (da,) = back(k.weights, dw)
    if k.scorer == "release":
        dh, dm_score, dws = release_scores_backward(k.scores, da)
        d_params = {"w_score": dws}
    else:
        dh, dm_score, dw1, dw2, dw3 = sab_scores_backward(k.scores, da)
        d_params = {"w1": dw1, "w2": dw2, "w3": dw3}
    if k.block_score_grad:
        return xp.zeros_like(dh), dmem, d_params
    return dh, dmem + dm_score, d_params
