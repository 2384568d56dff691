#!/usr/bin/env bash
# The GPU checks in one prepared run, for a lent GPU machine (the device tool's `run`, which copies this repository
# there and collects what lands in $OUT). First, here: `bash benchmarks/device_wheels.sh`; then
#     run(command="bash benchmarks/device_check.sh", carry=[".whl"], timeout_s=600)
# It writes into $OUT, in this order, so that a run cut short still returns the first results:
#   env.txt                        the GPU and the versions of torch, torchrl and tensordict there;
#   update_speed_eager.json        benchmarks/update_speed.py on HalfCheetah-v5, recipe defaults, eager;
#   update_speed_compiled.json     the same with --compile --cudagraphs (issue 16's targets: updates_per_s_back_to_back
#                                  >= 500, end_to_end_frames_per_s >= 300);
#   tests.log                      tests/test_cuda.py (graph capture and replay, the device-side skip, the recipe);
# and the stderr of each step beside it (*.err). Record the JSON lines in benchmarks/results/ with the device named.
set -uo pipefail
OUT=${OUT:?"set OUT to the folder for the results"}
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl \
    || { echo "installing .whl/ failed: run benchmarks/device_wheels.sh here and carry .whl" >&2; exit 1; }
# The loss lives in objectives/ and is installed as alm_torchrl.objectives (pyproject.toml); from a source tree the
# same name needs a link, removed at the end.
if [ ! -e alm_torchrl/objectives ]; then
    ln -s ../objectives alm_torchrl/objectives
    trap 'rm -f alm_torchrl/objectives' EXIT
fi
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 HYDRA_FULL_ERROR=1
{
    nvidia-smi -L
    python3 -c "import torch, torchrl, tensordict; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'torchrl', torchrl.__version__, 'tensordict', tensordict.__version__, torch.cuda.get_device_name())"
} >"$OUT/env.txt" 2>&1 || { cat "$OUT/env.txt"; exit 1; }
cat "$OUT/env.txt"

status=0
step() {  # step NAME SECONDS COMMAND...: stdout to $OUT/NAME, stderr to $OUT/NAME.err (extension dropped)
    local name=$1 seconds=$2 started=$SECONDS
    shift 2
    timeout "$seconds" "$@" >"$OUT/$name" 2>"$OUT/${name%.*}.err"
    local code=$?
    echo "$name: exit $code after $((SECONDS - started)) s"
    [ "$code" -eq 0 ] || status=1
}
step update_speed_eager.json 120 python3 benchmarks/update_speed.py --device cuda --loop-frames 2000
step update_speed_compiled.json 240 python3 benchmarks/update_speed.py --device cuda --compile --cudagraphs \
    --loop-frames 2000
step tests.log 200 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py
tail -n 3 "$OUT/tests.log"
exit "$status"
