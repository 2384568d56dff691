"""ALMLoss against TorchRL's LossModule contract (in the style of torchrl's test/objectives)."""
from __future__ import annotations

import copy

import pytest
import torch
from tensordict import TensorDict
from tensordict.nn import TensorDictModule
from torchrl.objectives import SoftUpdate, ValueEstimators

from alm_torchrl import make_alm_modules
from alm_torchrl.modules import make_encoder, make_qvalue_network
from alm_torchrl.objectives import ALMLoss

from conftest import (
    ACT_DIM,
    HIDDEN_DIM,
    LATENT_DIM,
    LOSS_GROUPS,
    OBS_DIM,
    action_spec,
    slice_batch,
    tiny_loss,
    tiny_modules,
    total_loss,
)

LOSS_KEYS = tuple(LOSS_GROUPS)
DIAGNOSTICS = ("kl", "model_kl_term", "model_reward", "model_value", "model_value_term", "latent_std", "reward_error",
               "classifier_accuracy", "q_mean", "target_q_mean", "imagined_reward", "classifier_reward")


def _with_updater(loss: ALMLoss, tau: float = 0.005) -> SoftUpdate:
    return SoftUpdate(loss, tau=tau)


def _grad_norms(loss: ALMLoss) -> dict[str, float]:
    return {name: (0.0 if p.grad is None else p.grad.abs().sum().item()) for name, p in loss.named_parameters()}


def test_warns_without_target_updater():
    loss = tiny_loss()
    with pytest.warns(UserWarning, match="No target network updater"):
        loss(slice_batch())


def test_outputs_losses_and_detached_diagnostics():
    loss = tiny_loss()
    _with_updater(loss)
    out = loss(slice_batch())
    assert set(out.keys()) == set(LOSS_KEYS) | set(DIAGNOSTICS)
    assert set(out.keys()) == set(loss.out_keys)
    for key in LOSS_KEYS:
        assert out[key].shape == () and out[key].requires_grad and torch.isfinite(out[key])
    for key in DIAGNOSTICS:
        assert out[key].shape == () and not out[key].requires_grad and torch.isfinite(out[key])
    assert 0.0 <= out["classifier_accuracy"] <= 1.0
    assert out["latent_std"] >= 0.1  # the encoder's std is softly clamped above 0.1


def test_input_left_unchanged_but_for_the_priorities():
    loss = tiny_loss()
    _with_updater(loss)
    batch = slice_batch()
    before = batch.clone()
    loss(batch)
    assert set(batch.keys(True, True)) == set(before.keys(True, True)) | {"td_error"}
    assert (batch.exclude("td_error") == before).all()


@pytest.mark.parametrize("num_qvalue_nets", [1, 3])
def test_priorities_are_the_largest_squared_td_error_of_the_first_step_on_every_step_of_the_slice(
    num_qvalue_nets,
):
    loss = tiny_loss(num_qvalue_nets=num_qvalue_nets, reduction="none")
    _with_updater(loss)
    batch = slice_batch()
    out = loss(batch)
    priority = batch["td_error"]
    assert priority.shape == batch.shape and not priority.requires_grad
    assert (priority == priority[:, :1]).all()
    # loss_qvalue is the mean over critics of the same squared errors (Eq. 10); priority is their max.
    if num_qvalue_nets == 1:
        torch.testing.assert_close(priority[:, 0], out["loss_qvalue"])
    else:
        assert (priority[:, 0] >= out["loss_qvalue"] - 1e-6).all()
        assert (priority[:, 0] <= num_qvalue_nets * out["loss_qvalue"] + 1e-6).all()
        assert (priority[:, 0] > out["loss_qvalue"] + 1e-6).any()


def _prioritized_samplers_available() -> bool:
    try:
        from torchrl.data import PrioritizedSliceSampler

        PrioritizedSliceSampler(10, alpha=1.0, beta=1.0, slice_len=2)
    except RuntimeError:  # torchrl's C++ segment trees did not load with this torch build
        return False
    return True


