"""The fused Triton memory write against the torch op, on the CPU through TRITON_INTERPRET=1."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

torch = pytest.importorskip("torch", reason="the fused write is torch code")
pytest.importorskip(
    "triton",
    reason="triton is not installed, so its CPU interpreter (TRITON_INTERPRET=1) is absent",
)

# The interpreter is chosen when the kernels are decorated, so the check runs in a fresh
# process with TRITON_INTERPRET=1 set before triton is imported.
_SCRIPT = textwrap.dedent(
    """
    import torch
    from memcore.backends.torch.memory import memory_write
    from memcore.backends.torch.triton_write import fused_available, fused_memory_write
    assert fused_available(torch.device("cpu"))
    torch.manual_seed(0)
    for B, K, L, D, H, tau in [(2, 20, 12, 32, 2, 0.5), (1, 33, 16, 64, 4, 0.25)]:
        ins = [torch.randn(B, K, D), torch.randn(B, L, D)]
        ins += [torch.randn(D, D) / D**0.5 for _ in range(3)] + [torch.randn(K, D)]
        ins = [t.requires_grad_(True) for t in ins]
        dy = torch.randn(B, K, D)
        y1 = fused_memory_write(*ins, num_heads=H, tau=tau)
        y2 = memory_write(*ins, num_heads=H, tau=tau)
        assert (y1 - y2).abs().max() < 1e-5, (y1 - y2).abs().max()
        for g1, g2 in zip(torch.autograd.grad(y1, ins, dy), torch.autograd.grad(y2, ins, dy)):
            err = ((g1 - g2).norm() / g2.norm()).item()
            assert err < 1e-5, err
    print("OK")
    """
)


def test_fused_write_matches_torch_under_interpreter():
    """Output and all six gradients equal the torch op's, with ragged K and L (masked tiles)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


def test_fallback_paths_equal_torch_op():
    """With a token_mask, an unfusable head width, or no GPU/interpreter, the torch op runs."""
    from memcore.backends.torch.memory import memory_write
    from memcore.backends.torch.triton_write import fused_memory_write

    torch.manual_seed(0)
    B, K, L, D = 2, 4, 3, 12
    ins = [torch.randn(B, K, D), torch.randn(B, L, D)]
    ins += [torch.randn(D, D) for _ in range(3)] + [torch.randn(K, D)]
    mask = torch.tensor([[True, False, True], [True, True, True]])
    for kw in ({"num_heads": 2, "token_mask": mask}, {"num_heads": 3}):
        assert torch.equal(fused_memory_write(*ins, **kw), memory_write(*ins, **kw))
