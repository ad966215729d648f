"""Run every issue-7 benchmark in one go (one lease of the GPU), each in its own process.

    python -m bench.run_all --out "$OUT"

Writes each benchmark's JSON, the scaling PNGs and one combined log into ``--out``. Each
benchmark gets a wall-clock budget (seconds) and is stopped when it runs past it, so a slow
one cannot starve the rest; benchmarks write their JSON as they go, so a stopped one keeps
the rows it finished. ``--only`` picks a subset (comma-separated names).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

__all__ = ["PLAN", "main"]

# name -> (module, arguments, budget in s), in priority order (issue 7: 1 > 4 > 3 > 2 > 5)
PLAN: dict[str, tuple[str, list[str], int]] = {
    "mrbp_lm": ("bench.mrbp_lm", ["--fit-gib", "40", "--fit-max-T", "512"], 200),
    "sab_replay": ("bench.sab_replay", ["--config-budget-s", "12"], 150),
    "read_sdpa": ("bench.read_sdpa", [], 40),
    "write_kernel": ("bench.write_kernel", [], 60),
    "scaling": ("bench.scaling", [], 90),
}


def main(argv: list[str] | None = None) -> int:
    """Run the plan; returns the number of benchmarks that failed or ran out of time."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", required=True)
    p.add_argument("--only", default=",".join(PLAN))
    p.add_argument("--budget-scale", type=float, default=1.0)
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "run_all.log"), "a") as log:
        return _run(args, log)


def _run(args: argparse.Namespace, log) -> int:
    failed = 0
    for name in args.only.split(","):
        module, extra, budget = PLAN[name]
        cmd = [
            sys.executable,
            "-m",
            module,
            *extra,
            "--out",
            os.path.join(args.out, f"{name}.json"),
        ]
        if name == "scaling":
            cmd += ["--png-dir", args.out]
        budget = int(budget * args.budget_scale)
        print(f"== {name}: {' '.join(cmd[1:])} (budget {budget} s)", file=log, flush=True)
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(
                cmd, stdout=log, stderr=subprocess.STDOUT, timeout=budget, check=False
            )
            status = f"rc={proc.returncode}"
            failed += proc.returncode != 0
        except subprocess.TimeoutExpired:
            status, failed = "TIMEOUT", failed + 1
        line = f"== {name}: {status} in {time.perf_counter() - t0:.0f} s"
        print(line, file=log, flush=True)
        print(line, flush=True)
    return failed


if __name__ == "__main__":
    sys.exit(main())
