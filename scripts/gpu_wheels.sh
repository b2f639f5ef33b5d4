#!/usr/bin/env bash
# The Python packages the lent GPU image lacks (it has torch 2.11, transformers 5.17, numpy,
# pillow, safetensors, pyarrow ...; see the device library's KINDS.md; scoring needs rapidfuzz and
# faster-coco-eval), downloaded here as
# CPython 3.12 wheels into .whl/ (git-ignored) for the device call to carry:
#
#     bash scripts/gpu_wheels.sh          # here, once per fresh checkout
#     # the device call (carry [".whl"], timeout_s 540):
#     python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#         --target /tmp/site .whl/*.whl && OUT=$OUT PYTHONPATH=/tmp/site bash scripts/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
PY="${PYTHON:-.venv/bin/python}"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d .whl \
    deltalake==1.6.6 arro3-core==0.9.1 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 \
    pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
    num2words==0.5.14 rapidfuzz==3.14.6 faster-coco-eval==1.8.0
ls .whl
