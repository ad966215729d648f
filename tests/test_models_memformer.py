"""The library's Memformer LM: config checks, torch shapes and numbers, torch vs JAX."""

from __future__ import annotations

import attrs
import numpy as np
import pytest

from memcore.errors import MemcoreError
from memcore.models import MemformerConfig

torch = pytest.importorskip("torch", reason="the torch model needs torch")

from memcore.backends.torch.memformer import MemformerLM

SMALL = MemformerConfig(vocab=11, dim=8, heads=2, layers=2, slots=3)

# The bench model (bench/lm_model.py before it moved into the library), float32 on the CPU,
# torch.manual_seed(0), MemformerLM(vocab=30, dim=32, heads=4, layers=2, slots=5), tokens
# and targets (3, 2, 6) from torch.Generator().manual_seed(1): the summed loss of 3
# segments and, for the first and last 4 parameters, the gradient's norm.
OLD_LOSS = 10.867016792297363
OLD_GRAD_NORMS_HEAD = [0.302102655736, 0.076198648856, 0.062761917671, 0.62434517858]
OLD_GRAD_NORMS_TAIL = [0.142971597279, 0.307975462912, 0.156667245378, 2.784231056292]


def _rollout(model, tokens, targets, recompute=False):
    memory = model.init_memory(tokens.shape[1])
    total = 0
    for t in range(tokens.shape[0]):
        loss, memory = model(memory, (tokens[t], targets[t]), recompute)
        total = total + loss
    return total, memory


def _ids(shape, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, shape, generator=g), torch.randint(0, vocab, shape, generator=g)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"dim": 10, "heads": 4}, "`dim` must be divisible by `heads`"),
        ({"vocab": 1}, "`vocab` must be an integer >= 2"),
        ({"layers": 0}, "`layers` must be an integer >= 1"),
        ({"tau": 1.5}, r"`tau` must be a real number in \(0, 1\]"),
        ({"slots": 2.0}, "`slots` must be an integer >= 1"),
        ({"fused_write": 1}, "`fused_write` must be a bool"),
    ],
)
def test_bad_config_raises_memcore_error(kwargs, match):
    """Each invalid field raises MemcoreError naming the field and the received value."""
    with pytest.raises(MemcoreError, match=match):
        attrs.evolve(SMALL, **kwargs)


def test_config_is_frozen_and_hashable():
    """The config hashes (a jit static argument) and derives its memory config."""
    assert hash(SMALL) == hash(attrs.evolve(SMALL))
    assert SMALL.memory.slots == 3 and SMALL.memory.dim == 8
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        SMALL.dim = 4


def test_import_memcore_models_imports_no_framework():
    """memcore.models imports neither torch nor JAX."""
    import subprocess
    import sys

    code = "import sys, memcore.models; print(any(m in sys.modules for m in ('torch', 'jax')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_torch_shapes_and_initial_memory_gradient():
    """Loss is a scalar, memories (B, K, D); dM_0 reaches v_bias through init_memory."""
    torch.manual_seed(0)
    model = MemformerLM(SMALL, dtype=torch.float64)
    tokens, targets = _ids((2, 3, 5), SMALL.vocab, 0)
    m0 = model.init_memory(3)
    assert m0.shape == (3, SMALL.slots, SMALL.dim) and m0.requires_grad
    loss, m1 = model(m0, {"tokens": tokens[0], "targets": targets[0]})
    assert loss.shape == () and m1.shape == m0.shape
    assert model.advance(tokens[0], m0).shape == m0.shape
    model(m1, (tokens[1], targets[1]))[0].backward()
    assert model.writer.v_bias.grad is not None and model.writer.v_bias.grad.abs().sum() > 0


def test_torch_model_matches_the_old_bench_numbers():
    """Same parameters, init and float32 numbers as the bench model it replaces."""
    torch.manual_seed(0)
    model = MemformerLM(MemformerConfig(vocab=30, dim=32, heads=4, layers=2, slots=5))
    tokens, targets = _ids((3, 2, 6), 30, 1)
    for recompute in (False, True):
        model.zero_grad(set_to_none=True)
        total, _ = _rollout(model, tokens, targets, recompute)
        total.backward()
        norms = [p.grad.double().norm().item() for p in model.parameters()]
        assert total.item() == pytest.approx(OLD_LOSS, rel=1e-6)
        np.testing.assert_allclose(norms[:4], OLD_GRAD_NORMS_HEAD, rtol=1e-5)
        np.testing.assert_allclose(norms[-4:], OLD_GRAD_NORMS_TAIL, rtol=1e-5)


