"""Results table and learning-curve figures from a folder of ALM recipe runs.

Every run dir of the recipe (``outputs/<env>/<date_time>/`` or a multirun job dir) holds its config in
``.hydra/`` and its metrics as TorchRL CSV logs (``alm_logging/<exp_name>/scalars/<group>/<metric>.csv``,
one ``frames,value`` line per logged point, no header). This module finds those runs, groups them by task
(``env.name``) and variant (the command-line overrides that change the algorithm), takes the seeds as
repetitions and writes:

- ``results.md`` and ``results.csv``: mean +- std over seeds of the metric at the requested frame counts
  (the last value logged at or before each; runs that have not got that far are left out, ``n`` counts
  the seeds used), with the published ALM numbers as extra rows where a released curve exists;
- ``<task>.png``: the metric against env frames, one mean line with a shaded +-std band per variant,
  and the published ALM curve (gym ``-v2`` tasks) overlaid.

Standard deviations are population ones (numpy's default ``ddof=0``), as in the reference README.

Usage::

    python -m alm_torchrl.results multirun/2025-01-31_12-00-00 outputs/ --out results/ \\
        --frames 20000 50000 100000 200000 --reference-dir shared/reference/official-alm-scores

``--reference-dir`` defaults to the environment variable ``ALM_REFERENCE_DIR``; without either there is no
overlay. Bad input (a missing folder, a folder without runs, an unknown ``--metric``) ends with one
``results: ...`` line on stderr and exit code 2, before anything is written.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import textwrap
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DEFAULT_FRAMES = (20_000, 50_000, 100_000, 200_000)
DEFAULT_METRIC = "eval/return_mean"
REFERENCE_ENV_VAR = "ALM_REFERENCE_DIR"
REFERENCE_LABEL = "published ALM (gym v2)"
# Our task name -> released score file (RajGhugare19/alm, scores/); there is none for Hopper.
REFERENCE_FILES = {
    "HalfCheetah-v5": "gym_half_cheetah.csv",
    "Walker2d-v5": "gym_walker2d.csv",
    "Ant-v5": "gym_ant.csv",
    "Humanoid-v5": "gym_humanoid.csv",
    "T-Ant": "gym_truncated_ant.csv",
    "T-Humanoid": "gym_truncated_humanoid.csv",
}
# The released Step column counts training steps after the random warm-up: env frames = Step + warm-up.
REFERENCE_WARMUP_FRAMES = 5_000
# Files without a Step column (gym_truncated_humanoid.csv): row i is evaluation i, at these env frames.
REFERENCE_FIRST_EVAL_FRAMES = 10_000
REFERENCE_EVAL_INTERVAL = 5_000
# Without --full-reference the published curve is drawn up to this factor times our last frame.
REFERENCE_PLOT_MARGIN = 1.1

# Overrides that do not make a variant: the task and seed (grouped on separately), the preset that picks the
# task, the run length (the n column shows how far runs got), and bookkeeping.
NON_VARIANT_KEYS = frozenset({"env.name", "env.seed", "experiment", "collector.total_frames", "collector.device"})
NON_VARIANT_PREFIXES = ("hydra.", "hydra/", "logger.", "checkpoint.", "compile.")
DEFAULT_VARIANT = "default"
LEGEND_WIDTH = 90  # characters per line of a legend label (variant labels can be long)


class ResultsError(Exception):
    """Bad input, reported by :func:`main` as one ``results: ...`` line and exit code 2."""


@dataclass(frozen=True)
class Run:
    """One recipe run: where its CSV logs are, and which task, variant and seed it belongs to."""

    run_dir: Path
    scalars_dir: Path
    task: str
    variant: str
    seed: int
    resumed: bool  # continues another run from its checkpoint (checkpoint.resume was set)


@dataclass(frozen=True)
class Curve:
    """One metric of one seed: values at increasing env frame counts."""

    frames: np.ndarray
    values: np.ndarray


@dataclass(frozen=True)
class Row:
    """One cell of the table: the metric of (task, variant) at one frame count, over ``n`` seeds."""

    task: str
    variant: str
    frames: int
    n: int
    mean: float  # nan when n == 0
    std: float  # population std; nan when n == 0


@dataclass(frozen=True)
class ReferenceCurves:
    """Published ALM returns: ``returns[i, s]`` is seed s at env frame count ``frames[i]``."""

    frames: np.ndarray
    returns: np.ndarray


def variant_label(overrides: Iterable[str]) -> str:
    """The variant of a run: its overrides without task, seed, run length and bookkeeping, sorted and joined.

    >>> variant_label(["env.seed=1", "loss.horizon=5", "logger.eval_iter=100", "hydra/launcher=local"])
    'loss.horizon=5'
    >>> variant_label(["env.name=T-Ant", "experiment=t_ant"])
    'default'
    """
    kept = []
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key not in NON_VARIANT_KEYS and not key.startswith(NON_VARIANT_PREFIXES):
            kept.append(override)
    return " ".join(sorted(kept)) or DEFAULT_VARIANT


def _runs_in_dir(run_dir: Path) -> list[Run]:
    """The runs logged in one Hydra run dir: one per ``alm_logging/<exp_name>/scalars`` folder (an env id
    with a ``/``, such as ``ALE/Pong-v5``, puts a folder level into the experiment name)."""
    config_file = run_dir / ".hydra" / "config.yaml"
    config = yaml.safe_load(config_file.read_text()) or {}
    env = config.get("env") or {}
    if "name" not in env or "seed" not in env:
        raise ResultsError(f"{config_file}: no env.name / env.seed, not an ALM recipe run")
    resumed = bool((config.get("checkpoint") or {}).get("resume"))
    overrides_file = run_dir / ".hydra" / "overrides.yaml"
    overrides = (yaml.safe_load(overrides_file.read_text()) or []) if overrides_file.is_file() else []
    return [
        Run(run_dir, scalars_dir, str(env["name"]), variant_label(overrides), int(env["seed"]), resumed)
        for scalars_dir in sorted(run_dir.glob("alm_logging/**/scalars"))
        if scalars_dir.is_dir() and "scalars" not in scalars_dir.relative_to(run_dir).parts[:-1]
    ]


def find_runs(paths: Iterable[str | Path]) -> list[Run]:
    """Every run under the given folders (a folder may itself be a run dir), sorted by task, variant, seed.

    Raises :class:`ResultsError` for a folder that does not exist or holds no run.
    """
    runs: set[Run] = set()
    for path in map(Path, paths):
        if not path.is_dir():
            raise ResultsError(f"{path}: no such directory")
        found = []
        for dirpath, dirnames, _ in os.walk(path.resolve()):
            if (Path(dirpath) / ".hydra" / "config.yaml").is_file():
                found.extend(_runs_in_dir(Path(dirpath)))
                dirnames.clear()  # a run dir holds no further runs
        if not found:
            raise ResultsError(
                f"{path}: no runs found (a run dir holds .hydra/config.yaml and alm_logging/*/scalars/)"
            )
        runs.update(found)
    return sorted(runs, key=lambda run: (run.task, run.variant, run.seed, str(run.scalars_dir)))


def available_metrics(run: Run) -> list[str]:
    """The metrics logged by a run, as ``group/name`` (e.g. ``eval/return_mean``)."""
    return sorted(path.relative_to(run.scalars_dir).with_suffix("").as_posix()
                  for path in run.scalars_dir.rglob("*.csv"))


def read_scalar_csv(path: Path) -> Curve:
    """A TorchRL CSVLogger file (``step,value`` lines, no header) as a curve sorted by step."""
    with path.open(newline="") as file:
        points = [(int(float(step)), float(value)) for step, value in csv.reader(file) if step]
    frames = np.array([step for step, _ in points], dtype=np.int64)
    values = np.array([value for _, value in points], dtype=np.float64)
    order = np.argsort(frames, kind="stable")
    return Curve(frames[order], values[order])


def load_metric(run: Run, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """The env frame counts and values of one metric of a run.

    Raises :class:`ResultsError`, naming the metrics the run has, when it did not log this one.
    """
    path = run.scalars_dir / f"{metric}.csv"
    if not path.is_file():
        raise ResultsError(
            f"unknown metric {metric!r} (run {run.run_dir} has: {', '.join(available_metrics(run)) or 'none'})"
        )
    curve = read_scalar_csv(path)
    return curve.frames, curve.values


def seed_curves(runs: Sequence[Run], metric: str) -> dict[int, Curve]:
    """One curve per seed. Runs that share a seed (a run and its resumed continuations) are spliced: each
    run's points replace the earlier-starting run's from its first logged frame on. Two runs of one seed
    that are not resumes are spliced the same way, with a warning on stderr."""
    pieces: dict[int, list[Curve]] = defaultdict(list)
    for run in runs:
        frames, values = load_metric(run, metric)
        if len(frames):
            pieces[run.seed].append(Curve(frames, values))
    for seed in pieces:
        fresh = [str(run.run_dir) for run in runs if run.seed == seed and not run.resumed]
        if len(fresh) > 1:
            print(f"results: warning: seed {seed} of {runs[0].task} / {runs[0].variant} has {len(fresh)} runs "
                  f"that are not resumes, spliced by frame count: {', '.join(fresh)}", file=sys.stderr)
    curves = {}
    for seed, seed_pieces in sorted(pieces.items()):
        seed_pieces.sort(key=lambda curve: curve.frames[0])
        frames, values = seed_pieces[0].frames, seed_pieces[0].values
        for later in seed_pieces[1:]:
            keep = frames < later.frames[0]
            frames = np.concatenate([frames[keep], later.frames])
            values = np.concatenate([values[keep], later.values])
        curves[seed] = Curve(frames, values)
    return curves


def value_at(curve: Curve, frames: int) -> float | None:
    """The last value logged at or before ``frames``; None when the curve does not span that frame count."""
    if not len(curve.frames) or not curve.frames[0] <= frames <= curve.frames[-1]:
        return None
    return float(curve.values[np.searchsorted(curve.frames, frames, side="right") - 1])


def _row(task: str, variant: str, frames: int, values: Sequence[float]) -> Row:
    """A table row from the per-seed values at one frame count."""
    if not values:
        return Row(task, variant, frames, 0, math.nan, math.nan)
    return Row(task, variant, frames, len(values), float(np.mean(values)), float(np.std(values)))


def group_curves(runs: Iterable[Run], metric: str) -> dict[tuple[str, str], dict[int, Curve]]:
    """The metric's curves by (task, variant) and then seed, in sorted order."""
    groups: dict[tuple[str, str], list[Run]] = defaultdict(list)
    for run in runs:
        groups[(run.task, run.variant)].append(run)
    return {key: seed_curves(group, metric) for key, group in sorted(groups.items())}


