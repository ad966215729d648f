"""memcore.check_mrbp and `memcore verify --model`: a user's step, MRBP against BPTT in float64.

Models are tiny (two stacked memories, T=3, B=2) so the file runs in seconds; the
library's own drivers are checked, and a driver that is wrong, a nondeterministic step
and unequal torch/JAX weights are shown to fail with the row that disagrees.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")

import memcore.backends.torch.check_mrbp as torch_half
from memcore import MemcoreError, ModelCheck, check_mrbp
from memcore.backends.jax import modules as jm
from memcore.backends.torch import MemoryReader, MemoryWriter
from memcore.cli import main

V, D, K, H, T, B, L = 5, 4, 3, 2, 3, 2, 3
NAMES = ("read.0.wq", "write.1.v_bias", "embed.weight", "head.weight")


class TwoMemory(torch.nn.Module):
    """Two stacked memories: layer i reads memory i, then writes it from its output."""

    def __init__(self):
        super().__init__()
        self.embed, self.head = torch.nn.Embedding(V, D), torch.nn.Linear(D, V, bias=False)
        self.read = torch.nn.ModuleList([MemoryReader(D, H), MemoryReader(D, H)])
        self.write = torch.nn.ModuleList([MemoryWriter(K, D, H), MemoryWriter(K, D, H)])

    def forward(self, memory, seg):
        h, new = self.embed(seg["tokens"]), []
        for read, write, m in zip(self.read, self.write, memory):
            h = h + read(h, m)
            new.append(write(m, h))
        return torch.nn.functional.cross_entropy(self.head(h).mT, seg["targets"]), new


def memory0(model):
    return [w.init_memory(B) for w in model.write]


def segments_np():
    rng = np.random.default_rng(0)
    return {"tokens": rng.integers(0, V, (T, B, L)), "targets": rng.integers(0, V, (T, B, L))}


def torch_case():
    torch.manual_seed(0)
    segs = {k: torch.from_numpy(v) for k, v in segments_np().items()}
    return TwoMemory(), segs


def jax_step(p, memory, seg):
    h, new = p["embed"][seg["tokens"]], []
    for r, w, m in zip(p["read"], p["write"], memory):
        h = h + jm.reader(r, h, m, num_heads=H)
        new.append(jm.writer(w, m, h, num_heads=H))
    logp = jax.nn.log_softmax(h @ p["head"])
    return -(logp * jax.nn.one_hot(seg["targets"], V)).sum(-1).mean(), new


def jax_memory0(p):
    return [jm.writer_initial_memory(w, B) for w in p["write"]]


def jax_params(model):
    w = {n: p.detach().numpy() for n, p in model.named_parameters()}
    layer = {"read": ("wq", "wk", "wv", "wo"), "write": ("wq", "wk", "wv", "v_bias")}
    out = {k: [{n: w[f"{k}.{i}.{n}"] for n in names} for i in (0, 1)] for k, names in layer.items()}
    return {"embed": w["embed.weight"], "head": w["head.weight"].T, **out}


PARAM_MAP = {"embed.weight": "embed", "head.weight": ("head", np.transpose)}


@pytest.mark.parametrize(
    "cuts", [{}, {"truncate_every": 2}, {"horizon": 2}], ids=["full", "truncate2", "horizon2"]
)
def test_torch_module_passes_per_parameter(cuts):
    """A float32 nn.Module: every parameter's MRBP gradient equals BPTT's at rel 1e-10."""
    model, segs = torch_case()
    report = check_mrbp(model, memory0, segs, **cuts)
    assert report.passed, report.text
    names = {r.check for r in report.results}
    assert {f"grad[{n}]" for n in NAMES} | {"loss", "memory[0]", "memory[1]"} <= names
    assert report.max_rel <= 1e-10
    assert all(abs_ >= 0 and rel >= 0 for abs_, rel in report.errors().values())
    assert "torch:mrbp-vs-bptt" in report.text and "check_mrbp: PASSED" in report.text


def test_user_model_is_not_touched():
    """The check runs a float64 deep copy: the user's weights, dtype and .grad are unchanged."""
    model, segs = torch_case()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    check_mrbp(model, memory0, segs)
    for n, p in model.named_parameters():
        assert p.dtype == torch.float32 and p.grad is None
        assert torch.equal(p, before[n])


def test_wrong_driver_fails_and_names_the_rows(monkeypatch):
    """An MRBP that drops the memory gradient (truncates every segment) fails, row by row."""
    from memcore.backends.torch.mrbp_model import mrbp

    def cut_everywhere(step, m0, segs, **kw):
        return mrbp(step, m0, segs, **{**kw, "truncate_every": 1})

    monkeypatch.setattr(torch_half, "_default_mrbp", lambda: cut_everywhere)
    model, segs = torch_case()
    report = check_mrbp(model, memory0, segs)
    assert not report.passed
    failed = {r.check for r in report.results if r.failed}
    assert "grad[write.0.wq]" in failed and "loss" not in failed
    assert "FAIL" in report.text and "check_mrbp: FAILED" in report.text


