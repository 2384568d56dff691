"""The training recipe end to end (as a subprocess), kill-and-resume, config validation, and the update helpers."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from tensordict import TensorDict, TensorDictBase
from torchrl.objectives import SoftUpdate

from alm_torchrl.envs import make_env, rollout_episodes
from alm_torchrl.replay import make_replay_buffer
from alm_torchrl.training import (
    GROUP_LOSSES,
    OPTIMIZER_GROUPS,
    NonFiniteGradientError,
    evaluate,
    load_checkpoint,
    make_collector,
    make_loss,
    make_modules,
    make_optimizers,
    make_recipe_replay_buffer,
    make_update,
    restore_replay_buffer,
    resume_training,
    save_checkpoint,
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
        runs[env_name] = run_dir
    return runs


@pytest.mark.parametrize("env_name", ["HalfCheetah-v5", "Pendulum-v1"])
def test_recipe_logs_evaluates_and_checkpoints(smoke_runs, env_name):
    run_dir = smoke_runs[env_name]
    scalars = _scalars(run_dir)
    for name in ("train/loss_model", "train/loss_actor", "train/episode_return", "time/update", "eval/return_mean"):
        assert (scalars / f"{name}.csv").is_file(), name
    eval_rows = (scalars / "eval" / "return_mean.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in eval_rows] == ["150", "300"]
    state = load_checkpoint(run_dir / "checkpoints")
    assert state["env_name"] == env_name
    assert state["collected_frames"] == 300
    # Updates start once 100 frames are stored: 21 batches of 10 frames, UTD 1.
    assert state["num_updates"] == 210
    # The loss samples with the behaviour policy's std: 200 frames into a 1.0 -> 0.1 anneal over 100k frames.
    assert state["loss"]["actor_std"].item() == pytest.approx(1.0 - 0.9 * 200 / 100_000)
    assert state["exploration_noise"]["sigma"].item() == pytest.approx(state["loss"]["actor_std"].item())


def test_kill_and_resume_continues_frames_and_buffer(tmp_path):
    first = tmp_path / "first"
    proc = subprocess.Popen(
        _recipe(*TINY, "env.name=Pendulum-v1", "collector.total_frames=100000", "checkpoint.interval=150",
                "logger.eval_iter=100000", run_dir=first),
        env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    checkpoint = first / "checkpoints" / "checkpoint.pt"
    try:
        deadline = time.monotonic() + 60
        while not checkpoint.exists():
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 60 s"
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    saved_dir = tmp_path / "saved"
    saved_dir.mkdir()
    shutil.copy(checkpoint, saved_dir / "checkpoint.pt")  # the checkpoint as the kill left it
    saved = load_checkpoint(saved_dir)
    frames = saved["collected_frames"]
    assert frames >= 150 and frames % 150 < 10

    second = tmp_path / "second"
    result = _run(*TINY, "env.name=Pendulum-v1", f"collector.total_frames={frames + 50}", "checkpoint.interval=150",
                  "logger.eval_iter=100000", f"checkpoint.resume={saved_dir}", run_dir=second)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"at frame {frames}" in result.stderr
    resumed = load_checkpoint(second / "checkpoints")
    assert resumed["collected_frames"] == frames + 50
    assert resumed["num_updates"] == saved["num_updates"] + 50
    assert resumed["exploration_noise"]["sigma"] < saved["exploration_noise"]["sigma"]

    old_data, new_data = _stored_transitions(saved), _stored_transitions(resumed)
    assert (len(old_data), len(new_data)) == (frames, frames + 50)
    assert (new_data[:frames] == old_data).all()
    traj_key = ("collector", "traj_ids")
    # New trajectories get fresh ids, so no slice can join the killed run's last episode to the new one.
    assert new_data[frames:][traj_key].min() > old_data[traj_key].max()


def _stored_transitions(state: dict) -> TensorDictBase:
    buffer = make_replay_buffer(size=100_000, batch_size=8, slice_len=3)
    restore_replay_buffer(buffer, state["replay_buffer"], torch.device("cpu"))
    return buffer.storage[: len(buffer)]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["env.name=HalfCheeta-v5"], "Unknown environment 'HalfCheeta-v5'"),
        (["loss.horizon=0"], "loss.horizon must be >= 1"),
        (["optim.batch_size=0"], "optim.batch_size must be >= 1"),
        (["loss.horizon=60", "env.max_episode_steps=50"], "loss.horizon=60 is longer than any episode"),
        (["collector.init_random_frames=2", "loss.horizon=3"], "cannot fill one slice of loss.horizon=3"),
        (["replay_buffer.size=100", "optim.batch_size=512"], "replay_buffer.size=100 is smaller than one batch"),
        (["optim.utd_ratio=0.05"], "optim.utd_ratio=0.05 = 0.5 updates per collected batch"),
        (["checkpoint.resume=/nonexistent/ckpt"], "no checkpoint at '/nonexistent/ckpt/checkpoint.pt'"),
        pytest.param(["collector.device=cuda"], "CUDA is not available",
                     marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA exists")),
    ],
)
def test_bad_config_fails_fast_with_one_line(tmp_path, overrides, message):
    start = time.monotonic()
    result = _run(*overrides, run_dir=tmp_path)
    assert result.returncode != 0
    assert message in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("alm.py:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "checkpoints").exists()
    assert time.monotonic() - start < 30


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
    optimizer = make_optimizers(loss, lr=1e-4)
    names = {id(p): name for name, p in loss.named_parameters()}
    groups = {group["name"]: {names[id(p)] for p in group["params"]} for group in optimizer.param_groups}
    assert sorted(name for group in groups.values() for name in group) == sorted(names.values())
    prefixes = {name: tuple(p.split(".")[0] for p in group) for name, group in groups.items()}
    assert set(prefixes["model"]) == {"encoder_params", "world_model_params"}
    assert set(prefixes["reward_classifier"]) == {"reward_model_params", "classifier_params"}
    assert set(LOSS_GROUPS) == {"loss_model", "loss_reward", "loss_classifier", "loss_qvalue", "loss_actor"}
    # Every loss's gradient lands in exactly one named group, the one the error message names.
    assert sorted(loss for losses in GROUP_LOSSES.values() for loss in losses) == sorted(LOSS_GROUPS)
    for group, losses in GROUP_LOSSES.items():
        assert {p for loss in losses for p in LOSS_GROUPS[loss]} == set(OPTIMIZER_GROUPS[group])


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
    groups = [{"params": g["params"], "name": g["name"]} for g in make_optimizers(loss, lr=1e-3).param_groups]
    return torch.optim.Adam(groups, lr=1e-3, foreach=True)


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
    optimizer = _foreach_adam(loss) if optimizer_kind == "foreach" else make_optimizers(loss, lr=1e-3)
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
    optimizer = make_optimizers(loss, lr=1e-3)
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
    with pytest.raises(ValueError, match="check_every=0"):
        make_update(loss, make_optimizers(loss, lr=1e-3), SoftUpdate(loss, tau=0.005), check_every=0)
    with pytest.raises(ValueError, match="need a fused optimizer"):
        make_update(loss, foreach, SoftUpdate(loss, tau=0.005), check_every=2)
    with pytest.raises(ValueError, match="need a fused optimizer"):
        make_update(loss, foreach, SoftUpdate(loss, tau=0.005), cudagraphs=True)


def test_compile_also_compiles_the_behaviour_policy_of_the_collector():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(RECIPE.parent), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*TINY, "env.name=Pendulum-v1", "compile.compile=true",
                                                       "collector.init_random_frames=10", "collector.total_frames=40"])
    env = make_env(cfg.env.name, seed=0, max_episode_steps=cfg.env.max_episode_steps)
    modules = make_modules(cfg, env, torch.device("cpu"))
    collector = make_collector(cfg, env, modules.policy, torch.device("cpu"))
    assert collector.compiled_policy and not collector.cudagraphed_policy
    batches = list(collector)  # 10 random frames, then 30 from the compiled policy
    collector.shutdown()
    assert len(batches) == 4 and all(batch["action"].abs().max() <= 2.0 for batch in batches)
    assert batches[-1]["latent"].shape == (10, 4)  # the policy's own outputs reach the stored batch


def test_save_checkpoint_is_atomic(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"frames": 1})
    with pytest.raises(Exception):
        save_checkpoint(path, {"frames": 2, "unpicklable": lambda: None})
    assert load_checkpoint(path) == {"frames": 1}
    assert list(tmp_path.iterdir()) == [path]


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the process's mappings from /proc")
def test_resume_restores_the_state_keeps_the_optimizer_settings_and_releases_the_checkpoint(smoke_runs):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(RECIPE.parent), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*SMOKE, "env.name=Pendulum-v1"])
    env = make_env(cfg.env.name, max_episode_steps=cfg.env.max_episode_steps)
    modules = make_modules(cfg, env, torch.device("cpu"))
    loss = make_loss(cfg, modules, torch.device("cpu"))
    # Settings the run was not saved with: the checkpoint's state is restored, the optimizer keeps these.
    optimizer = make_optimizers(loss, 3e-4, capturable=True)
    replay_buffer = make_recipe_replay_buffer(cfg, torch.device("cpu"))
    checkpoint = smoke_runs["Pendulum-v1"] / "checkpoints" / "checkpoint.pt"
    frames_and_updates = resume_training(checkpoint, loss=loss, optimizer=optimizer, replay_buffer=replay_buffer,
                                         exploration_noise=modules.exploration_noise, device=torch.device("cpu"))
    assert frames_and_updates == (300, 210) and len(replay_buffer) == 300
    saved = load_checkpoint(checkpoint)
    moments = [value["exp_avg"] for value in saved["optimizer"]["state"].values()]
    assert all(torch.equal(value["exp_avg"], moment) for value, moment in zip(optimizer.state.values(), moments))
    assert all(group["lr"] == 3e-4 and group["capturable"] for group in optimizer.param_groups)
    assert [group["name"] for group in optimizer.param_groups] == list(OPTIMIZER_GROUPS)
    # Had a tensor of the checkpoint survived (Optimizer.load_state_dict keeps CPU tensors as they are), its file
    # would stay mapped, and every page of it the replay buffer's copy read would stay resident for the whole run.
    assert str(checkpoint.resolve()) not in Path("/proc/self/maps").read_text()


@pytest.mark.parametrize("override, message", [
    ("network.hidden_dim=32", "was trained with network.hidden_dim=16, not network.hidden_dim=32; resume with "
                              "network.hidden_dim=16"),
    ("network.encoder=identity", "was trained with network.encoder='mlp', not network.encoder='identity'"),
    ("replay_buffer.size=1000", "holds a replay buffer of 100000 transitions, not replay_buffer.size=1000; resume "
                                "with replay_buffer.size=100000"),
])
def test_resume_with_other_networks_or_buffer_capacity_is_one_clear_error(smoke_runs, override, message):
    from hydra import compose, initialize_config_dir

    resume = smoke_runs["Pendulum-v1"] / "checkpoints"
    resumed = [*SMOKE, "env.name=Pendulum-v1", "collector.total_frames=400", f"checkpoint.resume={resume}"]
    with initialize_config_dir(config_dir=str(RECIPE.parent), version_base="1.3"):
        validate_config(compose(config_name="config", overrides=resumed))  # as saved: accepted
        with pytest.raises(ValueError, match=re.escape(message)):
            validate_config(compose(config_name="config", overrides=[*resumed, override]))


def test_restore_replay_buffer_puts_the_transitions_on_the_buffer_device():
    source = make_replay_buffer(size=50, batch_size=2, slice_len=3)
    source.extend(TensorDict({"observation": torch.randn(20, 3), ("collector", "traj_ids"): torch.zeros(20).long()},
                             batch_size=[20]))
    # "meta" stands in for cuda: a fresh lazy storage would otherwise adopt the checkpoint's CPU tensors.
    target = make_replay_buffer(size=50, batch_size=2, slice_len=3, device="meta")
    restore_replay_buffer(target, source.state_dict(), torch.device("meta"))
    assert len(target) == 20
    assert {tensor.device.type for tensor in target.storage[:20].values(True, True)} == {"meta"}
