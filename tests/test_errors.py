"""Every bad input raises MemcoreError naming the argument, what was expected and what came.

The generated error cases of :func:`memcore.ops.error_cases` for every op, through the
reference and the numpy backend, plus the explicit cases of issue 2, config validators
and runtime options.
"""

from __future__ import annotations

import re

import attrs
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import memcore
from memcore import MemcoreError, MemoryConfig, SABConfig
from memcore import reference as ref
from memcore.conformance.strategies import samples
from memcore.ops import error_cases
from memcore.opspec import Sizes


def _message_shape_ok(msg: str) -> bool:
    """One message shape: a backticked argument, then what was received (or the choices)."""
    return "`" in msg and ("Received:" in msg or "Available:" in msg)


@pytest.mark.parametrize("name", list(memcore.OPS))
def test_every_error_case_raises_memcore_error(name):
    """Each generated error case raises MemcoreError matching its regex, reference and backend."""
    spec = memcore.get_op(name)
    cases = error_cases(spec, spec.sample(np.random.default_rng(0), Sizes(), "float64"))
    assert len(cases) >= 2 * len(spec.inputs)
    backend = memcore.get_backend("numpy")
    for case in cases:
        for run in (ref.forward, backend.forward):
            with pytest.raises(MemcoreError, match=case.match) as info:
                run(name, *case.sample.inputs, **case.sample.attrs)
            assert _message_shape_ok(str(info.value)), f"{name} / {case.label}: {info.value}"


@pytest.mark.parametrize("name", list(memcore.OPS))
@given(data=st.data())
def test_error_cases_hold_on_drawn_shapes(name, data):
    """Error cases built from hypothesis-drawn valid samples all raise with the right message."""
    spec = memcore.get_op(name)
    sample = data.draw(samples(name, allow_empty=False), label="sample")
    ref.forward(name, *sample.inputs, **sample.attrs)  # the base sample itself is valid
    for case in error_cases(spec, sample):
        with pytest.raises(MemcoreError, match=case.match):
            ref.forward(name, *case.sample.inputs, **case.sample.attrs)


# ------------------------------------------------------------------ explicit cases of issue 2
def _read_inputs(b=2, l_tok=3, k=8, d=16):
    rng = np.random.default_rng(1)
    return [rng.standard_normal((b, l_tok, d)), rng.standard_normal((b, k, d))] + [
        rng.standard_normal((d, d)) for _ in range(4)
    ]


def test_wrong_shape_message_shows_expected_and_received():
    """A transposed memory names `memory`, the symbolic and concrete shape, and what came."""
    ins = _read_inputs()
    ins[1] = np.swapaxes(ins[1], 1, 2)  # (2, 16, 8)
    msg = re.escape(
        "`memory` must have shape (B, K, D) = (2, 16, 16). Received: memory.shape=(2, 16, 8)"
    )
    with pytest.raises(MemcoreError, match=msg):
        ref.memory_read(*ins, num_heads=4)


def test_wrong_rank_names_the_argument():
    """A memory without its batch axis: rank error naming `memory`."""
    ins = _read_inputs()
    ins[1] = ins[1][0]
    with pytest.raises(
        MemcoreError,
        match=re.escape(
            "`memory` must have rank 3, shape (B, K, D). Received: memory.shape=(8, 16)"
        ),
    ):
        ref.memory_read(*ins, num_heads=4)


def test_mismatched_batch():
    """memory with a different batch than x is rejected naming `memory`."""
    ins = _read_inputs()
    ins[1] = np.concatenate([ins[1], ins[1][:1]])
    with pytest.raises(MemcoreError, match=r"`memory` must have shape \(B, K, D\) = \(2, 8, 16\)"):
        ref.memory_read(*ins, num_heads=4)


@pytest.mark.parametrize("heads", [3, 5, 32])
def test_heads_must_divide_width(heads):
    """num_heads not dividing D names num_heads, D and the received value."""
    with pytest.raises(
        MemcoreError,
        match=rf"`num_heads` must divide the width D = 16. Received: num_heads={heads}",
    ):
        ref.memory_read(*_read_inputs(), num_heads=heads)


@pytest.mark.parametrize(
    "tau", [0.0, -0.5, 1.0000001, 2, float("nan"), float("inf"), 5e-324, 1e-39, 2.0**-127]
)
def test_tau_outside_unit_interval(tau):
    """tau must lie in [2**-126, 1]; the message states the range and the received tau."""
    m, x = _read_inputs()[1], _read_inputs()[0]
    ws = _read_inputs()[2:5]
    with pytest.raises(
        MemcoreError,
        match=r"`tau` must be a real number in \(0, 1\], at least 2\*\*-126 .* Received: tau=",
    ):
        ref.slot_attention(m, x, *ws, num_heads=2, tau=tau)


