"""ALM's components: architecture (spec Table 4), initialisation, distributions and policies."""
from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict
from tensordict.nn import InteractionType, set_interaction_type
from torch import nn
from torchrl.data import Bounded, Categorical, Composite, Unbounded
from torchrl.envs import ExplorationType, set_exploration_type

from alm_torchrl import make_alm_modules
from alm_torchrl.modules import GaussianParamHead

from conftest import ACT_DIM, OBS_DIM, action_spec


@pytest.fixture(scope="module")
def paper_modules():
    torch.manual_seed(0)
    return make_alm_modules(Unbounded(shape=(17,)), Bounded(-1.0, 1.0, shape=(6,)))


def _layers(module: nn.Module) -> list[str]:
    return [type(layer).__name__ for layer in module.modules() if not list(layer.children())]


def _linear_shapes(module: nn.Module) -> list[tuple[int, int]]:
    return [(layer.in_features, layer.out_features) for layer in module.modules() if isinstance(layer, nn.Linear)]


def test_paper_architecture(paper_modules):
    m = paper_modules
    assert _linear_shapes(m.encoder) == [(17, 512), (512, 512), (512, 100)]
    assert _layers(m.encoder.module[0]) == ["Linear", "ELU", "Linear", "ELU", "Linear"]
    assert _linear_shapes(m.world_model) == [(56, 1024), (1024, 1024), (1024, 100)]
    head = ["Linear", "LayerNorm", "Tanh", "Linear", "ELU", "Linear"]
    assert _layers(m.reward_model) == head and _linear_shapes(m.reward_model) == [(56, 512), (512, 512), (512, 1)]
    assert _layers(m.classifier) == head and _linear_shapes(m.classifier) == [(106, 512), (512, 512), (512, 2)]
    assert len(m.qvalue_network) == 2
    for critic in m.qvalue_network:
        assert _layers(critic) == head and _linear_shapes(critic) == [(56, 512), (512, 512), (512, 1)]
    assert _layers(m.actor_network) == ["Linear", "ELU", "Linear", "ELU", "Linear", "Tanh"]
    assert _linear_shapes(m.actor_network) == [(50, 512), (512, 512), (512, 6)]


def test_orthogonal_init_zero_bias_and_independent_critics(paper_modules):
    m = paper_modules
    for module in (m.encoder, m.world_model, m.reward_model, m.classifier, *m.qvalue_network, m.actor_network):
        for layer in module.modules():
            if isinstance(layer, nn.Linear):
                w = layer.weight
                gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
                torch.testing.assert_close(gram, torch.eye(gram.shape[0]), atol=1e-4, rtol=0)
                assert torch.count_nonzero(layer.bias) == 0
    first, second = (critic.module.net[0].weight for critic in m.qvalue_network)
    assert not torch.equal(first, second)


def test_gaussian_head_squashes_mean_and_std():
    head = GaussianParamHead(nn.Identity())
    raw = torch.tensor([[-1e4, 0.0, 1e4, -1e4, 0.0, 1e4]])
    loc, scale = head(raw)
    assert loc.abs().max() <= 30.0 and loc[0, 2] > 29.9
    assert scale.min() >= 0.1 and scale.max() <= 10.0 + 0.1 + 1e-4
    assert scale[0, 0] == pytest.approx(0.1, abs=1e-3)


def test_encoder_and_world_model_are_diagonal_normals(paper_modules):
    m = paper_modules
    td = TensorDict(observation=torch.randn(4, 17), batch_size=[4])
    dist = m.encoder.get_dist(td)
    assert dist.batch_shape == (4,) and dist.event_shape == (50,)
    with set_interaction_type(InteractionType.RANDOM):
        sample = m.encoder(td.clone())["latent"]
    with set_interaction_type(InteractionType.DETERMINISTIC):
        mean = m.encoder(td.clone())["latent"]
    torch.testing.assert_close(mean, dist.mean)
    assert not torch.equal(sample, mean)
    td = TensorDict(latent=torch.randn(4, 50), action=torch.rand(4, 6), batch_size=[4])
    assert m.world_model(td)["next_latent"].shape == (4, 50)


def test_behaviour_policy_noise_anneals_and_clamps():
    torch.manual_seed(0)
    modules = make_alm_modules(Unbounded(shape=(OBS_DIM,)), Bounded(-0.4, 0.4, shape=(ACT_DIM,)),
                               latent_dim=4, hidden_dim=16, model_hidden_dim=16, noise_annealing_frames=100,
                               eval_latent="mean")
    td = TensorDict(observation=torch.randn(512, OBS_DIM), batch_size=[512])
    with torch.no_grad(), set_exploration_type(ExplorationType.RANDOM):
        noisy = modules.policy(td.clone())["action"]
    assert noisy.abs().max() <= 0.4 and (noisy.abs() == 0.4).any()  # noise std 1.0, clamped to the bounds
    noise = modules.exploration_noise
    assert noise.sigma.item() == pytest.approx(1.0)
    noise.step(50)
    assert noise.sigma.item() == pytest.approx(0.55)
    noise.step(100)
    assert noise.sigma.item() == pytest.approx(0.1)
    with torch.no_grad(), set_exploration_type(ExplorationType.DETERMINISTIC):
        first = modules.eval_policy(td.clone())["action"]
        second = modules.policy(td.clone())["action"]
    torch.testing.assert_close(first, second)  # no noise and the latent mean when deterministic
    # The eval action is the actor's tanh mean, not rescaled to the bounds (reference behaviour).
    assert first.abs().max() <= 1.0


