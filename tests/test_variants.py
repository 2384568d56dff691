"""The paper's ablations (spec, "Paper variants"): each switch changes exactly what it should, and each one is reachable
from the recipe config."""
from __future__ import annotations

import math
import re
import subprocess
import sys

import pytest
import torch
from tensordict import TensorDict
from torchrl.envs.utils import ExplorationType, set_exploration_type
from torch import nn
from torchrl.data import Unbounded
from torchrl.objectives import SoftUpdate

from alm_torchrl import make_alm_modules
from alm_torchrl.envs import make_env
from alm_torchrl.objectives import ALMLoss
from alm_torchrl.update import make_optimizer, make_update
from recipes.alm.utils import ConfigError, load_config, make_alm_agent, make_learner, make_loss_module, validate_config

from conftest import HIDDEN_DIM, LATENT_DIM, OBS_DIM, action_spec, slice_batch, tiny_loss

from test_recipe import ENV, RECIPE, TINY, _scalars


def _losses(seed: int = 7, **loss_kwargs):
    """Loss outputs of a fixed network (seed 0) on a fixed batch with fixed random draws (``seed``)."""
    loss = tiny_loss(**loss_kwargs)
    SoftUpdate(loss, tau=0.005)
    torch.manual_seed(seed)
    return loss, loss(slice_batch())


def _perturbed(params) -> None:
    with torch.no_grad():
        for value in params.values(True, True):
            value.add_(0.5 * torch.randn_like(value))


def test_no_kl_term_removes_exactly_the_kl_from_the_model_loss():
    _, default = _losses()
    _, no_kl = _losses(kl_term=False)
    assert default["model_kl_term"] > 0 and no_kl["model_kl_term"] == 0
    torch.testing.assert_close(no_kl["kl"], default["kl"])  # still measured, no longer trained on
    torch.testing.assert_close(no_kl["loss_model"], default["loss_model"] - default["model_kl_term"])
    for key in ("loss_reward", "loss_classifier", "loss_qvalue", "loss_actor"):
        torch.testing.assert_close(no_kl[key], default[key])


def test_no_value_term_removes_exactly_the_value_from_the_model_loss():
    _, default = _losses()
    loss, no_value = _losses(value_term=False)
    assert "model_value" not in no_value.keys() and "model_value" not in loss.out_keys
    assert no_value["model_value_term"] == 0 and default["model_value_term"] != 0
    torch.testing.assert_close(no_value["loss_model"], default["loss_model"] - default["model_value_term"])
    # Without it, the critics' parameters cannot move loss_model.
    loss_model = no_value["loss_model"]
    _perturbed(loss.qvalue_network_params)
    torch.manual_seed(7)
    torch.testing.assert_close(loss(slice_batch())["loss_model"], loss_model)


@pytest.mark.parametrize("classifier_coef, changes", [(0.0, False), (0.1, True)])
def test_classifier_coef_zero_removes_the_classifier_from_the_actor_loss(classifier_coef, changes):
    loss, out = _losses(classifier_coef=classifier_coef)
    _perturbed(loss.classifier_params)
    torch.manual_seed(7)
    perturbed = loss(slice_batch())
    assert (not torch.allclose(perturbed["loss_actor"], out["loss_actor"])) == changes
    torch.testing.assert_close(perturbed["loss_model"], out["loss_model"])


def test_td3_actor_objective_is_minus_the_min_q_of_the_actor_sample():
    loss, out = _losses(actor_objective="td3")
    assert "actor_q" in out.keys() and "imagined_reward" not in out.keys()
    torch.testing.assert_close(out["loss_actor"], -out["actor_q"])
    # Gradient routing is unchanged: the actor loss trains the actor only.
    grads = torch.autograd.grad(out["loss_actor"], list(loss.parameters()), allow_unused=True)
    names = [name for name, _ in loss.named_parameters()]
    assert {name.split(".")[0] for name, g in zip(names, grads) if g is not None and g.any()} == {
        "actor_network_params"
    }
    # No imagination: the world model, reward model and classifier cannot move the actor loss, the critics can.
    loss_actor = out["loss_actor"].detach()
    for params in (loss.world_model_params, loss.reward_model_params, loss.classifier_params):
        _perturbed(params)
    torch.manual_seed(7)
    torch.testing.assert_close(loss(slice_batch())["loss_actor"].detach(), loss_actor)
    _perturbed(loss.qvalue_network_params)
    torch.manual_seed(7)
    assert not torch.allclose(loss(slice_batch())["loss_actor"].detach(), loss_actor)


