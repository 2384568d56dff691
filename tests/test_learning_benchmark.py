"""Learning benchmarks: ``benchmarks/learning.py`` spread over several sittings (``--sweep-dir``: a run's time adds up,
a finished run is not started again, a stopped one holds the results back), and ``benchmarks/pixel_reference.py``
(MR.Q's published pixel curves read in env steps, tabled and drawn next to ours)."""

from __future__ import annotations

import importlib
import json
import sys
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _benchmark(name: str):
    """Import ``benchmarks/<name>.py`` (a script folder, not a package)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(REPO / "benchmarks"))


@pytest.fixture(scope="module")
def learning():
    return _benchmark("learning")


def _job(learning, run_dir: Path, exit_code: int):
    command = [sys.executable, "-c", f"print('sitting that exits {exit_code}'); raise SystemExit({exit_code})"]
    return learning.Job("Pendulum-v1", "default", 0, run_dir, command)


def _run(learning, job):
    return learning.run_job(job, {}, threading.Lock(), set(), threading.Event())


def test_run_sittings_add_up_and_a_finished_run_is_not_started_again(learning, tmp_path):
    stopped = _run(learning, _job(learning, tmp_path, learning.RESUMABLE_EXIT_CODE))
    assert stopped.stopped and stopped.returncode == learning.RESUMABLE_EXIT_CODE
    first_wall = stopped.wall_s
    resumed = _run(learning, _job(learning, tmp_path, 0))
    assert resumed.returncode == 0 and not resumed.stopped
    sittings = json.loads((tmp_path / "benchmark_sittings.json").read_text())
    assert [sitting["returncode"] for sitting in sittings] == [learning.RESUMABLE_EXIT_CODE, 0]
    assert resumed.wall_s == pytest.approx(first_wall + sittings[1]["wall_s"], abs=0.11)
    # both sittings' output is kept in the run's log
    assert (tmp_path / "stdout.log").read_text().splitlines() == ["sitting that exits 75", "sitting that exits 0"]

    # a third sitting of the sweep: the run finished, so its command (which would fail) is not run
    again = _run(learning, _job(learning, tmp_path, 3))
    assert again.returncode == 0 and again.wall_s == resumed.wall_s
    assert again.last_line == "sitting that exits 0"
    assert len(json.loads((tmp_path / "benchmark_sittings.json").read_text())) == 2


def test_sweep_dir_is_where_the_runs_go(learning, capsys, tmp_path):
    assert learning.main(["--dry-run", "--tasks", "Pendulum-v1", "--seeds", "0", "--sweep-dir", str(tmp_path)]) == 0
    (command,) = [line for line in capsys.readouterr().out.splitlines() if "recipes/alm/alm.py" in line]
    assert f"hydra.run.dir={tmp_path.resolve()}/Pendulum-v1/default/seed0" in command
    assert "checkpoint.interval=5000" in command  # a hard kill loses at most 5,000 frames of a run


# --------------------------------------------------------------------------------------- benchmarks/pixel_reference.py
MRQ_FILE = """--------------------
Env: Dmc-visual-cartpole-swingup
Timestep\tSeed 0\t\tSeed 1
0\t\t1.0\t\t2.0
5000\t\t3.0\t\t4.0
--------------------
Env: Dmc-visual-cartpole-balance
Timestep\tSeed 0\t\tSeed 1
0\t\t100.0\t\t300.0
5000\t\t200.0\t\t400.0
10000\t\t900.0\t\t1000.0
"""


@pytest.fixture(scope="module")
def pixel_reference():
    return _benchmark("pixel_reference")


def test_mrq_rows_are_read_per_task_in_env_steps(pixel_reference, tmp_path):
    path = tmp_path / "dmc-visual_results.txt"
    path.write_text(MRQ_FILE)
    balance = pixel_reference.load_mrq(path, "dmc/cartpole-balance")
    assert balance.frames.tolist() == [0, 10000, 20000]  # a Timestep is an agent step at action repeat 2
    assert balance.returns.tolist() == [[100.0, 300.0], [200.0, 400.0], [900.0, 1000.0]]
    with pytest.raises(pixel_reference.ResultsError, match="no block 'Env: Dmc-visual-finger-spin'"):
        pixel_reference.load_mrq(path, "dmc/finger-spin")
    with pytest.raises(pixel_reference.ResultsError, match="DMC tasks only, not 'HalfCheetah-v5'"):
        pixel_reference.load_mrq(path, "HalfCheetah-v5")


def test_pixel_runs_are_tabled_and_drawn_next_to_mrq(pixel_reference, tmp_path, capsys):
    from test_results import write_run

    write_run(tmp_path / "runs" / "seed0", "dmc/cartpole-balance", 0, ["env.from_pixels=true"],
              {10000: 150.0, 20000: 500.0})
    (tmp_path / "mrq.txt").write_text(MRQ_FILE)
    out = tmp_path / "out"
    assert pixel_reference.main([str(tmp_path / "runs"), "--mrq-results", str(tmp_path / "mrq.txt"), "--out", str(out),
                                 "--frames", "10000", "20000"]) == 0
    table = capsys.readouterr().out
    assert "| dmc/cartpole-balance | env.from_pixels=true | 150 ± 0 (n=1) | 500 ± 0 (n=1) |" in table
    assert "| dmc/cartpole-balance | MR.Q from pixels (published) | 300 ± 100 (n=2) | 950 ± 50 (n=2) |" in table
    assert sorted(path.name for path in out.iterdir()) == ["dmc_cartpole-balance.png", "results.csv", "results.md"]


FAKE_RECIPE = '''
import sys, pathlib, yaml
overrides = sys.argv[1:]
values = dict(arg.split("=", 1) for arg in overrides)
run_dir = pathlib.Path(values["hydra.run.dir"])
(run_dir / ".hydra").mkdir(parents=True, exist_ok=True)
config = {"env": {"name": values["env.name"], "seed": int(values["env.seed"])}, "checkpoint": {"resume": None}}
(run_dir / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
(run_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides[:-1]))
scalars = run_dir / "alm_logging" / "ALM_x_ALM_0a1b2c3d_26_11_22-08_00_00" / "scalars" / "eval"
scalars.mkdir(parents=True, exist_ok=True)
stop_once = run_dir.parent / f"stop_seed{values['env.seed']}_once"
if stop_once.exists():  # preempted in its first sitting: half the run logged, then the resumable exit
    stop_once.unlink()
    (scalars / "return_mean.csv").write_text("5000,-1000.0\\n")
    print("alm.py: stopped by SIGTERM at frame 5000")
    sys.exit(75)
seed = int(values["env.seed"])
(scalars / "return_mean.csv").write_text(f"5000,-1000.0\\n10000,{-200.0 - 100 * seed}\\n")
print("Done: 10000 frames")
'''


def test_a_stopped_run_holds_the_results_back_until_the_sweep_is_continued(learning, tmp_path, monkeypatch, capsys):
    fake_recipe = tmp_path / "fake_alm.py"
    fake_recipe.write_text(FAKE_RECIPE)
    monkeypatch.setattr(learning, "RECIPE", fake_recipe)
    monkeypatch.setattr(learning, "machine_info", dict)  # it imports torch and four more in a subprocess: seconds
    sweep_dir, results = tmp_path / "sweep", tmp_path / "results"
    options = ["--tasks", "Pendulum-v1", "--seeds", "0", "1", "--frames", "10000", "--results", str(results),
               "--sweep-dir", str(sweep_dir), "--reference-dir", str(tmp_path)]
    (sweep_dir / "Pendulum-v1" / "default").mkdir(parents=True)
    (sweep_dir / "Pendulum-v1" / "default" / "stop_seed1_once").touch()

    assert learning.main(options) == 130  # seed 1 stopped: no results yet
    out, err = capsys.readouterr()
    assert "seed 1: stopped by a signal, checkpointed" in out and "seed 0: ok" in out
    assert f"--sweep-dir {sweep_dir.resolve()}" in err and not results.exists()

    assert learning.main(options) == 0  # the second sitting runs seed 1 only
    assert "(2 ok, 0 stopped, 0 failed)" in capsys.readouterr().out
    assert "| -1000 ± 0 (n=2) | -250 ± 50 (n=2) |" in (results / "results.md").read_text()  # both seeds, 7.5k, 10k
    seed0_dir = sweep_dir / "Pendulum-v1" / "default" / "seed0"
    seed0_sittings = json.loads((seed0_dir / "benchmark_sittings.json").read_text())
    assert [sitting["returncode"] for sitting in seed0_sittings] == [0]  # not started again
    info = json.loads((results / "run_info.json").read_text())
    assert [sitting["stopped"] for sitting in info["sittings"]] == [False, False]
    assert info["total_wall_s"] == pytest.approx(sum(sitting["wall_s"] for sitting in info["sittings"]), abs=0.11)
    assert {run["seed"]: run["returncode"] for run in info["runs"]} == {0: 0, 1: 0}
