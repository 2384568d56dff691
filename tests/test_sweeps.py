"""Experiment presets (recipes/alm/experiment/) and multirun sweeps (recipes/alm/hydra/launcher/).

Presets are checked through Hydra's compose API; the launchers with real tiny multiruns (submitit's local executor
and the joblib process pool) and, for SLURM, by submitting the Table 1 command to a stand-in ``sbatch`` that keeps
the generated script and refuses the job.
"""
from __future__ import annotations

import itertools
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf

from alm_torchrl.envs import check_env_name, replay_buffer_size_for
from alm_torchrl.checkpoint import TrainingCheckpoints

from conftest import TINY_RECIPE as TINY

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "alm" / "alm.py"
CONFIG_DIR = REPO / "recipes" / "alm"
# 200 frames on Pendulum-v1, evaluated at 100 and 200.
SWEEP_RUN = [*TINY, "env.name=Pendulum-v1", "collector.total_frames=200", "logger.eval_iter=100",
             "checkpoint.interval=100000"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}

TABLE1 = ["t_humanoid", "t_ant", "halfcheetah", "walker2d", "hopper"]
# preset -> (env.name, collector.total_frames, replay_buffer.size, published number quoted in the file)
PRESETS = {
    "t_humanoid": ("T-Humanoid", 200_000, 1_000_000, "5306 +- 437"),
    "t_ant": ("T-Ant", 200_000, 100_000, "4887 +- 1027"),
    "halfcheetah": ("HalfCheetah-v5", 200_000, 100_000, "10789 +- 366"),
    "walker2d": ("Walker2d-v5", 200_000, 100_000, "3006 +- 1183"),
    "hopper": ("Hopper-v5", 200_000, 100_000, "2546 +- 1074"),
    "humanoid": ("Humanoid-v5", 300_000, 1_000_000, "4737 +- 1495"),
    "ant": ("Ant-v5", 300_000, 100_000, "5396 +- 764"),
}
PRESET_KEYS = {"env.name", "collector.total_frames", "replay_buffer.size"}


def _compose(*overrides: str, hydra_config: bool = False):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3", job_name="alm"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=hydra_config)


