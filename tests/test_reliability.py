"""Runs that survive faults: stop signals, a full disk, damaged or crafted checkpoints, NaNs from the env, a failing
logger; and determinism: same seed, same bits, and a resumed run repeats the uninterrupted one exactly.

The recipe runs as a subprocess, through ``tests/faults.py`` where a fault is injected at the moment it would strike.
"""
from __future__ import annotations

import json
import os
import pickle
import shlex
import shutil
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import torch
from tensordict import TensorDict

from alm_torchrl.checkpoint import CHECKSUMS, CheckpointError, TrainingCheckpoints
from alm_torchrl.envs import SimulatorState, make_env
from alm_torchrl.preemption import RESUMABLE_EXIT_CODE, StopSignals
from alm_torchrl.replay import NonFiniteDataError, check_finite
from alm_torchrl.runtime import AdaptiveThreads
from recipes.alm.utils import (
    ConfigError,
    MetricsLog,
    load_config,
    make_checkpoints,
    make_learner,
    make_replay_buffer,
    validate_config,
)

from conftest import TINY_RECIPE

TESTS = Path(__file__).resolve().parent
FAULTS = TESTS / "faults.py"
RECIPE = TESTS.parent / "recipes" / "alm" / "alm.py"
# 200 frames of HalfCheetah (50-step episodes): 100 random, then 110 updates (from the batch of frame 100 on);
# evaluations (2 episodes, side by side) and checkpoints every 50 frames; one torch thread, as bitwise comparisons need
# a fixed thread count.
RUN = [*(override for override in TINY_RECIPE if not override.startswith("logger.num_eval_episodes")),
       "logger.num_eval_episodes=2", "env.name=HalfCheetah-v5", "collector.total_frames=200", "logger.eval_iter=50",
       "checkpoint.interval=50", "replay_buffer.size=1000", "compile.num_threads=1"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}


def _run(run_dir: Path, *faults: str, overrides: tuple[str, ...] = (), timeout: float = 120):
    command = [sys.executable, str(FAULTS), *faults, "--", *RUN, *overrides, f"hydra.run.dir={run_dir}"]
    return subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=timeout)


def _errors(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("alm.py:")]


def _checkpoint(run_dir: Path) -> Path:
    (checkpoint,) = (run_dir / "checkpoints").glob("checkpoint-*")
    return checkpoint


def _logged(run_dir: Path) -> dict[str, str]:
    """Every CSV the run logged, by metric, except wall-clock timings (time/*, frames/s), which no rerun repeats."""
    (scalars,) = run_dir.glob("alm_logging/*/scalars")
    return {str(csv.relative_to(scalars)): csv.read_text() for csv in sorted(scalars.rglob("*.csv"))
            if not str(csv.relative_to(scalars)).startswith("time/") and "frames_per_s" not in csv.name}


