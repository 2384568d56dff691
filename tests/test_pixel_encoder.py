"""ALM from pixels: DrQ-v2's convolutional encoder swapped in, every other network and ALMLoss unchanged."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from tensordict import TensorDict
from torch import nn
from torchrl.collectors import Collector
from torchrl.data import Bounded, Composite, Unbounded

from alm_torchrl import make_alm_modules
from alm_torchrl.modules import ConvFeatures
from alm_torchrl.objectives import ALMLoss
from alm_torchrl.replay import TRAJ_KEY, make_replay_buffer, sample_slices
from alm_torchrl.transforms import RandomShift
from alm_torchrl.update import make_optimizer, make_target_updater, make_update

from conftest import ACT_DIM, HIDDEN_DIM, LATENT_DIM, action_spec
from pixel_env import make_pixel_env

IMAGE = (9, 20, 20)  # 3 stacked RGB frames, small enough for the CPU
SIZES = {"latent_dim": LATENT_DIM, "hidden_dim": HIDDEN_DIM, "model_hidden_dim": HIDDEN_DIM}
CONV = {"conv_channels": 4, "conv_feature_dim": 6}


def pixel_spec(shape=IMAGE, key="pixels"):
    return Composite({key: Bounded(0, 255, shape=shape, dtype=torch.uint8)})


def pixel_modules(key="pixels", seed=0, **kwargs):
    torch.manual_seed(seed)
    return make_alm_modules(pixel_spec(key=key), action_spec(), observation_key=key, **SIZES, **CONV, **kwargs)


def pixel_loss(modules) -> ALMLoss:
    loss = ALMLoss(**modules.loss_kwargs())
    loss.set_keys(observation=modules.observation_key)
    loss.make_value_estimator(gamma=0.99)
    return loss


def pixel_batch(batch_size=6, horizon=3, key="pixels", seed=1) -> TensorDict:
    generator = torch.Generator().manual_seed(seed)
    terminated = torch.zeros(batch_size, horizon, 1, dtype=torch.bool)
    terminated[::3, -1] = True
    images = torch.randint(0, 256, (batch_size, horizon + 1, *IMAGE), generator=generator, dtype=torch.uint8)
    return TensorDict({
        key: images[:, :-1],
        "action": torch.rand(batch_size, horizon, ACT_DIM, generator=generator) * 2 - 1,
        "next": {key: images[:, 1:], "reward": torch.randn(batch_size, horizon, 1, generator=generator),
                 "terminated": terminated, "done": terminated.clone()},
    }, batch_size=[batch_size, horizon])


def _shapes(module: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(name, tuple(param.shape)) for name, param in module.named_parameters()]


def test_image_spec_gets_drqv2_encoder_and_the_same_other_networks():
    torch.manual_seed(0)
    pixels = make_alm_modules(pixel_spec((9, 84, 84)), action_spec(), observation_key="pixels")
    states = make_alm_modules(Unbounded(shape=(17,)), action_spec())
    conv = pixels.encoder.module[0].module.net[0]
    assert isinstance(conv, ConvFeatures)
    layers = [layer for layer in conv.convnet if isinstance(layer, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding) for c in layers] == [
        (9, 32, (3, 3), (2, 2), (0, 0))] + [(32, 32, (3, 3), (1, 1), (0, 0))] * 3
    assert [type(layer).__name__ for layer in conv.convnet] == ["Conv2d", "ReLU"] * 4
    # DrQ-v2's 32 x 35 x 35 features for 84x84 images, then its trunk, then ALM's encoder MLP.
    assert [type(layer).__name__ for layer in conv.trunk] == ["Linear", "LayerNorm", "Tanh"]
    assert conv.trunk[0].in_features == 32 * 35 * 35 and conv.trunk[0].out_features == 50
    assert [tuple(layer.weight.shape) for layer in pixels.encoder.module[0].module.net[1] if isinstance(
        layer, nn.Linear)] == [(512, 50), (512, 512), (100, 512)]
    for name in ("world_model", "reward_model", "classifier", "actor_network"):
        assert _shapes(getattr(pixels, name)) == _shapes(getattr(states, name)), name
    assert [_shapes(critic) for critic in pixels.qvalue_network] == [_shapes(c) for c in states.qvalue_network]
    assert pixels.encoder.in_keys == ["pixels"] and pixels.encoder.out_keys[-1] == "latent"
    assert pixels.observation_key == "pixels" and states.observation_key == "observation"


def test_drqv2_initialisation_and_pixel_scaling():
    conv = ConvFeatures((3, 16, 16), channels=8, feature_dim=5)
    first = conv.convnet[0].weight.flatten(1)
    gain = nn.init.calculate_gain("relu")
    torch.testing.assert_close(first @ first.T, gain**2 * torch.eye(8), atol=1e-4, rtol=0)
    assert all(torch.count_nonzero(layer.bias) == 0 for layer in conv.modules() if isinstance(layer, nn.Conv2d))
    images = torch.randint(0, 256, (2, 4, 3, 16, 16), dtype=torch.uint8)  # any leading batch dims
    features = conv(images)
    assert features.shape == (2, 4, 5)
    torch.testing.assert_close(conv(images.float() / 255), features)  # floats are taken to be in [0, 1]


def test_alm_loss_trains_a_pixel_encoder_in_one_update():
    modules = pixel_modules()
    loss = pixel_loss(modules)
    conv_params = {name for name, _ in loss.named_parameters() if "convnet" in name or "trunk" in name}
    assert conv_params and conv_params <= set(loss.trained_parameters("loss_model"))
    update = make_update(loss, make_optimizer(loss, lr=1e-3), make_target_updater(loss, tau=0.005))
    before = {name: param.detach().clone() for name, param in loss.named_parameters()}
    target_before = loss.target_encoder_params.clone()
    metrics = update(pixel_batch())
    assert all(torch.isfinite(metrics[key]) for key in metrics.keys() if key.startswith("loss_"))
    for name, param in loss.named_parameters():
        assert not torch.equal(param, before[name]), f"{name} did not train"
    moved = (loss.target_encoder_params - target_before).abs()
    assert any(value.sum() > 0 for value in moved.values(True, True))


def test_loss_reads_image_observations_under_any_key_the_same_way():
    batch = pixel_batch()
    flat, nested = pixel_loss(pixel_modules()), pixel_loss(pixel_modules(key=("agent", "pixels")))
    nested_batch = TensorDict({
        "agent": {"pixels": batch["pixels"]}, "action": batch["action"],
        "next": {"agent": {"pixels": batch["next", "pixels"]},
                 **{key: batch["next", key] for key in ("reward", "terminated", "done")}},
    }, batch_size=batch.batch_size)
    assert ("next", "agent", "pixels") in nested.in_keys
    for loss in (flat, nested):
        make_target_updater(loss, tau=0.005)
    torch.manual_seed(3)
    expected = flat(batch)
    torch.manual_seed(3)
    out = nested(nested_batch)
    for key in ("loss_model", "loss_reward", "loss_classifier", "loss_qvalue", "loss_actor", "kl"):
        torch.testing.assert_close(out[key], expected[key], msg=key)
    # The K-step lower bound takes images with any batch dims.
    assert flat.lower_bound(batch["pixels"][:, 0]).shape == (6,)
    assert flat.lower_bound(batch["pixels"]).shape == (6, 3)


def test_pixel_agent_collects_and_trains_from_the_frame_buffer():
    # The whole pixel pipeline at toy size: CatFrames env -> behaviour policy -> frame buffer -> random shift ->
    # ALMLoss. Frames of the toy env are 3 x 16 x 16 RGB, stacked 3 deep.
    env = make_pixel_env(max_steps=30, terminate_prob=0.02, frame_shape=(3, 16, 16))
    torch.manual_seed(0)
    modules = make_alm_modules(env.observation_spec_unbatched, env.action_spec_unbatched, observation_key="pixels",
                               **SIZES, **CONV)
    loss = pixel_loss(modules)
    update = make_update(loss, make_optimizer(loss, lr=1e-3), make_target_updater(loss, tau=0.005))
    buffer = make_replay_buffer(size=500, batch_size=8, slice_len=3, pixels_key="pixels")
    buffer.append_transform(RandomShift(pad=2, generator=torch.Generator().manual_seed(0)))
    collector = Collector(env, modules.policy, frames_per_batch=20, total_frames=200, init_random_frames=60)
    for data in collector:
        buffer.extend(data.select(*loss.in_keys, TRAJ_KEY))
        if len(buffer) >= 60:
            metrics = update(sample_slices(buffer, batch_size=8, slice_len=3))
    collector.shutdown()
    assert buffer.storage.frames_written < 2 * len(buffer)
    assert all(torch.isfinite(metrics[key]) for key in metrics.keys())


def test_readme_pixel_example_builds_what_it_says():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    marker = "<!-- the pixel example: tests/test_pixel_encoder.py runs this block -->"
    (block,) = re.findall(re.escape(marker) + r"\n```python\n(.*?)```", readme, flags=re.S)
    namespace: dict = {}
    exec(block, namespace)
    loss, buffer = namespace["loss"], namespace["replay_buffer"]
    assert isinstance(namespace["agent"].encoder.module[0].module.net[0], ConvFeatures)
    assert ("next", "pixels") in loss.in_keys and buffer.storage.pixels_key == "pixels"
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2, 4, 9, 84, 84), generator=generator, dtype=torch.uint8)
    flags = torch.zeros(2, 3, 1, dtype=torch.bool)
    batch = TensorDict({"pixels": images[:, :-1], "action": torch.zeros(2, 3, 6),
                        "next": {"pixels": images[:, 1:], "reward": torch.ones(2, 3, 1), "done": flags,
                                 "terminated": flags.clone()}}, batch_size=[2, 3])
    make_target_updater(loss, tau=0.005)
    losses = loss(buffer.transform[-1](batch))  # the random shift, then the loss
    assert all(torch.isfinite(losses[key]) for key in losses.keys() if key.startswith("loss_"))


def test_recipe_factories_build_the_pixel_learner_from_the_env():
    from recipes.alm.utils import ConfigError, load_config, make_learner

    env = make_pixel_env(frame_shape=(3, 16, 16))
    cfg = load_config("compile.compile=false", "network.latent_dim=4", "network.hidden_dim=16",
                      "network.model_hidden_dim=16", "network.conv_channels=4", "network.conv_feature_dim=6")
    learner = make_learner(cfg, env, torch.device("cpu"))
    conv = learner.agent.encoder.module[0].module.net[0]
    assert isinstance(conv, ConvFeatures) and conv.convnet[0].out_channels == 4 and conv.trunk[0].out_features == 6
    assert learner.agent.encoder.in_keys == ["pixels"] and learner.loss.tensor_keys.observation == "pixels"
    rollout = env.rollout(8, learner.agent.policy)
    assert rollout["action"].shape == (8, 2)
    with pytest.raises(ConfigError, match="network.conv_channels must be a positive integer"):
        make_learner(load_config("network.conv_channels=0"), env, torch.device("cpu"))


def test_bad_image_specs_are_refused():
    with pytest.raises(ValueError, match="at least 15x15"):
        make_alm_modules(pixel_spec((3, 14, 30)), action_spec(), observation_key="pixels")
    with pytest.raises(ValueError, match="encoder_type 'identity' needs a flat observation"):
        make_alm_modules(pixel_spec(), action_spec(), observation_key="pixels", encoder_type="identity")
    with pytest.raises(ValueError, match="conv_channels must be a positive integer"):
        make_alm_modules(pixel_spec(), action_spec(), observation_key="pixels", conv_channels=0)