def test_bench_module_is_the_library_model():
    """bench.lm_model.MemformerLM is the library model with the bench's positional form."""
    import pathlib
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    from bench.lm_model import MemformerLM as BenchLM

    model = BenchLM(30, 32, 4, 2, 5, fused_write=False)
    assert isinstance(model, MemformerLM) and model.config.slots == 5


def test_weights_select_positions_and_recompute_keeps_the_loss():
    """weights = mask / count gives the masked mean; recompute changes no loss or gradient."""
    torch.manual_seed(1)
    model = MemformerLM(SMALL, dtype=torch.float64)
    tokens, targets = _ids((1, 2, 5), SMALL.vocab, 2)
    m0 = model.init_memory(2).detach()
    mask = torch.zeros(2, 5, dtype=torch.float64)
    mask[:, -2:] = 1.0
    weighted, _ = model(m0, {"tokens": tokens[0], "targets": targets[0], "weights": mask / 4})
    logits = model.head(model.ln_out(model.encode(tokens[0], m0)))
    scored = logits[:, -2:].reshape(4, -1)
    ce = torch.nn.functional.cross_entropy(scored, targets[0][:, -2:].reshape(4))
    assert weighted.item() == pytest.approx(ce.item(), rel=1e-12)
    grads = []
    for recompute in (False, True):
        model.zero_grad(set_to_none=True)
        m = m0.clone().requires_grad_(True)
        seg = {"tokens": tokens[0], "targets": targets[0], "weights": mask / 4}
        loss, m1 = model(m, seg, recompute)
        (loss + m1.sum()).backward()
        grads.append([p.grad.clone() for p in model.parameters()] + [m.grad])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    "segment, memory_shape, match",
    [
        ("tokens", (2, 3, 8), "`segment` must be"),
        ({"tokens": 0, "labels": 0}, (2, 3, 8), "`segment` must be"),
        (None, (2, 3, 8), "`segment` must be"),
        ("bad_targets", (2, 3, 8), "`targets` must have the tokens' shape"),
        ("ok", (2, 8, 3), r"`memory` must have shape \(B, K, D\) = \(2, 3, 8\)"),
    ],
)
def test_torch_bad_segment_raises(segment, memory_shape, match):
    """A malformed segment or memory raises MemcoreError naming the argument."""
    model = MemformerLM(SMALL)
    tokens = torch.zeros(2, 5, dtype=torch.long)
    if segment == "ok":
        segment = (tokens, tokens)
    elif segment == "bad_targets":
        segment = (tokens, tokens[:, :4])
    with pytest.raises(MemcoreError, match=match):
        model(torch.zeros(memory_shape), segment)


def test_torch_rejects_a_non_config():
    """MemformerLM takes a MemformerConfig, nothing else."""
    with pytest.raises(MemcoreError, match=r"`config` must be a memcore.models.MemformerConfig"):
        MemformerLM({"vocab": 11})


# ----------------------------------------------------------------------------- JAX
def _jax():
    jax = pytest.importorskip("jax", reason="the JAX model needs jax")
    if not jax.config.jax_enable_x64:
        pytest.skip("needs JAX_ENABLE_X64=1 for float64 (tests/conftest.py sets it)")
    from memcore.backends.jax import memformer as jm

    return jax, jm