@pytest.mark.skipif(not _prioritized_samplers_available(), reason="torchrl's C++ segment trees are unavailable")
def test_prioritized_slice_sampler_gets_the_priorities():
    from torchrl.data import LazyTensorStorage, PrioritizedSliceSampler, TensorDictReplayBuffer

    loss = tiny_loss()
    _with_updater(loss)
    episodes = 4
    flat = slice_batch(batch_size=episodes, horizon=10, terminal_every=100).reshape(-1)
    flat["episode"] = torch.arange(episodes).repeat_interleave(10)
    buffer = TensorDictReplayBuffer(
        storage=LazyTensorStorage(100),
        sampler=PrioritizedSliceSampler(100, alpha=1.0, beta=1.0, slice_len=3, traj_key="episode"),
        batch_size=8 * 3,
    )
    buffer.extend(flat)
    sample = buffer.sample().reshape(8, 3)
    assert "priority_weight" in sample.keys()
    loss(sample)
    buffer.update_tensordict_priority(sample.reshape(-1))
    stored = buffer.sampler._sum_tree  # what the sampler draws slice starts from
    sampled = sample["index"].reshape(-1)
    torch.testing.assert_close(
        torch.tensor([stored[int(i)] for i in sampled]),
        (sample["td_error"].reshape(-1) + buffer.sampler._eps).pow(1.0),
    )


@pytest.mark.parametrize("loss_key", LOSS_KEYS)
def test_each_loss_reaches_only_its_own_parameters(loss_key):
    loss = tiny_loss()
    _with_updater(loss)
    loss(slice_batch())[loss_key].backward()
    grads = _grad_norms(loss)
    own = {name for name in grads if name.startswith(LOSS_GROUPS[loss_key])}
    assert own, f"no parameters found for {loss_key}"
    leaked = {name for name, g in grads.items() if g > 0 and name not in own}
    assert not leaked, f"{loss_key} leaked gradient into {sorted(leaked)}"
    # Every weight matrix of the group is reached (biases of a last layer can be 0 by chance).
    unreached = {name for name in own if name.endswith("weight") and grads[name] == 0}
    assert not unreached, f"{loss_key} did not reach {sorted(unreached)}"


@pytest.mark.parametrize("method, loss_key", [
    ("model_loss", "loss_model"), ("reward_loss", "loss_reward"), ("classifier_loss", "loss_classifier"),
    ("qvalue_loss", "loss_qvalue"), ("actor_loss", "loss_actor"),
])
def test_public_methods_compute_one_part_each(method, loss_key):
    loss = tiny_loss()
    _with_updater(loss)
    value, metadata = getattr(loss, method)(slice_batch())
    assert value.shape == () and torch.isfinite(value)
    assert all(not v.requires_grad for v in metadata.values())
    value.backward()
    grads = _grad_norms(loss)
    reached = {name for name, g in grads.items() if g > 0}
    assert reached and all(name.startswith(LOSS_GROUPS[loss_key]) for name in reached)


def test_summed_losses_reach_every_parameter_and_no_target():
    loss = tiny_loss()
    _with_updater(loss)
    total_loss(loss(slice_batch())).backward()
    grads = _grad_norms(loss)
    assert all(grads[name] > 0 for name in grads if name.endswith("weight"))
    names = [name for name, _ in loss.named_parameters()]
    assert not any("target" in name for name in names)
    targets = dict(loss.named_buffers())
    target_names = [name for name in targets if name.startswith("target_")]
    assert any(n.startswith("target_encoder_params") for n in target_names)
    assert any(n.startswith("target_qvalue_network_params") for n in target_names)
    assert all(targets[name].grad is None and not targets[name].requires_grad for name in target_names)
    assert len(set(names)) == len(names)


def test_actor_loss_depends_on_world_model_reward_classifier_and_critic():
    batch = slice_batch()
    reference = tiny_loss()
    _with_updater(reference)
    torch.manual_seed(3)
    base = reference.actor_loss(batch)[0].item()
    for params in ("world_model_params", "reward_model_params", "classifier_params", "qvalue_network_params"):
        loss = tiny_loss()
        _with_updater(loss)
        with torch.no_grad():
            getattr(loss, params).apply_(lambda p: p.add_(0.5))
        torch.manual_seed(3)
        assert loss.actor_loss(batch)[0].item() != pytest.approx(base), params


