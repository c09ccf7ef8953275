#!/usr/bin/env bash
# The GPU figures of issue 8, in under 8 minutes on one H100/H200:
#   bf16 training throughput with MFU (small, medium; batch 16 x 1024, random tokens),
#   torch.compile on/off, fused vs unfused score entropy and sampler (before/after),
#   sampling throughput, and the cached RADD sampler against the plain one; then the
#   evaluation throughput of python -m sedd_ray.evaluate (EVAL_GPU.md).
#
#   bash benchmarks/gpu.sh [OUT_DIR]     # writes OUT_DIR/RESULTS_GPU.md, .json and gpu.log
#
# OUT_DIR defaults to $OUT (the device runner's output folder) or benchmarks/. Needs a
# Python with CUDA torch and numpy (set PYTHON=...; default: .venv/bin/python, python3).
# No network, corpus or Ray is needed. Results are rewritten after every section, so a
# run cut short keeps what it measured. Copy the tables into RESULTS.md afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST="${1:-${OUT:-benchmarks}}"
mkdir -p "$DEST"

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for cand in .venv/bin/python python3 python; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c "import torch, numpy" 2>/dev/null; then
      PY="$cand"; break
    fi
  done
fi
if [ -z "$PY" ]; then
  echo "error: no Python with torch and numpy found; set PYTHON=/path/to/python" >&2
  exit 2
fi

"$PY" - <<'PYEOF' || exit 2
import sys
import torch
if not torch.cuda.is_available():
    sys.exit(f"error: benchmarks/gpu.sh needs a CUDA device, but torch {torch.__version__} "
             f"(CUDA build {torch.version.cuda}) sees none; the CPU figures are "
             "`python benchmarks/run.py`")
p = torch.cuda.get_device_properties(0)
print(f"GPU: {p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, "
      f"CUDA {torch.version.cuda}", flush=True)
PYEOF

nvidia-smi --query-gpu=name,memory.used,memory.total,utilization.gpu --format=csv \
  > "$DEST/gpu.log" 2>&1 || true
# 470 s for everything; the sections run in order of importance
timeout 470 "$PY" benchmarks/run.py --gpu --out "$DEST/RESULTS_GPU.md" --timeout 420 \
  2>&1 | tee -a "$DEST/gpu.log"
rc=${PIPESTATUS[0]}
# issue 16: evaluation throughput (bound tokens/s in bf16, samples/s), ~1 minute
timeout 120 "$PY" benchmarks/eval_throughput.py --device cuda --out "$DEST/EVAL_GPU.md" \
  2>&1 | tee -a "$DEST/gpu.log" || rc=1
echo "gpu.sh: exit $rc; results in $DEST/RESULTS_GPU.md" | tee -a "$DEST/gpu.log"
exit "$rc"
