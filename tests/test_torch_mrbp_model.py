"""The model-agnostic torch MRBP: every option gives plain autograd's gradient (BPTT through
the same step), in float64 on the CPU, on a model of two memory modules in series."""

from __future__ import annotations

import collections

import pytest

torch = pytest.importorskip("torch", reason="the model-agnostic MRBP is torch code")

from _mrbp_model_cases import B, Stacked, T, assert_close, bptt, data, grads
from memcore.backends.torch import _mrbp_graphs
from memcore.backends.torch._mrbp_tree import Segments, leaves_reached
from memcore.backends.torch.mrbp_model import MRBP, mrbp, recompute
from memcore.errors import MemcoreError


def _reference(model, segs, graph_m0=True, **kw):
    m0 = model.init_memory(B)
    m0 = m0 if graph_m0 else {k: v.detach() for k, v in m0.items()}
    total, final = bptt(model, m0, segs, **kw)
    return total, final, grads(model)


def _listed(segs):
    return [{"x": segs["x"][t], "y": segs["y"][t]} for t in range(segs["x"].shape[0])]


@pytest.mark.parametrize(
    "graph_m0, stash, listed, own_advance",
    [(True, "device", False, True), (False, "host", True, False), (True, "host", True, True)],
)
def test_mrbp_equals_bptt(graph_m0, stash, listed, own_advance):
    """Loss, M_T and every .grad (init_memory's v_bias included) equal plain autograd's."""
    model, segs = Stacked(), data(1)
    want_loss, want_final, want = _reference(model, segs, graph_m0)
    m0 = model.init_memory(B)
    m0 = m0 if graph_m0 else {k: v.detach() for k, v in m0.items()}
    out = mrbp(
        model,
        m0,
        _listed(segs) if listed else segs,
        advance=model.advance if own_advance else None,
        stash=stash,
    )
    assert out.loss.dim() == 0 and not out.loss.requires_grad
    assert abs(float(out.loss) - want_loss) <= 1e-12 * abs(want_loss)
    assert set(out.memory) == {"a", "b"} and not out.memory["a"].requires_grad
    assert_close(out.memory, want_final)
    got = grads(model)
    assert_close(got, want)
    assert float(got["a.writer.v_bias"].abs().max()) > 0


def test_mrbp_takes_a_function_and_a_tuple_memory():
    """A plain function over a (Ma, Mb) tuple memory, closing over the modules, works too."""
    model, segs = Stacked(), data(2)
    _, _, want = _reference(model, segs, graph_m0=True)

    def step(memory, segment):
        loss, nxt = model({"a": memory[0], "b": memory[1]}, segment)
        return loss, (nxt["a"], nxt["b"])

    m0 = model.init_memory(B)
    out = mrbp(step, (m0["a"], m0["b"]), segs)
    assert isinstance(out.memory, tuple) and len(out.memory) == 2
    assert_close(grads(model), want)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_truncate_every_cuts_like_bptt(k):
    """truncate_every=k equals BPTT with the memory detached entering t = k, 2k, ..."""
    model, segs = Stacked(), data(3)
    _, _, want = _reference(model, segs, truncate_every=k)
    mrbp(model, model.init_memory(B), segs, truncate_every=k)
    assert_close(grads(model), want)


@pytest.mark.parametrize("h, k", [(1, None), (2, None), (3, None), (T, None), (2, 3)])
def test_horizon_equals_windowed_bptt(h, k):
    """horizon=h: loss_t back-propagates through segments t-h+1..t only (and stops at cuts)."""
    model, segs = Stacked(), data(4)
    _, _, want = _reference(model, segs, horizon=h, truncate_every=k)
    mrbp(model, model.init_memory(B), segs, horizon=h, truncate_every=k)
    assert_close(grads(model), want)


def test_horizon_changes_the_gradient():
    """The windowed gradient is not the full one (the horizon test above can fail)."""
    model, segs = Stacked(), data(4)
    _, _, full = _reference(model, segs)
    mrbp(model, model.init_memory(B), segs, horizon=2)
    got = grads(model)
    assert max(float((got[k] - full[k]).abs().max()) for k in full) > 1e-6


