"""Benchmarks that print ratios against a baseline measured in the same run.

Each is runnable as ``python -m bench.<name>`` with sizes as flags, checks gradient
equivalence before timing, and records GPU, versions and command in its JSON:

- ``cupy_kernels``: the CuPy backend's fused kernels against the unfused path and torch.
- ``mrbp_lm``: MRBP vs BPTT vs per-segment checkpointing on a Memformer-lite LM
  (``lm_model``, ``lm_routing``).
- ``write_kernel``: the fused Triton memory write against the batched-matmul torch op.
- ``read_sdpa``: the memory read through SDPA against batched matmuls.
- ``sab_replay``: SAB sparse replay vs full BPTT vs LSTM + dense attention.
- ``scaling``: time and memory against T and K, plotted.
- ``run_all``: all of the above in one process tree (one GPU lease).

Results, with the command and versions, under ``bench/results/``; summary in docs/performance.md.
"""

__all__: list[str] = []
