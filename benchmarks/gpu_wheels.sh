#!/usr/bin/env bash
# Wheels of the packages a GPU machine's image lacks, for running our tests and benchmarks there.
#
# The lent GPU machines (see benchmarks/README.md, "GPU") have their own Python 3.12 with PyTorch,
# but no diffusers, gymnasium or pydantic, and cannot reach a package index. This script downloads,
# here, the wheels of those packages at the versions of this checkout's .venv into .whl/ (ignored by
# git), to be carried along and installed there with:
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
#   export PYTHONPATH=/tmp/site:$PWD
#
# Usage: benchmarks/gpu_wheels.sh [python of the .venv, default .venv/bin/python]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}

# What the image lacks (its package list: /work/.library/device/KINDS.md), with what they need beyond it.
# typing_extensions is there, but maybe older than pydantic needs; huggingface_hub (1.33) suits diffusers.
NAMES=(diffusers gymnasium farama-notifications pydantic pydantic_core annotated-types typing-inspection
       typing_extensions importlib_metadata lazy-importer)
PINS=()
for name in "${NAMES[@]}"; do
    PINS+=("$name==$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")")
done

exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
rm -rf .whl && mkdir -p .whl
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do
    PLATFORMS+=(--platform "$p")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d .whl "${PINS[@]}"
ls .whl
du -sh .whl
