"""peak_cache_bytes: exact formulas derived from the arrays the reference caches hold, and the
growth shapes they imply (BPTT linear in T times a step's cache; MRBP one memory per step;
sparse replay the memories plus one chunk's cache).

Counted (see memcore.reference.routing.accounting): every distinct array buffer of the
live caches and stored states, parameters excluded. Element counts below use the glossary;
``e`` is the itemsize. If an op's cache changes, these formulas and docs/semantics.md (Routing) change
with it.
"""

from __future__ import annotations

import numpy as np
import pytest

from memcore.config import SABConfig
from memcore.reference import routing
from memcore.reference.routing.samples import memformer_sample, sab_sample

B, L, K, D, H = 2, 3, 4, 6, 2  # Memformer sizes
I, HD, A, O = 3, 4, 3, 2  # SAB sizes (B shared)


def _memformer_step_elements() -> int:
    """Floats one Memformer step's cache adds (mse, no reset, no mask), M_t not included:
    read: x, q, o (B L D each), k, v (B K D), p (B H L K); h = x + r (B L D);
    write: slot q, k_s (B K D), token k, v (B L D), a (B H K (L+1)), M_{t+1} (B K D),
    norms (B K); loss residual (B L D)."""
    return 7 * B * L * D + 5 * B * K * D + B * H * K * (2 * L + 1) + B * K


def _memformer(driver: str, steps: int, dtype: str) -> int:
    s = memformer_sample(np.random.default_rng(0), T=steps, B=B, L=L, K=K, D=D, H=H, dtype=dtype)
    if driver == "bptt":
        return routing.bptt(
            "memformer", s.params, s.xs, s.state0, s.targets, config=s.config
        ).peak_cache_bytes
    return routing.mrbp(s.params, s.xs, s.state0, s.targets, config=s.config).peak_cache_bytes


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("steps", [1, 3, 6])
def test_memformer_bptt_holds_every_step_cache(dtype, steps):
    """BPTT's peak is e (B K D + T S): M_0 plus T step caches, so doubling T doubles all but M_0."""
    e = np.dtype(dtype).itemsize
    peak, doubled = _memformer("bptt", steps, dtype), _memformer("bptt", 2 * steps, dtype)
    assert peak == e * (B * K * D + steps * _memformer_step_elements())
    assert doubled - e * B * K * D == 2 * (peak - e * B * K * D)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("steps", [1, 3, 6])
def test_mrbp_peak_is_the_memories_plus_one_step(dtype, steps):
    """MRBP's peak is e ((T + 1) B K D + S): doubling T adds exactly T B K D e."""
    e = np.dtype(dtype).itemsize
    peak, doubled = _memformer("mrbp", steps, dtype), _memformer("mrbp", 2 * steps, dtype)
    assert peak == e * ((steps + 1) * B * K * D + _memformer_step_elements())
    assert doubled - peak == steps * B * K * D * e
    if steps > 1:
        assert peak < _memformer("bptt", steps, dtype)


def _sab_step_bytes(n: int, e: int) -> int:
    """Bytes one SAB step's cache adds when it reads n memories, its incoming c included:
    lstm: [x, h] (B (I + Hd)), c, gates i f g o, tanh(c') (6 B Hd); h_hat, h', s (3 B Hd);
    retrieve: stacked memories (B n Hd), tanh pre-scores (B n A), weights (B n), normalizer
    (B); output y and loss residual (2 B O); plus two bool masks (B n) of one byte."""
    return e * B * (I + 10 * HD + n * (HD + A + 1) + 1 + 2 * O) + 2 * B * n


def _sab(driver: str, steps: int, config: SABConfig, dtype: str):
    s = sab_sample(
        np.random.default_rng(1), T=steps, B=B, I=I, Hd=HD, A=A, O=O, config=config, dtype=dtype
    )
    return getattr(routing, driver)(s.params, s.xs, s.state0, s.targets, config=s.config)


def _reads(t: int, config: SABConfig) -> int:
    """N_t, the memories step t reads."""
    return int(config.include_h0_memory) + (t - 1) // config.k_att


CONFIGS = [
    SABConfig(k_top=2, k_att=100, k_trunc=4),  # no memories at all
    SABConfig(k_top=2, k_att=2, k_trunc=4, include_h0_memory=True),
    SABConfig(k_top=3, k_att=3, k_trunc=4),
    SABConfig(k_top=1, k_att=1, k_trunc=2),
]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(
    "config", CONFIGS, ids=lambda c: f"k_att={c.k_att},k_trunc={c.k_trunc},h0={c.include_h0_memory}"
)
def test_sab_bptt_holds_every_step_cache(dtype, config):
    """SAB BPTT's peak is sum_t step(N_t); with no memories that is T step(0), doubling with T."""
    e = np.dtype(dtype).itemsize
    for steps in (4, 8):
        peak = _sab("sab_bptt", steps, config, dtype).peak_cache_bytes
        assert peak == sum(_sab_step_bytes(_reads(t, config), e) for t in range(1, steps + 1))
    if config.k_att > 16:
        assert (
            _sab("sab_bptt", 16, config, dtype).peak_cache_bytes
            == 2 * _sab("sab_bptt", 8, config, dtype).peak_cache_bytes
        )


def _replay_peak(steps: int, config: SABConfig, e: int) -> int:
    """Stored: the distinct h vectors among boundary states and memories, one c per chunk;
    plus the last (largest) chunk's cache, whose entering c is the stored one."""
    k = config.k_trunc
    chunks = steps // k
    written = {t for t in range(1, steps + 1) if t % config.k_att == 0}
    boundary_h = {m * k for m in range(chunks)}  # step 0 stands for h0
    memories = written | ({0} if config.include_h0_memory else set())
    stored = e * B * HD * (len(boundary_h | memories) + chunks)
    last_chunk = sum(_sab_step_bytes(_reads(t, config), e) for t in range(steps - k + 1, steps + 1))
    return stored + last_chunk - e * B * HD


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(
    "config", CONFIGS, ids=lambda c: f"k_att={c.k_att},k_trunc={c.k_trunc},h0={c.include_h0_memory}"
)
def test_sparse_replay_peak_is_memories_plus_one_chunk(dtype, config):
    """Sparse replay's peak is the stored boundary states and memories plus one chunk's cache."""
    e = np.dtype(dtype).itemsize
    for steps in (4, 8, 16):
        result = _sab("sab_sparse_replay", steps, config, dtype)
        assert result.peak_cache_bytes == _replay_peak(steps, config, e), f"T={steps}"
        if steps >= 2 * config.k_trunc:  # with one chunk, replay also stores (h0, c0): no saving
            assert result.peak_cache_bytes < _sab("sab_bptt", steps, config, dtype).peak_cache_bytes


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_sparse_replay_without_memories_grows_only_by_boundary_states(dtype):
    """With no memories, doubling T adds only the (h, c) of the new chunk boundaries, not T step caches."""
    e = np.dtype(dtype).itemsize
    config = CONFIGS[0]
    peak8 = _sab("sab_sparse_replay", 8, config, dtype).peak_cache_bytes
    peak16 = _sab("sab_sparse_replay", 16, config, dtype).peak_cache_bytes
    assert peak16 - peak8 == (8 // config.k_trunc) * 2 * B * HD * e
    bptt8 = _sab("sab_bptt", 8, config, dtype).peak_cache_bytes
    assert _sab("sab_bptt", 16, config, dtype).peak_cache_bytes - bptt8 == bptt8
