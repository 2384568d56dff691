"""The speed benchmarks run end to end and report what the speed issue asks for (tiny sizes, seconds)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY_RECIPE

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import fixed_cost  # noqa: E402
import pixel_update  # noqa: E402
import reference_update_speed  # noqa: E402
import replay_sampling  # noqa: E402
import update_speed  # noqa: E402


def test_update_speed_reports_the_required_fields(capsys):
    result = update_speed.main([
        "--updates", "3", "--warmup-updates", "1", "--collector-frames", "10", "--loop-frames", "10",
        "--batch-size", "8", "--count-flops", *TINY_RECIPE,
    ])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == result
    for key in ("updates_per_s", "ms_per_update_median", "device", "env", "torch", "threads", "compile",
                "cudagraphs", "collector_random_frames_per_s", "collector_policy_frames_per_s",
                "loop_frames_per_s", "bytes_per_transition", "updates_per_s_back_to_back", "eval_s",
                "end_to_end_frames_per_s", "warmup_updates_s"):
        assert key in result, key
    assert result["env"] == "HalfCheetah-v5" and result["device"] == "cpu"
    assert result["compile"] is False and result["cudagraphs"] is False
    assert result["ms_per_update_median"] > 0
    assert result["updates_per_s"] == pytest.approx(1000 / result["ms_per_update_median"])
    assert result["updates_per_s_back_to_back"] > 0
    assert result["check_every"] == 10  # the recipe's: one host check per collected batch of 10 updates
    # HalfCheetah never terminates: the evaluation episode runs to TINY_RECIPE's 50-step limit.
    assert (result["eval_episodes"], result["eval_episode_length_mean"]) == (1, 50)
    # The loop's time per frame plus one evaluation every logger.eval_iter (the recipe's 5000) frames.
    assert 1 / result["end_to_end_frames_per_s"] == pytest.approx(
        1 / result["loop_frames_per_s"] + result["eval_s"] / 5000)
    # Tiny networks (hidden 16, latent 4, batch 8): about 0.6 MFLOP per update, mostly GEMMs.
    assert 1e-4 < result["gflop_per_update"] < 1e-2
    # Its matrix multiplies are most of that work; at the machine's fp32 rate they would take microseconds.
    assert 0.5 * result["gflop_per_update"] < result["matmul_gflop_per_update"] <= result["gflop_per_update"]
    assert 0 < result["matmul_ms_per_update"] < result["profiled_ms_per_update"]
    assert result["matmul_gflop_per_s"] == pytest.approx(
        result["matmul_gflop_per_update"] / result["matmul_ms_per_update"] * 1000)
    assert result["fp32_matmul_gflop_per_s"] > 1
    assert result["matmul_floor_ms_per_update"] == pytest.approx(
        1000 * result["matmul_gflop_per_update"] / result["fp32_matmul_gflop_per_s"])
    # obs and next obs (17 float32 each), action (6), reward; done, terminated (bool); the trajectory id and
    # the "index" entry TorchRL's TensorDictReplayBuffer writes (int64).
    assert result["bytes_per_transition"] == 4 * (17 + 17 + 6 + 1) + 1 + 1 + 8 + 8


def test_update_speed_prints_nothing_but_its_json_line_on_stdout():
    """`update_speed.py > results.jsonl` must give JSON only: TorchRL logs to stdout unless told otherwise."""
    script = Path(update_speed.__file__)
    command = [sys.executable, str(script), "--updates", "2", "--warmup-updates", "1", "--collector-frames", "10",
               "--loop-frames", "0", "--evaluations", "0", "--batch-size", "8", *TINY_RECIPE]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert len(lines) == 1, lines[:-1]
    assert json.loads(lines[0])["env"] == "HalfCheetah-v5"
    assert "[torchrl][INFO]" in result.stderr  # the log lines still reach the terminal


def test_replay_sampling_times_both_modes_on_a_wrapped_buffer(capsys):
    replay_sampling.main(["--sizes", "500", "--episode-steps", "100", "--batch-size", "8", "--writes", "4"])
    (result,) = (json.loads(line) for line in capsys.readouterr().out.strip().splitlines())
    assert result["buffer_size"] == 500 and result["samples_timed_per_mode"] == 40
    assert result["batches_per_draw"] == 10  # the recipe draws the 10 batches of a write at once
    for mode in ("transition", "trajectory"):
        assert 0 < result[f"{mode}_ms_per_sample_p10"] <= result[f"{mode}_ms_per_sample_median"]


# A stand-in checkout of the original code with the imports the harness must satisfy: `wandb`, and
# `utils.env` (which, in the original, imports old gym and mujoco-py).
FAKE_AGENT = '''
import numpy as np
import wandb
import utils


class Memory:
    def __init__(self):
        self.pushed = 0

    def push(self, transition):
        self.pushed += 1

    def sample_seq(self, seq_len, batch_size):
        return np.zeros((seq_len, batch_size, 1))

    def sample(self, batch_size):
        return np.zeros((batch_size, 1))


AGENTS = []


class AlmAgent:
    def __init__(self, device, low, high, num_states, num_actions, **config):
        self.batch_size, self.seq_len = config["batch_size"], config["seq_len"]
        self.env_buffer = Memory()
        self.stds = []
        AGENTS.append(self)

    def update(self, step):
        self.stds.append(utils.linear_schedule(1.0, 0.1, 100_000, step))
'''


def _fake_checkout(root: Path) -> Path:
    (root / "agents").mkdir(parents=True)
    (root / "agents" / "__init__.py").write_text("")
    (root / "agents" / "alm.py").write_text(FAKE_AGENT)
    (root / "utils").mkdir()
    (root / "utils" / "__init__.py").write_text("from .env import linear_schedule, register_mbpo_environments\n")
    (root / "utils" / "env.py").write_text("import gym_that_is_not_installed\n")
    return root


@pytest.fixture
def isolated_imports(monkeypatch):
    """Undo what the harness does to the import system: its sys.path entry and its stand-in modules."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        del sys.modules[name]