def test_soft_update_moves_encoder_and_critic_targets_by_tau():
    tau = 0.1
    loss = tiny_loss()
    updater = SoftUpdate(loss, tau=tau)
    for name in ("encoder", "qvalue_network"):
        source = getattr(loss, f"{name}_params")
        target = getattr(loss, f"target_{name}_params")
        assert (source.data == target).all()
    old_targets = {
        "encoder": loss.target_encoder_params.clone(),
        "qvalue_network": loss.target_qvalue_network_params.clone(),
    }
    with torch.no_grad():
        loss.encoder_params.apply_(lambda p: p.add_(1.0))
        loss.qvalue_network_params.apply_(lambda p: p.add_(1.0))
    updater.step()
    for name, old in old_targets.items():
        source = getattr(loss, f"{name}_params").data
        new = getattr(loss, f"target_{name}_params")
        expected = old + tau * (source - old)
        for key in new.keys(True, True):
            torch.testing.assert_close(new[key], expected[key])
            assert not torch.equal(new[key], old[key])


def test_set_keys_rejects_unknown_and_resets_defaults():
    loss = tiny_loss()
    with pytest.raises(ValueError, match="not_a_key"):
        loss.set_keys(not_a_key="x")
    default = ALMLoss.default_keys()
    loss.set_keys(observation="obs")
    assert loss.tensor_keys.observation == "obs"
    assert ("next", "obs") in loss.in_keys
    loss.set_keys(observation=None)
    assert loss.tensor_keys.observation == default.observation
    for field in ("observation", "action", "reward", "done", "terminated", "latent", "next_latent",
                  "predicted_reward", "classifier_logits", "state_action_value", "priority_weight"):
        assert getattr(loss.tensor_keys, field) == getattr(default, field)


def test_nested_keys_end_to_end():
    torch.manual_seed(0)
    from torchrl.data import Composite, Unbounded

    observation_key, action_key = ("agent", "observation"), ("agent", "action")
    modules = make_alm_modules(
        Composite(agent=Composite(observation=Unbounded(shape=(OBS_DIM,)))),
        Composite(agent=Composite(action=action_spec())),
        latent_dim=LATENT_DIM, hidden_dim=HIDDEN_DIM, model_hidden_dim=HIDDEN_DIM,
        observation_key=observation_key, action_key=action_key,
    )
    loss = ALMLoss(**modules.loss_kwargs())
    loss.set_keys(observation=observation_key, action=action_key, reward=("agent", "reward"),
                  done=("agent", "done"), terminated=("agent", "terminated"))
    _with_updater(loss)
    flat = slice_batch()
    nested = TensorDict({
        "agent": {"observation": flat["observation"], "action": flat["action"]},
        "next": {"agent": {key: flat["next", key] for key in ("observation", "reward", "done", "terminated")}},
    }, batch_size=flat.batch_size)
    torch.manual_seed(5)
    out = loss(nested)
    assert all(torch.isfinite(out[key]) for key in LOSS_KEYS)
    assert ("next", "agent", "terminated") in loss.in_keys


def test_keyword_call_matches_tensordict_call():
    loss = tiny_loss()
    _with_updater(loss)
    batch = slice_batch()
    torch.manual_seed(7)
    expected = loss(batch)
    loss.select_out_keys("loss_model", "loss_actor")
    torch.manual_seed(7)
    loss_model, loss_actor = loss(
        observation=batch["observation"], action=batch["action"],
        next_observation=batch["next", "observation"], next_reward=batch["next", "reward"],
        next_done=batch["next", "done"], next_terminated=batch["next", "terminated"],
    )
    torch.testing.assert_close(loss_model, expected["loss_model"])
    torch.testing.assert_close(loss_actor, expected["loss_actor"])


