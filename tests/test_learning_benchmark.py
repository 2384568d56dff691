"""benchmarks/learning.py: a sweep spread over several sittings (``--sweep-dir``) adds up its runs' time and does not
start a finished run again."""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def learning():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import learning
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    return learning


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
