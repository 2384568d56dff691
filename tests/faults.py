"""Run the recipe (``recipes/alm/alm.py``) with faults injected where real ones strike, for the reliability tests.

    python tests/faults.py <fault>=<n> [<fault>=<n> ...] -- <recipe overrides>

Faults (``n`` counts from 1):

- ``sigterm-update=n``: SIGTERM to this process in the middle of update ``n`` (after its gradient pass).
- ``sigterm-eval=n``: SIGTERM in the middle of evaluation ``n`` (after its first episode's rollout).
- ``sigterm-write=n`` / ``sigkill-write=n``: SIGTERM / SIGKILL while checkpoint ``n`` is being written (after the
  replay buffer's files, before the rest).
- ``enospc-write=n``: checkpoint write ``n`` fails with ENOSPC (no space left on device) halfway through.
- ``efbig-write=n``: from checkpoint write ``n`` on, no file may grow past 64 KiB (``RLIMIT_FSIZE``): the replay
  buffer's ``torch.save`` itself fails, with EFBIG, as it would with ENOSPC on a full disk.
- ``sigterm-verify=n``: SIGTERM as checkpoint verification ``n`` starts (start-up's check of the checkpoint to resume).
- ``sigint-twice-write=n``: Ctrl-C twice while checkpoint ``n`` is being written.
- ``nan-reward=n`` / ``nan-observation=n``: the env returns a NaN reward / observation at its step ``n``.
- ``remove-logs=n``: the logger's directory is removed after the env's step ``n``.

Each fault patches the real function at the point where the fault would hit; the recipe itself is unchanged.
"""

from __future__ import annotations

import errno
import os
import resource
import runpy
import shutil
import signal
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "alm" / "alm.py"
sys.path[:0] = [str(RECIPE.parent), str(REPO)]

import utils  # noqa: E402  (the recipe's utils.py, as alm.py imports it)

import alm_torchrl.checkpoint  # noqa: E402
import alm_torchrl.envs  # noqa: E402
import alm_torchrl.evaluation  # noqa: E402


def _on_call(owner, name: str, n: int, fault, *, before: bool = False) -> None:
    """Run ``fault()`` during the ``n``-th call of ``owner.name`` (after the original, or before it)."""
    original = getattr(owner, name)
    calls = [0]

    def patched(*args, **kwargs):
        calls[0] += 1
        if before and calls[0] == n:
            fault()
        result = original(*args, **kwargs)
        if not before and calls[0] == n:
            fault()
        return result

    setattr(owner, name, patched)


def _signal(signum: int):
    return lambda: os.kill(os.getpid(), signum)


def _twice(fault):
    def both() -> None:
        fault()
        fault()

    return both


def _disk_full() -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _cap_file_sizes() -> None:
    """Writes past 64 KiB of a file fail with EFBIG (SIGXFSZ ignored, or it would kill the process instead)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 2**10, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


def _sigterm_during_verification(n: int) -> None:
    """SIGTERM as ``TrainingCheckpoints.verify`` (a classmethod, patched as one) is called the ``n``-th time."""
    checkpoints = alm_torchrl.checkpoint.TrainingCheckpoints
    verify, calls = checkpoints.verify, [0]

    def patched(cls, *args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            os.kill(os.getpid(), signal.SIGTERM)
        return verify(*args, **kwargs)

    checkpoints.verify = classmethod(patched)


def _sigterm_during_update(n: int) -> None:
    """SIGTERM between the gradient pass and the optimizer step of update ``n``."""
    make_update = utils.make_update

    def patched(loss, optimizer, *args, **kwargs):
        _on_call(optimizer, "step", n, _signal(signal.SIGTERM), before=True)
        return make_update(loss, optimizer, *args, **kwargs)

    utils.make_update = patched


def _sigterm_during_eval(n: int) -> None:
    """SIGTERM after the first rollout of evaluation ``n``, while the evaluation is still running."""
    evaluate = alm_torchrl.evaluation.evaluate
    rollout = alm_torchrl.evaluation.rollout_episodes
    calls = [0]

    def patched_evaluate(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            def rollout_then_signal(*rollout_args, **rollout_kwargs):
                episodes = rollout(*rollout_args, **rollout_kwargs)
                os.kill(os.getpid(), signal.SIGTERM)
                return episodes

            alm_torchrl.evaluation.rollout_episodes = rollout_then_signal
            try:
                return evaluate(*args, **kwargs)
            finally:
                alm_torchrl.evaluation.rollout_episodes = rollout
        return evaluate(*args, **kwargs)

    alm_torchrl.evaluation.evaluate = patched_evaluate


def _during_write(n: int, fault) -> None:
    """``fault()`` after checkpoint write ``n`` has written its replay buffer, before its remaining components."""
    _on_call(alm_torchrl.checkpoint.ReplayBufferAdapter, "save", n, fault)


def _env_step_fault(n: int, key: str) -> None:
    """The train env's step ``n`` returns a NaN under ``("next", key)``."""
    make_environment = utils.make_environment

    def patched(cfg):
        train_env, eval_env = make_environment(cfg)
        original_step, steps = train_env._step, [0]

        def step(tensordict):
            out = original_step(tensordict)
            steps[0] += 1
            if steps[0] == n:
                out[key] = torch.full_like(out[key], float("nan"))
            return out

        train_env._step = step
        return train_env, eval_env

    utils.make_environment = patched


def _remove_logs_after_step(n: int) -> None:
    make_environment = utils.make_environment

    def patched(cfg):
        train_env, eval_env = make_environment(cfg)
        _on_call(train_env, "_step", n, lambda: shutil.rmtree(utils.LOG_DIR))
        return train_env, eval_env

    utils.make_environment = patched


FAULTS = {
    "sigterm-update": _sigterm_during_update,
    "sigterm-eval": _sigterm_during_eval,
    "sigterm-write": lambda n: _during_write(n, _signal(signal.SIGTERM)),
    "sigkill-write": lambda n: _during_write(n, _signal(signal.SIGKILL)),
    "enospc-write": lambda n: _during_write(n, _disk_full),
    "efbig-write": lambda n: _on_call(alm_torchrl.checkpoint.ReplayBufferAdapter, "save", n, _cap_file_sizes,
                                      before=True),
    "sigterm-verify": _sigterm_during_verification,
    "sigint-twice-write": lambda n: _during_write(n, _twice(_signal(signal.SIGINT))),
    "nan-reward": lambda n: _env_step_fault(n, "reward"),
    "nan-observation": lambda n: _env_step_fault(n, "observation"),
    "remove-logs": _remove_logs_after_step,
}


if __name__ == "__main__":
    separator = sys.argv.index("--")
    for fault in sys.argv[1:separator]:
        name, n = fault.split("=")
        FAULTS[name](int(n))
    sys.argv = [str(RECIPE), *sys.argv[separator + 1:]]
    runpy.run_path(str(RECIPE), run_name="__main__")