@pytest.mark.parametrize("reduction", [None, "none", "mean", "sum"])
def test_reduction(reduction):
    batch_size = 8
    loss = tiny_loss(reduction=reduction)
    _with_updater(loss)
    torch.manual_seed(11)
    out = loss(slice_batch(batch_size))
    for key in LOSS_KEYS:
        assert out[key].shape == ((batch_size,) if reduction == "none" else ())
    if reduction in ("none", "sum"):
        mean_loss = tiny_loss()
        _with_updater(mean_loss)
        torch.manual_seed(11)
        mean_out = mean_loss(slice_batch(batch_size))
        for key in LOSS_KEYS:
            total = out[key].sum() if reduction == "none" else out[key]
            torch.testing.assert_close(total, mean_out[key] * batch_size, rtol=1e-5, atol=1e-5)


def test_bad_reduction_is_one_clear_error():
    with pytest.raises(ValueError, match="reduction must be 'none', 'mean' or 'sum', got 'avg'"):
        tiny_loss(reduction="avg")


def test_vmap_equals_loop():
    batch = slice_batch()
    outputs = []
    for deactivate_vmap in (False, True):
        loss = tiny_loss(num_qvalue_nets=3, deactivate_vmap=deactivate_vmap)
        _with_updater(loss)
        torch.manual_seed(13)
        outputs.append(loss(batch))
    for key in outputs[0].keys():
        torch.testing.assert_close(outputs[0][key], outputs[1][key])


def _same_outputs(first: ALMLoss, second: ALMLoss, batch: TensorDict) -> None:
    torch.manual_seed(17)
    expected = first(batch)
    torch.manual_seed(17)
    got = second(batch)
    for key in expected.keys():
        torch.testing.assert_close(got[key], expected[key])


def test_a_state_dict_loads_into_a_loss_that_has_not_run():
    source = tiny_loss(seed=0)
    _with_updater(source)
    source.make_value_estimator(gamma=0.9)
    source(slice_batch())
    loaded = tiny_loss(seed=1)
    _with_updater(loaded)
    loaded.load_state_dict(source.state_dict())
    assert loaded.value_estimator.gamma.item() == pytest.approx(0.9)
    _same_outputs(source, loaded, slice_batch())


def test_state_dict_round_trip():
    source = tiny_loss(seed=0)
    _with_updater(source)
    with torch.no_grad():  # make targets differ from the online weights
        source.encoder_params.apply_(lambda p: p.mul_(1.1))
        source.qvalue_network_params.apply_(lambda p: p.mul_(0.9))
    source.actor_std = 0.4
    state = source.state_dict()
    assert any(key.startswith("target_encoder_params") for key in state)
    assert any(key.startswith("target_qvalue_network_params") for key in state)
    loaded = tiny_loss(seed=123)
    _with_updater(loaded)
    loaded.load_state_dict(state)
    assert loaded.actor_std == pytest.approx(0.4)
    _same_outputs(source, loaded, slice_batch())


@pytest.mark.parametrize("deactivate_vmap", [False, True], ids=["vmap", "loop"])
def test_networks_called_before_follow_in_place_steps_loaded_states_and_copies(deactivate_vmap):
    """After its first call the loss keeps, for each parameter set, where each tensor goes in its network (a swap of
    table entries per call): those tensors must follow the optimizer's in-place steps, a loaded state, and a deep
    copy's own parameters."""
    called, fresh = tiny_loss(seed=0, deactivate_vmap=deactivate_vmap), tiny_loss(seed=1)
    for loss in (called, fresh):
        _with_updater(loss)
        loss.make_value_estimator()
    batch = slice_batch()
    called(batch)
    called.load_state_dict(fresh.state_dict())
    _same_outputs(fresh, called, batch)
    with torch.no_grad():  # an optimizer step: in place, on the trained parameters and the targets
        for loss in (called, fresh):
            for name, param in loss.state_dict(keep_vars=True).items():
                if "_params." in name:
                    param.add_(0.01 * len(name))
    _same_outputs(fresh, called, batch)
    copied = copy.deepcopy(called)
    with torch.no_grad():
        for loss in (copied, fresh):
            for param in loss.state_dict(keep_vars=True).values():
                if param.is_floating_point():
                    param.mul_(0.9)
    _same_outputs(fresh, copied, batch)