def test_reference_harness_times_the_original_update(tmp_path, capsys, isolated_imports):
    checkout = _fake_checkout(tmp_path / "alm")
    result = reference_update_speed.main(
        ["--reference-dir", str(checkout), "--updates", "4", "--warmup-updates", "1", "--explore-steps", "20"]
    )
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
    assert result["implementation"] == "original (RajGhugare19/alm)"
    assert result["batch_size"] == 512 and result["horizon"] == 3
    assert result["updates_timed"] == 4 and result["ms_per_update_median"] > 0
    agent_module = sys.modules["agents.alm"]
    (agent,) = agent_module.AGENTS
    assert agent.env_buffer.pushed == 20  # --explore-steps
    # 1 warm-up and 4 timed updates, steps 1-5, each through the stand-in for the original's
    # linear_schedule (1.0 -> 0.1 over 100k steps).
    assert agent.stds == pytest.approx([1.0 - 0.9 * step / 100_000 for step in range(1, 6)])
    assert agent_module.wandb.__name__ == "wandb"


def test_reference_harness_rejects_a_directory_without_the_original(tmp_path, capsys):
    with pytest.raises(SystemExit):
        reference_update_speed.parse_args(["--reference-dir", str(tmp_path)])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert str(tmp_path) in error and "agents/alm.py" in error


def test_fixed_cost_times_the_original_and_ours_side_by_side(tmp_path, capsys, isolated_imports):
    checkout = _fake_checkout(tmp_path / "alm")
    result = fixed_cost.main([
        "--reference-dir", str(checkout), "--variants", "original", "eager", "--blocks", "3", "--warmup-updates", "1",
        "--explore-steps", "20", *TINY_RECIPE,
    ])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
    assert set(result["variants"]) == {"original", "eager"} and result["threads"] == 1
    assert result["variants"]["original"]["speedup_median"] == 1
    eager = result["variants"]["eager"]
    assert eager["ms_per_update_median"] >= eager["ms_per_update_min"] > 0
    assert eager["speedup_min"] <= eager["speedup_median"] <= eager["speedup_max"]
    (agent,) = sys.modules["agents.alm"].AGENTS
    # A turn is the recipe's updates per collected batch (TINY_RECIPE: 10 frames x utd 1): one turn of warm-up, 3 timed.
    assert result["updates_per_turn"] == 10
    assert agent.env_buffer.pushed == 20 and len(agent.stds) == 10 + 3 * 10