def _assert_same_run(expected: Path, actual: Path) -> None:
    """Bitwise the same final checkpoint (parameters, targets, optimizer, buffer, RNGs, collector and simulators) and
    the same logged rows (steps and values, evaluation returns included)."""
    expected_checkpoint, actual_checkpoint = _checkpoint(expected), _checkpoint(actual)
    assert expected_checkpoint.name == actual_checkpoint.name
    files = sorted(path.relative_to(expected_checkpoint) for path in expected_checkpoint.rglob("*") if path.is_file())
    assert files == sorted(path.relative_to(actual_checkpoint) for path in actual_checkpoint.rglob("*")
                           if path.is_file())
    for file in files:
        if file.name in (CHECKSUMS, "manifest.json"):  # the manifest has a time stamp, torch.save files a random id
            continue
        if file.suffix == ".pt":  # the replay buffer: its transitions, not the storage's unwritten rows
            saved = [torch.load(root / file, weights_only=True) for root in (expected_checkpoint, actual_checkpoint)]
            assert saved[0]["_len"] == saved[1]["_len"] == 200
            stored = [TensorDict(state["_storage"], batch_size=[1000])[:200] for state in saved]
            assert (stored[0] == stored[1]).all(), file
        else:
            assert (expected_checkpoint / file).read_bytes() == (actual_checkpoint / file).read_bytes(), file
    metadata = [TrainingCheckpoints.metadata(path) for path in (expected_checkpoint, actual_checkpoint)]
    assert [(m["collected_frames"], m["num_updates"]) for m in metadata] == [(200, 110)] * 2
    assert _logged(expected) == _logged(actual)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run."""
    run_dir = tmp_path_factory.mktemp("reference")
    result = _run(run_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def test_two_runs_with_the_same_config_and_seed_are_bitwise_identical(reference, tmp_path):
    result = _run(tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_same_run(reference, tmp_path)
    evaluations = [line.split(",") for line in _logged(reference)["eval/return_mean.csv"].splitlines()]
    assert [step for step, _ in evaluations] == ["50", "100", "150", "200"]


def _assert_stopped_at(result: subprocess.CompletedProcess, run_dir: Path, signal_name: str, frame: int) -> None:
    assert result.returncode == RESUMABLE_EXIT_CODE, result.stderr[-3000:]
    assert f"{signal_name} received: finishing the current batch of updates" in result.stderr
    (line,) = _errors(result)
    assert f"stopped by {signal_name} at frame {frame} (checkpoint {run_dir / 'checkpoints'}" in line
    assert line.endswith(f"hydra.run.dir={run_dir}")  # the command that continues the run
    checkpoint = TrainingCheckpoints.verify(run_dir / "checkpoints")  # the last checkpoint is whole
    assert TrainingCheckpoints.metadata(checkpoint)["collected_frames"] == frame
    assert not [entry for entry in (run_dir / "checkpoints").iterdir() if entry.name.startswith(".")]


def test_sigterm_during_an_update_then_during_an_evaluation_resumes_twice_exactly(reference, tmp_path):
    # Update 17 is in the batch of frame 110 (updates start with the batch of frame 100, 10 per batch).
    _assert_stopped_at(_run(tmp_path, "sigterm-update=17"), tmp_path, "SIGTERM", 110)
    # The same command again resumes (checkpoint.resume=auto); its first evaluation, at frame 150, is interrupted.
    result = _run(tmp_path, "sigterm-eval=1")
    assert f"Resumed from {tmp_path / 'checkpoints'} at frame 110\n" in result.stderr
    _assert_stopped_at(result, tmp_path, "SIGTERM", 150)
    result = _run(tmp_path)
    assert result.returncode == 0 and "at frame 150\n" in result.stderr, result.stderr[-3000:]
    _assert_same_run(reference, tmp_path)
    # Once finished, the same command says so and does nothing.
    result = _run(tmp_path)
    assert result.returncode == 0 and _errors(result) == [
        f"alm.py: {tmp_path / 'checkpoints'} holds this run, finished at frame 200"]


def test_sigterm_during_a_checkpoint_write_keeps_it_and_resumes_exactly(reference, tmp_path):
    # Write 3 is the checkpoint of frame 150: it completes, then the run stops without writing another one.
    _assert_stopped_at(_run(tmp_path, "sigterm-write=3"), tmp_path, "SIGTERM", 150)
    result = _run(tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_same_run(reference, tmp_path)


def test_sigterm_during_start_up_stops_before_anything_is_built(reference, tmp_path):
    """SIGTERM while start-up verifies the checkpoint to resume (a minute of checksums for a Humanoid buffer)."""
    shutil.copytree(reference / "checkpoints", tmp_path / "checkpoints")
    result = _run(tmp_path, "sigterm-verify=1", overrides=("collector.total_frames=300",))
    _assert_stopped_at(result, tmp_path, "SIGTERM", 200)
    assert "Resumed from" not in result.stderr and not (tmp_path / "alm_logging").exists()


def test_the_command_printed_on_a_stop_continues_a_run_of_another_config(tmp_path):
    """quick_start.yaml from a copy of the recipe's configs: Hydra's overrides leave out both options, without which
    the printed command would continue with config.yaml, which the checkpoint does not match (env.scale_actions)."""
    configs = tmp_path / "configs"
    shutil.copytree(RECIPE.parent, configs, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    run_dir = tmp_path / "run"
    options = ["--config-path", str(configs), "--config-name", "quick_start"]
    result = subprocess.run([sys.executable, str(FAULTS), "sigterm-update=17", "--", *options, *RUN,
                             f"hydra.run.dir={run_dir}"], env=ENV, capture_output=True, text=True, timeout=120)
    _assert_stopped_at(result, run_dir, "SIGTERM", 110)
    (line,) = _errors(result)
    command = shlex.split(line.split("to be resumed: ", 1)[1])
    assert command[1:6] == [str(RECIPE), *options]
    result = subprocess.run([sys.executable, *command[1:]], env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Resumed from {run_dir / 'checkpoints'} at frame 110" in result.stderr


def test_a_failed_write_on_a_stop_keeps_the_last_checkpoint_and_exits_to_be_resumed(tmp_path):
    # The stop at frame 110 (update 17) writes checkpoint 3, whose replay buffer torch.save fails for real.
    result = _run(tmp_path, "sigterm-update=17", "efbig-write=3")
    assert result.returncode == RESUMABLE_EXIT_CODE and "Traceback" not in result.stderr, result.stderr[-3000:]
    kept = f"the last checkpoint is {tmp_path / 'checkpoints' / 'checkpoint-000000000100'} (frame 100)"
    failed, stopped = _errors(result)
    assert failed == f"alm.py: the checkpoint of frame 110 was not written ([Errno 27] File too large); {kept}; " \
                     "stopping anyway"
    assert stopped.startswith(f"alm.py: stopped by SIGTERM at frame 110 ({kept}), to be resumed: ")
    assert TrainingCheckpoints.metadata(TrainingCheckpoints.verify(tmp_path / "checkpoints"))["collected_frames"] == 100
    assert [path.name for path in (tmp_path / "checkpoints").iterdir()] == ["checkpoint-000000000100"]


def test_a_second_ctrl_c_stops_at_once_without_writing(tmp_path):
    # Ctrl-C twice during the write of frame 100's checkpoint: the first asks for a checkpoint, the second stops.
    result = _run(tmp_path, "sigint-twice-write=2")
    assert result.returncode == 130, result.stderr[-3000:]
    assert "SIGINT received: finishing the current batch of updates, then writing a checkpoint and stopping (Ctrl-C " \
           "again to stop at once without writing)" in result.stderr
    assert _errors(result) == ["alm.py: interrupted: stopped at once, without writing a checkpoint"]
    # The interrupted write left nothing behind; frame 50's checkpoint is the last one, whole.
    assert [path.name for path in (tmp_path / "checkpoints").iterdir()] == ["checkpoint-000000000050"]
    TrainingCheckpoints.verify(tmp_path / "checkpoints")


@pytest.fixture(scope="module")
def disk_full_and_logs_removed(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """Write 3 (frame 150) fails with ENOSPC; the log directory is removed at frame 160."""
    run_dir = tmp_path_factory.mktemp("faults")
    return run_dir, _run(run_dir, "enospc-write=3", "remove-logs=160")


def test_a_full_disk_during_a_write_keeps_the_previous_checkpoint_and_training_goes_on(disk_full_and_logs_removed):
    run_dir, result = disk_full_and_logs_removed
    assert result.returncode == 0, result.stderr[-3000:]
    failed = [line for line in _errors(result) if "not written" in line]
    assert failed == [
        f"alm.py: the checkpoint of frame 150 was not written ([Errno 28] No space left on device); the last "
        f"checkpoint is {run_dir / 'checkpoints' / 'checkpoint-000000000100'} (frame 100); training goes on and tries "
        f"again at frame 200"]
    # The next interval's write worked, and so did the ones after it.
    assert TrainingCheckpoints.metadata(TrainingCheckpoints.verify(run_dir / "checkpoints"))["collected_frames"] == 200
    assert [path.name for path in (run_dir / "checkpoints").iterdir()] == ["checkpoint-000000000200"]


def test_a_logger_that_fails_mid_run_is_switched_off_and_training_keeps_its_checkpoints(disk_full_and_logs_removed):
    run_dir, result = disk_full_and_logs_removed
    (line,) = [line for line in _errors(result) if "logger" in line.lower()]
    assert line.startswith("alm.py: the MP4CSVLogger failed at frame 200 (FileNotFoundError: ")
    assert line.endswith("; metrics are no longer logged, training and its checkpoints go on")
    assert "Done: 200 frames, 110 updates" in result.stdout


def test_a_non_finite_reward_from_the_env_stops_the_run_with_one_line_and_is_never_stored(tmp_path):
    result = _run(tmp_path, "nan-reward=57")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert _errors(result) == [
        "alm.py: non-finite ('next', 'reward') (nan) at frame 57 (step 7 of its episode) in the collected data; it "
        "was not stored and the run stops; the last checkpoint is "
        f"{tmp_path / 'checkpoints' / 'checkpoint-000000000050'} (frame 50)"]


def test_check_finite_names_the_first_bad_frame_and_key():
    batch = TensorDict({"observation": torch.zeros(10, 3), "action": torch.zeros(10, 2),
                        ("next", "reward"): torch.zeros(10, 1), ("next", "observation"): torch.zeros(10, 3),
                        ("next", "step_count"): torch.arange(20, 30).unsqueeze(-1)}, batch_size=[10])
    check_finite(batch, first_frame=1)
    batch["next", "observation"][6, 1] = float("inf")
    batch["next", "reward"][8] = float("nan")
    with pytest.raises(NonFiniteDataError, match=r"non-finite \('next', 'observation'\) \(inf\) at frame 107 \(step 26 "
                                                 r"of its episode\)") as error:
        check_finite(batch, first_frame=101)
    assert (error.value.key, error.value.frame) == (("next", "observation"), 107)


def test_the_simulator_state_makes_the_next_steps_bitwise_identical():
    for name in ("HalfCheetah-v5", "Pendulum-v1"):
        env = make_env(name, seed=0, max_episode_steps=1000)
        state = env.rollout(30, break_when_any_done=False)[-1]["next"].exclude("reward", "done", "terminated",
                                                                               "truncated")
        saved = SimulatorState(env).state_dict()
        actions = [env.action_spec.rand() for _ in range(20)]

        def steps(env):
            tensordict, observations = state.clone(), []
            for action in actions:
                tensordict = env.step(tensordict.set("action", action))["next"]
                observations.append(tensordict["observation"])
            return torch.stack(observations)

        expected = steps(env)
        other = make_env(name, seed=7, max_episode_steps=1000)
        other.reset()
        SimulatorState(other).load_state_dict(saved)
        assert torch.equal(steps(other), expected), name


# ------------------------------------------------------------------------------------------- damaged checkpoints
@pytest.fixture
def copied(reference, tmp_path, monkeypatch) -> Path:
    """A copy of the reference run's checkpoints, in a run dir of its own (the working directory)."""
    shutil.copytree(reference / "checkpoints", tmp_path / "saved")
    monkeypatch.chdir(tmp_path)
    return tmp_path / "saved"


