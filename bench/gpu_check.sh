#!/usr/bin/env bash
# GPU check (issue 18): a 2-task MR-LoRA stream (synthetic DCL twin, RS -> Med) through the platform's
# own runner with scaling.backend=local (no Ray), on a 1.19 B LLaVA-shaped model (random weights, built
# from config, no download) in bf16, without and with activation checkpointing; then prints training
# samples/s, MFU, peak GPU memory beside the planner's estimate, evaluation generated tokens/s and the
# accuracy matrix (bench/gpu_check.py's docstring says how each is measured). One GPU, < 8 minutes.
# Needs only torch (with CUDA), transformers, peft and pyarrow (and what they bring: numpy, pyyaml,
# tokenizers, safetensors, pillow); not Ray, not DeepSpeed. Runs from a checkout (PYTHONPATH=platform).
#   bash bench/gpu_check.sh [--out results.json] [--root DIR --keep] [--checkpointing off,on]
#   bash bench/gpu_check.sh --tiny [--out r.json]     # the same path on CPU with a tiny model (< 1 min)
#   bash bench/gpu_check.sh --help                    # every option
# PYTHON=/path/to/python picks the interpreter (default python3); MLLMCL_CACHE where the base and the
# synthetic data are built (default ~/.cache/mllmcl).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false HF_HUB_DISABLE_PROGRESS_BARS=1
export PYTHONPATH="$PWD/platform${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
tiny=0
for arg in "$@"; do
  case "$arg" in
    -h|--help) exec "$PY" bench/gpu_check.py --help ;;
    --tiny) tiny=1 ;;
  esac
done
"$PY" - "$tiny" <<'PYEOF'
import importlib.util, sys
tiny = sys.argv[1] == "1"
needed = ("torch", "transformers", "peft", "pyarrow", "yaml", "PIL")  # yaml: pyyaml, PIL: pillow
missing = [m for m in needed if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"gpu_check: missing packages {missing} (it needs {', '.join(needed)}; not Ray, not DeepSpeed)")
if not tiny:
    import torch
    if not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device (bash bench/gpu_check.sh --tiny runs the same path on CPU)")
    print("GPU:", torch.cuda.get_device_name(0), "| torch", torch.__version__, "| CUDA", torch.version.cuda)
PYEOF
if [ "$tiny" = 0 ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
exec timeout 470 "$PY" bench/gpu_check.py "$@"