def test_function_step_restores_grad():
    """A function step over float64 params passes; their .grad is what it was before."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(D, D, generator=g, dtype=torch.float64, requires_grad=True)
    w.grad = torch.full_like(w, 7.0)

    def step(m, x):
        m = torch.tanh(m @ w + x)
        return (m**2).sum(), m

    xs = torch.randn(T, B, D, generator=g, dtype=torch.float64)
    report = check_mrbp(step, torch.zeros(B, D, dtype=torch.float64), xs, params={"w": w})
    assert report.passed, report.text
    assert torch.equal(w.grad, torch.full_like(w, 7.0))


def test_function_step_with_float32_params_is_refused():
    """A function's float32 params cannot be cast without touching them: MemcoreError names them."""
    w = torch.randn(D, D, requires_grad=True)
    with pytest.raises(MemcoreError, match=r"`params` must be float64.*params\['w'\]"):
        check_mrbp(lambda m, x: ((m @ w).sum(), m @ w), torch.zeros(B, D), [0], params={"w": w})


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"framework": "tf"}, "`framework` must be one of torch, jax"),
        ({"truncate_every": 0}, "`truncate_every` must be None or an integer >= 1"),
        ({"horizon": True}, "`horizon` must be None or an integer >= 1"),
        ({"rtol": -1.0}, "`rtol` must be a finite real number >= 0"),
        ({"torch": (1, 2)}, r"`torch` must be a tuple \(step, memory0, segments\[, params\]\)"),
    ],
)
def test_bad_arguments(kwargs, match):
    """Bad arguments raise MemcoreError naming the argument, before anything runs."""
    model, segs = torch_case()
    args = () if "torch" in kwargs else (model, memory0, segs)
    with pytest.raises(MemcoreError, match=match):
        check_mrbp(*args, **kwargs)


def test_jax_step_passes_and_cross_framework_agrees():
    """JAX MRBP = JAX BPTT, and torch's MRBP gradients = JAX's on the same weights (float64)."""
    model, segs = torch_case()
    params = jax_params(model)
    alone = check_mrbp(jax_step, jax_memory0, segments_np(), params=params, framework="jax")
    assert alone.passed and {"grad[read.1.wv]", "grad[head]"} <= {r.check for r in alone.results}
    both = check_mrbp(
        torch=(model, memory0, segs),
        jax=(jax_step, params, jax_memory0, segments_np()),
        param_map=PARAM_MAP,
    )
    assert both.passed, both.text
    cross = [r for r in both.results if r.op == "torch-vs-jax:mrbp"]
    assert {"grad[head.weight -> head]", "grad[write.1.v_bias]"} <= {r.check for r in cross}


def test_cross_framework_different_weights_fail():
    """Unequal torch and JAX weights are reported as such, not as a gradient mismatch."""
    model, segs = torch_case()
    params = jax_params(model)
    params["embed"] = params["embed"] + 1e-3
    report = check_mrbp(
        torch=(model, memory0, segs),
        jax=(jax_step, params, jax_memory0, segments_np()),
        param_map=PARAM_MAP,
    )
    bad = [r for r in report.results if r.failed]
    assert [r.check for r in bad] == ["grad[embed.weight -> embed]"]
    assert "start both models from the same weights" in bad[0].worst.reason
    assert not report.passed


def test_jax_without_x64_is_refused():
    """Without x64, JAX would compute in float32: MemcoreError says to set JAX_ENABLE_X64=1."""
    code = textwrap.dedent(
        """
        import jax, jax.numpy as jnp, memcore
        step = lambda p, m, x: ((m * p).sum(), m * p + x)
        try:
            memcore.check_mrbp(step, jnp.ones(2), jnp.ones((2, 2)), params=jnp.ones(2),
                               framework="jax")
        except memcore.MemcoreError as e:
            print("REFUSED", e)
        """
    )
    env = {**os.environ, "JAX_ENABLE_X64": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert "REFUSED" in out.stdout and "JAX_ENABLE_X64=1" in out.stdout, out.stderr


FACTORY = '''
import torch
from memcore import ModelCheck

def good():
    w = torch.ones(2, 2, dtype=torch.float64, requires_grad=True)
    step = lambda m, x: ((m @ w).sum(), torch.tanh(m @ w + x))
    m0, xs = torch.zeros(1, 2, dtype=torch.float64), torch.ones(3, 1, 2, dtype=torch.float64)
    return ModelCheck(step=step, memory0=m0, segments=xs, params=[w])

def noisy():  # draws new noise in MRBP's replay: its gradients cannot equal BPTT's
    d = good()
    step = lambda m, x: d.step(m, x + torch.rand_like(x))
    return {"step": step, "memory0": d.memory0, "segments": d.segments, "params": d.params}

def wrong():
    return 42

def typo():
    return {"stepp": None}
'''


@pytest.fixture
def factory_dir(tmp_path, monkeypatch):
    (tmp_path / "my_factories.py").write_text(FACTORY)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_cli_verify_model_exit_codes(factory_dir, capsys):
    """verify --model: 0 when MRBP = BPTT, 1 for a nondeterministic step, 2 for bad input."""
    assert main(["verify", "--model", "my_factories:good", "--json", "r.json"]) == 0
    assert "check_mrbp: PASSED" in capsys.readouterr().out
    assert json.loads((factory_dir / "r.json").read_text())["ok"] is True
    assert main(["verify", "--model", "my_factories:noisy"]) == 1
    assert "check_mrbp: FAILED" in capsys.readouterr().out
    for target, match in [
        ("no_such_module:f", "could not be imported"),
        ("my_factories:missing", "factory 'missing' must be a callable"),
        ("my_factories:wrong", "must return a memcore.ModelCheck.*Received: int"),
        ("my_factories:typo", r"Received: dict with keys \['stepp'\]"),
        ("my_factories", "must be 'package.module:factory'"),
    ]:
        assert main(["verify", "--model", target]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err
        assert __import__("re").search(match, err), err


def test_model_check_protocol_matches_check_mrbp():
    """ModelCheck's fields are exactly check_mrbp's arguments (one protocol, no drift)."""
    import inspect

    import attrs

    fields = {f.name for f in attrs.fields(ModelCheck)}
    assert fields == set(inspect.signature(check_mrbp).parameters)