def _validate(resume: Path, *overrides: str) -> None:
    validate_config(load_config(*RUN, "collector.total_frames=300", f"checkpoint.resume={resume}", *overrides))


def _file(copied: Path, component: str, pattern: str) -> Path:
    return sorted((_checkpoint_of(copied) / "components").glob(f"*-{component}/{pattern}"))[0]


def _checkpoint_of(directory: Path) -> Path:
    (checkpoint,) = directory.glob("checkpoint-*")
    return checkpoint


def _rewrite_checksums(file: Path) -> None:
    """Record ``file``'s new size and CRC-32 in its component's checksums, as a crafted checkpoint would."""
    component = next(parent for parent in file.parents if (parent / CHECKSUMS).exists())
    checksums = json.loads((component / CHECKSUMS).read_text())
    checksums[file.relative_to(component).as_posix()] = [file.stat().st_size, zlib.crc32(file.read_bytes())]
    (component / CHECKSUMS).write_text(json.dumps(checksums))


def test_an_undamaged_copy_is_accepted(copied):
    _validate(copied)


def test_a_truncated_checkpoint_file_is_one_clear_error_naming_it(copied):
    storage = _file(copied, "replay_buffer", "storage.pt")
    storage.write_bytes(storage.read_bytes()[: storage.stat().st_size // 2])
    with pytest.raises(ConfigError, match=f"{storage}: not a readable torch file \\(truncated or damaged\\)"):
        _validate(copied)
    _rewrite_checksums(storage)  # even with matching checksums, the torch file itself is unreadable
    with pytest.raises(ConfigError, match=f"{storage}: not a readable torch file"):
        _validate(copied)


def test_a_corrupted_checkpoint_file_is_one_clear_error_naming_it(copied):
    weights = _file(copied, "loss", "state/*.memmap")
    data = bytearray(weights.read_bytes())
    data[0] ^= 0x40  # one flipped bit: same size, other contents
    weights.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match=f"{weights}: damaged \\(CRC-32 [0-9a-f]{{8}}, [0-9a-f]{{8}} when written\\)"):
        _validate(copied)
    weights.write_bytes(bytes(data[:-4]))
    with pytest.raises(ConfigError, match=f"{weights}: {len(data) - 4} bytes, {len(data)} when written"):
        _validate(copied)


def test_a_checkpoint_of_another_format_version_is_one_clear_error_naming_it(copied):
    manifest = _checkpoint_of(copied) / "manifest.json"
    content = json.loads(manifest.read_text())
    content["metadata"]["format"] = "alm-torchrl/1"
    manifest.write_text(json.dumps(content))
    with pytest.raises(ConfigError, match=f"{manifest} has checkpoint format 'alm-torchrl/1'; this version reads "
                                          "'alm-torchrl/2'"):
        _validate(copied)


def test_a_damaged_checkpoint_is_refused_by_the_recipe_in_one_line_before_anything_is_built(copied):
    storage = _file(copied, "replay_buffer", "storage.pt")
    storage.write_bytes(storage.read_bytes()[:100])
    start = time.monotonic()
    result = subprocess.run([sys.executable, str(RECIPE), *RUN, "collector.total_frames=300",
                             f"checkpoint.resume={copied}", f"hydra.run.dir={copied.parent / 'resumed'}"],
                            env=ENV, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    (line,) = _errors(result)
    assert line.startswith(f"alm.py: invalid config: checkpoint.resume='{copied}': {storage}: ")
    assert not (copied.parent / "resumed" / "checkpoints").exists() and time.monotonic() - start < 30


class _Payload:
    """Unpickling this creates a file: what a crafted checkpoint could do, were it unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_a_torch_file_carrying_a_pickle_payload_is_refused_without_running_it(copied, tmp_path):
    marker = tmp_path / "payload-ran"
    storage = _file(copied, "replay_buffer", "storage.pt")
    state = torch.load(storage, weights_only=True)
    state["_len"] = _Payload(marker)
    torch.save(state, storage)
    _rewrite_checksums(storage)
    with pytest.raises(ConfigError, match=f"{storage}: holds pickled objects other than tensors "
                                          r"\(io.open\); refusing to load it"):
        _validate(copied)
    # Loading without the check: torch.load(weights_only=True) refuses it too.
    cfg = load_config(*RUN)
    learner = make_learner(cfg, make_env(cfg.env.name, max_episode_steps=50), torch.device("cpu"))
    checkpoints = make_checkpoints(cfg, learner, make_replay_buffer(cfg, torch.device("cpu")))
    with pytest.raises(CheckpointError, match="replay_buffer.*Weights only load failed"):
        checkpoints.load(copied, verify=False)
    assert not marker.exists()


def test_a_tensordict_directory_carrying_a_pickle_payload_is_refused_without_running_it(copied, tmp_path):
    """TorchRL's state-dict adapter reads tensors with tensordict.load, which unpickles the ``other.pickle`` of an entry
    whose meta.json names a non-tensor class (tensordict 0.14 warns, then loads it)."""
    marker = tmp_path / "payload-ran"
    state = _file(copied, "loss", "state/meta.json").parent
    crafted = state / "extra"
    crafted.mkdir()
    (crafted / "other.pickle").write_bytes(pickle.dumps({"data": _Payload(marker)}))
    (crafted / "meta.json").write_text(json.dumps({"_type": "<class 'tensordict.tensorclass.NonTensorData'>",
                                                   "shape": [], "device": "cpu"}))
    meta = json.loads((state / "meta.json").read_text())
    (state / "meta.json").write_text(json.dumps({**meta, "extra": {"type": "NonTensorData"}}))
    for file in (crafted / "other.pickle", crafted / "meta.json", state / "meta.json"):
        _rewrite_checksums(file)
    with pytest.raises(ConfigError, match=f"{crafted / 'meta.json'}: describes a "
                                          r"\"<class 'tensordict.tensorclass.NonTensorData'>\", not a TensorDict"):
        _validate(copied)
    shutil.move(crafted / "other.pickle", state / "other.pickle")
    shutil.rmtree(crafted)
    (state / "meta.json").write_text(json.dumps(meta))
    checksums = json.loads((state.parent / CHECKSUMS).read_text())
    (state.parent / CHECKSUMS).write_text(json.dumps({key: value for key, value in checksums.items()
                                                      if not key.startswith("state/extra/")}))
    for file in (state / "other.pickle", state / "meta.json"):
        _rewrite_checksums(file)
    with pytest.raises(ConfigError, match=f"{state / 'other.pickle'}: a .pickle file, which no checkpoint of this "
                                          "format holds"):
        _validate(copied)
    assert not marker.exists()


def test_a_checkpoint_without_a_component_the_recipe_restores_is_refused_naming_it(copied):
    """One written through the Python API without the update metrics, say: refused before anything is built, rather
    than by the load's traceback once everything is."""
    manifest_file = _checkpoint_of(copied) / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    shutil.rmtree(manifest_file.parent / manifest["components"].pop("update_metrics")["path"])
    manifest_file.write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match=f"{manifest_file}: lacks update_metrics, which this run restores"):
        _validate(copied)


def test_a_resume_with_another_seed_is_refused(copied):
    with pytest.raises(ConfigError, match="was trained with env.seed=0, not env.seed=7; resume with env.seed=0"):
        _validate(copied, "env.seed=7")


def test_a_file_the_checkpoint_did_not_write_is_refused(copied):
    extra = _file(copied, "rng", "state.json").parent / "notes.json"
    extra.write_text("{}")
    with pytest.raises(ConfigError, match=f"{extra}: not written with this checkpoint"):
        _validate(copied)


def test_a_fresh_run_does_not_replace_a_run_dir_s_checkpoints(copied):
    shutil.copytree(copied, Path("checkpoints"))  # the working directory is the run dir
    validate_config(load_config(*RUN, "collector.total_frames=300"))  # resume=auto: continues it
    with pytest.raises(ConfigError, match="checkpoint.dir='checkpoints' already holds a checkpoint of a run, which "
                                          "this run would replace"):
        validate_config(load_config(*RUN, "checkpoint.resume=null"))


# ---------------------------------------------------------------------------------------------- stop signals
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT])
def test_stop_signals_request_a_stop_instead_of_ending_the_process(signum):
    lines = []
    previous = signal.getsignal(signum)
    with StopSignals(announce=lines.append) as stop:
        os.kill(os.getpid(), signum)
        assert stop.requested == signum
        if signum == signal.SIGINT:
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signum)
        else:
            os.kill(os.getpid(), signum)  # a repeat, e.g. SLURM's SIGTERM after its warning: already stopping
        assert stop.requested == signum and len(lines) == 1
    assert signal.getsignal(signum) == previous


