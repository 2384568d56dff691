"""Time ALM's full update (five losses, backward, optimizer step, target update) as the recipe builds it.

Builds env, modules, loss, optimizer, update, replay buffer and collector with the recipe's own config
(``recipes/alm/config.yaml``) and factories (``recipes/alm/utils.py``), fills the buffer from the real MuJoCo env
with the recipe's random warm-up, then reports, as one JSON line on stdout:

- the update: ``ms_per_update_median`` (and p10/p90/mean) and ``updates_per_s`` (from the median), each update
  timed on its own, and ``ms_per_sample_median``: a batch's share of the recipe's draw from the replay buffer (the
  batches of a collected batch's updates at once, ``sample_batches``); ``warmup_updates_s``: the untimed warm-up
  updates together, compilation included;
  ``updates_per_s_back_to_back``: sampling and updating ``--updates`` times in a row with one device
  sync at the end, as the recipe runs them (on a GPU the host then queues work ahead of the device);
- the collector alone: ``collector_random_frames_per_s`` (warm-up, random actions) and
  ``collector_policy_frames_per_s`` (the behaviour policy on ``device``);
- the whole recipe loop (collect ``frames_per_batch`` frames, store them, sample and update ``utd_ratio`` times per
  frame): ``loop_frames_per_s``;
- evaluation, as the recipe runs it (``logger.num_eval_episodes`` mean-action episodes side by side): ``eval_s`` for
  one, with ``eval_episode_length_mean``; and the whole recipe with it, ``end_to_end_frames_per_s``: the loop's time
  per frame plus one evaluation every ``logger.eval_iter`` frames;
- with ``--count-flops``: ``gflop_per_update``, the work ``torch.profiler`` counts in one update, and on the CPU how
  long its matrix multiplies take against the machine's fp32 rate (:func:`work_per_call`);
- with ``--profile N``: ``profile``, where the time of N updates goes as Python's profiler sees it (see
  :func:`profile_breakdown`; under the profiler an update takes about twice as long);
- memory: ``bytes_per_transition`` of the replay storage, ``buffer_capacity`` and the process's peak resident set
  ``max_rss_gib`` (with ``--fill-buffer``, after writing the whole buffer).

Examples::

    python benchmarks/update_speed.py                                   # HalfCheetah-v5, the recipe's defaults
    python benchmarks/update_speed.py --tiny --compile false            # the fixed-cost regime, eager
    python benchmarks/update_speed.py --env Humanoid-v5 --fill-buffer   # + a full 1e6-transition buffer
    python benchmarks/update_speed.py --device cuda --compile true --cudagraphs --loop-frames 2000
    python benchmarks/update_speed.py --updates 2 --loop-frames 0 --serial-eval  # evaluation before batching
"""

from __future__ import annotations