def test_the_networks_are_the_users_own_with_their_hooks_and_modes_after_the_first_call(monkeypatch):
    """The loss calls the modules it was given, holding their own parameters again after each call (compiled or not):
    a hook registered or a training mode set after the first call takes effect, as in TorchRL's losses."""
    loss = tiny_loss(seed=0)
    _with_updater(loss)
    layer = next(module for module in loss.reward_model.modules() if isinstance(module, torch.nn.Linear))
    own = {name: list(network.parameters()) for name, network in _networks(loss).items()}
    batch = slice_batch()
    loss(batch)
    modes = []
    layer.register_forward_hook(lambda module, args, output: modes.append(module.training))
    loss(batch)
    assert modes == [True] * 3  # the model loss's frozen reward, the reward loss, the imagined rewards
    loss.reward_model.eval()
    loss(batch)
    assert modes[3:] == [False] * 3
    # Under torch.compile and before any eager call, the parameters go in through TorchRL's to_module, also undone.
    fresh = tiny_loss(seed=1)
    _with_updater(fresh)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    fresh(batch)
    loss(batch)
    for checked in (fresh, loss):
        for name, network in _networks(checked).items():
            params = list(network.parameters())
            assert params and all(isinstance(param, torch.nn.Parameter) for param in params), name
    assert all(a is b for name, network in _networks(loss).items() for a, b in zip(network.parameters(), own[name]))


def _networks(loss: ALMLoss) -> dict[str, torch.nn.Module]:
    return {name: getattr(loss, name) for names in loss.LOSS_NETWORKS.values() for name in names}


def test_pickled_and_deep_copied_losses_call_their_own_critics():
    import pickle

    loss = tiny_loss(seed=0)
    _with_updater(loss)
    batch = slice_batch()
    loss(batch)
    for copied in (pickle.loads(pickle.dumps(loss)), copy.deepcopy(loss)):
        _same_outputs(loss, copied, batch)
        calls = []
        loss.qvalue_network.register_forward_hook(lambda module, args, output: calls.append(1))
        copied(batch)
        assert not calls  # the copy's vmapped critics are its own module, not the original's


def test_cast_after_a_call_with_a_list_of_critics():
    """A list of critics makes locked parameters, whose detach() tensordict memoises: the detached critics the loss
    uses must follow .double() after a first call."""
    loss = tiny_loss(seed=0)
    _with_updater(loss)
    loss(slice_batch())
    loss = loss.double()
    batch = slice_batch().apply(lambda tensor: tensor.double() if tensor.is_floating_point() else tensor)
    out = loss(batch)
    assert all(value.dtype == torch.float64 for value in out.values())


def test_an_estimator_instance_reads_the_losss_keys():
    from torchrl.objectives.value import TD0Estimator

    loss, reference = tiny_loss(seed=0), tiny_loss(seed=0)
    for each in (loss, reference):
        _with_updater(each)
    loss.make_value_estimator(TD0Estimator(gamma=0.9, value_network=None))
    reference.make_value_estimator(gamma=0.9)
    batch = slice_batch()
    torch.manual_seed(0)
    expected = reference(batch)["loss_qvalue"]
    torch.manual_seed(0)
    assert torch.equal(loss(batch)["loss_qvalue"], expected)


def test_numbers_may_be_numpy_scalars_or_one_element_tensors_and_nothing_else():
    import numpy as np

    kwargs = tiny_modules().loss_kwargs()
    loss = ALMLoss(**kwargs, lmbda=np.float32(0.9), actor_std=torch.tensor(0.5), noise_clip=None)
    assert loss.lmbda == pytest.approx(0.9) and loss.actor_std == pytest.approx(0.5) and loss.noise_clip is None
    with pytest.raises(ValueError, match=r"lmbda must be a number in \[0, 1\].*got tensor"):
        ALMLoss(**kwargs, lmbda=torch.tensor([0.1, 0.2]))
    critic = kwargs.pop("qvalue_network")[0]
    for bad in ("2", 2.5, True, 0):
        with pytest.raises(ValueError, match=f"num_qvalue_nets must be an integer >= 1, got {bad!r}"):
            ALMLoss(**kwargs, qvalue_network=critic, num_qvalue_nets=bad)


