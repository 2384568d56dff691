"""The README's Python example trains ALM without Hydra, as it says."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
MARKER = "<!-- the README example: tests/test_readme.py runs this block -->"


def test_readme_example_trains_alm_from_python(tmp_path):
    text = README.read_text()
    (block,) = re.findall(re.escape(MARKER) + r"\n```python\n(.*?)```", text, flags=re.S)
    assert len(block.strip().splitlines()) <= 32  # "about 30 lines"
    result = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    loss_model, evaluation = result.stdout.strip().splitlines()[-1].split(" ", 1)
    assert float(loss_model) == float(loss_model)  # a finite number, not nan
    assert "'return_mean'" in evaluation and "'length_mean': 200.0" in evaluation
