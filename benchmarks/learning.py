"""Learning benchmark on a 2-core CPU: does ALM learn? (7.5 hours on the 2-core Intel Xeon VM, measured over nine
sittings; see benchmarks/learning.md)

Trains ALM with the recipe (``recipes/alm/alm.py``) for 20,000 env frames per run, 3 seeds each: HalfCheetah-v5 at
the paper's settings (so its curve compares with the published one), twice (the recipe's transition-uniform slice
sampling, and TorchRL's trajectory-uniform sampling as a second variant), and InvertedPendulum-v5 and Pendulum-v1
with small networks and batch; 12 runs. Then writes the table and figures with ``python -m alm_torchrl.results``
plus ``run_info.json`` (how, where and how long it ran). See ``benchmarks/learning.md`` for the settings, their
calibration, the time estimate and how to read the results.

    python benchmarks/learning.py --reference-dir shared/reference/official-alm-scores   # the benchmark (~7.5 h)
    python benchmarks/learning.py --tasks InvertedPendulum-v5 Pendulum-v1               # the pendulums (~25 min)
    python benchmarks/learning.py --dry-run                                               # print the commands only
    python benchmarks/learning.py --smoke                                                 # pipeline check, ~1-2 min
    python benchmarks/learning.py --suite dmc     # DMC tasks instead (docs/results/dmc_small_scale/README.md)

Each run is one recipe process (one torch thread: ``OMP_NUM_THREADS=1``), ``--jobs`` of them at a time, in
``<out-runs>/<date_time>/<task>/<variant>/seed<k>/`` (a Hydra run dir: ``.hydra/``, ``alm_logging/``,
``stdout.log``). Runs are started longest first (HalfCheetah's paper-size updates cost about 20 times the small
ones) so that the two workers finish close together. A failed run is reported and left out of the results; the exit
code is then 1.

The benchmark can be spread over several sittings. Ctrl-C (or SIGTERM) stops the runs this script started the way
the recipe stops on preemption: each finishes its batch of updates and writes a checkpoint (runs also checkpoint
every 5,000 frames). ``--sweep-dir <the printed folder>`` with the same options continues that sweep: stopped runs
resume from their checkpoints, finished ones are kept, and the results cover every run once all have finished.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from alm_torchrl.preemption import RESUMABLE_EXIT_CODE

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "alm" / "alm.py"

DEFAULT_TASKS = ("HalfCheetah-v5", "InvertedPendulum-v5", "Pendulum-v1")  # longest first
# What every run shares. Everything else is the recipe's default, i.e. the paper's (Tables 3-4): horizon 3, lr 1e-4,
# UTD 1, gamma 0.99, tau 0.005, slice starts uniform over transitions, evaluation of the mean action on a sampled
# latent, 10 frames per collector batch.
BENCHMARK = {
    "collector.init_random_frames": 5000,  # the paper's warm-up (the recipe's default), also the released curve's
    "logger.eval_iter": 2500,  # 8 evaluations: 2.5k, 5k (untrained: 0 and 10 updates), 7.5k, ..., 20k
    "logger.num_eval_episodes": 5,  # as the paper
}
SMALL_NETWORKS = {
    "network.latent_dim": 32,  # paper 50
    "network.hidden_dim": 64,  # paper 512
    "network.model_hidden_dim": 128,  # paper 1024
    "optim.batch_size": 64,  # paper 512
}
# Per task (calibrated in benchmarks/learning.md). HalfCheetah runs at the paper's settings, so its curve compares
# with the published one: at the small sizes it stays in its early saturation dip for the whole 20k frames
# (docs/results/README.md). The pendulums learn at the small sizes, with the noise annealed over 10k of their 15k
# trained frames (the default's 100k would leave them acting almost randomly). Pendulum-v1 keeps gymnasium's own
# 200-step episodes, so its returns read as usual (random about -1200, solved about -150).
TASK_SETTINGS = {
    "HalfCheetah-v5": {},
    "InvertedPendulum-v5": {**SMALL_NETWORKS, "exploration.annealing_frames": 10000},
    "Pendulum-v1": {**SMALL_NETWORKS, "exploration.annealing_frames": 10000, "env.max_episode_steps": 200},
}
# Second variants, each run on the same seeds: TorchRL's trajectory-uniform slice sampling, the behaviour this
# project had before it sampled like the original (README, "One batch of slices").
VARIANTS = {"HalfCheetah-v5": {"trajectory_sampling": {"replay_buffer.sampling": "trajectory"}}}
# Rough relative run cost, to start the longest runs first.
TASK_COST = {"HalfCheetah-v5": 20, "InvertedPendulum-v5": 2, "Pendulum-v1": 1}
# --smoke: a pipeline check, not a benchmark (tiny networks, 600 frames, a few hundred updates).
SMOKE = {
    "collector.init_random_frames": 200,
    "exploration.annealing_frames": 200,
    "network.latent_dim": 8,
    "network.hidden_dim": 16,
    "network.model_hidden_dim": 16,
    "optim.batch_size": 8,
    "logger.eval_iter": 200,
    "logger.num_eval_episodes": 1,
}
SMOKE_DEFAULTS = {"frames": 600, "seeds": [0], "tasks": ["HalfCheetah-v5", "Pendulum-v1"],
                  "out_runs": Path("/tmp/alm_learning_smoke/runs"), "results": Path("/tmp/alm_learning_smoke/results")}
# --suite dmc: DeepMind Control Suite tasks at action repeat 2, frames counted in env steps (calibrated in
# docs/results/dmc_small_scale/README.md). Frame counts below are env steps; the update count is per agent step.
DMC_TASKS = ("dmc/cartpole-swingup", "dmc/reacher-easy", "dmc/cartpole-balance")
DMC_SETTINGS = {
    "env.frame_skip": 2,  # DMC's usual action repeat (DrQ-v2, TD-MPC2, MR.Q, the ALM DMC fork)
    "collector.init_random_frames": 5000,  # 2,500 agent steps, 5 episodes; then UTD 1: 47,500 updates per 100k run
    "exploration.annealing_frames": 50000,  # noise 1.0 -> 0.1 over the first 50k of 95k trained env steps
    **SMALL_NETWORKS,
    "logger.eval_iter": 5000,  # 20 evaluations of 5 episodes (500 agent steps each), as often as the references
    "logger.num_eval_episodes": 5,
}
DMC_DEFAULTS = {"frames": 100_000, "tasks": list(DMC_TASKS), "out_runs": REPO / "multirun" / "learning_benchmark_dmc",
                "results": REPO / "docs" / "results" / "dmc_small_scale"}
# Bookkeeping shared by every run: CPU, CSV logs, no checkpoint but the final one.
FIXED = {
    "collector.device": "cpu",
    "compile.num_threads": 1,  # one torch thread per run (the recipe's torch.set_num_threads; OMP_NUM_THREADS=1 too)
    "logger.backend": "csv",
    "checkpoint.interval": 5000,  # what a hard kill can lose; Ctrl-C and SIGTERM checkpoint first (--sweep-dir)
}
THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
LOG_ENV = {"TQDM_MININTERVAL": "30"}  # a progress line every 30 s in each run's stdout.log, not every 0.1 s


@dataclass
class Job:
    task: str
    variant: str
    seed: int
    run_dir: Path
    command: list[str]
    wall_s: float | None = None  # over every sitting of a resumed sweep
    returncode: int | None = None
    last_line: str = ""

    @property
    def stopped(self) -> bool:
        """Stopped by a signal after writing its checkpoint: ``--sweep-dir`` resumes it."""
        return self.returncode == RESUMABLE_EXIT_CODE


def overrides_for(task: str, variant: str, seed: int, frames: int, smoke: bool) -> list[str]:
    task_settings = DMC_SETTINGS if task.startswith("dmc/") else TASK_SETTINGS.get(task, {})
    values = {"env.name": task, "env.seed": seed, "collector.total_frames": frames, **BENCHMARK, **task_settings,
              **VARIANTS.get(task, {}).get(variant, {}), **(SMOKE if smoke else {}), **FIXED}
    return [f"{key}={value}" for key, value in values.items()]


def variants_of(task: str, with_variants: bool) -> list[str]:
    return ["default", *(VARIANTS.get(task, {}) if with_variants else ())]


def default_reference_dir() -> Path | None:
    candidates = (os.environ.get("ALM_REFERENCE_DIR"), REPO / "shared" / "reference" / "official-alm-scores",
                  REPO.parent / "shared" / "reference" / "official-alm-scores")
    for candidate in candidates:
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return None


def machine_info() -> dict:
    cpu_model, physical = "unknown", set()
    try:
        physical_id = None
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = (part.strip() for part in line.partition(":"))
            if key == "model name":
                cpu_model = value
            elif key == "physical id":
                physical_id = value
            elif key == "core id":
                physical.add((physical_id, value))
    except OSError:
        pass
    info = {"cpu_model": cpu_model, "logical_cpus": os.cpu_count(), "physical_cores": len(physical) or None,
            "platform": platform.platform(), "python": platform.python_version()}
    try:
        info["memory_gb"] = round(int(Path("/proc/meminfo").read_text().split()[1]) / 2**20, 1)
    except (OSError, IndexError, ValueError):
        pass
    versions = subprocess.run(
        [sys.executable, "-c", "import json, torch, torchrl, tensordict, gymnasium, mujoco; "
         "print(json.dumps({m.__name__: m.__version__ for m in (torch, torchrl, tensordict, gymnasium, mujoco)}))"],
        capture_output=True, text=True, check=False)
    if versions.returncode == 0:
        info["versions"] = json.loads(versions.stdout)
        info["cuda"] = False  # runs are forced to collector.device=cpu
    return info


def git_info() -> dict:
    def git(*args: str) -> str:
        result = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=False)
        return result.stdout.strip() if result.returncode == 0 else ""
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD") or None, "modified_files": status.splitlines()}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-runs", type=Path, default=None,
                        help="parent folder of the run dirs; each invocation adds a <date_time>/ folder "
                             "(default: multirun/learning_benchmark, ignored by git; "
                             "smoke: /tmp/alm_learning_smoke/runs)")
    parser.add_argument("--results", type=Path, default=None,
                        help="folder for results.md/.csv, <task>.png, run_info.json "
                             "(default: docs/results/learning_20k; smoke: /tmp/alm_learning_smoke/results)")
    parser.add_argument("--sweep-dir", type=Path, default=None,
                        help="continue the sweep in this folder (printed at the start and when stopped): stopped runs "
                             "resume from their checkpoints, finished ones are kept (default: a new "
                             "<out-runs>/<date_time>/)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once, one core each (default: 2)")
    parser.add_argument("--frames", type=int, default=None, help="env frames per run (default: 20000; smoke: 600)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 1 2 (smoke: 0)")
    parser.add_argument("--tasks", nargs="+", default=None,
                        help=f"gymnasium ids or recipe presets (default: {' '.join(DEFAULT_TASKS)})")
    parser.add_argument("--no-variants", dest="variants", action="store_false",
                        help="run only the default variant of each task (not HalfCheetah's trajectory sampling)")
    parser.add_argument("--table-frames", type=int, nargs="+", default=None,
                        help="frame counts of the results table (default: a quarter, half, three quarters and all of "
                             "--frames, each rounded up to an evaluation point: 5000 10000 15000 20000)")
    parser.add_argument("--reference-dir", type=Path, default=default_reference_dir(),
                        help="released ALM score files for the overlay (default: $ALM_REFERENCE_DIR, else "
                             "shared/reference/official-alm-scores in or beside the checkout if present, else none)")
    parser.add_argument("--suite", choices=("gym", "dmc"), default="gym",
                        help="gym: the gymnasium tasks and settings above (default); dmc: DeepMind Control Suite tasks "
                             f"({' '.join(DMC_TASKS)}) at action repeat 2, 100,000 env steps, results in "
                             "docs/results/dmc_small_scale (smoke: dmc/cartpole-swingup)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny pipeline check (600 frames, tiny networks, 1 seed, 2 tasks) writing to /tmp")
    args = parser.parse_args(argv)
    defaults = SMOKE_DEFAULTS if args.smoke else {
        "frames": 20000, "seeds": [0, 1, 2], "tasks": list(DEFAULT_TASKS),
        "out_runs": REPO / "multirun" / "learning_benchmark", "results": REPO / "docs" / "results" / "learning_20k"}
    if args.suite == "dmc":
        defaults = {**defaults, "tasks": [DMC_TASKS[0]]} if args.smoke else {**defaults, **DMC_DEFAULTS}
        if args.reference_dir == default_reference_dir():
            args.reference_dir = None  # the released ALM curves are gymnasium tasks only
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.settings = {**BENCHMARK, **(DMC_SETTINGS if args.suite == "dmc" else {}), **(SMOKE if args.smoke else {})}
    if args.smoke:
        args.variants = False
    if args.table_frames is None:  # a quarter, half, three quarters and all of the frames, at evaluation points
        every = args.settings["logger.eval_iter"]
        args.table_frames = sorted({min(-(-args.frames * quarter // 4 // every) * every, args.frames)
                                    for quarter in (1, 2, 3, 4)})
    if args.jobs < 1:
        parser.error("--jobs must be >= 1")
    if args.settings["collector.init_random_frames"] >= args.frames:
        parser.error(f"--frames {args.frames} must exceed the warm-up "
                     f"({args.settings['collector.init_random_frames']} random frames), or no update would run")
    if args.reference_dir is not None and not args.reference_dir.is_dir():
        parser.error(f"--reference-dir {args.reference_dir}: no such directory")
    args.tasks = sorted(dict.fromkeys(args.tasks), key=lambda task: -TASK_COST.get(task, 2))
    return args


def quote(command: list[str], env: dict[str, str]) -> str:
    return " ".join([*(f"{k}={v}" for k, v in env.items()), *map(shlex.quote, command)])


def run_job(job: Job, env: dict[str, str], lock: threading.Lock, procs: set, stopping: threading.Event) -> Job:
    job.run_dir.mkdir(parents=True, exist_ok=True)
    sittings_file = job.run_dir / "benchmark_sittings.json"  # one entry per process, so a resumed run's time adds up
    sittings = json.loads(sittings_file.read_text()) if sittings_file.exists() else []
    if sittings and sittings[-1]["returncode"] == 0:  # finished in an earlier sitting of this sweep
        job.returncode, job.wall_s = 0, round(sum(sitting["wall_s"] for sitting in sittings), 1)
        job.last_line = sittings[-1].get("last_line", "")
        return job
    start = time.monotonic()
    with (job.run_dir / "stdout.log").open("a") as log:  # a resumed run appends its sitting
        with lock:
            if stopping.is_set():
                return job
            proc = subprocess.Popen(job.command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
            procs.add(proc)
        try:
            job.returncode = proc.wait()
        finally:
            with lock:
                procs.discard(proc)
    lines = (job.run_dir / "stdout.log").read_text(errors="replace").replace("\r", "\n").splitlines()
    job.last_line = next((line for line in reversed(lines) if line.strip()), "")
    sittings.append({"ended": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                     "wall_s": round(time.monotonic() - start, 1), "returncode": job.returncode,
                     "last_line": job.last_line})
    sittings_file.write_text(json.dumps(sittings, indent=1) + "\n")
    job.wall_s = round(sum(sitting["wall_s"] for sitting in sittings), 1)
    return job


def record_sitting(sweep_dir: Path, started: str, wall_s: float, stopped: bool) -> list[dict]:
    """Add this invocation to ``<sweep_dir>/benchmark_sittings.json``; return every sitting of the sweep so far."""
    sittings_file = sweep_dir / "benchmark_sittings.json"
    sittings = json.loads(sittings_file.read_text()) if sittings_file.exists() else []
    sittings.append({"started": started, "wall_s": round(wall_s, 1), "stopped": stopped})
    sweep_dir.mkdir(parents=True, exist_ok=True)
    sittings_file.write_text(json.dumps(sittings, indent=1) + "\n")
    return sittings


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.sweep_dir is not None:
        sweep_dir = args.sweep_dir.resolve()
    else:
        sweep_dir = (args.out_runs / dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")).resolve()
    env = {**os.environ, **THREAD_ENV, **LOG_ENV}
    jobs = []
    for task in args.tasks:
        for variant in variants_of(task, args.variants):
            for seed in args.seeds:
                run_dir = sweep_dir / task.replace("/", "_") / variant / f"seed{seed}"
                command = [sys.executable, str(RECIPE), *overrides_for(task, variant, seed, args.frames, args.smoke),
                           f"hydra.run.dir={run_dir}"]
                jobs.append(Job(task, variant, seed, run_dir, command))

    def results_command(run_dirs: list[str]) -> list[str]:
        command = [sys.executable, "-m", "alm_torchrl.results", *run_dirs, "--out", str(args.results),
                   "--frames", *map(str, args.table_frames)]
        return command + (["--reference-dir", str(args.reference_dir)] if args.reference_dir is not None else [])

    if args.dry_run:
        print(f"# {len(jobs)} runs, {args.jobs} at a time, each logging to <run dir>/stdout.log")
        for job in jobs:
            print(quote(job.command, {**THREAD_ENV, **LOG_ENV}))
        print("# then")
        print(quote(results_command(["<run dirs that finished>"]), {}))
        return 0

    print(f"{len(jobs)} runs ({', '.join(args.tasks)}; seeds {' '.join(map(str, args.seeds))}; {args.frames} frames), "
          f"{args.jobs} at a time, in {sweep_dir}", flush=True)
    info = {
        "benchmark": "benchmarks/learning.py" + (" --suite dmc" if args.suite == "dmc" else "")
                     + (" --smoke" if args.smoke else ""),
        "command": " ".join(map(shlex.quote, [sys.executable, *(sys.argv if argv is None else [__file__, *argv])])),
        "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "git": git_info(),
        "load_average_at_start": os.getloadavg(),
        "jobs": args.jobs, "thread_env": THREAD_ENV, "frames": args.frames, "seeds": args.seeds, "tasks": args.tasks,
        "overrides": {f"{task} {variant}": overrides_for(task, variant, "<seed>", args.frames, args.smoke)
                      for task in args.tasks for variant in variants_of(task, args.variants)},
        "runs_dir": str(sweep_dir),
    }
    lock, procs, stopping = threading.Lock(), set(), threading.Event()
    start = time.monotonic()
    done = 0
    pool = ThreadPoolExecutor(max_workers=args.jobs)
    previous_handler = signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM stops the sweep as Ctrl-C
    try:
        futures = [pool.submit(run_job, job, env, lock, procs, stopping) for job in jobs]
        for future in as_completed(futures):
            job = future.result()
            done += 1
            status = ("ok" if job.returncode == 0 else "stopped by a signal, checkpointed" if job.stopped
                      else f"FAILED (exit {job.returncode}, see {job.run_dir}/stdout.log)")
            print(f"[{done}/{len(jobs)} at {(time.monotonic() - start) / 60:.1f} min] {job.task} {job.variant} "
                  f"seed {job.seed}: {status} in {job.wall_s:.0f} s | {job.last_line[-100:]}", flush=True)
    except KeyboardInterrupt:
        stopping.set()  # no further run starts
        pool.shutdown(wait=False, cancel_futures=True)
        with lock:
            running = list(procs)
        for proc in running:  # only the recipe processes this script started: each checkpoints, then exits
            proc.send_signal(signal.SIGTERM)
        for proc in running:
            proc.wait()
        record_sitting(sweep_dir, info["started"], time.monotonic() - start, stopped=True)
        print(f"stopped; {len(running)} run(s) checkpointed. Continue with the same options and --sweep-dir "
              f"{sweep_dir}", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
    pool.shutdown()
    sitting_wall = time.monotonic() - start
    sittings = record_sitting(sweep_dir, info["started"], sitting_wall, stopped=False)

    finished = [job for job in jobs if job.returncode == 0]
    stopped = [job for job in jobs if job.stopped]  # by a signal sent to the runs themselves, not to this script
    failed = [job for job in jobs if job.returncode != 0 and not job.stopped]
    info.update({
        "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "total_wall_s": round(sum(sitting["wall_s"] for sitting in sittings), 1),
        "total_wall_min": round(sum(sitting["wall_s"] for sitting in sittings) / 60, 1),
        "sittings": sittings,  # this invocation and earlier ones of the same --sweep-dir
        "load_average_at_end": os.getloadavg(),
        "runs": [{"task": job.task, "variant": job.variant, "seed": job.seed, "run_dir": str(job.run_dir),
                  "wall_s": job.wall_s, "returncode": job.returncode, "last_line": job.last_line} for job in jobs],
    })
    print(f"all runs done in {sitting_wall / 60:.1f} min ({len(finished)} ok, {len(stopped)} stopped, "
          f"{len(failed)} failed)", flush=True)
    if stopped:
        print(f"no results until the stopped runs finish: continue with the same options and --sweep-dir {sweep_dir}",
              file=sys.stderr)
        return 130
    if not finished:
        print("no run finished; no results written", file=sys.stderr)
        return 1
    command = results_command([str(job.run_dir) for job in finished])
    results = subprocess.run(command, cwd=REPO, check=False)
    info["results_command"] = " ".join(map(shlex.quote, command))
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "run_info.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"results and run_info.json in {args.results}", flush=True)
    return 1 if failed or results.returncode else 0


if __name__ == "__main__":
    sys.exit(main())
