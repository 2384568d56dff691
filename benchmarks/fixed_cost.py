"""The fixed cost of an update, ours against the original, timed side by side in one process.

On a shared VM the speed of the whole machine drifts by up to 2x from one minute (and one process) to the next, so
medians taken in separate processes, even interleaved, compare moments as much as code. Here the original's agent and
our learners live in one process and take turns, in an order that rotates from block to block. A turn is what the
recipe does after each collected batch: ``updates_per_batch`` updates (10 with the recipe's defaults), their batches
drawn at once (``recipes.alm.utils.sample_batches``); the original's turn is as many of its ``agent.update(step)``
(which samples its batches inside). Each block gives one ratio per variant (the original's time over the variant's,
in the same few seconds), and the reported ``speedup_median`` is the median of those ratios. Both run on the same
torch runtime: the thread count of ``--threads`` (1 by default) and the recipe's allocator tuning
(``configure_runtime``), which is ours, not the original's: at the paper's sizes it makes the original 6-11% faster on
the Intel VM (``benchmarks/README.md``), so this protocol compares against the original so tuned. The sizes are the
tiny ones of ``update_speed.py --tiny`` (latent 8, hidden 32, model hidden 32, batch 16), where the arithmetic takes
microseconds and what is timed is Python, tensor-library and dispatch overhead; ``--paper-sizes`` times the paper's
instead.

Ours is built by the recipe's factories with its config (``recipes/alm/config.yaml``), as ``update_speed.py`` builds
it: ``eager`` is ``compile.compile=false``, ``compiled`` is ``compile.compile=true``. Only one compiled learner can be
timed per process (a second would share the first's compiled frames and pay for checking both's guards).

One JSON line on stdout. About 3 minutes on a 2-core CPU, most of it compiling (``--variants original eager`` skips
that). Example::

    python benchmarks/fixed_cost.py --reference-dir /path/to/alm   # a checkout of github.com/RajGhugare19/alm
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is not a package
from reference_update_speed import build_original_agent  # noqa: E402
from update_speed import TINY_OVERRIDES, cpu_model, torchrl_logs_to_stderr  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for recipes.alm.utils
from alm_torchrl.replay import TRAJ_KEY  # noqa: E402
from recipes.alm.utils import (  # noqa: E402
    ConfigError,
    configure_runtime,
    load_config,
    make_collector,
    make_environment,
    make_learner,
    make_replay_buffer,
    sample_batches,
    updates_per_batch,
    validate_config,
)

VARIANTS = ("original", "eager", "compiled")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference-dir", required=True, type=Path,
                        help="a checkout of https://github.com/RajGhugare19/alm")
    parser.add_argument("--env", default="HalfCheetah-v5", help="a gymnasium MuJoCo id")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                        help="what to time; the original is always one of them, the reference of every ratio")
    parser.add_argument("--blocks", type=int, default=30, help="turns each variant takes")
    parser.add_argument("--warmup-updates", type=int, default=20,
                        help="untimed updates of each variant first (compilation included)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads, for every variant")
    parser.add_argument("--paper-sizes", action="store_true", help="the paper's sizes instead of the tiny ones")
    parser.add_argument("--explore-steps", type=int, default=5_000,
                        help="random-action steps in the original's replay memory (its explore_steps)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("overrides", nargs="*",
                        help="recipe config overrides for ours, e.g. collector.init_random_frames=1000 "
                             "(compile.compile and compile.num_threads are the variant's and --threads')")
    args = parser.parse_args(argv)
    for name, least in (("blocks", 2), ("warmup_updates", 1), ("threads", 1),
                        ("explore_steps", 4)):
        if getattr(args, name) < least:
            parser.error(f"--{name.replace('_', '-')} must be >= {least}, got {getattr(args, name)}")
    if "original" not in args.variants or len(set(args.variants)) < 2:
        parser.error(f"--variants must name the original and at least one of ours, got {' '.join(args.variants)}")
    if not (args.reference_dir / "agents" / "alm.py").is_file():
        parser.error(f"--reference-dir {args.reference_dir}: no agents/alm.py there; "
                     "expected a checkout of https://github.com/RajGhugare19/alm")
    return args


def recipe_config(args: argparse.Namespace, compile: bool):
    return load_config(
        f"env.name={args.env}",
        f"env.seed={args.seed}",
        "collector.device=cpu",
        *(() if args.paper_sizes else TINY_OVERRIDES),
        *args.overrides,
        f"compile.compile={str(compile).lower()}",
        f"compile.num_threads={args.threads}",
    )


def our_turns(configs: dict[str, DictConfig], seed: int) -> dict[str, Callable[[], int]]:
    """A turn of each of our variants: the updates the recipe makes after a collected batch, on batches drawn as it
    draws them, all from one buffer filled by the recipe's random warm-up. Each returns its number of updates."""
    any_config = next(iter(configs.values()))
    configure_runtime(any_config)
    torch.manual_seed(seed)
    env, eval_env = make_environment(any_config)
    eval_env.close()
    learners = {variant: make_learner(cfg, env, torch.device("cpu")) for variant, cfg in configs.items()}
    some_learner = next(iter(learners.values()))
    replay_buffer = make_replay_buffer(any_config, torch.device("cpu"))
    keys = [*some_learner.loss.in_keys, TRAJ_KEY]
    collector = make_collector(any_config, env, some_learner.agent.policy, torch.device("cpu"))
    collected = 0
    for data in collector:  # the warm-up frames are random actions, whichever policy the collector holds
        replay_buffer.extend(data.reshape(-1).select(*keys))
        collected += data.numel()
        if collected >= any_config.collector.init_random_frames:
            break
    collector.shutdown()

    def turn_of(update: Callable) -> Callable[[], int]:
        def turn() -> int:
            batches = sample_batches(any_config, replay_buffer)
            for batch in batches:
                update(batch)
            return len(batches)

        return turn

    return {variant: turn_of(learner.update) for variant, learner in learners.items()}