@pytest.mark.parametrize("tau", [True, "0.5", None])
def test_tau_wrong_type(tau):
    """A bool, string or None tau is a type error naming `tau`."""
    m, x = _read_inputs()[1], _read_inputs()[0]
    with pytest.raises(MemcoreError, match=r"`tau` must be of type int or float"):
        ref.slot_attention(m, x, *_read_inputs()[2:5], num_heads=2, tau=tau)


@pytest.mark.parametrize("k_top", [0, -3])
def test_k_top_below_one(k_top):
    """k_top < 1 is rejected for sparsify and sparse_retrieve."""
    rng = np.random.default_rng(2)
    with pytest.raises(
        MemcoreError, match=rf"`k_top` must be an integer >= 1. Received: k_top={k_top}"
    ):
        ref.sparsify(rng.standard_normal((2, 4)), k_top=k_top)
    ins = (
        rng.standard_normal((2, 3)),
        rng.standard_normal((2, 4, 3)),
        rng.standard_normal((3, 2)),
        rng.standard_normal((3, 2)),
        rng.standard_normal(2),
    )
    with pytest.raises(MemcoreError, match=r"`k_top` must be an integer >= 1"):
        ref.sparse_retrieve(*ins, k_top=k_top)


@pytest.mark.parametrize("k_top", [1.0, True, "2"])
def test_k_top_wrong_type(k_top):
    """k_top must be an int (not a float or a bool)."""
    with pytest.raises(MemcoreError, match=r"`k_top` must be of type int"):
        ref.sparsify(np.zeros((1, 3)), k_top=k_top)


@pytest.mark.parametrize("mask_dtype", [np.float64, np.int64, np.uint8])
def test_non_bool_mask(mask_dtype):
    """token_mask and reset must be bool arrays."""
    ins = _read_inputs()
    with pytest.raises(
        MemcoreError, match=r"`token_mask` must have dtype bool. Received: token_mask.dtype="
    ):
        ref.slot_attention(
            ins[1], ins[0], *ins[2:5], num_heads=2, token_mask=np.ones((2, 3), mask_dtype)
        )
    with pytest.raises(MemcoreError, match=r"`reset` must have dtype bool"):
        ref.memory_reset(ins[1], ins[1][0], reset=np.ones(2, mask_dtype))


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.bool_, np.complex128])
def test_integer_and_other_non_float_arrays(dtype):
    """Float inputs given as integer, bool or complex arrays name the argument and dtype."""
    with pytest.raises(MemcoreError, match=r"`m` must have a floating dtype .*Received: m.dtype="):
        ref.bmn(np.ones((2, 3, 4), dtype), np.ones((3, 4)))


def test_mixed_float_dtypes():
    """All float inputs share one dtype: float32 v_bias with float64 m is rejected."""
    with pytest.raises(
        MemcoreError,
        match=r"`v_bias` must have the same dtype as `m` \(float64\). "
        r"Received: v_bias.dtype=float32",
    ):
        ref.bmn(np.ones((2, 3, 4)), np.ones((3, 4), np.float32))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_inputs_and_check_finite_option(bad):
    """NaN/Inf inputs raise by default; memcore.options(check_finite=False) lets them through."""
    v_bias = np.ones((3, 4))
    m = np.ones((2, 3, 4))
    m[1, 2, 3] = bad
    with pytest.raises(MemcoreError, match=r"`m` must be finite \(no NaN or Inf\)"):
        ref.bmn(m, v_bias)
    with pytest.raises(MemcoreError, match=r"`m` must be finite"):
        memcore.get_backend("numpy").bmn(m, v_bias)
    with memcore.options(check_finite=False), np.errstate(invalid="ignore"):
        out = ref.bmn(m, v_bias)
        memcore.get_backend("numpy").bmn(m, v_bias)
        assert not np.all(np.isfinite(out[1, 2]))
    assert memcore.get_options().check_finite is True
    with pytest.raises(MemcoreError, match=r"`m` must be finite"):
        ref.bmn(m, v_bias)


def test_missing_and_unknown_attributes_and_input_count():
    """A missing required attribute, an unknown attribute and a wrong input count all raise."""
    ins = _read_inputs()
    with pytest.raises(MemcoreError, match=r"`memory_read` requires attribute `num_heads`"):
        ref.memory_read(*ins)
    with pytest.raises(
        MemcoreError, match=r"unknown attribute\(s\) \['heads'\]. Available: num_heads"
    ):
        ref.memory_read(*ins, num_heads=2, heads=2)
    with pytest.raises(
        MemcoreError,
        match=r"`memory_read` takes 6 array inputs \(x, memory, wq, wk, wv, wo\). Received: 5",
    ):
        ref.memory_read(*ins[:5], num_heads=2)


