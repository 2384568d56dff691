"""``python -m alm_torchrl.results``: run discovery, the results table, the figures and the published curves.

One real tiny multirun of the recipe (two seeds on Pendulum-v1) checks that the tool reads what the recipe and
TorchRL's CSVLogger actually write; the other tests write run dirs in the same layout with known values.
"""
from __future__ import annotations

import csv
import doctest
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from matplotlib.image import imread

import alm_torchrl.results
from alm_torchrl.results import (
    REFERENCE_FILES,
    REFERENCE_LABEL,
    find_runs,
    group_curves,
    load_metric,
    load_reference,
    main,
    reference_path,
    summarise,
    summarise_reference,
)

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "alm" / "alm.py"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Tiny networks, 150 frames of Pendulum-v1 (100 random), evaluated at 50, 100 and 150 frames.
TINY_ALGORITHM = [
    "network.latent_dim=4",
    "network.hidden_dim=16",
    "network.model_hidden_dim=16",
    "optim.batch_size=8",
    "collector.init_random_frames=100",
    "env.max_episode_steps=50",
]
TINY_BOOKKEEPING = ["compile.compile=false", "logger.num_eval_episodes=1", "logger.eval_iter=50",
                    "checkpoint.interval=100000", "collector.total_frames=150", "env.name=Pendulum-v1"]
REFERENCE_README_ROW = re.compile(r"^\| (gym_\w+)[^|]*((?:\|[^|]*)+)\|$")


def _reference_dir() -> Path | None:
    """The released ALM scores: $ALM_REFERENCE_DIR, or shared/reference/ in or next to the checkout."""
    candidates = [os.environ.get("ALM_REFERENCE_DIR"), REPO / "shared" / "reference" / "official-alm-scores",
                  REPO.parent / "shared" / "reference" / "official-alm-scores"]
    return next((Path(c) for c in candidates if c and (Path(c) / "README.md").is_file()), None)


REFERENCE_DIR = _reference_dir()
needs_reference = pytest.mark.skipif(REFERENCE_DIR is None, reason="published ALM scores not found")