def test_loss_scale_accumulates_like_backward():
    """Two rollouts with loss_scale=0.5 leave the sum of the two scaled BPTT gradients."""
    model, segs = Stacked(), data(5)
    want_loss, _, once = _reference(model, segs, loss_scale=0.5)
    runner = MRBP(model, loss_scale=0.5)
    first = runner(model.init_memory(B), segs)
    runner(model.init_memory(B), segs)
    assert abs(float(first.loss) - want_loss) <= 1e-12 * abs(want_loss)
    assert_close(grads(model), {k: 2 * v for k, v in once.items()})


def _counting(module):
    calls = collections.Counter()
    module.register_forward_pre_hook(lambda m, args: calls.update(["forward"]))
    return calls


def test_recompute_marker_and_modules_keep_the_gradient():
    """recompute(...) in the step and recompute=[module] recompute in the backward, same grads."""
    model, segs = Stacked(mark=True), data(6)
    _, _, want = _reference(model, segs)
    calls_a, calls_b = _counting(model.a.ffn), _counting(model.b.ffn)
    mrbp(model, model.init_memory(B), segs, advance=model.advance, recompute=[model.b])
    assert_close(grads(model), want)
    # forward + replay + the recomputation in the backward: 3 runs per segment each (the
    # counters sit on a submodule, which the recomputation calls again)
    assert calls_a["forward"] == 3 * T and calls_b["forward"] == 3 * T
    assert "forward" not in model.b.__dict__  # the wrapper is gone after the rollout


def test_recompute_is_a_plain_call_outside_the_replay():
    """Outside MRBP's replay, recompute(fn, ...) is fn(...) (nothing runs twice)."""
    calls = []
    out = recompute(lambda x, y=1: calls.append(x) or x + y, torch.ones(2), y=2)
    assert torch.equal(out, torch.full((2,), 3.0)) and len(calls) == 1


def test_inputs_are_not_mutated():
    """memory0 and the segments come back unchanged."""
    model, segs = Stacked(), data(7)
    m0 = {k: v.detach() for k, v in model.init_memory(B).items()}
    copies = ({k: v.clone() for k, v in m0.items()}, {k: v.clone() for k, v in segs.items()})
    mrbp(model, m0, segs, stash="host", horizon=2)
    assert all(torch.equal(m0[k], copies[0][k]) for k in m0)
    assert all(torch.equal(segs[k], copies[1][k]) for k in segs)


def test_graph_needs_cuda_and_static_shapes():
    """graph=True on the CPU, and segments of two shapes, raise clear errors."""
    model, segs = Stacked(), data(8)
    m0 = model.init_memory(B)
    if not torch.cuda.is_available():
        with pytest.raises(MemcoreError, match="graph=True needs CUDA"):
            mrbp(model, m0, segs, graph=True)
    listed = _listed(segs)
    listed[2] = {"x": listed[2]["x"][:, :-1], "y": listed[2]["y"][:, :-1]}
    with pytest.raises(MemcoreError, match=r"segments of one structure.*segment 2 differs"):
        _mrbp_graphs.signature(m0, Segments(listed))
    with pytest.raises(MemcoreError, match=r"one CUDA device.*cpu"):
        _mrbp_graphs.signature(m0, Segments(segs))
    with pytest.raises(MemcoreError, match="`horizon` is not supported with graph=True"):
        MRBP(model, graph=True, horizon=2)


def test_grad_slots_reattach_none_and_reject_replaced():
    """The captured .grad tensors: set to None -> zeroed and put back; replaced -> error."""
    p = torch.nn.Parameter(torch.ones(3))
    slots = _mrbp_graphs.GradSlots([p])
    captured = p.grad
    captured.add_(2.0)
    p.grad = None
    slots.check()
    assert p.grad is captured and not captured.any()
    p.grad = torch.zeros(3)
    with pytest.raises(MemcoreError, match="was replaced by another tensor"):
        slots.check()