def test_multi_output_backward_needs_a_tuple():
    """sparse_retrieve's backward rejects a single array as its cotangent."""
    rng = np.random.default_rng(3)
    ins = (
        rng.standard_normal((2, 3)),
        rng.standard_normal((2, 4, 3)),
        rng.standard_normal((3, 2)),
        rng.standard_normal((3, 2)),
        rng.standard_normal(2),
    )
    _, cache = ref.sparse_retrieve_forward(*ins, k_top=2)
    with pytest.raises(
        MemcoreError, match=r"`grad_out` of sparse_retrieve must be a tuple of 2 arrays"
    ):
        ref.sparse_retrieve_backward(cache, np.ones((2, 3)))


def test_unknown_op_lists_the_ops():
    """get_op with a typo lists every registered op."""
    with pytest.raises(
        MemcoreError, match=r"Unknown op 'memory_rd'. Available: memory_read, slot_attention"
    ):
        memcore.get_op("memory_rd")


# ------------------------------------------------------------------ configs and options
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"slots": 0, "dim": 8}, "`slots` must be an integer >= 1. Received: slots=0"),
        ({"slots": 2.0, "dim": 8}, "`slots` must be an integer >= 1. Received: slots=2.0"),
        ({"slots": True, "dim": 8}, "`slots` must be an integer >= 1. Received: slots=True"),
        ({"slots": 4, "dim": 0}, "`dim` must be an integer >= 1. Received: dim=0"),
        ({"slots": 4, "dim": 8, "heads": 0}, "`heads` must be an integer >= 1. Received: heads=0"),
        (
            {"slots": 4, "dim": 10, "heads": 3},
            "`dim` must be divisible by `heads` (3). Received: dim=10, heads=3",
        ),
        (
            {"slots": 4, "dim": 8, "tau": 0.0},
            "`tau` must be a real number in (0, 1], at least 2**-126",
        ),
        (
            {"slots": 4, "dim": 8, "tau": 1.5},
            "`tau` must be a real number in (0, 1], at least 2**-126",
        ),
    ],
)
def test_memory_config_validators(kwargs, message):
    """MemoryConfig rejects bad fields with the expected and the received value."""
    with pytest.raises(MemcoreError, match=re.escape(message)):
        MemoryConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"k_top": 0}, "`k_top` must be an integer >= 1. Received: k_top=0"),
        ({"k_att": -1}, "`k_att` must be an integer >= 1. Received: k_att=-1"),
        ({"k_trunc": 0}, "`k_trunc` must be an integer >= 1. Received: k_trunc=0"),
        ({"eps": -1e-7}, "`eps` must be a finite real number >= 0. Received: eps=-1e-07"),
        ({"eps": float("nan")}, "`eps` must be a finite real number >= 0. Received: eps=nan"),
        ({"threshold_grad": 1}, "`threshold_grad` must be a bool. Received: threshold_grad=1"),
        (
            {"block_score_grad": "no"},
            "`block_score_grad` must be a bool. Received: block_score_grad='no'",
        ),
        (
            {"include_h0_memory": None},
            "`include_h0_memory` must be a bool. Received: include_h0_memory=None",
        ),
    ],
)
def test_sab_config_validators(kwargs, message):
    """SABConfig rejects bad fields with the expected and the received value."""
    with pytest.raises(MemcoreError, match=re.escape(message)):
        SABConfig(**kwargs)


def test_configs_validate_on_evolve_and_are_frozen():
    """attrs.evolve re-runs the validators; configs are frozen and hashable."""
    cfg = MemoryConfig(slots=4, dim=8, heads=2)
    assert (
        cfg.tau == 0.25
        and cfg.head_dim == 4
        and hash(cfg) == hash(MemoryConfig(slots=4, dim=8, heads=2))
    )
    with pytest.raises(MemcoreError, match=r"`tau` must be a real number in \(0, 1\]"):
        attrs.evolve(cfg, tau=2.0)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        cfg.tau = 0.5  # type: ignore[misc]
    with pytest.raises(MemcoreError, match=r"`k_top` must be an integer >= 1"):
        attrs.evolve(SABConfig(), k_top=0)


def test_unknown_option_names_and_bad_option_values():
    """memcore.options rejects unknown names (listing the known ones) and non-bool values."""
    with pytest.raises(
        MemcoreError, match=re.escape("Unknown option(s) ['check_finit']. Available: check_finite")
    ), memcore.options(check_finit=False):
        pass  # pragma: no cover
    with pytest.raises(
        MemcoreError, match=re.escape("`check_finite` must be a bool. Received: check_finite='no'")
    ), memcore.options(check_finite="no"):
        pass  # pragma: no cover
    assert memcore.get_options().check_finite is True
