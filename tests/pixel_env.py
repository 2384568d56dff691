"""A toy pixel environment for the pixel tests: random uint8 frames that say which episode and step they belong to."""
from __future__ import annotations

import torch
from tensordict import TensorDict
from torchrl.data import Bounded, Composite, Unbounded
from torchrl.envs import CatFrames, Compose, EnvBase, InitTracker, StepCounter, TransformedEnv

FRAME_SHAPE = (3, 12, 12)


class MarkedFramesEnv(EnvBase):
    """Each frame is random noise except two pixels: the episode number and the step, modulo 256.

    Episodes end by a termination (probability ``terminate_prob`` per step) or, with :func:`make_pixel_env`, a
    time-limit truncation. Actions are 2-d in [-1, 1]; the reward is their sum.
    """

    def __init__(self, frame_shape: tuple[int, int, int] = FRAME_SHAPE, terminate_prob: float = 0.1, seed: int = 0):
        super().__init__(batch_size=[])
        self.observation_spec = Composite(pixels=Bounded(0, 255, shape=frame_shape, dtype=torch.uint8))
        self.action_spec = Bounded(-1.0, 1.0, shape=(2,))
        self.reward_spec = Unbounded(shape=(1,))
        self.frame_shape, self.terminate_prob = frame_shape, terminate_prob
        self.rng = torch.Generator().manual_seed(seed)
        self.episode, self.step_index = -1, 0

    def _frame(self) -> torch.Tensor:
        frame = torch.randint(0, 256, self.frame_shape, generator=self.rng, dtype=torch.uint8)
        frame[0, 0, 0], frame[0, 0, 1] = self.episode % 256, self.step_index % 256
        return frame

    def _reset(self, tensordict):
        self.episode, self.step_index = self.episode + 1, 0
        flag = torch.zeros(1, dtype=torch.bool)
        return TensorDict({"pixels": self._frame(), "done": flag, "terminated": flag.clone()}, [])

    def _step(self, tensordict):
        self.step_index += 1
        terminated = torch.rand((1,), generator=self.rng) < self.terminate_prob
        reward = tensordict["action"].sum(-1, keepdim=True)
        return TensorDict(
            {"pixels": self._frame(), "reward": reward, "done": terminated, "terminated": terminated.clone()}, []
        )

    def _set_seed(self, seed: int | None):
        if seed is not None:
            self.rng.manual_seed(seed)


def make_pixel_env(
    num_frames: int = 3, max_steps: int = 20, terminate_prob: float = 0.1, seed: int = 0, **kwargs
) -> TransformedEnv:
    """:class:`MarkedFramesEnv` with a time limit and ``num_frames`` stacked frames (CatFrames, padding "same"), and
    ``InitTracker`` as ``alm_torchrl.envs.make_env`` adds it (TorchRL's Collector wants it for a module policy)."""
    return TransformedEnv(
        MarkedFramesEnv(terminate_prob=terminate_prob, seed=seed, **kwargs),
        Compose(InitTracker(), StepCounter(max_steps=max_steps), CatFrames(N=num_frames, dim=-3, in_keys=["pixels"])),
    )


def episode_and_step(stacks: torch.Tensor, num_frames: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """The marks of each frame of ``[*B, F * C, H, W]`` stacks: episode and step numbers, each ``[*B, F]``."""
    frames = stacks.unflatten(-3, (num_frames, -1))
    return frames[..., 0, 0, 0], frames[..., 0, 0, 1]