def write_run(run_dir: Path, task: str, seed: int, overrides: list[str], points: dict[int, float],
              resume: str | None = None, metric: str = "eval/return_mean") -> Path:
    """A run dir as the recipe writes it: .hydra/ config and overrides, one CSVLogger file (``step,value``)."""
    (run_dir / ".hydra").mkdir(parents=True)
    config = {"env": {"name": task, "seed": seed, "max_episode_steps": 1000}, "checkpoint": {"resume": resume}}
    (run_dir / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    (run_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    csv_path = run_dir / "alm_logging" / f"ALM_{task}_ALM_0a1b2c3d_26_11_22-08_00_00" / "scalars" / f"{metric}.csv"
    csv_path.parent.mkdir(parents=True)
    csv_path.write_text("".join(f"{step},{float(value)}\n" for step, value in points.items()))
    return run_dir


def run_main(*argv: str | Path) -> int:
    return main([str(arg) for arg in argv])


def read_png(path: Path) -> np.ndarray:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    return imread(path)


@pytest.fixture(scope="module")
def real_sweep(tmp_path_factory) -> Path:
    """A real multirun of the recipe: seeds 0 and 1, one job dir each."""
    sweep_dir = tmp_path_factory.mktemp("sweep")
    command = [sys.executable, str(RECIPE), "-m", *TINY_ALGORITHM, *TINY_BOOKKEEPING, "env.seed=0,1",
               f"hydra.sweep.dir={sweep_dir}"]
    subprocess.run(command, cwd=sweep_dir, check=True, capture_output=True, timeout=300,
                   env={**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"})
    return sweep_dir


def test_real_runs_are_grouped_by_task_variant_and_seed(real_sweep):
    runs = find_runs([real_sweep])
    assert [(run.task, run.seed) for run in runs] == [("Pendulum-v1", 0), ("Pendulum-v1", 1)]
    # The variant keeps the algorithm's overrides and drops task, seed, run length and logging/checkpointing.
    assert {run.variant for run in runs} == {" ".join(sorted(TINY_ALGORITHM))}
    assert all(run.run_dir.parent.name == "Pendulum-v1" for run in runs)


def test_real_csv_log_is_read_as_logged(real_sweep):
    run = find_runs([real_sweep])[0]
    frames, values = load_metric(run, "eval/return_mean")
    assert frames.tolist() == [50, 100, 150]
    with (run.scalars_dir / "eval" / "return_mean.csv").open() as file:
        logged = [(int(step), float(value)) for step, value in csv.reader(file)]
    assert list(zip(frames.tolist(), values.tolist())) == logged
    assert np.all(values < 0)  # Pendulum returns


def test_real_runs_end_to_end(real_sweep, tmp_path, capsys):
    out = tmp_path / "results"
    assert run_main(real_sweep, "--out", out, "--frames", "100", "150", "200") == 0
    runs = find_runs([real_sweep])
    at_150 = [load_metric(run, "eval/return_mean")[1][-1] for run in runs]
    with (out / "results.csv").open() as file:
        rows = {int(row["frames"]): row for row in csv.DictReader(file)}
    assert rows[150]["n"] == "2" and math.isclose(float(rows[150]["mean"]), np.mean(at_150))
    assert rows[200]["n"] == "0"  # no run got to 200 frames
    printed = capsys.readouterr().out
    assert printed == (out / "results.md").read_text() and "| Pendulum-v1 |" in printed
    assert read_png(out / "Pendulum-v1.png").ndim == 3


def test_single_and_sweep_layouts_grouping(tmp_path):
    bookkeeping = ["logger.eval_iter=100", "checkpoint.interval=1000", "hydra/launcher=local",
                   "collector.device=cpu", "compile.num_threads=1", "experiment=halfcheetah"]
    write_run(tmp_path / "outputs" / "HalfCheetah-v5" / "2026-01-01_00-00-00", "HalfCheetah-v5", 0,
              ["env.seed=0", *bookkeeping], {100: 1.0})
    for seed in (0, 1, 2):
        write_run(tmp_path / "multirun" / "2026-01-02" / "12-00-00" / str(seed), "HalfCheetah-v5", seed,
                  [f"env.seed={seed}", "loss.horizon=5", "optim.lr=3e-4"], {100: 1.0})
    write_run(tmp_path / "multirun" / "2026-01-02" / "12-00-00" / "3", "T-Ant", 4, ["env.seed=4"], {100: 1.0})
    runs = find_runs([tmp_path / "outputs", tmp_path / "multirun"])
    assert [(run.task, run.variant, run.seed) for run in runs] == [
        ("HalfCheetah-v5", "default", 0),
        ("HalfCheetah-v5", "loss.horizon=5 optim.lr=3e-4", 0),
        ("HalfCheetah-v5", "loss.horizon=5 optim.lr=3e-4", 1),
        ("HalfCheetah-v5", "loss.horizon=5 optim.lr=3e-4", 2),
        ("T-Ant", "default", 4),
    ]
    assert find_runs([tmp_path, tmp_path / "outputs"]) == runs  # a run reached twice counts once


def test_table_mean_and_std_over_seeds(tmp_path):
    returns = {0: [10.0, 250.0, 900.0], 1: [30.0, 310.0, 1500.0], 2: [-5.0, 180.0, 1100.0]}
    for seed, values in returns.items():
        write_run(tmp_path / f"s{seed}", "Walker2d-v5", seed, [f"env.seed={seed}"], dict(zip((100, 200, 300), values)))
    rows = summarise(find_runs([tmp_path]), "eval/return_mean", [100, 200, 300])
    expected = np.array(list(returns.values()))
    assert [row.frames for row in rows] == [100, 200, 300]
    for column, row in enumerate(rows):
        assert (row.task, row.variant, row.n) == ("Walker2d-v5", "default", 3)
        assert row.mean == pytest.approx(expected[:, column].mean())
        assert row.std == pytest.approx(expected[:, column].std())


def test_value_at_or_before_and_n(tmp_path, capsys):
    write_run(tmp_path / "a", "Ant-v5", 0, [], {5000: 1.0, 10000: 2.0, 15000: 3.0})
    write_run(tmp_path / "b", "Ant-v5", 1, [], {5000: 10.0, 10000: 20.0})  # stopped at 10k
    rows = summarise(find_runs([tmp_path]), "eval/return_mean", [4999, 5000, 9999, 10000, 12500, 15000, 20000])
    table = {row.frames: (row.n, row.mean) for row in rows}
    assert table[4999][0] == 0  # before the first evaluation
    assert table[5000] == (2, 5.5)
    assert table[9999] == (2, 5.5)  # last value at or before, not the nearest
    assert table[10000] == (2, 11.0)
    assert table[12500] == (1, 2.0)  # seed 1 never got to 12.5k: left out
    assert table[15000] == (1, 3.0)
    assert table[20000][0] == 0 and math.isnan(table[20000][1])
    out = tmp_path / "out"
    assert run_main(tmp_path, "--out", out, "--frames", "12500", "20000") == 0
    printed = capsys.readouterr().out
    assert "| task | variant | 12.5k | 20k |" in printed
    assert "| Ant-v5 | default | 2.00 ± 0.00 (n=1) | – (n=0) |" in printed


def test_resumed_run_continues_its_seed(tmp_path, capsys):
    write_run(tmp_path / "first", "Hopper-v5", 0, [], {100: 1.0, 200: 2.0, 300: 3.0})  # crashed after 300
    write_run(tmp_path / "resumed", "Hopper-v5", 0, ["checkpoint.resume=../first/checkpoints"],
              {300: 30.0, 400: 40.0}, resume="../first/checkpoints")
    write_run(tmp_path / "other_seed", "Hopper-v5", 1, [], {100: 5.0, 200: 6.0, 300: 7.0, 400: 8.0})
    rows = summarise(find_runs([tmp_path]), "eval/return_mean", [200, 300, 400])
    assert [(row.n, row.mean) for row in rows] == [(2, 4.0), (2, 18.5), (2, 24.0)]
    spliced = group_curves(find_runs([tmp_path]), "eval/return_mean")[("Hopper-v5", "default")][0]
    assert spliced.frames.tolist() == [100, 200, 300, 400] and spliced.values.tolist() == [1.0, 2.0, 30.0, 40.0]
    assert capsys.readouterr().err == ""
    write_run(tmp_path / "rerun", "Hopper-v5", 1, [], {100: 0.0})
    summarise(find_runs([tmp_path]), "eval/return_mean", [100])
    assert "seed 1 of Hopper-v5 / default has 2 runs that are not resumes" in capsys.readouterr().err


def test_figures_are_png_per_task(tmp_path):
    for seed in (0, 1):
        write_run(tmp_path / "runs" / f"c{seed}", "HalfCheetah-v5", seed, [],
                  {f: seed + f / 100 for f in range(5000, 30001, 5000)})
        write_run(tmp_path / "runs" / f"h{seed}", "ALE/Pong-v5", seed, ["loss.horizon=1"], {10: -21.0, 20: -20.0})
    out = tmp_path / "out"
    assert run_main(tmp_path / "runs", "--out", out) == 0
    assert sorted(path.name for path in out.iterdir()) == [
        "ALE_Pong-v5.png", "HalfCheetah-v5.png", "results.csv", "results.md"]
    for name in ("ALE_Pong-v5.png", "HalfCheetah-v5.png"):
        image = read_png(out / name)
        assert image.shape[0] > 300 and image.shape[1] > 500 and image.std() > 0  # not a blank canvas


@needs_reference
def test_reference_frames_are_step_plus_warmup():
    cheetah = load_reference(REFERENCE_DIR / "gym_half_cheetah.csv")
    with (REFERENCE_DIR / "gym_half_cheetah.csv").open() as file:
        steps = [int(row[0]) for row in list(csv.reader(file))[1:]]
    assert cheetah.frames.tolist() == [step + 5000 for step in steps] and cheetah.frames[0] == 10_000
    assert cheetah.returns.shape == (len(steps), 5)
    humanoid = load_reference(REFERENCE_DIR / "gym_truncated_humanoid.csv")
    assert humanoid.returns.shape[1] == 5  # no Step column: all five columns are returns
    assert humanoid.frames.tolist() == list(range(10_000, 10_000 + 5_000 * len(humanoid.frames), 5_000))
    assert reference_path(REFERENCE_DIR, "Hopper-v5") is None


@needs_reference
def test_reference_matches_the_readme_summary_table():
    """Every number of the README's summary table (columns by Step) is our value at Step + 5000 frames."""
    lines = (REFERENCE_DIR / "README.md").read_text().splitlines()
    header = next(line for line in lines if line.startswith("| file |"))
    steps = [int(cell.strip().rstrip("k")) * 1000 for cell in header.strip("|").split("|")[1:]]
    tasks = {name.removesuffix(".csv"): task for task, name in REFERENCE_FILES.items()}
    checked = 0
    for line in lines:
        match = REFERENCE_README_ROW.match(line)
        if not match:
            continue
        task = tasks[match.group(1)]
        reference = load_reference(reference_path(REFERENCE_DIR, task))
        cells = [cell.strip() for cell in match.group(2).strip("|").split("|")]
        rows = summarise_reference(task, reference, [step + 5000 for step in steps])
        for cell, row in zip(cells, rows):
            if cell:
                mean, std = (float(part) for part in cell.split("+-"))
                assert (row.variant, row.n) == (REFERENCE_LABEL, 5)
                assert (round(row.mean), round(row.std)) == (mean, std), (task, row.frames)
                checked += 1
    assert checked == 32
    cheetah = summarise_reference("HalfCheetah-v5", load_reference(REFERENCE_DIR / "gym_half_cheetah.csv"),
                                  [205_000])[0]
    assert (round(cheetah.mean), round(cheetah.std)) == (10789, 328)


@needs_reference
def test_reference_rows_and_overlay(tmp_path, capsys):
    for seed in (0, 1):
        write_run(tmp_path / "runs" / str(seed), "T-Humanoid", seed, [], {10_000: 100.0 + seed, 20_000: 300.0})
    out = tmp_path / "out"
    assert run_main(tmp_path / "runs", "--out", out, "--frames", "20000", "--reference-dir", REFERENCE_DIR) == 0
    published_row = rf"\| T-Humanoid \| {re.escape(REFERENCE_LABEL)} \| \d+ ± \d+ \(n=5\) \|"
    assert re.search(published_row, capsys.readouterr().out)
    with (out / "results.csv").open() as file:
        variants = [row["variant"] for row in csv.DictReader(file)]
    assert variants == ["default", REFERENCE_LABEL]
    overlay = read_png(out / "T-Humanoid.png")
    assert run_main(tmp_path / "runs", "--out", tmp_path / "plain", "--frames", "20000") == 0
    assert overlay.shape == read_png(tmp_path / "plain" / "T-Humanoid.png").shape
    assert not np.array_equal(overlay, read_png(tmp_path / "plain" / "T-Humanoid.png"))


@pytest.mark.parametrize("case", ["missing", "empty", "metric", "reference"])
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, capsys, case):
    runs = write_run(tmp_path / "runs" / "0", "Ant-v5", 0, [], {100: 1.0}).parent
    (tmp_path / "empty").mkdir()
    argv = {
        "missing": [tmp_path / "nope"],
        "empty": [runs, tmp_path / "empty"],
        "metric": [runs, "--metric", "eval/return_max"],
        "reference": [runs, "--reference-dir", tmp_path / "nope"],
    }[case]
    assert run_main(*argv, "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert err.startswith("results: ") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()
    if case == "metric":
        assert "eval/return_mean" in err  # says which metrics exist


def test_command_line_module(tmp_path):
    result = subprocess.run([sys.executable, "-m", "alm_torchrl.results", str(tmp_path / "nope"), "--out",
                             str(tmp_path / "out")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stderr == f"results: {tmp_path / 'nope'}: no such directory\n"


def test_docstring_examples():
    result = doctest.testmod(alm_torchrl.results)
    assert result.attempted > 0 and result.failed == 0