def test_log_reward_form_is_the_appendix_a8_transform():
    _, default = _losses()
    _, small_shift = _losses(log_reward_shift=2.0)
    _, paper_shift = _losses(log_reward_shift=10_000.0)
    # a(log(r + a) - log a) -> r as a grows (Appendix A.8): the paper's a = 10,000 is nearly the raw reward.
    assert not torch.allclose(small_shift["model_reward"], default["model_reward"], rtol=1e-2)
    torch.testing.assert_close(paper_shift["model_reward"], default["model_reward"], rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(paper_shift["loss_reward"], default["loss_reward"])  # Eq. 11 still fits raw rewards


def _ent_loss(entropy_coef: float) -> ALMLoss:
    torch.manual_seed(0)
    modules = make_alm_modules(Unbounded(shape=(OBS_DIM,)), action_spec(), latent_dim=LATENT_DIM,
                               hidden_dim=HIDDEN_DIM, model_hidden_dim=HIDDEN_DIM, actor_std="learned")
    loss = ALMLoss(**modules.loss_kwargs(), entropy_coef=entropy_coef)
    SoftUpdate(loss, tau=0.005)
    return loss


def test_alm_ent_adds_the_entropy_bonus_to_the_imagined_rewards():
    batch = slice_batch(horizon=1)  # K = 1: G_0 = r_0 + gamma q_1, so the bonus enters loss_actor once
    outputs = {}
    for coef in (0.0, 0.5):
        torch.manual_seed(3)
        outputs[coef] = _ent_loss(coef)(batch)
    assert "actor_entropy" in outputs[0.5].keys() and "actor_entropy" not in outputs[0.0].keys()
    expected = outputs[0.0]["loss_actor"] - 0.5 * outputs[0.5]["actor_entropy"]
    torch.testing.assert_close(outputs[0.5]["loss_actor"], expected)
    torch.testing.assert_close(outputs[0.5]["loss_model"], outputs[0.0]["loss_model"])


def test_alm_ent_bonus_raises_the_learned_std():
    loss = _ent_loss(entropy_coef=100.0)
    optimizer = torch.optim.Adam(loss.actor_network_params.values(True, True), lr=1e-2)
    latent = torch.randn(64, LATENT_DIM)

    def mean_std() -> float:
        with loss.actor_network_params.to_module(loss.actor_network):
            return loss.actor_network(TensorDict({"latent": latent}, [64]))["action_std"].mean().item()

    before = mean_std()
    for step in range(30):
        optimizer.zero_grad()
        loss(slice_batch(seed=step))["loss_actor"].backward()
        optimizer.step()
    assert before < 0.7 < mean_std() <= 1.0


def test_learned_std_policy_samples_with_its_std_and_evaluates_the_mean():
    torch.manual_seed(0)
    modules = make_alm_modules(Unbounded(shape=(OBS_DIM,)), action_spec(), latent_dim=LATENT_DIM,
                               hidden_dim=HIDDEN_DIM, model_hidden_dim=HIDDEN_DIM, actor_std="learned")
    assert modules.exploration_noise is None
    observation = TensorDict({"observation": torch.randn(1, OBS_DIM).expand(4000, OBS_DIM)}, [4000])
    with set_exploration_type(ExplorationType.RANDOM):
        noisy = modules.policy(observation.clone())
    with set_exploration_type(ExplorationType.DETERMINISTIC):
        mean = modules.policy(observation.clone())
    assert (mean["action"] == mean["action"][:1]).all()
    assert noisy["action"].abs().max() <= 1.0
    # Away from the bounds the spread is the actor's std (the latent is sampled too, so a little wider).
    assert (noisy["action"].std(0) >= 0.9 * noisy["action_std"][0]).all()


def test_entropy_bonus_without_a_learned_std_is_one_clear_error():
    loss = tiny_loss(entropy_coef=0.1)
    SoftUpdate(loss, tau=0.005)
    with pytest.raises(ValueError, match="entropy_coef=0.1 needs an actor that learns its std"):
        loss(slice_batch())


def test_identity_encoder_has_no_parameters_and_the_latent_is_the_observation():
    torch.manual_seed(0)
    modules = make_alm_modules(Unbounded(shape=(OBS_DIM,)), action_spec(), latent_dim=LATENT_DIM,
                               hidden_dim=HIDDEN_DIM, model_hidden_dim=HIDDEN_DIM, encoder_type="identity")
    assert not list(modules.encoder.parameters())
    batch = slice_batch()
    dist = modules.encoder.get_dist(batch[:, 0].select("observation"))
    torch.testing.assert_close(dist.mean, batch["observation"][:, 0])
    loss = ALMLoss(**modules.loss_kwargs())
    assert not any(name.startswith("encoder_params") for name, _ in loss.named_parameters())
    update = make_update(loss, make_optimizer(loss, 1e-3), SoftUpdate(loss, tau=0.005))
    before = {name: p.detach().clone() for name, p in loss.named_parameters()}
    update(batch)
    assert all(not torch.equal(before[name], p) for name, p in loss.named_parameters())


def test_linear_classifier_is_one_linear_layer():
    modules = make_alm_modules(Unbounded(shape=(OBS_DIM,)), action_spec(), latent_dim=LATENT_DIM,
                               hidden_dim=HIDDEN_DIM, model_hidden_dim=HIDDEN_DIM, classifier_type="linear")
    layers = [m for m in modules.classifier.modules() if isinstance(m, (nn.Linear, nn.LayerNorm))]
    assert len(layers) == 1 and layers[0].in_features == 2 * LATENT_DIM + action_spec().shape[-1]


@pytest.mark.parametrize("kwargs, message", [
    ({"actor_objective": "ddpg"}, "actor_objective must be 'svg' or 'td3', got 'ddpg'"),
    ({"log_reward_shift": 0.0}, r"log_reward_shift must be a number > 0 or None \(paper: 10000\), got 0.0"),
])
def test_bad_variant_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_loss(**kwargs)


def _config(*overrides: str):
    return load_config(*TINY, "env.name=Pendulum-v1", *overrides)


def _build(cfg) -> None:
    """What alm.py does with a config before training: check it, set the runtime, build the learner and buffer."""
    from recipes.alm.utils import configure_runtime, make_replay_buffer

    validate_config(cfg)
    configure_runtime(cfg)
    make_learner(cfg, make_env(cfg.env.name, max_episode_steps=cfg.env.max_episode_steps), torch.device("cpu"))
    make_replay_buffer(cfg, torch.device("cpu"))


def test_every_ablation_is_a_recipe_switch():
    env = make_env("Pendulum-v1", seed=0, max_episode_steps=50)
    cfg = _config("network.encoder=identity", "network.classifier=linear", "loss.kl_term=false",
                  "loss.value_term=false", "loss.actor_objective=td3", "loss.log_reward_shift=10000",
                  "loss.classifier_coef=0", "loss.horizon=5", "network.actor_std=learned", "loss.entropy_coef=0.1")
    validate_config(cfg)
    modules = make_alm_agent(cfg, env, torch.device("cpu"))
    loss = make_loss_module(cfg, modules, torch.device("cpu"))
    assert not list(modules.encoder.parameters())
    assert sum(isinstance(m, nn.Linear) for m in modules.classifier.modules()) == 1
    assert (loss.kl_term, loss.value_term, loss.actor_objective, loss.log_reward_shift) == (False, False, "td3", 1e4)
    assert float(loss.classifier_coef) == 0.0 and loss.entropy_coef == 0.1 and modules.exploration_noise is None
    default = make_loss_module(_config(), make_alm_agent(_config(), env, torch.device("cpu")), torch.device("cpu"))
    assert (default.kl_term, default.value_term, default.actor_objective, default.log_reward_shift) == (
        True, True, "svg", None)


@pytest.mark.parametrize("override, message", [
    ("network.encoder=cnn", "network.encoder must be 'mlp' or 'identity', got 'cnn'"),
    ("loss.actor_objective=sac", "loss.actor_objective must be 'svg' or 'td3', got 'sac'"),
    ("loss.log_reward_shift=-1", "loss.log_reward_shift must be a number > 0 or None (paper: 10000), got -1.0"),
    ("loss.entropy_coef=0.1", "needs an actor that learns its std: add network.actor_std=learned"),
])
def test_bad_ablation_config_is_one_clear_error(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        _build(_config(override))


@pytest.mark.parametrize("override", ["logger.eval_iter=0", "logger.num_eval_episodes=0", "checkpoint.interval=-5"])
def test_intervals_and_eval_episodes_must_be_positive(override):
    key, value = override.split("=")
    with pytest.raises(ConfigError, match=f"^{key} must be a positive integer, got {value}$"):
        validate_config(_config(override))


@pytest.mark.parametrize("override, message", [
    ("optim.lr=0", "optim.lr must be a number > 0 (paper: 1e-4), got 0.0"),
    ("optim.gamma=1.5", "optim.gamma must be a number in (0, 1] (paper: 0.99), got 1.5"),
    ("optim.max_grad_norm=-1", "optim.max_grad_norm must be a number > 0 (paper: 100), got -1.0"),
    ("loss.tau=0", "loss.tau must be a number in (0, 1] (paper: 0.005), got 0.0"),
    ("loss.lmbda=abc", "loss.lmbda: Value 'abc' of type 'str' could not be converted to Float"),
    ("loss.lmbda=1.01", "loss.lmbda must be a number in [0, 1] (paper: 0.95), got 1.01"),
    ("loss.classifier_coef=-0.1", "loss.classifier_coef must be a number >= 0"),
    ("exploration.noise_init=0.05", "exploration.noise_init must be a number >= noise_end (0.1) (paper: 1.0)"),
    ("exploration.annealing_frames=0", "exploration.annealing_frames must be a number >= 1"),
    ("collector.total_frames=0", "collector.total_frames must be >= 1, got 0"),
    ("compile.num_threads=0", "compile.num_threads must be a positive integer or None"),
])
def test_out_of_range_numbers_are_one_clear_error(override, message):
    with pytest.raises(ConfigError, match="^" + re.escape(message)):
        _build(_config(override))


@pytest.mark.parametrize("override", ["optim.gamma=1", "loss.lmbda=0", "loss.classifier_coef=0",
                                      "exploration.noise_init=0.1"])
def test_numbers_at_the_edge_of_their_range_are_accepted(override):
    _build(_config(override))


def test_unknown_logger_backend_is_one_clear_error():
    with pytest.raises(ConfigError, match="^logger.backend='tensorbord' is not one of csv, tensorboard, wandb, "
                                          "mlflow, trackio, or empty"):
        validate_config(_config("logger.backend=tensorbord"))
    validate_config(_config("logger.backend=csv"))
    validate_config(_config("logger.backend="))


def test_logger_backend_without_its_package_is_one_clear_error(monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *args: None if name == "wandb" else find_spec(name, *args)
    )
    with pytest.raises(ConfigError, match="^logger.backend='wandb' needs the wandb package: pip install wandb$"):
        validate_config(_config("logger.backend=wandb"))


@pytest.mark.parametrize("frames_per_batch, utd_ratio", [(30, 0.1), (100, 0.29), (10, 2)])
def test_utd_ratios_whose_product_is_whole_up_to_float_rounding_are_accepted(frames_per_batch, utd_ratio):
    validate_config(_config(f"collector.frames_per_batch={frames_per_batch}", f"optim.utd_ratio={utd_ratio}"))


def test_recipe_runs_the_ablations_and_logs_the_lower_bound_bias(tmp_path):
    """One end-to-end run with every switch flipped, evaluating the lower-bound bias (Appendix E)."""
    run_dir = tmp_path / "run"
    command = [sys.executable, str(RECIPE), *TINY, "env.name=Pendulum-v1", "collector.total_frames=200",
               "logger.eval_iter=200", "checkpoint.interval=1000", "network.encoder=identity",
               "network.classifier=linear", "loss.kl_term=false", "loss.actor_objective=td3",
               "loss.log_reward_shift=10000", "logger.lower_bound_bias=true", f"hydra.run.dir={run_dir}"]
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    scalars = _scalars(run_dir)
    bias = (scalars / "eval" / "lower_bound_bias_mean.csv").read_text().strip().splitlines()
    assert len(bias) == 1 and math.isfinite(float(bias[0].split(",")[1]))
    assert (scalars / "train" / "actor_q.csv").exists() and (scalars / "train" / "model_kl_term.csv").exists()


def test_recipe_runs_alm_ent(tmp_path):
    run_dir = tmp_path / "run"
    command = [sys.executable, str(RECIPE), *TINY, "env.name=Pendulum-v1", "collector.total_frames=200",
               "logger.eval_iter=200", "checkpoint.interval=1000", "network.actor_std=learned",
               "loss.entropy_coef=0.1", f"hydra.run.dir={run_dir}"]
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    entropy = (_scalars(run_dir) / "train" / "actor_entropy.csv").read_text().strip().splitlines()
    assert entropy and all(math.isfinite(float(line.split(",")[1])) for line in entropy)
