"""The training recipe end to end (as a subprocess), kill-and-resume, config validation, and the update helpers."""
from __future__ import annotations

import errno
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from tensordict import TensorDict
from torchrl.objectives import SoftUpdate

from alm_torchrl.checkpoint import ReplayBufferAdapter, TrainingCheckpoints
from alm_torchrl.envs import make_env, rollout_episodes
from alm_torchrl.evaluation import evaluate
from alm_torchrl.replay import make_replay_buffer
from alm_torchrl.update import OPTIMIZER_GROUPS, NonFiniteGradientError, make_optimizer, make_update
from recipes.alm.utils import (
    ConfigError,
    UpdateMetrics,
    checkpoint_components,
    load_config,
    make_checkpoints,
    make_collector,
    make_learner,
    make_environment,
    make_replay_buffer as make_recipe_replay_buffer,
    resolve_device,
    validate_config,
)

from conftest import LOSS_GROUPS, TINY_RECIPE as TINY, fixed_policy, slice_batch, tiny_loss

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "alm" / "alm.py"
# Two evaluation episodes, so that the recipe evaluates with a batched env (one copy per episode).
SMOKE = [*(override for override in TINY if not override.startswith("logger.num_eval_episodes")),
         "logger.num_eval_episodes=2", "collector.total_frames=300", "logger.eval_iter=150", "checkpoint.interval=150"]
# One intra-op thread per recipe process: the 2-core box stalls on oversubscription.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}


def _recipe(*overrides: str, run_dir: Path) -> list[str]:
    return [sys.executable, str(RECIPE), *overrides, f"hydra.run.dir={run_dir}"]


def _run(*overrides: str, run_dir: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        _recipe(*overrides, run_dir=run_dir), env=ENV, capture_output=True, text=True, timeout=timeout
    )


def _scalars(run_dir: Path) -> Path:
    (scalars,) = run_dir.glob("alm_logging/*/scalars")
    return scalars


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory) -> dict[str, Path]:
    runs = {}
    for env_name in ("HalfCheetah-v5", "Pendulum-v1"):
        run_dir = tmp_path_factory.mktemp(env_name)
        result = _run(*SMOKE, f"env.name={env_name}", run_dir=run_dir)
        assert result.returncode == 0, result.stderr[-3000:]
        (run_dir / "stderr.txt").write_text(result.stderr)
        runs[env_name] = run_dir
    return runs


def _restored(checkpoint: Path, *overrides: str) -> tuple[dict, object, object]:
    """A checkpoint loaded into fresh training objects built by the recipe's factories: (metadata, learner, buffer)."""
    cfg = load_config(*TINY, *overrides)
    env = make_env(cfg.env.name, max_episode_steps=cfg.env.max_episode_steps)
    learner = make_learner(cfg, env, torch.device("cpu"))
    replay_buffer = make_recipe_replay_buffer(cfg, torch.device("cpu"))
    metadata = make_checkpoints(cfg, learner, replay_buffer).load(checkpoint)
    return metadata, learner, replay_buffer


@pytest.mark.parametrize("env_name", ["HalfCheetah-v5", "Pendulum-v1"])
def test_recipe_logs_evaluates_and_checkpoints(smoke_runs, env_name):
    run_dir = smoke_runs[env_name]
    scalars = _scalars(run_dir)
    for name in ("train/loss_model", "train/loss_actor", "train/episode_return", "time/update", "eval/return_mean"):
        assert (scalars / f"{name}.csv").is_file(), name
    eval_rows = (scalars / "eval" / "return_mean.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in eval_rows] == ["150", "300"]
    # One checkpoint kept (the 150-frame one was replaced by the 300-frame one).
    assert [path.name for path in (run_dir / "checkpoints").iterdir()] == ["checkpoint-000000000300"]
    metadata, learner, replay_buffer = _restored(run_dir / "checkpoints", f"env.name={env_name}")
    assert metadata["env_name"] == env_name
    assert metadata["collected_frames"] == 300 and len(replay_buffer) == 300
    # Updates start once 100 frames are stored: 21 batches of 10 frames, UTD 1.
    assert metadata["num_updates"] == 210
    # The loss samples with the behaviour policy's std: 200 frames into a 1.0 -> 0.1 anneal over 100k frames.
    assert learner.loss.actor_std.item() == pytest.approx(1.0 - 0.9 * 200 / 100_000)
    assert learner.agent.exploration_noise.sigma.item() == pytest.approx(learner.loss.actor_std.item())


def test_recipe_prints_no_torchrl_info_lines(smoke_runs):
    log = (smoke_runs["Pendulum-v1"] / "stderr.txt").read_text()
    assert "[torchrl][INFO]" not in log and "frames/s" in log  # the progress bar, and nothing from TorchRL


def _checkpoint_dirs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "checkpoints").glob("checkpoint-*"))