def test_stop_signals_forward_to_the_handler_installed_before_them():
    """Under submitit, its SIGUSR2 handler requeues the job: it must still run, after the checkpoint."""
    calls = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(signum))
    try:
        with StopSignals(announce=lambda line: None) as stop:
            os.kill(os.getpid(), signal.SIGUSR2)
            assert calls == []  # not while training: the checkpoint comes first
        stop.forward()
        assert calls == [signal.SIGUSR2]
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_metrics_log_switches_a_failing_backend_off_with_one_line(capsys):
    class Failing:
        experiment = None

        def log_scalar(self, name, value, step):
            raise ConnectionError("the W&B server went away")

    log = MetricsLog(Failing())
    log.log({"train/loss": 1.0}, step=1000)
    log.log({"train/loss": 1.0}, step=2000)
    assert capsys.readouterr().err.splitlines() == [
        "alm.py: the Failing failed at frame 1000 (ConnectionError: the W&B server went away); metrics are no longer "
        "logged, training and its checkpoints go on"]
    assert log.logger is None


# ------------------------------------------------------------------------------------------------- threads
def test_threads_follow_the_free_cores_and_a_small_update_gets_one(monkeypatch):
    monkeypatch.setattr("alm_torchrl.runtime.usable_cores", lambda: 4)
    before = torch.get_num_threads()
    try:
        assert AdaptiveThreads(gflop_per_update=0.01).num_threads == 1
        threads = AdaptiveThreads(gflop_per_update=30.0, first_look_s=0.0)
        threads.load.cpus = [0, 1, 2, 3]
        assert [threads._threads_for(busy) for busy in (0.0, 0.2, 0.8, 2.0, 3.9, 6.0)] == [4, 4, 3, 2, 1, 1]
        threads.load.others_busy = lambda: 2.9  # two processes keep about three cores busy
        threads._next_look = 0.0
        assert threads.update() == 1 and torch.get_num_threads() == 1
        threads.load.others_busy = lambda: 0.0
        assert threads.update() == 1  # looked again less than period_s ago: unchanged
        threads._next_look = 0.0
        assert threads.update() == 4
    finally:
        torch.set_num_threads(before)
