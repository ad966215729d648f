"""The model-agnostic torch MRBP on CUDA: graph=True (captured advance and replayed backward)
and the host stash give plain autograd's gradient, in float64, on two stacked memory modules.
Run on a GPU: ``python -m pytest -q tests/test_torch_mrbp_model_cuda.py``."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch", reason="the model-agnostic MRBP is torch code")

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from _mrbp_model_cases import B, Stacked, T, assert_close, bptt, data, grads
from memcore.backends.torch.mrbp_model import MRBP, mrbp
from memcore.errors import MemcoreError

DEV = torch.device("cuda")


def _reference(model, segs, **kw):
    total, final = bptt(model, model.init_memory(B), segs, **kw)
    return total, final, grads(model)


def _listed(segs):
    return [{"x": segs["x"][t], "y": segs["y"][t]} for t in range(segs["x"].shape[0])]


@pytest.mark.parametrize(
    "stash, k, mark",
    [("device", None, False), ("host", None, True), ("host", 2, False), ("device", 3, True)],
)
def test_graphed_mrbp_equals_bptt(stash, k, mark):
    """graph=True: loss, M_T and every .grad (v_bias through init_memory too) equal BPTT's."""
    model, segs = Stacked(device=DEV, mark=mark), data(1, device=DEV)
    want_loss, want_final, want = _reference(model, segs, truncate_every=k)
    runner = MRBP(model, advance=model.advance, stash=stash, graph=True, truncate_every=k,
                  recompute=[model.b] if mark else ())  # fmt: skip
    out = runner(model.init_memory(B), segs)
    assert abs(float(out.loss) - want_loss) <= 1e-10 * abs(want_loss)
    assert_close(out.memory, want_final)
    assert_close(grads(model), want)


def test_graphs_are_reused_and_accumulate():
    """A second rollout replays the same graphs; .grad set to None in between is handled."""
    model, segs = Stacked(device=DEV), data(2, device=DEV)
    _, _, want = _reference(model, segs)
    runner = MRBP(model, graph=True)
    runner(model.init_memory(B), segs)
    runner(model.init_memory(B), segs)
    assert len(runner._graphs) == 1
    twice = {k: 2 * v for k, v in want.items()}
    assert_close({n: p.grad for n, p in model.named_parameters()}, twice)
    model.zero_grad(set_to_none=True)  # what optimizer.zero_grad() does
    runner(model.init_memory(B), segs)
    assert_close(grads(model), want)


def test_graphed_host_stash_is_bit_identical_to_device():
    """The host stash only moves the memories: same bits as keeping them on the device."""
    got = {}
    for stash in ("device", "host"):
        model, segs = Stacked(device=DEV), data(3, device=DEV)
        MRBP(model, stash=stash, graph=True)(model.init_memory(B), segs)
        got[stash] = grads(model)
    assert all(torch.equal(got["device"][k], got["host"][k]) for k in got["device"])


def test_eager_on_cuda_equals_bptt():
    """The eager driver on CUDA with the host stash and a horizon equals windowed BPTT."""
    model, segs = Stacked(device=DEV), data(4, device=DEV)
    _, _, want = _reference(model, segs, horizon=2)
    mrbp(model, model.init_memory(B), segs, stash="host", horizon=2)
    assert_close(grads(model), want)


def test_graph_rejects_replaced_grads_and_dynamic_shapes():
    """A replaced .grad, segments of two shapes, a CPU memory: clear errors."""
    model, segs = Stacked(device=DEV), data(5, device=DEV)
    runner = MRBP(model, graph=True)
    runner(model.init_memory(B), segs)
    model.head.weight.grad = torch.zeros_like(model.head.weight)
    with pytest.raises(MemcoreError, match="was replaced by another tensor"):
        runner(model.init_memory(B), segs)
    listed = _listed(segs)
    listed[1] = {"x": listed[1]["x"][:, :-1], "y": listed[1]["y"][:, :-1]}
    with pytest.raises(MemcoreError, match="segment 1 differs from segment 0"):
        MRBP(model, graph=True)(model.init_memory(B), listed)
    cpu = {k: v.detach().cpu() for k, v in model.init_memory(B).items()}
    with pytest.raises(MemcoreError, match="one CUDA device"):
        MRBP(model, graph=True)(cpu, segs)


def test_graph_rejects_a_memory_that_widens():
    """A next memory wider than memory0 (float64 from float32) cannot be replayed exactly."""
    model, segs = Stacked(device=DEV), data(6, device=DEV)
    m0 = {k: v.detach().float() for k, v in model.init_memory(B).items()}

    def step(memory, segment):
        return model({k: v.double() for k, v in memory.items()}, segment)

    with pytest.raises(MemcoreError, match="memory0's shapes, device and \\(or narrower\\) dtypes"):
        MRBP(step, graph=True)(m0, segs)


@pytest.mark.parametrize("recompute", ["layers", "lean", "keep"])
def test_lm_graphed_mrbp_matches_bptt_in_float32(recompute):
    """The bench LM through the library's graphed MRBP (+host, recompute modes) vs BPTT, fp32."""
    import pathlib
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    from bench.harness import rel_error
    from bench.lm_model import MemformerLM
    from bench.lm_routing import bptt as lm_bptt
    from bench.lm_routing import graphed_mrbp

    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        torch.manual_seed(0)
        model = MemformerLM(vocab=64, dim=32, heads=4, layers=2, slots=8).to(DEV)
        tokens = torch.randint(0, 64, (T, B, 16), device=DEV)
        targets = torch.randint(0, 64, (T, B, 16), device=DEV)
        lm_bptt(model, tokens, targets)
        want = [p.grad.clone() for p in model.parameters()]
        model.zero_grad(set_to_none=False)
        graphed_mrbp(model, tokens, targets, stash="host", recompute=recompute)()
        assert rel_error([p.grad for p in model.parameters()], want) < 1e-5
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