def test_a_reward_without_its_trailing_dim_is_one_clear_error():
    batch = slice_batch()
    batch.set(("next", "reward"), batch.get(("next", "reward")).squeeze(-1))
    with pytest.raises(ValueError, match=r"expects \('next', 'reward'\) of shape \[B, K, 1\]"):
        tiny_loss().reward_loss(batch)


@pytest.mark.parametrize("horizon", [1, 3, 5])
@pytest.mark.parametrize("num_qvalue_nets", [1, 2, 3])
def test_horizons_and_critic_counts(horizon, num_qvalue_nets):
    loss = tiny_loss(num_qvalue_nets=num_qvalue_nets)
    _with_updater(loss)
    assert loss.num_qvalue_nets == num_qvalue_nets
    assert loss.qvalue_network_params["module", "net", "0", "weight"].shape[0] == num_qvalue_nets
    out = loss(slice_batch(horizon=horizon))
    assert all(torch.isfinite(out[key]) for key in LOSS_KEYS)
    total_loss(out).backward()


def test_single_critic_module_is_expanded():
    torch.manual_seed(0)
    modules = tiny_modules()
    kwargs = modules.loss_kwargs()
    kwargs["qvalue_network"] = kwargs["qvalue_network"][0]
    loss = ALMLoss(**kwargs, num_qvalue_nets=3)
    assert loss.qvalue_network_params["module", "net", "0", "weight"].shape[0] == 3


def test_a_list_of_one_critic_is_trained():
    loss = tiny_loss(num_qvalue_nets=1)  # make_alm_modules gives a list of one critic
    _with_updater(loss)
    critic = {name: p for name, p in loss.named_parameters() if name.startswith("qvalue_network_params.")}
    assert critic and all(p.shape[0] == 1 for p in critic.values())
    before = {name: p.detach().clone() for name, p in critic.items()}
    optimizer = torch.optim.Adam(loss.parameters(), lr=1e-2)
    loss(slice_batch())["loss_qvalue"].backward()
    optimizer.step()
    assert all(not torch.equal(before[name], p) for name, p in critic.items() if name.endswith("weight"))


def test_value_estimator_gamma_and_unsupported_estimators():
    loss = tiny_loss()
    loss.make_value_estimator(gamma=0.9)
    assert loss.value_estimator.gamma.item() == pytest.approx(0.9)
    for value_type in (ValueEstimators.TD1, ValueEstimators.TDLambda, ValueEstimators.GAE):
        with pytest.raises(NotImplementedError):
            loss.make_value_estimator(value_type)
    with pytest.raises(TypeError):
        tiny_loss(gamma=0.9)


def test_schedulable_actor_std_and_noise_clip():
    loss = tiny_loss()
    buffer = loss.actor_std
    loss.actor_std = 0.25
    assert loss.actor_std is buffer and loss.actor_std.item() == pytest.approx(0.25)
    # With std 0 the sampled action is the actor's mean; with a clip it stays within it.
    latent = torch.randn(64, LATENT_DIM)
    loss.actor_std = 0.0
    mean = loss.sample_action(latent)
    loss.actor_std = 100.0
    noisy = loss.sample_action(latent)
    assert ((noisy - mean).abs() <= 0.3 + 1e-5).all()
    assert (noisy.abs() < 1.0).all()  # clamped inside [low + 1e-6, high - 1e-6]


def test_straight_through_clamp_keeps_gradient():
    loss = tiny_loss()
    bias = loss.actor_network_params["module", "0", "2", "bias"]
    with torch.no_grad():  # push the mean near 1 so that +0.3 of noise is clamped
        bias.fill_(1.0)
    latent = torch.randn(16, LATENT_DIM)
    loss.actor_std = 100.0  # the noise is then +-0.3 after clipping
    action = loss.sample_action(latent)
    assert (action <= 1.0 - 1e-6 + 1e-7).all()
    action.sum().backward()
    clamped_grad = bias.grad.clone()
    loss.zero_grad()
    loss.actor_std = 0.0
    loss.sample_action(latent).sum().backward()
    # The clamp is invisible to the gradient: it equals the gradient of the unclamped mean.
    torch.testing.assert_close(clamped_grad, bias.grad)