import argparse
import cProfile
import itertools
import json
import logging
import platform
import pstats
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tensordict import TensorDict

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for recipes.alm.utils
from alm_torchrl.envs import make_env  # noqa: E402
from alm_torchrl.evaluation import evaluate  # noqa: E402
from alm_torchrl.replay import TRAJ_KEY  # noqa: E402
from alm_torchrl.runtime import configure_cpu_runtime, skip_pandas_lookup_in_tensordict_from_any  # noqa: E402
from recipes.alm.utils import (  # noqa: E402
    ConfigError,
    compile_enabled,
    configure_runtime,
    load_config,
    make_collector,
    make_environment,
    make_learner,
    make_replay_buffer,
    resolve_device,
    sample_batches,
    updates_per_batch,
    validate_config,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--env", default="HalfCheetah-v5", help="env.name: a gymnasium id or preset")
    parser.add_argument("--device", default="auto", help="collector.device: auto, cpu or cuda")
    parser.add_argument("--batch-size", type=int, default=512, help="optim.batch_size (slices per update)")
    parser.add_argument("--compile", choices=["auto", "true", "false"], nargs="?", const="true", default=None,
                        help="compile.compile (default: the recipe's, auto; --compile alone: true)")
    parser.add_argument("--compile-mode", default=None, help="compile.compile_mode")
    parser.add_argument("--cudagraphs", action="store_true", help="compile.cudagraphs=true (CUDA only)")
    parser.add_argument("--threads", type=int, default=None, help="compile.num_threads (default: one per core)")
    parser.add_argument("--updates", type=int, default=30, help="timed updates")
    parser.add_argument("--warmup-updates", type=int, default=5, help="untimed updates first (compilation, capture)")
    parser.add_argument("--collector-frames", type=int, default=500, help="frames to time the behaviour policy on")
    parser.add_argument("--loop-frames", type=int, default=100, help="frames of the whole loop to time (0: skip)")
    parser.add_argument("--fill-buffer", action="store_true", help="write the whole replay buffer before timing")
    parser.add_argument("--evaluations", type=int, default=1, help="evaluations to time, median reported (0: skip)")
    parser.add_argument("--serial-eval", action="store_true",
                        help="evaluate in one env, one episode after the other, to measure what batching them buys")
    parser.add_argument("--critics", choices=["auto", "vmap", "loop"], default="auto",
                        help="how the loss runs its critics (auto: the recipe's choice)")
    parser.add_argument("--default-malloc", action="store_true",
                        help="skip the recipe's malloc tuning (configure_cpu_runtime), to measure what it buys")
    parser.add_argument("--adam-foreach", action="store_true",
                        help="foreach Adam instead of the recipe's fused Adam, to measure what fused buys")
    parser.add_argument("--check-every", type=int, default=None,
                        help="read the gradient norms on the host every N updates (default: the recipe's, once per "
                             "collected batch; 1 measures a host sync per update)")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="also profile N updates with cProfile and report where their time goes")
    parser.add_argument("--count-flops", action="store_true",
                        help="also report gflop_per_update, as torch.profiler counts it over 3 updates, "
                             "and the matrix multiplies' time against the machine's fp32 rate")
    parser.add_argument("--tiny", action="store_true",
                        help="the fixed-cost regime: latent 8, hidden 32, model hidden 32, batch 16 (as "
                             "reference_update_speed.py --tiny)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("overrides", nargs="*", help="more recipe config overrides, e.g. network.hidden_dim=256")
    args = parser.parse_args(argv)
    for name, least in (("batch_size", 1), ("updates", 2), ("warmup_updates", 1), ("check_every", 1),
                        ("evaluations", 0)):
        if getattr(args, name) is not None and getattr(args, name) < least:  # updates: p10 and p90 need two
            parser.error(f"--{name.replace('_', '-')} must be >= {least}, got {getattr(args, name)}")
    if args.adam_foreach and (args.cudagraphs or (args.check_every or 1) > 1):
        parser.error("--adam-foreach cannot skip a non-finite step on the device, so it is checked before every step: "
                     "drop --cudagraphs and --check-every")
    return args


# The sizes of the fixed-cost regime (--tiny): the arithmetic takes microseconds, so what is timed is Python,
# TensorDict and dispatch overhead.
TINY_OVERRIDES = ("network.latent_dim=8", "network.hidden_dim=32", "network.model_hidden_dim=32", "optim.batch_size=16")


def recipe_config(args: argparse.Namespace):
    return load_config(
        f"env.name={args.env}",
        f"env.seed={args.seed}",
        f"collector.device={args.device}",
        f"optim.batch_size={args.batch_size}",
        *(TINY_OVERRIDES if args.tiny else ()),
        *([f"compile.compile={args.compile}"] if args.compile else []),
        f"compile.cudagraphs={args.cudagraphs}",
        *([f"compile.compile_mode={args.compile_mode}"] if args.compile_mode else []),
        *([f"compile.num_threads={args.threads}"] if args.threads else []),
        *args.overrides,
    )


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def torchrl_logs_to_stderr() -> None:
    """TorchRL logs to stdout, which holds the one JSON line of a benchmark (``> results.jsonl``)."""
    for handler in logging.getLogger("torchrl").handlers:
        if type(handler) is logging.StreamHandler:  # TorchRL's console handler, not a subclass someone added
            handler.setStream(sys.__stderr__)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def update_timings(durations: list[float], sample_durations: list[float]) -> dict[str, float]:
    """The reported statistics of per-update (and per-sample) wall times in seconds: at least two of each."""
    deciles = statistics.quantiles(durations, n=10)
    median = statistics.median(durations)
    return {
        "ms_per_update_median": 1000 * median,
        "ms_per_update_p10": 1000 * deciles[0],
        "ms_per_update_p90": 1000 * deciles[-1],
        "ms_per_update_mean": 1000 * statistics.fmean(durations),
        "updates_per_s": 1 / median,
        "ms_per_sample_median": 1000 * statistics.median(sample_durations),
        "updates_timed": len(durations),
    }


MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")  # inductor calls these for its GEMMs too


def fp32_matmul_gflop_per_s(rows: int = 2048, size: int = 1024, repeats: int = 20) -> float:
    """The machine's fp32 matrix-multiply rate on torch's current threads: the median of ``repeats`` products of a
    ``[rows, size]`` by a ``[size, size]`` matrix (the paper-size world model's hidden layer over 2048 rows)."""
    left, right = torch.randn(rows, size), torch.randn(size, size)
    for _ in range(3):
        left @ right
    durations = []
    for _ in range(repeats):
        start = time.perf_counter()
        left @ right
        durations.append(time.perf_counter() - start)
    return 2 * rows * size * size / statistics.median(durations) / 1e9


def work_per_call(fn: Callable[[], object], calls: int = 3, on_cpu: bool = True) -> dict[str, float]:
    """The floating-point work of one call of ``fn`` as ``torch.profiler`` counts it (GEMMs and a few other ops):
    ``gflop_per_update``. On the CPU also its matrix multiplies against the machine's fp32 floor:
    ``matmul_gflop_per_update``, ``matmul_ms_per_update`` (their own time under the profiler, out of
    ``profiled_ms_per_update``, a whole call's), the rate they ran at (``matmul_gflop_per_s``), the rate of one large
    product (:func:`fp32_matmul_gflop_per_s`) and what that work would take at that rate
    (``matmul_floor_ms_per_update``): the part of an update no fp32 implementation can cut."""
    with torch.profiler.profile(with_flops=True) as profile:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        seconds_per_call = (time.perf_counter() - start) / calls
    events = profile.key_averages()
    result = {"gflop_per_update": sum(event.flops for event in events) / calls / 1e9}
    if on_cpu:
        matmuls = [event for event in events if event.key in MATMUL_OPS]
        gflop = sum(event.flops for event in matmuls) / calls / 1e9
        seconds = sum(event.self_cpu_time_total for event in matmuls) / 1e6 / calls
        floor_rate = fp32_matmul_gflop_per_s()
        result.update(
            profiled_ms_per_update=1000 * seconds_per_call,
            matmul_gflop_per_update=gflop,
            matmul_ms_per_update=1000 * seconds,
            matmul_gflop_per_s=gflop / seconds if seconds else 0.0,
            fp32_matmul_gflop_per_s=floor_rate,
            matmul_floor_ms_per_update=1000 * gflop / floor_rate,
        )
    return result


# Where an update's time goes, two views: the cumulative time under a few functions (what each step costs with
# everything it calls), and every function's own time summed by library (these add up to the total).
PROFILE_PARTS = {
    "backward": ("torch/autograd/__init__.py", "backward"),
    "optimizer_step": ("torch/optim/adam.py", "step"),
    "target_update": ("alm_torchrl/update.py", "step"),  # ForeachSoftUpdate.step
    "parameter_swaps": ("tensordict/base.py", "to_module"),
    "tensordict_from_any": ("tensordict/base.py", "from_any"),
}
PROFILE_LIBRARIES = {"tensordict": "/tensordict/", "torchrl": "/torchrl/", "torch_nn": "/torch/nn/",
                     "torch_other": "/torch/", "alm_torchrl": "/alm_torchrl/", "objectives": "/objectives/"}


def profile_breakdown(fn: Callable[[], object], calls: int) -> dict[str, float]:
    """Milliseconds per call of ``fn`` under cProfile: ``total_ms``; ``cum_<part>_ms``, the cumulative time under each
    of ``PROFILE_PARTS``; and ``own_<library>_ms``, the own time of the functions of each of ``PROFILE_LIBRARIES``
    (first match), of built-ins and C functions (``builtins``) and of the rest (``other``), which add up to the
    total."""
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        fn()
    profiler.disable()
    stats = pstats.Stats(profiler).stats  # {(file, line, name): (calls, primitive calls, own, cumulative, callers)}
    per_call = 1000 / calls
    result = {"total_ms": per_call * sum(entry[2] for entry in stats.values())}
    for part, (file, name) in PROFILE_PARTS.items():
        result[f"cum_{part}_ms"] = per_call * sum(entry[3] for key, entry in stats.items()
                                                  if key[0].endswith(file) and key[2] == name)
    for (file, _, _), entry in stats.items():
        library = "builtins" if file == "~" else next(
            (name for name, marker in PROFILE_LIBRARIES.items() if marker in file), "other")
        result[f"own_{library}_ms"] = result.get(f"own_{library}_ms", 0.0) + per_call * entry[2]
    return {key: round(value, 3) for key, value in result.items()}


def storage_bytes_per_transition(replay_buffer) -> int:
    stored = replay_buffer.storage._storage  # the preallocated TensorDict of the LazyTensorStorage
    return sum(tensor.element_size() * tensor[0].numel() for tensor in stored.values(True, True))


def fill_buffer(replay_buffer, example: TensorDict, traj_len: int) -> None:
    """Write synthetic transitions (copies of ``example`` rows) until the buffer is full, in ``traj_len`` episodes."""
    capacity = replay_buffer.storage.max_size
    chunk = example.reshape(-1)[:1].expand(traj_len).clone()
    next_id = int(replay_buffer.storage[: len(replay_buffer)].get(TRAJ_KEY).max()) + 1
    while len(replay_buffer) < capacity:
        chunk.set(TRAJ_KEY, torch.full((traj_len,), next_id, device=chunk.device))
        replay_buffer.extend(chunk)
        next_id += 1


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torchrl_logs_to_stderr()
    try:
        cfg = recipe_config(args)
        validate_config(cfg)
        device = resolve_device(cfg)
        if args.default_malloc:  # the recipe's threads without its malloc tuning, to measure what that buys
            configure_cpu_runtime(cfg.compile.num_threads, keep_freed_memory=False)
            skip_pandas_lookup_in_tensordict_from_any()
        else:
            configure_runtime(cfg)
    except ConfigError as err:
        sys.exit(f"update_speed.py: invalid config: {err}")
    torch.manual_seed(cfg.env.seed)

    env, eval_env = make_environment(cfg)
    # The recipe checks the norms once per collected batch; a non-fused Adam can only be checked before every step.
    check_every = args.check_every or (1 if args.adam_foreach else updates_per_batch(cfg))
    learner = make_learner(
        cfg,
        env,
        device,
        deactivate_vmap=None if args.critics == "auto" else args.critics == "loop",
        fused_optimizer=not args.adam_foreach,
        check_every=check_every,
    )
    loss, update = learner.loss, learner.update
    replay_buffer = make_replay_buffer(cfg, device)
    keys = [*loss.in_keys, TRAJ_KEY]
    result: dict = {
        "env": cfg.env.name,
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "compile": compile_enabled(cfg, device),
        "cudagraphs": bool(cfg.compile.cudagraphs),
        "critics": "loop" if loss.deactivate_vmap else "vmap",
        "malloc_tuned": not args.default_malloc,
        "adam": "foreach" if args.adam_foreach else "fused",
        "check_every": check_every,
        "batch_size": cfg.optim.batch_size,
        "horizon": cfg.loss.horizon,
        "tiny": args.tiny,
        "cpu": cpu_model(),
    }

    # The recipe's random warm-up fills the buffer; timing it gives the collector's speed with random actions.
    warmup_frames = cfg.collector.init_random_frames
    collector = make_collector(cfg, env, learner.agent.policy, device)
    batches = iter(collector)
    start = time.perf_counter()
    collected = 0
    while collected < warmup_frames:
        data = next(batches)
        replay_buffer.extend(data.reshape(-1).select(*keys))
        collected += data.numel()
    result["collector_random_frames_per_s"] = collected / (time.perf_counter() - start)
    if args.fill_buffer:
        fill_buffer(replay_buffer, data.select(*keys), cfg.env.max_episode_steps)
    result["buffer_capacity"] = replay_buffer.storage.max_size
    result["bytes_per_transition"] = storage_bytes_per_transition(replay_buffer)

    # The behaviour policy on `device` (the warm-up is over, so the collector now calls the policy), after 2 untimed
    # batches: with compile.compile / compile.cudagraphs the collector compiles it and captures it (10 eager calls).
    for _ in range(2):
        next(batches)
    start, policy_frames = time.perf_counter(), 0
    while policy_frames < args.collector_frames:
        policy_frames += next(batches).numel()
    synchronize(device)
    result["collector_policy_frames_per_s"] = policy_frames / (time.perf_counter() - start)

    # The update alone, on fresh samples; sampling is timed apart. Batches are drawn as the recipe draws them: every
    # update of a collected batch at once (from states), so a batch's sampling time is its share of a draw.
    durations, sample_durations, warmup_s, drawn = [], [], 0.0, []
    for step in range(args.warmup_updates + args.updates):
        if not drawn:
            start = time.perf_counter()
            drawn = sample_batches(cfg, replay_buffer)
            synchronize(device)
            sample_seconds = (time.perf_counter() - start) / len(drawn)
        batch = drawn.pop(0)
        start = time.perf_counter()
        update(batch)
        synchronize(device)
        if step < args.warmup_updates:  # with compile.compile, compilation (a warm inductor cache makes it shorter)
            warmup_s += time.perf_counter() - start
        else:
            sample_durations.append(sample_seconds)
            durations.append(time.perf_counter() - start)
    result.update(update_timings(durations, sample_durations), warmup_updates_s=warmup_s)
    training_batches = (batch for _ in itertools.count() for batch in sample_batches(cfg, replay_buffer))
    start = time.perf_counter()
    for _ in range(args.updates):
        update(next(training_batches))
    synchronize(device)
    result["updates_per_s_back_to_back"] = args.updates / (time.perf_counter() - start)

    if args.profile:
        result["profile"] = profile_breakdown(lambda: update(next(training_batches)), args.profile)

    if args.count_flops:
        result.update(work_per_call(lambda: update(next(training_batches)), on_cpu=device.type == "cpu"))

    # The whole loop, as the recipe runs it after the warm-up: collect, store, then utd_ratio updates per frame.
    if args.loop_frames:
        start, loop_frames = time.perf_counter(), 0
        while loop_frames < args.loop_frames:
            data = next(batches)
            replay_buffer.extend(data.reshape(-1).select(*keys))
            loop_frames += data.numel()
            for batch in sample_batches(cfg, replay_buffer):
                update(batch)
        synchronize(device)
        result["loop_frames_per_s"] = loop_frames / (time.perf_counter() - start)
    collector.shutdown()

    if args.evaluations:
        num_episodes = cfg.logger.num_eval_episodes
        if args.serial_eval:  # one env, one episode after the other, instead of the recipe's side-by-side copies
            eval_env = make_env(cfg.env.name, seed=cfg.env.seed + 1, max_episode_steps=cfg.env.max_episode_steps,
                                frame_skip=cfg.env.frame_skip, scale_actions=cfg.env.scale_actions)
        durations = []
        for _ in range(args.evaluations):
            start = time.perf_counter()
            evaluation = evaluate(eval_env, learner.agent.eval_policy, num_episodes, cfg.env.max_episode_steps)
            durations.append(time.perf_counter() - start)
        eval_env.close()
        result.update({
            "eval_s": statistics.median(durations),
            "eval_episodes": num_episodes,
            "eval_episode_length_mean": evaluation["length_mean"],  # an untrained policy's: short where envs terminate
            "eval_side_by_side": not args.serial_eval,
        })
        if "loop_frames_per_s" in result:
            seconds_per_frame = 1 / result["loop_frames_per_s"] + result["eval_s"] / cfg.logger.eval_iter
            result["end_to_end_frames_per_s"] = 1 / seconds_per_frame

    result["max_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
