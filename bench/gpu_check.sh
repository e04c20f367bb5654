#!/usr/bin/env bash
# GPU check (issue 7): one MR-LoRA expert fine-tuning on a ~1.1 B-parameter VLM-shaped model
# (built from config, no download) with DDP and with DeepSpeed ZeRO-2 in bf16, 20 steps each;
# prints samples/s, peak GPU memory and MFU. Needs torch with CUDA, transformers, peft and
# deepspeed importable (no network needed: the package is used from platform/). < 8 minutes.
#   bash bench/gpu_check.sh [--steps 20 --batch 8 --text-len 256] [--out results.json]
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-/tmp/mllmcl-torch-extensions}"
PY="${PYTHON:-python3}"
"$PY" - <<'PYEOF'
import importlib, sys
missing = [m for m in ("torch", "transformers", "peft", "deepspeed", "safetensors") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"gpu_check: missing packages {missing} (pip install them, or carry wheels)")
import torch
if not torch.cuda.is_available():
    sys.exit("gpu_check: no CUDA device (use `python bench/gpu_check.py --tiny` for the CPU smoke test)")
print("GPU:", torch.cuda.get_device_name(0), "| torch", torch.__version__, "| CUDA", torch.version.cuda)
PYEOF
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec timeout 470 "$PY" bench/gpu_check.py "$@"