# ----------------------------------------------------------------------------- bad input
def test_batch_without_time_dimension_is_one_clear_error():
    loss = tiny_loss()
    _with_updater(loss)
    with pytest.raises(ValueError, match=r"expects a \[B, K\] batch .* got batch_size=\[8\]"):
        loss(slice_batch()[:, 0])


def test_missing_keys_are_named():
    loss = tiny_loss()
    _with_updater(loss)
    batch = slice_batch().exclude(("next", "terminated"), "action")
    with pytest.raises(KeyError, match=r"missing the entries \['action', \('next', 'terminated'\)\]"):
        loss(batch)


def test_mismatched_latent_sizes_are_one_clear_error():
    torch.manual_seed(0)
    kwargs = tiny_modules().loss_kwargs()
    kwargs["encoder"] = make_encoder(OBS_DIM, latent_dim=LATENT_DIM + 3, hidden_dim=HIDDEN_DIM)
    loss = ALMLoss(**kwargs)
    _with_updater(loss)
    with pytest.raises(ValueError, match=r"encoder's latent \(size 7\) does not fit the world model"):
        loss(slice_batch())


def test_missing_action_bounds_is_one_clear_error():
    kwargs = tiny_modules().loss_kwargs()
    actor = kwargs["actor_network"]
    kwargs["actor_network"] = TensorDictModule(actor.module, in_keys=actor.in_keys, out_keys=actor.out_keys)
    with pytest.raises(ValueError, match="needs the action bounds"):
        ALMLoss(**kwargs)


def test_swapped_encoder_and_three_critics_train():
    """A deeper encoder with another hidden size and three critics drop in without touching the loss."""
    from alm_torchrl.modules import GaussianParamHead, _gaussian_latent_module
    from torch import nn

    torch.manual_seed(0)
    kwargs = tiny_modules().loss_kwargs()
    deeper = nn.Sequential(nn.Linear(OBS_DIM, 24), nn.ELU(), nn.Linear(24, 24), nn.ELU(),
                           nn.Linear(24, 24), nn.ELU(), nn.Linear(24, 2 * LATENT_DIM))
    kwargs["encoder"] = _gaussian_latent_module(deeper, ["observation"], "latent")
    kwargs["qvalue_network"] = [make_qvalue_network(LATENT_DIM, ACT_DIM, 8) for _ in range(3)]
    loss = ALMLoss(**kwargs)
    updater = SoftUpdate(loss, tau=0.005)
    assert isinstance(loss.encoder.module[0].module, GaussianParamHead)
    optimizer = torch.optim.Adam(loss.parameters(), lr=3e-3)
    batch = slice_batch(batch_size=32)
    initial = {name: p.detach().clone() for name, p in loss.named_parameters()}
    first = loss(batch)
    for _ in range(60):
        losses = loss(batch)
        optimizer.zero_grad()
        total_loss(losses).backward()
        optimizer.step()
        updater.step()
    last = loss(batch)
    assert last["loss_reward"] < first["loss_reward"]
    assert last["loss_qvalue"] < first["loss_qvalue"]
    assert all(not torch.equal(initial[name], p) for name, p in loss.named_parameters())


def test_reset_parameters_recursive():
    loss = tiny_loss()
    before = {name: p.detach().clone() for name, p in loss.named_parameters()}
    target_before = loss.target_encoder_params.clone()
    loss.reset_parameters_recursive()
    # LayerNorm weights reset to ones, which they already are; every other weight is re-drawn.
    redrawn = [name for name, p in before.items() if name.endswith("weight") and not (p == 1).all()]
    assert redrawn and all(not torch.equal(before[name], dict(loss.named_parameters())[name]) for name in redrawn)
    assert not (loss.target_encoder_params == target_before).all()


if __name__ == "__main__":
    pytest.main([__file__, "-q"])