def test_leaves_reached_finds_every_parameter_the_step_uses():
    """The graph walk finds the leaves backward would fill, and skips the memory inputs."""
    model, segs = Stacked(), data(9)
    m0 = {k: v.detach().requires_grad_(True) for k, v in model.init_memory(B).items()}
    loss, nxt = model(m0, Segments(segs)[0])
    found = leaves_reached([loss, *nxt.values()], lambda x: any(x is v for v in m0.values()))
    assert sorted(id(p) for p in found) == sorted(id(p) for p in model.parameters())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"stash": "disk"}, "`stash` must be one of"),
        ({"truncate_every": 0}, "`truncate_every` must be None or an integer >= 1"),
        ({"horizon": True}, "`horizon` must be None or an integer >= 1"),
        ({"loss_scale": float("nan")}, "`loss_scale` must be a finite real number"),
        ({"ddp": object()}, "`ddp` must be None or a torch.nn.parallel.DistributedDataParallel"),
        ({"recompute": [lambda x: x]}, "`recompute` must hold nn.Modules"),
    ],
)
def test_bad_options_name_the_argument(kwargs, match):
    """Each bad option is rejected at the entry, naming it."""
    model = Stacked()
    with pytest.raises(MemcoreError, match=match):
        mrbp(model, model.init_memory(B), data(0), **kwargs)


def test_bad_steps_and_inputs_name_the_culprit():
    """A non-scalar loss, a non-tensor memory leaf, empty or ragged segments are rejected."""
    model, segs = Stacked(), data(0)
    m0 = model.init_memory(B)
    with pytest.raises(MemcoreError, match=r"loss a 0-d tensor.*segment 4: loss of shape \(2,\)"):
        mrbp(lambda m, s: (model(m, s)[0].expand(2), model(m, s)[1]), m0, segs)
    with pytest.raises(MemcoreError, match="`memory0` must be a tensor or a pytree of tensors"):
        mrbp(model, {"a": m0["a"], "b": 1.0}, segs)
    with pytest.raises(MemcoreError, match="T >= 1 segments"):
        mrbp(model, m0, [])
    with pytest.raises(MemcoreError, match="one leading size T"):
        mrbp(model, m0, {"x": segs["x"], "y": segs["y"][:-1]})
    with pytest.raises(MemcoreError, match="`segments` must be a list or tuple"):
        mrbp(model, m0, iter(_listed(segs)))
    with pytest.raises(MemcoreError, match="`step` must be callable"):
        mrbp(3, m0, segs)


