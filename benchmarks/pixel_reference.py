"""Pixel runs of the recipe next to MR.Q's published pixel-based DMC curves, at the same env-step budget.

MR.Q (Fujimoto et al., "Towards General-Purpose Model-Free Reinforcement Learning", ICLR 2025; code and results at
github.com/facebookresearch/MRQ) publishes the evaluation returns of its visual DMC runs per seed in
``results/dmc-visual_results.txt``: 10 seeds, a row every 5,000 agent steps. MR.Q acts with action repeat 2
(``MRQ/env_preprocessing.py``, ``action_repeat = 2``), so a row's env steps are twice its ``Timestep``. This reads that
file (give its path; nothing of it is stored here) and writes ``results.md``, ``results.csv`` and one ``<task>.png``
per task, as ``python -m alm_torchrl.results`` does, with MR.Q as the reference curve.

    python benchmarks/pixel_reference.py <run dirs> --mrq-results MRQ/results/dmc-visual_results.txt \\
        --out docs/results/dmc_pixels --frames 20000 40000 60000 80000 100000
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from alm_torchrl.results import (
    ReferenceCurves,
    ResultsError,
    find_runs,
    group_curves,
    summarise_curves,
    summarise_reference,
    write_results,
)

METRIC = "eval/return_mean"
MRQ_ACTION_REPEAT = 2  # env steps per MR.Q Timestep on DMC
MRQ_LABEL = "MR.Q from pixels (published)"


def mrq_env_name(task: str) -> str:
    """``dmc/cartpole-balance`` -> ``Dmc-visual-cartpole-balance``, the block name in MR.Q's results file."""
    if not task.startswith("dmc/"):
        raise ResultsError(f"MR.Q publishes pixel curves for DMC tasks only, not {task!r}")
    return "Dmc-visual-" + task.removeprefix("dmc/")


def load_mrq(path: Path, task: str) -> ReferenceCurves:
    """MR.Q's per-seed returns of one task, against env steps."""
    wanted, rows, inside = f"Env: {mrq_env_name(task)}", [], False
    for line in path.read_text().splitlines():
        if line.startswith("Env: "):
            inside = line.strip() == wanted
        elif inside and line[:1].isdigit():
            rows.append([float(value) for value in line.split()])
    if not rows:
        raise ResultsError(f"{path} has no block {wanted!r}")
    table = np.array(rows)
    return ReferenceCurves(table[:, 0].astype(np.int64) * MRQ_ACTION_REPEAT, table[:, 1:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs_dirs", nargs="+", type=Path, help="folders holding recipe run dirs (pixel DMC runs)")
    parser.add_argument("--mrq-results", type=Path, required=True, help="MR.Q's results/dmc-visual_results.txt")
    parser.add_argument("--out", type=Path, required=True, help="folder for results.md, results.csv, <task>.png")
    parser.add_argument("--frames", type=int, nargs="+", default=[20000, 40000, 60000, 80000, 100000],
                        help="env steps of the table (default: 20000 40000 60000 80000 100000)")
    args = parser.parse_args(argv)
    try:
        if not args.mrq_results.is_file():
            raise ResultsError(f"--mrq-results {args.mrq_results}: no such file")
        curves = group_curves(find_runs(args.runs_dirs), METRIC)
        tasks = sorted({task for task, _ in curves})
        references = {task: load_mrq(args.mrq_results, task) for task in tasks}
    except ResultsError as error:
        print(f"pixel_reference: {error}", file=sys.stderr)
        return 2
    rows = summarise_curves(curves, args.frames)
    for task in tasks:
        rows.extend(summarise_reference(task, references[task], args.frames, label=MRQ_LABEL))
    print(write_results(args.out, rows, curves, METRIC, references, reference_label=MRQ_LABEL), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
