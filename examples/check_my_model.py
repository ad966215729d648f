"""Check the two-memory models of torch_mrbp.py and jax_mrbp.py: MRBP's gradients equal BPTT's.

    python examples/check_my_model.py              # torch, JAX, and torch against JAX
    cd examples && memcore verify --model check_my_model:torch_check   # (or jax_check, both)

Each factory returns a memcore.ModelCheck; check_mrbp runs it in float64.
"""
import functools
import os

os.environ.setdefault("JAX_ENABLE_X64", "1")  # float64 in JAX; must precede `import jax`

import jax_mrbp
import numpy as np
import torch
import torch_mrbp

from memcore import ModelCheck, check_mrbp

T, B, L = 4, 2, 3  # a small rollout is enough: the check is exact, not statistical


def segments():  # the recall task's tokens and targets, as NumPy (T, B, L) int arrays
    x = np.random.default_rng(0).integers(0, torch_mrbp.V, (T, B, L))
    x[0] = x[0, :, :1]
    return {"tokens": x, "targets": np.broadcast_to(x[:1, :, :1], x.shape).copy()}


def torch_check() -> ModelCheck:
    torch.manual_seed(0)
    segs = {k: torch.from_numpy(v) for k, v in segments().items()}
    model = torch_mrbp.TwoMemoryLM()  # float32: check_mrbp checks a float64 copy of it
    return ModelCheck(step=model, memory0=lambda m: m.initial_memory(B), segments=segs)


def jax_params(model):  # the torch model's weights as the JAX model's pytree (head transposed)
    w = {n: p.detach().numpy() for n, p in model.named_parameters()}
    read, write = ("wq", "wk", "wv", "wo"), ("wq", "wk", "wv", "v_bias")
    return {
        "embed": w["embed.weight"],
        "head": w["head.weight"].T,
        "read": [{n: w[f"read.{i}.{n}"] for n in read} for i in (0, 1)],
        "write": [{n: w[f"write.{i}.{n}"] for n in write} for i in (0, 1)],
    }


def jax_check() -> ModelCheck:
    params = jax_params(torch_check().step)
    return ModelCheck(
        step=jax_mrbp.step,
        params=params,
        memory0=functools.partial(jax_mrbp.memory0, batch=B),
        segments=segments(),
        framework="jax",
    )


def both() -> ModelCheck:  # torch, JAX, and torch against JAX on the same weights and inputs
    t, j = torch_check(), jax_check()
    return ModelCheck(
        torch=(t.step, t.memory0, t.segments),
        jax=(j.step, j.params, j.memory0, j.segments),
        param_map={"embed.weight": "embed", "head.weight": ("head", np.transpose)},
    )


if __name__ == "__main__":
    c = both()
    report = check_mrbp(torch=c.torch, jax=c.jax, param_map=c.param_map)
    print(report)
    raise SystemExit(0 if report.passed and report.max_rel <= 1e-10 else 1)