def original_turn(args: argparse.Namespace, updates_per_turn: int) -> Callable[[], int]:
    agent = build_original_agent(
        args.reference_dir, args.env, tiny=not args.paper_sizes, explore_steps=args.explore_steps, seed=args.seed
    )
    step = 0

    def turn() -> int:
        nonlocal step
        for _ in range(updates_per_turn):
            step += 1
            agent.update(step)
        return updates_per_turn

    return turn


def side_by_side(turns: dict[str, Callable[[], int]], blocks: int) -> dict[str, list[float]]:
    """Seconds per update of each variant, one figure per block; the variants take turns in a rotating order."""
    names = list(turns)
    per_block: dict[str, list[float]] = {name: [] for name in names}
    for block in range(blocks):
        for name in names[block % len(names):] + names[: block % len(names)]:
            start = time.perf_counter()
            updates = turns[name]()
            per_block[name].append((time.perf_counter() - start) / updates)
    return per_block


def summarise(per_block: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """Per variant: the median time per update, and the block-by-block speedup over the original (median, min, max)."""
    summary = {}
    for name, seconds in per_block.items():
        speedups = [original / ours for original, ours in zip(per_block["original"], seconds)]
        summary[name] = {
            "ms_per_update_median": 1000 * statistics.median(seconds),
            "ms_per_update_min": 1000 * min(seconds),
            "speedup_median": statistics.median(speedups),
            "speedup_min": min(speedups),
            "speedup_max": max(speedups),
        }
    return summary


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torchrl_logs_to_stderr()
    ours = [variant for variant in VARIANTS if variant in args.variants and variant != "original"]
    try:  # ours first: a bad override is one line before the original's warm-up
        configs = {variant: recipe_config(args, compile=variant == "compiled") for variant in ours}
        for cfg in configs.values():
            validate_config(cfg)
        our_variants = our_turns(configs, args.seed)
    except ConfigError as err:
        sys.exit(f"fixed_cost.py: invalid config: {err}")
    updates_per_turn = updates_per_batch(next(iter(configs.values())))
    turns = {"original": original_turn(args, updates_per_turn), **our_variants}
    warmup_s = {}
    for name, turn in turns.items():
        start, updates = time.perf_counter(), 0
        while updates < args.warmup_updates:
            updates += turn()
        warmup_s[name] = time.perf_counter() - start
    per_block = side_by_side(turns, args.blocks)
    result = {
        "measurement": "fixed_cost_side_by_side" if not args.paper_sizes else "paper_sizes_side_by_side",
        "env": args.env,
        "sizes": "paper" if args.paper_sizes else "tiny",
        "threads": torch.get_num_threads(),
        "blocks": args.blocks,
        "updates_per_turn": updates_per_turn,
        "torch": torch.__version__,
        "cpu": cpu_model(),
        "variants": summarise(per_block),
        "warmup_s": warmup_s,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