def _flat(cfg) -> dict:
    """Every leaf of a job config by dotted key, interpolations left unresolved."""
    def walk(node, prefix):
        for key, value in node.items():
            if isinstance(value, dict):
                yield from walk(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value
    return dict(walk(OmegaConf.to_container(cfg, resolve=False), ""))


def test_every_preset_file_is_tested():
    assert sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml")) == sorted(PRESETS)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_sets_task_frames_and_buffer_and_nothing_else(name):
    env_name, frames, buffer_size, published = PRESETS[name]
    text = (CONFIG_DIR / "experiment" / f"{name}.yaml").read_text()
    assert text.startswith("# @package _global_\n")
    assert published in text
    cfg = _compose(f"experiment={name}")
    assert cfg.env.name == env_name
    check_env_name(cfg.env.name)
    assert cfg.collector.total_frames == frames
    assert cfg.replay_buffer.size == buffer_size == replay_buffer_size_for(env_name)
    # Everything else stays the recipe's default, i.e. the paper's settings.
    preset, plain = _flat(cfg), _flat(_compose())
    assert preset.keys() == plain.keys()
    assert {key for key in plain if preset[key] != plain[key]} <= PRESET_KEYS
    assert (cfg.collector.init_random_frames, cfg.optim.batch_size, cfg.optim.utd_ratio, cfg.loss.horizon) == (
        5000, 512, 1, 3)
    assert (cfg.logger.eval_iter, cfg.logger.num_eval_episodes, cfg.env.max_episode_steps) == (5000, 5, 1000)


def test_without_a_preset_the_recipe_config_is_unchanged():
    written = OmegaConf.load(CONFIG_DIR / "config.yaml")
    del written["defaults"], written["hydra"]
    assert _flat(_compose()) == _flat(written)


@pytest.mark.parametrize("order", ["after", "before"])
def test_command_line_overrides_beat_the_preset(order):
    overrides = ["collector.total_frames=300", "replay_buffer.size=5000", "env.name=Pendulum-v1"]
    cfg = _compose(*(["experiment=humanoid", *overrides] if order == "after" else [*overrides, "experiment=humanoid"]))
    assert (cfg.collector.total_frames, cfg.replay_buffer.size, cfg.env.name) == (300, 5000, "Pendulum-v1")


def test_unknown_preset_is_refused():
    with pytest.raises(MissingConfigException, match="experiment"):
        _compose("experiment=t_humanoidd")


def test_launcher_configs_compose():
    local = _compose("hydra/launcher=local", hydra_config=True).hydra.launcher
    assert local._target_.endswith("JoblibLauncher") and local.n_jobs == 5
    slurm = _compose("hydra/launcher=slurm", hydra_config=True).hydra.launcher
    assert slurm._target_.endswith("SlurmLauncher")
    assert (slurm.gpus_per_node, slurm.cpus_per_task, slurm.mem_gb, slurm.timeout_min) == (1, 4, 32, 720)
    assert slurm.partition is None
    # Requeued on time-outs (and preemptions), with 5 minutes to checkpoint between the warning signal and the kill.
    assert (slurm.max_num_timeout, slurm.signal_delay_s) == (3, 300)
    slurm_local = _compose("hydra/launcher=slurm_local", hydra_config=True).hydra.launcher
    assert slurm_local._target_.endswith("submitit_launcher.LocalLauncher") and slurm_local.gpus_per_node == 0
    sweep = OmegaConf.to_container(_compose(hydra_config=True).hydra.sweep, resolve=False)
    assert sweep == {"dir": "multirun/${now:%Y-%m-%d_%H-%M-%S}",
                     "subdir": "${env.name}/seed${env.seed}_job${hydra.job.num}"}


def test_table1_command_submits_one_slurm_array_of_25_runs(tmp_path):
    """The exact Table 1 command, up to sbatch: a stand-in sbatch keeps the script and refuses the job."""
    bin_dir, kept = tmp_path / "bin", tmp_path / "kept"
    bin_dir.mkdir()
    kept.mkdir()
    fakes = {
        "sbatch": f'#!/bin/sh\nfor a in "$@"; do case "$a" in *.sh) cp "$a" {kept}/submission.sh;; esac; done\n'
                  'echo "sbatch: error: stand-in sbatch refuses the job" >&2\nexit 1\n',
        "srun": "#!/bin/sh\nexit 1\n",  # submitit only checks that srun exists
    }
    for name, script in fakes.items():
        (bin_dir / name).write_text(script)
        (bin_dir / name).chmod(stat.S_IRWXU)
    sweep_dir = tmp_path / "multirun"
    command = [sys.executable, str(RECIPE), "-m", "hydra/launcher=slurm", "hydra.launcher.partition=gpu_part",
               "hydra.launcher.account=my_account", f"experiment={','.join(TABLE1)}", "env.seed=0,1,2,3,4",
               f"hydra.sweep.dir={sweep_dir}"]
    result = subprocess.run(command, env={**ENV, "PATH": f"{bin_dir}{os.pathsep}{ENV['PATH']}"},
                            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode != 0 and "stand-in sbatch refuses the job" in result.stderr, result.stderr[-3000:]
    jobs = re.findall(r"#(\d+) : experiment=(\w+) env\.seed=(\d)", result.stdout + result.stderr)
    assert sorted((exp, int(seed)) for _, exp, seed in jobs) == sorted(itertools.product(TABLE1, range(5)))
    script = (kept / "submission.sh").read_text()
    for line in ["#SBATCH --array=0-24%25", "#SBATCH --partition=gpu_part", "#SBATCH --account=my_account",
                 "#SBATCH --gpus-per-node=1", "#SBATCH --cpus-per-task=4", "#SBATCH --mem=32GB",
                 "#SBATCH --time=720", "export OMP_NUM_THREADS=4 MKL_NUM_THREADS=4"]:
        assert line in script.splitlines(), line
    assert f"{sweep_dir}/.submitit/" in script


def _multirun(launcher: list[str], sweep_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(RECIPE), "-m", *launcher, f"hydra.sweep.dir={sweep_dir}", *overrides]
    return subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=180, cwd=sweep_dir.parent)


def _check_job_dirs(sweep_dir: Path, *extra_overrides: str) -> dict[int, list[str]]:
    """Both seeds' job dirs hold their overrides, an eval CSV at frames 100 and 200, and a 200-frame checkpoint."""
    evals = {}
    for seed in (0, 1):
        job_dir = sweep_dir / "Pendulum-v1" / f"seed{seed}_job{seed}"
        overrides = yaml.safe_load((job_dir / ".hydra" / "overrides.yaml").read_text())
        assert f"env.seed={seed}" in overrides and set(extra_overrides) <= set(overrides)
        (csv,) = job_dir.glob("alm_logging/*/scalars/eval/return_mean.csv")
        rows = [row.split(",") for row in csv.read_text().splitlines()]
        assert [step for step, _ in rows] == ["100", "200"]
        assert TrainingCheckpoints.metadata(job_dir / "checkpoints")["collected_frames"] == 200
        evals[seed] = [value for _, value in rows]
    assert evals[0] != evals[1]  # each job got its own seed
    return evals


@pytest.fixture(scope="module")
def submitit_sweep(tmp_path_factory) -> dict[int, list[str]]:
    sweep_dir = tmp_path_factory.mktemp("submitit") / "multirun"
    # The hopper preset with the task, length and network overridden: the command line must win in a real run.
    result = _multirun(["hydra/launcher=slurm_local"], sweep_dir, "experiment=hopper", *SWEEP_RUN, "env.seed=0,1")
    assert result.returncode == 0, result.stderr[-3000:]
    config = yaml.safe_load((sweep_dir / "Pendulum-v1" / "seed0_job0" / ".hydra" / "config.yaml").read_text())
    assert (config["env"]["name"], config["collector"]["total_frames"]) == ("Pendulum-v1", 200)
    assert config["replay_buffer"]["size"] == 100_000  # the preset's value, not overridden
    assert len(list((sweep_dir / ".submitit").glob("*/*_result.pkl"))) == 2
    return _check_job_dirs(sweep_dir, "experiment=hopper", "collector.total_frames=200")


def test_submitit_local_sweep_runs_two_seeds(submitit_sweep):
    assert set(submitit_sweep) == {0, 1}


def test_joblib_local_pool_runs_two_seeds_like_submitit(tmp_path, submitit_sweep):
    sweep_dir = tmp_path / "multirun"
    result = _multirun(["hydra/launcher=local", "hydra.launcher.n_jobs=2"], sweep_dir, *SWEEP_RUN, "env.seed=0,1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Joblib.Parallel(n_jobs=2" in result.stdout + result.stderr
    # Same seeds, same single-threaded CPU runs: the launcher does not change the results.
    assert _check_job_dirs(sweep_dir) == submitit_sweep


def _submitit_task_pid(sweep_dir: Path) -> int | None:
    """The pid of the process running a job of ``sweep_dir`` (``python -m submitit.core._submit <its folder>``)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"submitit.core._submit" in command and any(str(sweep_dir).encode() in part for part in command):
            return int(pid)
    return None


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the job's process in /proc")
def test_a_submitit_job_signalled_before_its_time_limit_checkpoints_is_requeued_and_resumes_in_its_job_dir(tmp_path):
    sweep_dir = tmp_path / "multirun"
    command = [sys.executable, str(RECIPE), "-m", "hydra/launcher=slurm_local", f"hydra.sweep.dir={sweep_dir}",
               *SWEEP_RUN, "checkpoint.interval=50", "env.seed=0"]
    sweep = subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    job_dir = sweep_dir / "Pendulum-v1" / "seed0_job0"
    try:
        deadline = time.monotonic() + 120
        while not list(job_dir.glob("checkpoints/checkpoint-*")):  # the job is training
            assert sweep.poll() is None and time.monotonic() < deadline, sweep.communicate()[1][-3000:]
            time.sleep(0.2)
        # What SLURM sends signal_delay_s before the time limit, as submitit's local executor does 30 s before it.
        os.kill(_submitit_task_pid(sweep_dir), signal.SIGUSR2)
        _, stderr = sweep.communicate(timeout=180)
    finally:
        sweep.kill()
    assert sweep.returncode == 0, stderr[-3000:]
    (log,) = sweep_dir.glob(".submitit/*/*_0_log.err")  # both attempts of the job write to it
    stopped = re.search(r"alm\.py: stopped by SIGUSR2 at frame (\d+) \(checkpoint ", log.read_text())
    assert stopped, log.read_text()[-3000:]
    frame = int(stopped.group(1))
    assert f"Resumed from {job_dir / 'checkpoints'} at frame {frame}\n" in log.read_text()
    # The requeued job continued in the same job dir, its logs too: every evaluation once, in order.
    assert TrainingCheckpoints.metadata(job_dir / "checkpoints")["collected_frames"] == 200
    (csv,) = job_dir.glob("alm_logging/*/scalars/eval/return_mean.csv")
    assert [row.split(",")[0] for row in csv.read_text().splitlines()] == ["100", "200"]