def test_fixed_cost_rotates_the_turns_and_compares_block_by_block():
    calls = []

    def turn_of(name):
        def turn():
            calls.append(name)
            return 2

        return turn

    per_block = fixed_cost.side_by_side({name: turn_of(name) for name in ("original", "eager", "compiled")}, blocks=3)
    assert calls == ["original", "eager", "compiled", "eager", "compiled", "original", "compiled", "original", "eager"]
    assert {name: len(seconds) for name, seconds in per_block.items()} == {"original": 3, "eager": 3, "compiled": 3}
    # Each block's ratio is the original's time over the variant's in that block: a slow moment slows both.
    summary = fixed_cost.summarise({"original": [0.02, 0.04, 0.03], "compiled": [0.005, 0.01, 0.015]})
    assert summary["compiled"]["speedup_median"] == pytest.approx(4)
    assert (summary["compiled"]["speedup_min"], summary["compiled"]["speedup_max"]) == pytest.approx((2, 4))
    assert summary["compiled"]["ms_per_update_median"] == pytest.approx(10)
    assert summary["original"]["speedup_median"] == 1


def test_pixel_update_reports_time_and_memory(capsys):
    result = pixel_update.main([
        "--image-size", "16", "--batch-size", "4", "--buffer-size", "600", "--updates", "2", "--conv-channels", "4",
        "network.latent_dim=4", "network.hidden_dim=16", "network.model_hidden_dim=16",
    ])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
    assert result["image"] == [9, 16, 16] and result["images_per_update"] == 4 * (3 + 2)
    assert result["buffer_transitions"] == 600
    # 500-step episodes: one frame per transition and the first frame of each of the 2 episodes.
    assert result["frames_written"] == 600 + 2
    frame = 3 * 16 * 16
    # The ring (600 + 600 // 8 frames) and 78 bytes of the rest: 6 actions, reward, 2 flags, trajectory id, index, and
    # the 4 frame numbers.
    assert result["bytes_per_transition"] == frame * 675 / 600 + 4 * 6 + 4 + 2 + 8 + 8 + 4 * 8
    assert result["ms_per_update_median"] > 0 and 0 < result["sample_share"] < 1


def test_update_speed_takes_compile_alone_as_true():
    """`--compile --cudagraphs` (the GPU commands of benchmarks/README.md) must parse, not ask for a value."""
    args = update_speed.parse_args(["--device", "cuda", "--compile", "--cudagraphs"])
    assert args.compile == "true" and args.cudagraphs
    assert update_speed.parse_args(["--compile", "false"]).compile == "false"
    assert update_speed.parse_args([]).compile is None  # the recipe's default, auto


@pytest.mark.parametrize(
    "script, argv, message",
    [
        (update_speed, ["--updates", "1"], "--updates must be >= 2, got 1"),
        (reference_update_speed, ["--reference-dir", ".", "--explore-steps", "3"],
         "--explore-steps must be >= 4, got 3"),
        (fixed_cost, ["--reference-dir", ".", "--blocks", "1"], "--blocks must be >= 2, got 1"),
        (fixed_cost, ["--reference-dir", ".", "--variants", "eager"],
         "--variants must name the original and at least one of ours, got eager"),
    ],
)
def test_benchmarks_reject_too_few_updates_or_steps(script, argv, message, capsys):
    with pytest.raises(SystemExit):
        script.parse_args(argv)
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(message)


def test_soak_watches_a_real_recipe_run_and_summarises_growth_after_warm_up(capsys):
    import soak  # noqa: E402

    summary = soak.main(["--updates", "200", "--sample-every", "50", "--warmup-updates", "0", "--warmup-frames", "100",
                         "--interval", "100", "--env", "Pendulum-v1", "env.max_episode_steps=50",
                         "compile.compile=false"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines[-1] == summary and summary["exit_code"] == 0
    samples = lines[:-1]
    # The recipe logs at each episode end (every 50 frames; updates start at frame 100, 10 per batch of 10 frames):
    # 10, 60, 110, 160 updates. soak samples the last log every half second, at least 50 updates after its previous
    # sample, so on a loaded machine it may see a later log first; the run's three qualifying logs bound it.
    updates = [sample["updates"] for sample in samples]
    assert updates and set(updates) <= {60, 110, 160} and all(b - a >= 50 for a, b in zip(updates, updates[1:]))
    for sample in samples:
        assert sample["rss_mb"] > 50 and sample["open_fds"] > 3 and sample["update_ms_mean"] > 0
    for earlier, later in zip(samples, samples[1:]):
        assert later["window_update_ms"] == pytest.approx(
            (later["update_ms_mean"] * later["updates"] - earlier["update_ms_mean"] * earlier["updates"])
            / (later["updates"] - earlier["updates"]))
    assert {"rss_growth", "open_fds_growth", "update_ms_growth", "flat"} <= set(summary)