def summarise_curves(curves: dict[tuple[str, str], dict[int, Curve]], frames: Sequence[int]) -> list[Row]:
    """For each (task, variant) and frame count: mean and std over seeds of the value at that frame count."""
    rows = []
    for (task, variant), by_seed in curves.items():
        for frame_count in frames:
            values = [value for curve in by_seed.values() if (value := value_at(curve, frame_count)) is not None]
            rows.append(_row(task, variant, frame_count, values))
    return rows


def summarise(runs: Sequence[Run], metric: str, frames: Sequence[int]) -> list[Row]:
    """For each (task, variant) and frame count: mean and std over seeds of the metric at that frame count."""
    return summarise_curves(group_curves(runs, metric), frames)


def aggregate_curves(curves: Iterable[Curve]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and std over seeds at every frame count any seed logged (each seed holding its last value),
    using only the seeds whose curve spans that frame count. Returns (frames, mean, std)."""
    curves = list(curves)
    grid = np.unique(np.concatenate([curve.frames for curve in curves]))
    means, stds = [], []
    for frame_count in grid:
        values = [value for curve in curves if (value := value_at(curve, int(frame_count))) is not None]
        means.append(np.mean(values))
        stds.append(np.std(values))
    return grid, np.array(means), np.array(stds)


def reference_path(reference_dir: Path, task: str) -> Path | None:
    """The released score file for a task, or None when there is none."""
    name = REFERENCE_FILES.get(task)
    path = reference_dir / name if name else None
    return path if path is not None and path.is_file() else None


def load_reference(path: Path) -> ReferenceCurves:
    """A released ALM score file as env frame counts and per-seed returns.

    With a ``Step`` column, frames = Step + 5,000 (Step counts steps after the warm-up); without one
    (gym_truncated_humanoid.csv), row i is evaluation i at 10,000 + 5,000 i frames.
    """
    with path.open(newline="") as file:
        header, *lines = list(csv.reader(file))
    table = np.array(lines, dtype=np.float64)
    if header[0] == "Step":
        frames = table[:, 0].astype(np.int64) + REFERENCE_WARMUP_FRAMES
        return ReferenceCurves(frames, table[:, 1:])
    frames = REFERENCE_FIRST_EVAL_FRAMES + REFERENCE_EVAL_INTERVAL * np.arange(len(table), dtype=np.int64)
    return ReferenceCurves(frames, table)


def summarise_reference(
    task: str, reference: ReferenceCurves, frames: Sequence[int], label: str = REFERENCE_LABEL
) -> list[Row]:
    """Published mean and std over seeds at each frame count (the last evaluation at or before it), as rows of the
    variant ``label``."""
    rows = []
    for frame_count in frames:
        index = np.searchsorted(reference.frames, frame_count, side="right") - 1
        spans = index >= 0 and frame_count <= reference.frames[-1]
        rows.append(_row(task, label, frame_count, list(reference.returns[index]) if spans else []))
    return rows


def figure_path(out_dir: Path, task: str) -> Path:
    """Where the figure of a task goes (a ``/`` in a gymnasium id becomes ``_``)."""
    return out_dir / f"{task.replace('/', '_')}.png"


def plot_task(
    task: str,
    curves_by_variant: dict[str, dict[int, Curve]],
    metric: str,
    path: Path,
    reference: ReferenceCurves | None = None,
    full_reference: bool = False,
    reference_label: str = REFERENCE_LABEL,
) -> Path:
    """Draw the metric of one task against env frames: per variant the mean over seeds with a shaded
    +-std band, and a published curve when given (the released ALM one unless ``reference_label`` names another;
    over our frame range plus 10%, or all of it with ``full_reference``). Writes a PNG to ``path`` and returns it."""
    figure = Figure(figsize=(8, 5.5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    last_frame = 0
    for variant, curves in curves_by_variant.items():
        if not curves:
            continue
        frames, mean, std = aggregate_curves(curves.values())
        last_frame = max(last_frame, int(frames[-1]))
        line, = axes.plot(frames, mean, label=textwrap.fill(f"{variant} ({_seeds(len(curves))})", LEGEND_WIDTH))
        axes.fill_between(frames, mean - std, mean + std, color=line.get_color(), alpha=0.2, linewidth=0)
    if reference is not None:
        shown = np.ones(len(reference.frames), dtype=bool) if full_reference else (
            reference.frames <= REFERENCE_PLOT_MARGIN * last_frame)
        if shown.any():
            frames, returns = reference.frames[shown], reference.returns[shown]
            mean, std = returns.mean(axis=1), returns.std(axis=1)
            axes.plot(frames, mean, color="black", linestyle="--",
                      label=f"{reference_label} ({_seeds(returns.shape[1])})")
            axes.fill_between(frames, mean - std, mean + std, color="black", alpha=0.1, linewidth=0)
    axes.set_xlabel("env frames")
    axes.set_ylabel(metric)
    axes.set_title(f"{task}: {metric} (mean ± std over seeds)")
    axes.grid(alpha=0.3)
    if axes.get_legend_handles_labels()[0]:
        figure.legend(loc="outside lower center", fontsize="small")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    return path


def _format_mean_std(mean: float, std: float) -> str:
    """``mean ± std`` with the decimals that give the mean three significant digits (none from 100 up)."""
    magnitude = math.floor(math.log10(abs(mean))) if mean else 0
    decimals = min(max(0, 2 - magnitude), 6)
    return f"{mean:.{decimals}f} ± {std:.{decimals}f}"


def _seeds(count: int) -> str:
    return f"{count} seed" if count == 1 else f"{count} seeds"


def _format_frames(frames: int) -> str:
    """A frame count as a column header: ``20k`` for multiples of 1,000, ``7.5k`` for multiples of 100."""
    if frames >= 1000 and frames % 100 == 0:
        return f"{frames / 1000:g}k"
    return str(frames)


def format_markdown(rows: Sequence[Row], metric: str) -> str:
    """The table as markdown: one line per (task, variant), one column per frame count."""
    frame_counts = list(dict.fromkeys(row.frames for row in rows))
    cells: dict[tuple[str, str], dict[int, str]] = defaultdict(dict)
    for row in rows:
        value = "–" if row.n == 0 else _format_mean_std(row.mean, row.std)
        cells[(row.task, row.variant)][row.frames] = f"{value} (n={row.n})"
    lines = [
        f"{metric}: mean ± std (population) over seeds, at the last evaluation at or before each frame "
        "count; n = seeds that got that far.",
        "",
        "| task | variant | " + " | ".join(_format_frames(frames) for frames in frame_counts) + " |",
        "|---|---|" + "---|" * len(frame_counts),
    ]
    for (task, variant), by_frames in cells.items():
        lines.append(f"| {task} | {variant} | " + " | ".join(by_frames[f] for f in frame_counts) + " |")
    return "\n".join(lines) + "\n"


def write_csv(rows: Sequence[Row], path: Path) -> None:
    """The table in long form: one line per (task, variant, frames), empty mean/std when n = 0."""
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["task", "variant", "frames", "n", "mean", "std"])
        for row in rows:
            stats = ["", ""] if row.n == 0 else [repr(row.mean), repr(row.std)]
            writer.writerow([row.task, row.variant, row.frames, row.n, *stats])


def write_results(
    out: Path,
    rows: list[Row],
    curves: dict[tuple[str, str], dict[int, Curve]],
    metric: str,
    references: dict[str, ReferenceCurves],
    full_reference: bool = False,
    reference_label: str = REFERENCE_LABEL,
) -> str:
    """Write ``results.md``, ``results.csv`` and one ``<task>.png`` per task of ``curves`` into ``out`` (the reference
    rows, labelled ``reference_label``, after each task's variants); return the markdown table."""
    rows = sorted(rows, key=lambda row: (row.task, row.variant == reference_label, row.variant))
    out.mkdir(parents=True, exist_ok=True)
    table = format_markdown(rows, metric)
    (out / "results.md").write_text(table)
    write_csv(rows, out / "results.csv")
    for task in sorted({curve_task for curve_task, _ in curves}):
        by_variant = {variant: seeds for (curve_task, variant), seeds in curves.items() if curve_task == task}
        plot_task(task, by_variant, metric, figure_path(out, task), references.get(task), full_reference,
                  reference_label)
    return table


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(
        prog="python -m alm_torchrl.results",
        description="Results table and learning-curve figures from ALM recipe runs.",
    )
    parser.add_argument("runs_dirs", nargs="+", metavar="RUNS_DIR", help="folders holding run dirs")
    parser.add_argument("--out", required=True, type=Path, help="folder for results.md, results.csv, <task>.png")
    parser.add_argument("--frames", nargs="+", type=int, default=list(DEFAULT_FRAMES),
                        help="frame counts of the table (default: %(default)s)")
    parser.add_argument("--metric", default=DEFAULT_METRIC, help="group/name of a logged metric (default: %(default)s)")
    parser.add_argument("--reference-dir", type=Path, default=os.environ.get(REFERENCE_ENV_VAR),
                        help=f"folder of the released ALM score files (default: ${REFERENCE_ENV_VAR}; "
                             "none: no overlay)")
    parser.add_argument("--full-reference", action="store_true",
                        help="draw the whole published curve, not only over the frame range of the runs")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (2 for bad input)."""
    args = _parse_args(argv)
    try:
        if args.reference_dir is not None and not args.reference_dir.is_dir():
            raise ResultsError(f"--reference-dir {args.reference_dir}: no such directory")
        curves = group_curves(find_runs(args.runs_dirs), args.metric)
    except ResultsError as error:
        print(f"results: {error}", file=sys.stderr)
        return 2
    rows = summarise_curves(curves, args.frames)
    tasks = sorted({task for task, _ in curves})
    references = {}
    for task in tasks:
        path = reference_path(args.reference_dir, task) if args.reference_dir is not None else None
        if path is not None:
            references[task] = load_reference(path)
            rows.extend(summarise_reference(task, references[task], args.frames))
    print(write_results(args.out, rows, curves, args.metric, references, args.full_reference), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