def test_ddp_all_reduces_once_per_rollout(tmp_path):
    """Under DDP (gloo, 2 CPU processes) each rollout all-reduces every bucket once, in
    segment 0's backward, and leaves the single-process full-batch gradient."""
    import torch.multiprocessing as mp

    from _mrbp_model_cases import ddp_worker

    if not torch.distributed.is_available():
        pytest.skip("needs torch.distributed (gloo)")
    out = tmp_path / "rank0.pt"
    mp.spawn(ddp_worker, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    got = torch.load(out)
    for calls in got["calls"]:
        assert calls and sorted(calls) == sorted(set(calls)), got["calls"]  # each bucket once
    torch.manual_seed(0)
    model = Stacked()
    segs = data(10, batch=4)
    for _ in range(2):  # two rollouts accumulate
        bptt(model, model.init_memory(4), segs)
    assert_close(got["grads"], grads(model))


class _EagerGraph:
    """Stands in for a CUDA graph on the CPU: replay runs the function again and writes its
    outputs into the tensors the capture returned, as a replayed graph writes its buffers."""

    def __init__(self, fn, out):
        self.fn, self.out = fn, out

    def replay(self):
        new = self.fn()
        if self.out is not None:
            with torch.no_grad():
                for o, n in zip(self.out, new):
                    o.copy_(n)


def _stand_in_capture(fn, device, pool):
    out = fn()
    return _EagerGraph(fn, out), out


@pytest.mark.parametrize(
    "stash, k, mark", [("device", None, False), ("host", 2, True), ("device", 3, False)]
)
def test_graph_rollout_logic_with_stand_in_graphs(monkeypatch, stash, k, mark):
    """The graphed rollout's bookkeeping (static buffers, .grad added in place, dM between
    replays, cuts, dM_0 through init_memory) gives BPTT's gradient, graphs run eagerly."""
    monkeypatch.setattr(_mrbp_graphs, "GRAPH_DEVICE", "cpu")
    monkeypatch.setattr(_mrbp_graphs, "_capture", _stand_in_capture)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    model, segs = Stacked(mark=mark), data(11)
    want_loss, want_final, want = _reference(model, segs, truncate_every=k)
    runner = MRBP(model, advance=model.advance, stash=stash, graph=True, truncate_every=k,
                  recompute=[model.b] if mark else (), loss_scale=0.5)  # fmt: skip
    runner.capture(model.init_memory(B), segs)
    assert all(not p.grad.any() for p in model.parameters())  # capture leaves .grad at zero
    out = runner(model.init_memory(B), segs)
    assert abs(float(out.loss) - 0.5 * want_loss) <= 1e-12 * abs(want_loss)
    assert_close(out.memory, want_final)
    model.zero_grad(set_to_none=True)  # put back, zeroed, by the next call
    out = runner(model.init_memory(B), segs)
    assert_close(grads(model), {n: 0.5 * g for n, g in want.items()})


@pytest.mark.parametrize("k", [None, 2])
def test_keep_blocks_skips_the_replay_forward_of_marked_blocks(k):
    """keep_blocks: the replay returns the forward's block outputs (each marked block runs
    in the forward and in its backward only) and the gradient is still BPTT's."""
    model, segs = Stacked(mark=True), data(12)
    _, _, want = _reference(model, segs, truncate_every=k)
    calls_a, calls_b = _counting(model.a.ffn), _counting(model.b.ffn)
    out = mrbp(model, model.init_memory(B), segs, advance=model.advance, recompute=[model.b],
               keep_blocks=True, stash="host", truncate_every=k)  # fmt: skip
    assert_close(grads(model), want)
    assert calls_a["forward"] == 2 * T and calls_b["forward"] == 2 * T
    assert out.loss.dim() == 0


def test_keep_blocks_in_the_graphed_rollout_with_stand_in_graphs(monkeypatch):
    """keep_blocks with graph=True: the blocks' static buffers travel through the stash."""
    monkeypatch.setattr(_mrbp_graphs, "GRAPH_DEVICE", "cpu")
    monkeypatch.setattr(_mrbp_graphs, "_capture", _stand_in_capture)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    model, segs = Stacked(mark=True), data(13)
    _, _, want = _reference(model, segs)
    runner = MRBP(model, advance=model.advance, graph=True, keep_blocks=True, stash="host")
    runner(model.init_memory(B), segs)
    assert_close(grads(model), want)


def test_keep_blocks_rejects_horizon():
    """keep_blocks with a horizon is rejected (kept blocks accumulate per traversal)."""
    with pytest.raises(MemcoreError, match="`keep_blocks` is not supported with a horizon"):
        MRBP(Stacked(), keep_blocks=True, horizon=2)


def test_fsdp_wrapped_step_is_refused():
    """A step whose class is (or derives from) an FSDP wrapper gets a MemcoreError naming it,
    before any forward runs (FSDP under MRBP is untested, so it is refused, not guessed)."""

    class FullyShardedDataParallel(Stacked):  # stands in for torch's wrapper by class name
        pass

    torch.manual_seed(0)
    model = FullyShardedDataParallel()
    with pytest.raises(MemcoreError, match=r"must not be FSDP-wrapped.*FullyShardedDataParallel"):
        mrbp(model, model.init_memory(B), data(0))
