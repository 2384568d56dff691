"""The training recipe as a subprocess, watched from outside: resident memory, open files, progress and update time.

Used by ``soak.py`` (does anything grow over a long run?) and ``sharing.py`` (how fast next to busy processes?). The
recipe runs unchanged (``recipes/alm/alm.py`` with Hydra overrides); progress comes from its CSV logs, which it writes
at every episode end: ``train/num_updates`` and ``time/update`` (TorchRL's ``timeit``: the mean over the run so far,
from which the mean over any window of updates follows).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "alm" / "alm.py"

# The tiny HalfCheetah run: latent 8, hidden 32, batch 16.
SMALL = ["network.latent_dim=8", "network.hidden_dim=32", "network.model_hidden_dim=32", "optim.batch_size=16"]


class RecipeProcess:
    """Starts ``alm.py`` with ``overrides`` in ``run_dir``; :meth:`sample` reads its state from /proc and its logs."""

    def __init__(self, overrides: list[str], run_dir: Path, *, env: dict[str, str] | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.stderr = (self.run_dir / "stderr.txt").open("w")
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            [sys.executable, str(RECIPE), *overrides, f"hydra.run.dir={self.run_dir}"],
            stdout=subprocess.DEVNULL, stderr=self.stderr, env={**os.environ, **(env or {})},
        )

    def running(self) -> bool:
        return self.process.poll() is None

    def sample(self) -> dict[str, float]:
        """Seconds since start, resident MB, open file descriptors, and the last logged frames, updates and mean
        update time (ms, over the run so far)."""
        pid = self.process.pid
        status = Path(f"/proc/{pid}/status").read_text()
        rss_kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
        sample = {"elapsed_s": round(time.monotonic() - self.started, 2), "rss_mb": round(rss_kb / 1024, 1),
                  "open_fds": len(os.listdir(f"/proc/{pid}/fd"))}
        return {**sample, **self.progress()}

    def progress(self) -> dict[str, float]:
        updates = self._last_row("train/num_updates.csv")
        update_s = self._last_row("time/update.csv")
        if updates is None or update_s is None or updates[0] != update_s[0]:  # none yet, or read mid-write
            return {}
        return {"frames": updates[0], "updates": int(updates[1]), "update_ms_mean": update_s[1] * 1000}

    def _last_row(self, name: str) -> tuple[int, float] | None:
        files = list(self.run_dir.glob(f"alm_logging/*/scalars/{name}"))
        if not files:
            return None
        lines = files[0].read_text().splitlines()
        if not lines:
            return None
        step, value = lines[-1].split(",")
        return int(step), float(value)

    def stop(self) -> int:
        if self.running():
            self.process.terminate()  # the recipe checkpoints and stops (exit 75)
        code = self.process.wait(timeout=600)
        self.stderr.close()
        return code


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def window_update_ms(earlier: dict, later: dict) -> float | None:
    """Mean update time between two samples, from the run-so-far means logged at each (ms)."""
    if "updates" not in earlier or "updates" not in later or later["updates"] <= earlier["updates"]:
        return None
    total = later["update_ms_mean"] * later["updates"] - earlier["update_ms_mean"] * earlier["updates"]
    return total / (later["updates"] - earlier["updates"])
