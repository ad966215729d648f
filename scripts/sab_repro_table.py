"""The SAB reproduction tables (ours vs the paper, per row) from the runs of
``scripts/gpu_issue14_repro.sh``: Table 2 (copy T = 100, accuracy on the last 10 digits)
and Table 6 (transfer of the T = 100 models to longer T).

Usage: python scripts/sab_repro_table.py RUNS_DIR [--out README.md]

RUNS_DIR holds one folder per run (bptt, tbptt, sab, sab_release), each with the
``results.json`` of ``memcore train`` and, when evaluated, ``transfer.json``
(``scripts/sab_transfer_eval.py``). Missing runs or values print as "-".
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

__all__ = ["PAPER_TABLE2", "PAPER_TABLE6", "RUNS", "main", "render"]

# (run folder, row label, SAB paper's Table 2 accuracy %, Table 6 column or None)
RUNS = (
    ("bptt", "LSTM, full BPTT", 99.8, "LSTM"),
    ("tbptt", "LSTM, TBPTT k_trunc 5", 31.0, None),
    ("sab", "SAB k_trunc 5 k_top 5 (memcore semantics)", 100.0, "SAB"),
    ("sab_release", "SAB k_trunc 5 k_top 5 (release mode)", 100.0, "SAB"),
)
PAPER_TABLE2 = {label: acc for _, label, acc, _ in RUNS}
TRANSFER_T = (100, 200, 300, 400, 2000, 5000)
PAPER_TABLE6 = {
    "LSTM": (99, 34, 25, 21, 12, 12),
    "SAB": (99, 95, 83, 75, 47, 41),
}
CHANCE = 12.5


def _load(path: pathlib.Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100.0 * x:.1f}"


def render(runs_dir: pathlib.Path) -> str:
    """The README text for the runs under ``runs_dir``."""
    lines = ["# SAB paper reproduction: copy task T = 100 (Table 2) and transfer (Table 6)", ""]
    lines += [
        (
            f"Made by `scripts/sab_repro_table.py` from `{runs_dir}`. Accuracy in % on the "
            f"last 10 digits, 512 held-out sequences; chance {CHANCE}%."
        ),
        "",
    ]
    lines += ["## Table 2: copy, T = 100", "",
              "| run | steps done | ours: acc % | ours: CE (last 10) | paper: acc % |",
              "|---|---|---|---|---|"]  # fmt: skip
    for name, label, paper, _ in RUNS:
        res = _load(runs_dir / name / "results.json") or {}
        final = res.get("final_eval") or {}
        steps = res.get("steps_done", "-")
        ce = final.get("ce")
        lines.append(f"| {label} | {steps} | {_pct(final.get('accuracy'))} | "
                     f"{'-' if ce is None else f'{ce:.3f}'} | {paper} |")  # fmt: skip
    lines += ["", "## Table 6: transfer of the T = 100 models", "",
              "| run | step | " + " | ".join(f"T={T}" for T in TRANSFER_T) + " |",
              "|---|---|" + "---|" * len(TRANSFER_T)]  # fmt: skip
    for name, label, _, column in RUNS:
        if column is None:
            continue
        tr = _load(runs_dir / name / "transfer.json") or {}
        cells = [_pct((tr.get("T", {}).get(str(T)) or {}).get("accuracy")) for T in TRANSFER_T]
        lines.append(f"| ours: {label} | {tr.get('step', '-')} | " + " | ".join(cells) + " |")
    for column, values in PAPER_TABLE6.items():
        lines.append(f"| paper: {column} | 200000 | " + " | ".join(str(v) for v in values) + " |")
    lines += ["", "Paper: Ke et al., NeurIPS 2018, Tables 2 and 6 (LSTM and SAB columns).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs_dir", type=pathlib.Path)
    p.add_argument("--out", type=pathlib.Path, default=None)
    args = p.parse_args(argv)
    text = render(args.runs_dir)
    out = args.out or args.runs_dir.parent / "README.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