def test_torch_and_jax_give_the_same_loss_and_gradients_in_float64():
    """Same parameters, 2 segments (one weighted): loss, M_2 and gradients agree (1e-10)."""
    jax, jm = _jax()
    jnp = jax.numpy
    torch.manual_seed(0)
    model = MemformerLM(SMALL, dtype=torch.float64)
    tokens, targets = _ids((2, 2, 5), SMALL.vocab, 3)
    weights = torch.rand(2, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    seg = {"tokens": tokens[1], "targets": targets[1], "weights": weights}
    l0, m = model(model.init_memory(2), (tokens[0], targets[0]))
    l1, m_final = model(m, seg)
    (l0 + l1).backward()
    params = jm.from_flat({k: v.detach().numpy() for k, v in model.named_parameters()}, SMALL)
    tok, tgt = jnp.asarray(tokens.numpy()), jnp.asarray(targets.numpy())

    def f(p):
        loss0, m = jm.segment_loss(p, jm.init_memory(p, 2, SMALL), (tok[0], tgt[0]), SMALL)
        w = jnp.asarray(weights.numpy())
        loss1, m = jm.segment_loss(p, m, {"tokens": tok[1], "targets": tgt[1], "weights": w}, SMALL)
        return loss0 + loss1, m

    (val, mj), grads = jax.jit(jax.value_and_grad(f, has_aux=True))(params)
    assert float(val) == pytest.approx((l0 + l1).item(), rel=1e-12)
    np.testing.assert_allclose(np.asarray(mj), m_final.detach().numpy(), rtol=1e-10, atol=1e-12)
    flat = jm.to_flat(grads, SMALL)
    for name, p in model.named_parameters():
        g = p.grad.numpy()
        err = np.abs(np.asarray(flat[name]) - g).max() / max(np.abs(g).max(), 1e-30)
        assert err < 1e-10, (name, err)


def test_jax_init_matches_torch_names_and_shapes():
    """init's pytree flattens to the torch model's names and shapes; from_flat inverts it."""
    jax, jm = _jax()
    shapes = jax.eval_shape(lambda k: jm.to_flat(jm.init(k, SMALL), SMALL), jax.random.key(0))
    model = MemformerLM(SMALL)
    want = {k: tuple(v.shape) for k, v in model.named_parameters()}
    assert {k: tuple(v.shape) for k, v in shapes.items()} == want
    flat = {k: v.detach().numpy() for k, v in model.named_parameters()}
    back = jm.to_flat(jm.from_flat(flat, SMALL), SMALL)
    assert all(np.array_equal(np.asarray(back[k]), flat[k]) for k in flat)


def test_jax_bad_inputs_raise():
    """A wrong config, flat dict or memory shape raises MemcoreError naming it."""
    jax, jm = _jax()
    flat = {k: v.detach().numpy() for k, v in MemformerLM(SMALL).named_parameters()}
    params = jm.from_flat(flat, SMALL)
    with pytest.raises(MemcoreError, match="`config` must be"):
        jm.init(jax.random.key(0), {"vocab": 3})
    with pytest.raises(MemcoreError, match="`flat` must have the torch model's parameter names"):
        jm.from_flat({"emb.weight": np.zeros((11, 8))}, SMALL)
    tok = jax.numpy.zeros((2, 5), jax.numpy.int32)
    with pytest.raises(MemcoreError, match=r"`memory` must have shape \(B, K, D\)"):
        jm.segment_loss(params, jax.numpy.zeros((2, 8, 3)), (tok, tok), SMALL)


# ----------------------------------------------------------------------------- memcore train
def _train_config(**routing):
    import pathlib

    import tomllib

    from memcore.train.config import parse_config

    root = pathlib.Path(__file__).resolve().parents[1]
    data = tomllib.loads((root / "configs" / "recall_lm_memformer_smoke.toml").read_text())
    data["routing"].update(routing)
    return parse_config(data)


def _lm_gradient(backend_name, config, seed=0):
    from memcore.registry import get_backend
    from memcore.train import lm_task, tasks

    be = get_backend(backend_name)
    params = lm_task.init_lm_params(config, np.random.default_rng(seed))
    params = {k: be.from_numpy(v, dtype="float64") for k, v in params.items()}
    batch = tasks.make_batch(config.task, np.random.default_rng(seed + 1), 3)
    xs = be.from_numpy(batch.xs, dtype="float64")
    targets = be.from_numpy(batch.targets.astype(np.int32))
    res = lm_task.routed_gradient_lm(be, config, params, xs, targets, batch.weights)
    return res.loss, {k: np.asarray(be.to_numpy(g)) for k, g in res.grads.items()}


def _max_rel(a, b):
    return max(np.abs(a[k] - b[k]).max() / max(np.abs(b[k]).max(), 1e-30) for k in b)


def test_lm_recall_batch_layout():
    """Segment 0 holds item tokens, the last segment the queries; only it is scored."""
    from memcore.train import lm_task

    config = _train_config()
    task = config.task  # S = 3, L = 2 items, V = 4 values
    batch = lm_task.lm_recall_batch(task, np.random.default_rng(0), 5)
    V, L = task.values, task.items
    assert batch.xs.shape == (4, 5, 2) and batch.weights == (0.0, 0.0, 0.0, 1.0)
    np.testing.assert_array_equal(batch.xs[0], V + np.arange(L) * V + batch.targets[3])
    np.testing.assert_array_equal(batch.xs[3], np.broadcast_to(V + L * V + np.arange(L), (5, 2)))
    assert batch.xs[1:3].max() < V and batch.xs.max() < lm_task.lm_vocab(task)


def test_lm_train_mrbp_gradient_equals_bptt_on_torch():
    """memcore train's MRBP and BPTT give the same loss and gradients (float64, 1e-10)."""
    loss_m, grads_m = _lm_gradient("torch", _train_config(method="mrbp"))
    loss_b, grads_b = _lm_gradient("torch", _train_config(method="bptt"))
    assert loss_m == pytest.approx(loss_b, rel=1e-12)
    assert _max_rel(grads_m, grads_b) < 1e-10
    assert np.abs(grads_m["writer.v_bias"]).sum() > 0


def test_lm_train_jax_mrbp_gradient_equals_torch():
    """The JAX MRBP training gradient equals the torch one from the same parameters."""
    _jax()
    config = _train_config(method="mrbp")
    loss_t, grads_t = _lm_gradient("torch", config)
    loss_j, grads_j = _lm_gradient("jax", config)
    assert loss_j == pytest.approx(loss_t, rel=1e-10)
    assert _max_rel(grads_j, grads_t) < 1e-10


def test_lm_train_rejects_a_backend_without_autodiff():
    """The numpy backend cannot train the framework model: MemcoreError naming --backend."""
    from memcore.registry import get_backend
    from memcore.train import lm_task

    with pytest.raises(MemcoreError, match="`--backend` must be one of torch, jax"):
        lm_task.routed_gradient_lm(get_backend("numpy"), _train_config(), {}, None, None, ())


def test_lm_task_needs_the_lm_model():
    """Task lm_recall with model kind memformer is refused at load time."""
    import copy
    import pathlib

    import tomllib

    from memcore.train.config import parse_config

    root = pathlib.Path(__file__).resolve().parents[1]
    data = tomllib.loads((root / "configs" / "recall_lm_memformer_smoke.toml").read_text())
    bad = copy.deepcopy(data)
    bad["model"] = {"kind": "memformer"}
    with pytest.raises(MemcoreError, match=r"`model.kind` must be 'memformer_lm'"):
        parse_config(bad)


def test_memcore_train_smoke_config_learns_with_mrbp(tmp_path, capsys):
    """`memcore train` on the smoke config exits 0, and MRBP training beats chance (1/4)."""
    import json
    import pathlib

    from memcore.train.cli import main as train_main

    root = pathlib.Path(__file__).resolve().parents[1]
    config = root / "configs" / "recall_lm_memformer_smoke.toml"
    code = train_main([str(config), "--backend", "torch", "--out", str(tmp_path), "--quiet"])
    assert code == 0, capsys.readouterr().err
    results = json.loads((tmp_path / "results.json").read_text())
    losses = results["history"]["loss"]
    assert np.mean(losses[-20:]) < 0.8 * np.mean(losses[:20]), losses
    assert results["final_eval"]["accuracy"] > 0.5, results["final_eval"]


@pytest.mark.parametrize("mode", [True, "replay"])
def test_model_is_an_mrbp_step_with_recompute(mode):
    """mrbp(model, ...) with per-block recompute gives BPTT's loss and every gradient."""
    from memcore.backends.torch.mrbp_model import mrbp

    torch.manual_seed(4)
    model = MemformerLM(SMALL, dtype=torch.float64)
    tokens, targets = _ids((3, 2, 5), SMALL.vocab, 5)
    total, _ = _rollout(model, tokens, targets)
    total.backward()
    ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    model.recompute = mode
    segments = [(tokens[t], targets[t]) for t in range(3)]
    out = mrbp(model, model.init_memory(2), segments, advance=lambda m, s: model.advance(s[0], m))
    assert float(out.loss) == pytest.approx(total.item(), rel=1e-12)
    for p, g in zip(model.parameters(), ref):
        torch.testing.assert_close(p.grad, g, rtol=1e-10, atol=1e-13)


def test_bad_recompute_mode_raises():
    """recompute takes False, True or 'replay' only."""
    model = MemformerLM(SMALL)
    tokens = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(MemcoreError, match="`recompute` must be False, True or 'replay'"):
        model(model.init_memory(2), (tokens, tokens), recompute="layers")
