"""Benchmarks that print ratios against a baseline measured in the same run.

``python -m bench.cupy_kernels``: the CuPy backend's fused kernels against the unfused
CuPy path and against torch. Results, with the command and versions, under ``bench/results/``.
"""

__all__: list[str] = []
