#!/usr/bin/env bash
# Set up a development environment from scratch: .venv with torch, torchvision and this package (kernels
# built in place, CUDA ones too when nvcc and a CUDA build of torch are present).  Idempotent.
#   PYTHON=python3.11 bash scripts/setup.sh      # choose the interpreter
#   NMX_FORCE_CPU=1 bash scripts/setup.sh        # skip the CUDA kernels (faster build)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${NMX_TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q $TORCH_SPEC
.venv/bin/python -m pip install -q ninja setuptools wheel numpy
# --no-build-isolation: the kernels must be compiled against the torch installed above.
MAX_JOBS=${MAX_JOBS:-2} .venv/bin/python -m pip install -q --no-build-isolation -e ".[test,plot,tensorboard,huggingface,lightning]"
.venv/bin/python -c "import neural_mechanics_ext as nmx; print('neural_mechanics_ext', nmx.build_info())"
