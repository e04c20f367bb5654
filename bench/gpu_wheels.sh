#!/usr/bin/env bash
# Wheels that bench/gpu_check.sh needs on a GPU machine whose image has torch, transformers
# and peft but no DeepSpeed and no network (Python 3.12, x86-64): DeepSpeed (pure Python
# with DS_BUILD_OPS=0) and the dependencies such images lack. Writes them to .whl/.
#   bash bench/gpu_wheels.sh            # here, with registry access
#   there: python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl \
#          && PYTHONPATH=/tmp/site bash bench/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
PY="${PYTHON:-python3}"
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps -w .whl deepspeed==0.19.8
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
ls -la .whl