def _eval_actions(modules, observation: torch.Tensor, seed: int) -> TensorDict:
    torch.manual_seed(seed)
    with torch.no_grad(), set_exploration_type(ExplorationType.DETERMINISTIC):
        return modules.eval_policy(TensorDict(observation=observation, batch_size=observation.shape[:1]))


def test_eval_policy_acts_on_a_sampled_latent_by_default_as_the_original_evaluates():
    """The original evaluates ``actor(z).mean`` with ``z = encoder(s).sample()``: the latent is a draw of the encoder
    (evaluations of the same state differ), the action the actor's mean on it (no behaviour noise)."""
    torch.manual_seed(0)
    modules = make_alm_modules(Unbounded(shape=(OBS_DIM,)), action_spec(), latent_dim=4, hidden_dim=16,
                               model_hidden_dim=16)
    observation = torch.randn(8, OBS_DIM)
    first, again, other = (_eval_actions(modules, observation, seed) for seed in (1, 1, 2))
    torch.testing.assert_close(first["action"], again["action"])  # a function of the torch seed
    assert (first["action"] - other["action"]).abs().min() > 0  # every state's action moves with the draw
    torch.manual_seed(1)
    with torch.no_grad():
        latent = modules.encoder.get_dist(TensorDict(observation=observation, batch_size=[8])).rsample()
        by_hand = modules.actor_network(TensorDict(latent=latent, batch_size=[8]))["action"]
    torch.testing.assert_close(first["latent"], latent)
    torch.testing.assert_close(first["action"], by_hand)


def test_eval_policy_on_the_latent_mean_is_deterministic():
    torch.manual_seed(0)
    modules = make_alm_modules(Unbounded(shape=(OBS_DIM,)), action_spec(), latent_dim=4, hidden_dim=16,
                               model_hidden_dim=16, eval_latent="mean")
    observation = torch.randn(8, OBS_DIM)
    first, other = (_eval_actions(modules, observation, seed) for seed in (1, 2))
    torch.testing.assert_close(first["action"], other["action"])
    with torch.no_grad():
        mean = modules.encoder.get_dist(TensorDict(observation=observation, batch_size=[8])).mean
        by_hand = modules.actor_network(TensorDict(latent=mean, batch_size=[8]))["action"]
    torch.testing.assert_close(first["action"], by_hand)


def test_eval_latent_leaves_the_behaviour_policy_alone():
    observation = TensorDict(observation=torch.randn(8, OBS_DIM), batch_size=[8])
    actions = []
    for eval_latent in ("sample", "mean"):
        torch.manual_seed(0)
        modules = make_alm_modules(Unbounded(shape=(OBS_DIM,)), action_spec(), latent_dim=4, hidden_dim=16,
                                   model_hidden_dim=16, eval_latent=eval_latent)
        with torch.no_grad(), set_exploration_type(ExplorationType.RANDOM):
            actions.append(modules.policy(observation.clone())["action"])
    torch.testing.assert_close(*actions)


def test_policy_runs_in_a_torchrl_collector():
    from torchrl.collectors import Collector
    from torchrl.envs import GymEnv, InitTracker, TransformedEnv

    # TorchRL 0.14's Collector warns about any module policy on an env without InitTracker
    # (0.15 appends one); make_env always adds it, so do the same here
    env = TransformedEnv(GymEnv("Pendulum-v1"), InitTracker())
    torch.manual_seed(0)
    modules = make_alm_modules(env.observation_spec_unbatched, env.action_spec_unbatched,
                               latent_dim=4, hidden_dim=16, model_hidden_dim=16)
    collector = Collector(env, modules.policy, frames_per_batch=20, total_frames=40)
    batches = list(collector)
    collector.shutdown()
    assert len(batches) == 2 and batches[0]["action"].shape == (20, 1)
    assert batches[0]["action"].abs().max() <= 2.0


@pytest.mark.parametrize("kwargs, message", [
    ({"latent_dim": 0}, "latent_dim must be a positive integer, got 0"),
    ({"num_qvalue_nets": 0}, "num_qvalue_nets must be a positive integer, got 0"),
    ({"eval_latent": "mode"}, "eval_latent must be 'sample' or 'mean', got 'mode'"),
])
def test_bad_hyperparameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_alm_modules(Unbounded(shape=(OBS_DIM,)), action_spec(), **kwargs)


def test_bad_specs():
    with pytest.raises(ValueError, match="Bounded"):
        make_alm_modules(Unbounded(shape=(OBS_DIM,)), Categorical(3))
    with pytest.raises(KeyError, match="no entry 'observation'"):
        make_alm_modules(Composite(pixels=Unbounded(shape=(OBS_DIM,))), action_spec())
    with pytest.raises(ValueError, match=r"flat vector or a \[C, H, W\] image"):
        make_alm_modules(Unbounded(shape=(8, 8)), action_spec())
    with pytest.raises(ValueError, match="at least 15x15 pixels"):  # an image, too small for the conv encoder
        make_alm_modules(Unbounded(shape=(3, 8, 8)), action_spec())


if __name__ == "__main__":
    pytest.main([__file__, "-q"])
