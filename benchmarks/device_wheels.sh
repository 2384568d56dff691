#!/usr/bin/env bash
# Downloads into .whl/ (git-ignored) the wheels that benchmarks/device_check.sh installs on a lent GPU machine: its
# image has Python 3.12 and a CUDA build of torch, none of the packages below, and no network. Run it here, where
# PyPI is reachable, before the device call. The versions are the ones this project is tested with.
set -euo pipefail
cd "$(dirname "$0")/.."
exclude="$(git rev-parse --git-path info/exclude)"
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"
rm -rf .whl && mkdir .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
    torchrl==0.14.1 tensordict==0.14.3 pyvers==0.2.3 hoptorch==0.1.4 orjson==3.13.0 importlib_metadata==10.2.0 \
    gymnasium==1.4.0 farama-notifications==0.0.6 mujoco==3.17.0 glfw==2.11.0 pyopengl==3.1.10 etils==1.15.0 \
    websockets==15.0.1 hydra-core==1.3.8 omegaconf==2.3.1
# No wheel of this one on PyPI (hydra-core's parser runtime); it is pure Python, so a wheel built here installs there.
python3 -m pip wheel --quiet --no-deps -w .whl antlr4-python3-runtime==4.9.3
du -sh .whl