def test_kill_and_resume_continues_frames_and_buffer(tmp_path):
    first = tmp_path / "first"
    proc = subprocess.Popen(
        _recipe(*TINY, "env.name=Pendulum-v1", "collector.total_frames=100000", "checkpoint.interval=150",
                "logger.eval_iter=100000", run_dir=first),
        env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not _checkpoint_dirs(first):
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 60 s"
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    saved_dir = tmp_path / "saved"
    shutil.copytree(first / "checkpoints", saved_dir)  # the checkpoints as the kill left them
    saved, _, saved_buffer = _restored(saved_dir, "env.name=Pendulum-v1")
    frames = saved["collected_frames"]
    assert frames >= 150 and frames % 150 < 10

    second = tmp_path / "second"
    result = _run(*TINY, "env.name=Pendulum-v1", f"collector.total_frames={frames + 50}", "checkpoint.interval=150",
                  "logger.eval_iter=100000", f"checkpoint.resume={saved_dir}", run_dir=second)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"at frame {frames}" in result.stderr
    resumed, resumed_learner, resumed_buffer = _restored(second / "checkpoints", "env.name=Pendulum-v1")
    assert resumed["collected_frames"] == frames + 50
    assert resumed["num_updates"] == saved["num_updates"] + 50
    assert resumed_learner.agent.exploration_noise.sigma < 1.0 - 0.9 * (frames - 100) / 100_000

    old_data, new_data = saved_buffer.storage[: len(saved_buffer)], resumed_buffer.storage[: len(resumed_buffer)]
    assert (len(old_data), len(new_data)) == (frames, frames + 50)
    assert (new_data[:frames] == old_data).all()
    traj_key = ("collector", "traj_ids")
    # An episode ended at the checkpoint's frame (episodes of 50 frames): the next one has a fresh id. (An episode in
    # progress continues with its own: tests/test_reliability.py.)
    assert new_data[frames:][traj_key].min() > old_data[traj_key].max()


BAD_CONFIGS = [
    (["env.name=HalfCheeta-v5"], "Unknown environment 'HalfCheeta-v5'"),
    (["loss.horizon=0"], "loss.horizon must be >= 1"),
    (["optim.batch_size=0"], "optim.batch_size must be >= 1"),
    (["loss.horizon=60", "env.max_episode_steps=50"], "loss.horizon=60 is longer than any episode"),
    (["collector.init_random_frames=2", "loss.horizon=3"], "cannot fill one slice of loss.horizon=3"),
    (["replay_buffer.size=100", "optim.batch_size=512"], "replay_buffer.size=100 is smaller than one batch"),
    (["optim.lr=abc"], "optim.lr: Value 'abc' of type 'str' could not be converted to Float"),
    (["replay_buffer.sampling=uniform"],
     "replay_buffer.sampling must be one of 'transition', 'trajectory', got 'uniform'"),
    (["logger.eval_latent=mode"], "logger.eval_latent must be 'sample' or 'mean', got 'mode'"),
    (["loss.lmbda=1.5"], "loss.lmbda must be a number in [0, 1] (paper: 0.95), got 1.5"),
    (["optim.utd_ratio=0.05"], "optim.utd_ratio=0.05 = 0.5 updates per collected batch"),
    (["checkpoint.resume=/nonexistent/ckpt"], "checkpoint.resume='/nonexistent/ckpt': no checkpoint there"),
    (["env.name=CartPole-v1"], "env.name: 'CartPole-v1' takes Discrete actions; ALM needs continuous (Box) actions"),
    (["env.seed=-1"], "env.seed must be an integer in [0, 2**31 - 1], got -1"),
    (["env.seed=5000000000"], "env.seed must be an integer in [0, 2**31 - 1], got 5000000000"),
    (["env.max_episode_steps=0"], "env.max_episode_steps must be >= 1 (env steps), got 0"),
    (["replay_buffer.prefetch=-1"], "replay_buffer.prefetch must be >= 0 (batches sampled ahead by a thread; 0: none)"),
    (["compile.compile_mode=foo"], "compile.compile_mode must be null or one of default, lite, reduce-overhead"),
    pytest.param(["collector.device=cuda"], "CUDA is not available",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA exists")),
]


@pytest.mark.parametrize("overrides, message", BAD_CONFIGS)
def test_bad_config_is_one_clear_error(tmp_path, monkeypatch, overrides, message):
    """Every check the recipe makes before training, in process (``alm.py`` prints it as one line: below): the config's
    own, then its factories' checks of their arguments, named by their config keys."""
    monkeypatch.chdir(tmp_path)  # the run directory, where checkpoint.dir is looked for
    with pytest.raises(ConfigError) as error:
        cfg = load_config(*TINY, *overrides)
        validate_config(cfg)
        device = resolve_device(cfg)
        train_env, _ = make_environment(cfg)
        make_learner(cfg, train_env, device)
        make_recipe_replay_buffer(cfg, device)
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("overrides, message", [BAD_CONFIGS[0], BAD_CONFIGS[6], BAD_CONFIGS[12]])
def test_bad_config_fails_fast_with_one_line(tmp_path, overrides, message):
    """The recipe itself: one ``alm.py:`` line, no traceback, nothing written; checks and a schema error (refused
    resumes: the resume tests below)."""
    start = time.monotonic()
    result = _run(*overrides, run_dir=tmp_path)
    assert result.returncode != 0
    assert message in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("alm.py:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "checkpoints").exists()
    assert time.monotonic() - start < 30


def test_a_task_whose_package_is_missing_is_one_line_naming_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "Box2D", None)  # as if not installed, whether it is or not
    for name in [name for name in sys.modules if name.startswith("gymnasium.envs.box2d")]:
        monkeypatch.delitem(sys.modules, name)  # imported again, without Box2D
    with pytest.raises(ConfigError) as error:
        validate_config(load_config(*TINY, "env.name=LunarLanderContinuous-v3"))
    # gymnasium's own advice follows (pip install swig, then gymnasium[box2d]), in one line
    message = str(error.value)
    assert message.startswith("env.name: 'LunarLanderContinuous-v3' cannot be built here: Box2D is not installed")
    assert "gymnasium[box2d]" in message and "\n" not in message


def test_evaluate_takes_the_first_num_episodes_of_side_by_side_rollouts():
    def episodes_of(num_envs: int, num_episodes: int) -> dict[str, float]:
        env = make_env("Hopper-v5", seed=7, num_envs=num_envs, max_episode_steps=200)
        return evaluate(env, fixed_policy(env), num_episodes, max_steps=200)

    env = make_env("Hopper-v5", seed=7, num_envs=2, max_episode_steps=200)
    policy = fixed_policy(env)
    expected = [*rollout_episodes(env, policy, 200), *rollout_episodes(env, policy, 200)][:3]
    result = episodes_of(num_envs=2, num_episodes=3)  # two rollouts of two episodes, the fourth one unused
    assert result["length_mean"] == pytest.approx(sum(len(episode) for episode in expected) / 3)
    assert result["return_mean"] == pytest.approx(sum(e["next", "reward"].sum().item() for e in expected) / 3)
    assert len({len(episode) for episode in expected}) > 1  # the episodes differ, so taking the wrong ones shows
    # One copy per episode gives the same episodes as single envs seeded 7, 8 and 9.
    singles = [make_env("Hopper-v5", seed=7 + i, max_episode_steps=200) for i in range(3)]
    single_returns = [evaluate(env, fixed_policy(env), 1, max_steps=200)["return_mean"] for env in singles]
    assert episodes_of(num_envs=3, num_episodes=3)["return_mean"] == pytest.approx(sum(single_returns) / 3)


def test_resume_from_another_env_fails(smoke_runs, tmp_path):
    result = _run("env.name=Pendulum-v1", f"checkpoint.resume={smoke_runs['HalfCheetah-v5'] / 'checkpoints'}",
                  run_dir=tmp_path)
    assert result.returncode != 0
    assert "was trained on env.name='HalfCheetah-v5', not env.name='Pendulum-v1'" in result.stderr


def test_resume_of_a_finished_run_fails(smoke_runs, tmp_path):
    result = _run("env.name=Pendulum-v1", "collector.total_frames=300",
                  f"checkpoint.resume={smoke_runs['Pendulum-v1'] / 'checkpoints'}", run_dir=tmp_path)
    assert result.returncode != 0
    assert "already holds 300 frames, >= collector.total_frames=300" in result.stderr


def test_optimizer_groups_cover_every_parameter_once():
    loss = tiny_loss()
    optimizer = make_optimizer(loss, lr=1e-4)
    names = {id(p): name for name, p in loss.named_parameters()}
    groups = {group["name"]: {names[id(p)] for p in group["params"]} for group in optimizer.param_groups}
    assert sorted(name for group in groups.values() for name in group) == sorted(names.values())
    prefixes = {name: {p.split(".")[0] for p in group} for name, group in groups.items()}
    # ALM's four optimisers (spec): encoder + world model, reward model + classifier, critics, actor.
    assert prefixes == {
        "model": {"encoder_params", "world_model_params"},
        "reward_classifier": {"reward_model_params", "classifier_params"},
        "qvalue": {"qvalue_network_params"},
        "actor": {"actor_network_params"},
    }
    # Every loss term's parameters land in exactly one named group, the one the error message names.
    assert sorted(key for keys in OPTIMIZER_GROUPS.values() for key in keys) == sorted(LOSS_GROUPS)


def _nan_gradient_once(loss) -> None:
    """Make the next backward's gradient of the first critic weight NaN, and only that one."""
    armed = [True]

    def hook(grad: torch.Tensor) -> torch.Tensor:
        if armed[0]:
            armed[0] = False
            return grad * float("nan")
        return grad

    next(iter(loss.qvalue_network_params.values(True, True))).register_hook(hook)


def _foreach_adam(loss) -> torch.optim.Adam:
    """The recipe's four named groups in a non-fused Adam, which cannot skip a step on the device."""
    return make_optimizer(loss, lr=1e-3, fused=False)


def _snapshot(loss, optimizer) -> tuple[dict, list]:
    params = {name: p.detach().clone() for name, p in loss.named_parameters()}
    steps = [optimizer.state[p]["step"].clone() for group in optimizer.param_groups for p in group["params"]]
    return params, steps


def _assert_unchanged(loss, optimizer, snapshot) -> None:
    params, steps = snapshot
    assert all(torch.equal(params[name], p) for name, p in loss.named_parameters())
    now = [optimizer.state[p]["step"] for group in optimizer.param_groups for p in group["params"]]
    assert all(torch.equal(before, after) for before, after in zip(steps, now))


@pytest.mark.parametrize("optimizer_kind", ["fused", "foreach", "cudagraph-wrapper"])
def test_update_names_the_group_with_a_non_finite_gradient_and_leaves_parameters_alone(optimizer_kind):
    loss = tiny_loss()
    # foreach: no on-device skip, so the update checks before the step
    optimizer = _foreach_adam(loss) if optimizer_kind == "foreach" else make_optimizer(loss, lr=1e-3)
    with warnings.catch_warnings():  # without CUDA, CudaGraphModule warns and runs eagerly (its plumbing is tested)
        warnings.simplefilter("ignore", UserWarning)
        update = make_update(loss, optimizer, SoftUpdate(loss, tau=0.005),
                             cudagraphs=optimizer_kind == "cudagraph-wrapper")
        metrics = update(slice_batch())
        assert {"loss_model", "grad_norm_model", "grad_norm_actor"} <= set(metrics.keys())
        before = _snapshot(loss, optimizer)
        _nan_gradient_once(loss)
        with pytest.raises(NonFiniteGradientError, match="from loss_qvalue in optimizer group 'qvalue'") as error:
            update(slice_batch(seed=2))
        _assert_unchanged(loss, optimizer, before)
        assert error.value.skipped_updates == (0 if optimizer_kind == "foreach" else 1)
        update(slice_batch(seed=3))  # a caller that catches the error can go on: the next finite update steps
    assert all(not torch.equal(before[0][name], p) for name, p in loss.named_parameters())


def test_update_checking_every_few_updates_skips_the_bad_step_and_raises_at_the_check():
    loss = tiny_loss()
    optimizer = make_optimizer(loss, lr=1e-3)
    update = make_update(loss, optimizer, SoftUpdate(loss, tau=0.005), check_every=3)
    update(slice_batch())
    before = _snapshot(loss, optimizer)
    _nan_gradient_once(loss)
    update(slice_batch(seed=2))  # non-finite: skipped on the device, no host check yet
    _assert_unchanged(loss, optimizer, before)
    with pytest.raises(NonFiniteGradientError, match="step of 1 update.* was skipped") as error:
        update(slice_batch(seed=3))  # finite, applied; the third update checks
    assert error.value.group == "qvalue" and error.value.skipped_updates == 1
    assert all(not torch.equal(before[0][name], p) for name, p in loss.named_parameters())


def test_update_refuses_what_it_cannot_check():
    loss = tiny_loss()
    foreach = _foreach_adam(loss)
    with pytest.raises(ValueError, match="check_every must be a number of updates >= 1, got 0"):
        make_update(loss, make_optimizer(loss, lr=1e-3), SoftUpdate(loss, tau=0.005), check_every=0)
    with pytest.raises(ValueError, match="need a fused optimizer"):
        make_update(loss, foreach, SoftUpdate(loss, tau=0.005), check_every=2)
    with pytest.raises(ValueError, match="need a fused optimizer"):
        make_update(loss, foreach, SoftUpdate(loss, tau=0.005), cudagraphs=True)


def test_compile_also_compiles_the_behaviour_policy_of_the_collector():
    cfg = load_config(*TINY, "env.name=Pendulum-v1", "compile.compile=true", "collector.init_random_frames=10",
                      "collector.total_frames=40")
    env = make_env(cfg.env.name, seed=0, max_episode_steps=cfg.env.max_episode_steps)
    learner = make_learner(cfg, env, torch.device("cpu"))
    collector = make_collector(cfg, env, learner.agent.policy, torch.device("cpu"))
    assert collector.compiled_policy and not collector.cudagraphed_policy
    torch._dynamo.utils.counters.clear()
    batches = list(collector)  # 10 random frames, then 30 from the compiled policy
    collector.shutdown()
    assert len(batches) == 4 and all(batch["action"].abs().max() <= 2.0 for batch in batches)
    # Compiled once: the policy's input gains the policy's own outputs after its first step, which a graph compiled
    # on the first step's input would not accept (dynamo would trace the policy again at every start-up).
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1, dict(torch._dynamo.utils.counters["stats"])
    assert batches[-1]["latent"].shape == (10, 4)  # the policy's own outputs reach the stored batch


def test_compile_auto_runs_eager_with_one_line_where_torch_compile_cannot_work(tmp_path):
    overrides = [override for override in TINY if not override.startswith("compile.compile")]
    # No C++ compiler for inductor, and an empty cache, so nothing compiled before can stand in.
    env = {**ENV, "CXX": "/bin/false", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    result = subprocess.run(
        _recipe(*overrides, "env.name=Pendulum-v1", "compile.compile=auto", "collector.total_frames=150",
                "logger.eval_iter=150", "checkpoint.interval=150", run_dir=tmp_path / "run"),
        env=env, capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if "torch.compile does not work here" in line]
    assert len(lines) == 1 and "running eager" in lines[0] and "C++ compiler" in lines[0]
    assert "Traceback" not in result.stderr
    assert "Done: 150 frames" in result.stdout


class _Blocking:
    """A checkpoint component whose save writes a file, then waits forever: a save that a kill interrupts."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker


class _BlockingAdapter(ReplayBufferAdapter):
    adapter_id = "test.blocking"

    def save(self, component, path, *, args, kwargs):
        path.mkdir(parents=True)
        (path / "partial").write_bytes(b"x" * 1000)
        component.marker.touch()
        time.sleep(600)


KILLED_MID_WRITE = """
import sys, torch
from pathlib import Path
from tensordict import TensorDict
sys.path[:0] = [sys.argv[2], str(Path(sys.argv[2]).parent)]
from test_recipe import _Blocking, _BlockingAdapter, _small_checkpoints
checkpoints, _ = _small_checkpoints(Path(sys.argv[1]))
checkpoints.save(100, {"frames": 100})
checkpoints.checkpoint.register("blocking", _Blocking(Path(sys.argv[1]) / "marker"), adapter=_BlockingAdapter())
checkpoints.save(200, {"frames": 200})
"""


def _small_checkpoints(directory: Path, capacity: int = 50) -> tuple[TrainingCheckpoints, torch.nn.Module]:
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    buffer = make_replay_buffer(size=capacity, batch_size=2, slice_len=3)
    buffer.extend(TensorDict({"observation": torch.randn(20, 3), ("collector", "traj_ids"): torch.zeros(20).long()},
                             batch_size=[20]))
    checkpoints = TrainingCheckpoints(directory / "checkpoints", loss=net,
                                      optimizer=torch.optim.Adam(net.parameters()), replay_buffer=buffer)
    return checkpoints, net


def test_a_kill_in_the_middle_of_a_checkpoint_write_keeps_the_last_finished_one(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", KILLED_MID_WRITE, str(tmp_path), str(Path(__file__).parent)],
                            env=ENV, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "marker").exists():
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    directory = tmp_path / "checkpoints"
    assert any(".stage-" in path.name for path in directory.iterdir())  # the unfinished write
    assert TrainingCheckpoints.find(directory).name == "checkpoint-000000000100"
    checkpoints, net = _small_checkpoints(tmp_path)
    with torch.no_grad():
        net.weight.zero_()
    assert checkpoints.load(directory)["frames"] == 100
    assert net.weight.abs().sum() > 0  # restored
    checkpoints.save(300, {"frames": 300})  # the next save clears what the kill left
    assert [path.name for path in directory.iterdir()] == ["checkpoint-000000000300"]


def test_a_failed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    checkpoints, _ = _small_checkpoints(tmp_path)
    first = checkpoints.save(100, {"frames": 100})

    def disk_full(self, component, path, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ReplayBufferAdapter, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        checkpoints.save(200, {"frames": 200})
    assert [path.name for path in (tmp_path / "checkpoints").iterdir()] == [first.name]
    assert TrainingCheckpoints.metadata(tmp_path / "checkpoints")["frames"] == 100


def test_a_write_that_fails_in_torch_save_is_an_os_error_and_keeps_the_previous_checkpoint(tmp_path):
    """A real failed write: files capped at 256 KiB (RLIMIT_FSIZE, EFBIG) fail the replay buffer's torch.save as a full
    disk would (ENOSPC); torch reports either as a RuntimeError, which the recipe would not take for a failed write."""
    checkpoints, _ = _small_checkpoints(tmp_path, capacity=20_000)  # its storage.pt: 400 KB; every other file < 30 KB
    first = checkpoints.save(100, {"frames": 100})
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    on_excess = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else a write past the cap kills the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 2**10, limits[1]))
    try:
        with pytest.raises(OSError) as error:
            checkpoints.save(200, {"frames": 200})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, on_excess)
    assert error.value.errno == errno.EFBIG
    assert [path.name for path in (tmp_path / "checkpoints").iterdir()] == [first.name]
    assert TrainingCheckpoints.metadata(TrainingCheckpoints.verify(tmp_path / "checkpoints"))["frames"] == 100


def test_a_disk_without_room_for_another_checkpoint_is_an_os_error_before_anything_is_written(tmp_path, monkeypatch):
    """Some files are written through memory maps, which end the process (SIGBUS) when the disk fills under them: a save
    checks first that the disk has the room the newest checkpoint takes."""
    checkpoints, _ = _small_checkpoints(tmp_path)
    first = checkpoints.save(100, {"frames": 100})
    size = sum(file.stat().st_size for file in first.rglob("*") if file.is_file())
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=size - 1))
    with pytest.raises(OSError, match=r"MiB free on the disk of .*, where a checkpoint takes") as error:
        checkpoints.save(200, {"frames": 200})
    assert error.value.errno == errno.ENOSPC
    assert [path.name for path in (tmp_path / "checkpoints").iterdir()] == [first.name]
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=size))
    assert checkpoints.save(200, {"frames": 200}).name == "checkpoint-000000000200"


def test_a_checkpoint_is_on_disk_before_it_is_published_and_the_previous_one_removed(tmp_path, monkeypatch):
    """Every file and directory of the new checkpoint is flushed (fsync) before it is renamed into place, and the
    directory holding it after the rename, both before the previous checkpoint is deleted: a power loss leaves one whole
    checkpoint."""
    checkpoints, _ = _small_checkpoints(tmp_path)
    previous = checkpoints.save(100, {"frames": 100})
    new = tmp_path / "checkpoints" / "checkpoint-000000000200"
    flushed = {}  # inode: (new published?, previous still there?), at its first fsync
    fsync = os.fsync

    def recording_fsync(descriptor):
        flushed.setdefault(os.fstat(descriptor).st_ino, (new.exists(), previous.exists()))
        fsync(descriptor)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    assert checkpoints.save(200, {"frames": 200}) == new and not previous.exists()
    written = [new, *new.rglob("*")]
    assert {path: flushed.get(path.stat().st_ino) for path in written} == {path: (False, True) for path in written}
    assert flushed[new.parent.stat().st_ino] == (True, True)


@pytest.mark.parametrize("actor_std", ["scheduled", "learned"])
def test_a_checkpoint_to_resume_must_hold_the_components_the_recipe_registers(actor_std):
    """validate_config checks a checkpoint against checkpoint_components before anything is built: the same names."""
    cfg = load_config(*TINY, "env.name=Pendulum-v1", f"network.actor_std={actor_std}")
    cpu = torch.device("cpu")
    train_env, eval_env = make_environment(cfg)
    learner = make_learner(cfg, train_env, cpu)
    checkpoints = make_checkpoints(cfg, learner, make_recipe_replay_buffer(cfg, cpu),
                                   collector=make_collector(cfg, train_env, learner.agent.policy, cpu),
                                   eval_env=eval_env, update_metrics=UpdateMetrics())
    assert sorted(checkpoints.checkpoint.components) == sorted(checkpoint_components(cfg))


def test_auto_resume_refuses_a_checkpoint_of_the_older_layout_rather_than_start_beside_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the run directory
    (tmp_path / "checkpoints").mkdir()
    torch.save({"collected_frames": 150}, tmp_path / "checkpoints" / "checkpoint.pt")  # one file, before 0c985f1
    with pytest.raises(ConfigError, match=f"checkpoint.resume=auto: {tmp_path / 'checkpoints' / 'checkpoint.pt'} is a "
                                          "checkpoint of alm_torchrl before its torchrl.checkpoint directories, which "
                                          "this version cannot resume; to start afresh, move it out of "
                                          "checkpoint.dir='checkpoints' or run in another directory"):
        validate_config(load_config(*TINY))


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the process's mappings from /proc")
def test_resume_restores_the_state_keeps_the_optimizer_settings_and_releases_the_checkpoint(smoke_runs):
    cfg = load_config(*SMOKE, "env.name=Pendulum-v1")
    env = make_env(cfg.env.name, max_episode_steps=cfg.env.max_episode_steps)
    learner = make_learner(cfg, env, torch.device("cpu"))
    # Settings the run was not saved with: the checkpoint's state is restored, the optimizer keeps these.
    optimizer = make_optimizer(learner.loss, 3e-4, capturable=True)
    replay_buffer = make_recipe_replay_buffer(cfg, torch.device("cpu"))
    checkpoints = TrainingCheckpoints(smoke_runs["Pendulum-v1"] / "checkpoints", loss=learner.loss,
                                      optimizer=optimizer, replay_buffer=replay_buffer,
                                      exploration_noise=learner.agent.exploration_noise)
    metadata = checkpoints.load(smoke_runs["Pendulum-v1"] / "checkpoints")
    assert (metadata["collected_frames"], metadata["num_updates"]) == (300, 210) and len(replay_buffer) == 300
    steps = {float(state["step"]) for state in optimizer.state.values()}
    assert steps == {210.0}  # Adam's step counts (and moments) come from the checkpoint
    assert all(state["exp_avg"].abs().sum() > 0 for state in optimizer.state.values())
    assert all(group["lr"] == 3e-4 and group["capturable"] for group in optimizer.param_groups)
    assert [group["name"] for group in optimizer.param_groups] == list(OPTIMIZER_GROUPS)
    # Had a tensor of the checkpoint survived, its file would stay mapped, and every page of it the replay buffer's
    # copy read would stay resident for the whole run.
    assert str(smoke_runs["Pendulum-v1"] / "checkpoints") not in Path("/proc/self/maps").read_text()


@pytest.mark.parametrize("override, message", [
    ("network.hidden_dim=32", "was trained with network.hidden_dim=16, not network.hidden_dim=32; resume with "
                              "network.hidden_dim=16"),
    ("network.encoder=identity", "was trained with network.encoder='mlp', not network.encoder='identity'"),
    ("replay_buffer.size=1000", "holds a replay buffer of 100000 transitions, not replay_buffer.size=1000; resume "
                                "with replay_buffer.size=100000"),
    # The buffer's actions are in the agent's space, which scaling changes.
    ("env.scale_actions=true", "was trained with env.scale_actions=False, not env.scale_actions=True; resume with "
                               "env.scale_actions=False"),
])
def test_resume_with_other_networks_actions_or_buffer_capacity_is_one_clear_error(smoke_runs, override, message):
    resume = smoke_runs["Pendulum-v1"] / "checkpoints"
    resumed = [*SMOKE, "env.name=Pendulum-v1", "collector.total_frames=400", f"checkpoint.resume={resume}"]
    validate_config(load_config(*resumed))  # as saved: accepted
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate_config(load_config(*resumed, override))


def test_env_scale_actions_gives_the_agent_the_unit_box_in_training_and_evaluation():
    cfg = load_config(*TINY, "env.name=Pendulum-v1", "env.scale_actions=true")
    validate_config(cfg)
    for env in make_environment(cfg):
        assert env.action_spec.space.low.unique().tolist() == [-1.0]
        assert env.action_spec.space.high.unique().tolist() == [1.0]
    unscaled, _ = make_environment(load_config(*TINY, "env.name=Pendulum-v1"))
    assert unscaled.action_spec.space.high.tolist() == [2.0]  # the default: the original's unscaled actions


def test_a_damaged_or_foreign_checkpoint_is_one_clear_error(smoke_runs, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(smoke_runs["Pendulum-v1"] / "checkpoints", damaged)
    (manifest,) = damaged.glob("*/manifest.json")
    manifest.write_text(manifest.read_text()[:100])  # truncated
    resumed = [*SMOKE, "env.name=Pendulum-v1", "collector.total_frames=400"]
    # Named, whether the checkpoint or the directory holding it is given.
    for resume in (damaged, manifest.parent):
        expected = f"checkpoint.resume='{resume}': {manifest}: .*Invalid checkpoint manifest"
        with pytest.raises(ConfigError, match=expected):
            validate_config(load_config(*resumed, f"checkpoint.resume={resume}"))


def test_replay_buffer_adapter_puts_the_transitions_on_the_buffer_device(tmp_path):
    from torchrl.checkpoint import Checkpoint

    source = make_replay_buffer(size=50, batch_size=2, slice_len=3)
    source.extend(TensorDict({"observation": torch.randn(20, 3), ("collector", "traj_ids"): torch.zeros(20).long()},
                             batch_size=[20]))
    Checkpoint().register("buffer", source, adapter=ReplayBufferAdapter()).save(tmp_path / "checkpoint")
    # "meta" stands in for cuda: the transitions must land on the buffer's device, not the files' CPU.
    target = make_replay_buffer(size=50, batch_size=2, slice_len=3, device="meta")
    Checkpoint().register("buffer", target, adapter=ReplayBufferAdapter()).load(tmp_path / "checkpoint")
    assert len(target) == 20 and target.writer._cursor == 20
    assert {tensor.device.type for tensor in target.storage[:20].values(True, True)} == {"meta"}
