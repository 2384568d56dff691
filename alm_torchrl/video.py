"""Evaluation videos: TorchRL's ``VideoRecorder`` on an env that renders, and a CSV logger that writes them as mp4.

:func:`make_video_env` builds one copy of the task that renders every step (``make_env(image_size=...)``) with a
``VideoRecorder`` writing to a TorchRL logger; run an episode in it (``evaluate(video_env, policy, 1, ...)``) and
``video_env.transform.dump(step=...)`` logs it. Only this env renders: the evaluation copies do not.

TorchRL's ``CSVLogger`` writes mp4 files with torchcodec, which cannot work on a CPU-only PyTorch from PyPI: the PyPI
wheels of torchcodec are CUDA builds from 0.14 on, and every version needs FFmpeg's shared libraries from the system.
:class:`MP4CSVLogger` keeps TorchRL's writer where it works and otherwise writes the same file with PyAV, whose wheels
bundle FFmpeg (the ``video`` extra). TensorBoard and W&B encode videos themselves (with moviepy).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch
from torchrl.envs import TransformedEnv
from torchrl.record import VideoRecorder
from torchrl.record.loggers import CSVLogger, Logger

from alm_torchrl.envs import make_env

__all__ = ["DEFAULT_VIDEO_SIZE", "MP4CSVLogger", "make_video_env", "torchcodec_can_encode", "write_mp4"]

DEFAULT_VIDEO_SIZE = (256, 256)
"""``(height, width)`` of the recorded frames."""


@functools.cache
def torchcodec_can_encode() -> bool:
    """Whether TorchRL's mp4 writer (torchcodec's ``VideoEncoder``) can be imported with this PyTorch."""
    try:
        from torchcodec.encoders import VideoEncoder  # noqa: F401
    except Exception:  # not installed, or a build that cannot load here (CUDA wheel, no FFmpeg libraries)
        return False
    return True


def write_mp4(path: str | os.PathLike, frames: torch.Tensor, fps: float = 30) -> None:
    """Write ``frames`` (uint8, ``[T, H, W, 3]``) as an H.264 mp4 file with PyAV (FFmpeg bundled in its wheel).

    An odd height or width loses its last row or column (H.264's 4:2:0 chroma needs even sizes).
    """
    import av

    frames = frames[:, : frames.shape[1] // 2 * 2, : frames.shape[2] // 2 * 2].contiguous().numpy()
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("h264", rate=round(fps))
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())  # flush the encoder


class MP4CSVLogger(CSVLogger):
    """TorchRL's ``CSVLogger`` with mp4 videos (``<log_dir>/<exp_name>/videos/<name>_<step>.mp4``) on any machine.

    Videos go through TorchRL's own writer when torchcodec can encode here, else through :func:`write_mp4` (PyAV) to
    the same file name.
    """

    def __init__(self, exp_name: str, log_dir: str | None = None, video_fps: int = 30) -> None:
        super().__init__(exp_name, log_dir=log_dir, video_format="mp4", video_fps=video_fps)

    def log_video(self, name: str, video: torch.Tensor, step: int | None = None, **kwargs) -> None:
        if torchcodec_can_encode():
            return super().log_video(name, video, step=step, **kwargs)
        if video.dim() != 5 or video.size(2) != 3:
            raise ValueError(f"video must be uint8 of shape [N, T, 3, H, W], got {tuple(video.shape)}")
        experiment = self.experiment
        if step is None:  # numbered per tag, as CSVExperiment.add_video does
            step = experiment.videos_counter[name]
            experiment.videos_counter[name] += 1
        path = Path(experiment.log_dir, "videos", f"{name}_{step}.mp4")
        path.parent.mkdir(parents=True, exist_ok=True)
        write_mp4(path, video.flatten(0, 1).permute(0, 2, 3, 1), fps=kwargs.get("fps", self.video_fps))


def make_video_env(
    env_name: str,
    logger: Logger,
    *,
    seed: int | None = None,
    max_episode_steps: int | None = None,
    frame_skip: int = 1,
    image_size: tuple[int, int] = DEFAULT_VIDEO_SIZE,
    fast_render: bool = False,
    scale_actions: bool = False,
    tag: str = "eval/video",
) -> TransformedEnv:
    """One copy of ``env_name`` rendering ``image_size`` frames, recorded by a ``VideoRecorder`` into ``logger``.

    Every step of an episode is recorded (the reset frame too: ``T + 1`` frames for ``T`` steps); the recorder keeps
    them in memory until ``env.transform.dump(step=...)`` hands the video to ``logger`` under ``tag``.
    ``fast_render`` drops shadows, reflections and multisampling, ``scale_actions`` rescales the actions to
    ``[-1, 1]`` (:func:`alm_torchrl.envs.make_env`).
    """
    env = make_env(env_name, seed=seed, max_episode_steps=max_episode_steps, frame_skip=frame_skip,
                   image_size=image_size, fast_render=fast_render, scale_actions=scale_actions)
    return env.append_transform(VideoRecorder(logger, tag, in_keys=["pixels"], skip=1))
