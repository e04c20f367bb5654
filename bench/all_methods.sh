#!/usr/bin/env bash
# The all-methods table (README "Measured: every method on both synthetic streams"): every registered
# method's tiny preset (jobs/configs/<stream>/<method>_tiny.yaml: the default budget, 1000 train /
# 200 test samples a task) on one stream, in this process (scaling.backend=local: the same runner,
# methods and training loop without Ray's start-up per fit), then one table: final accuracy per task,
# MFT, MFN, MAA, BWT, FWT, router accuracy, and the seconds spent in fine-tuning (all fits of all
# stages, from the manifest) and in the whole run.
#   bench/all_methods.sh dcl /tmp/mllmcl-all                      # every method, ~1 h on 2 cores
#   bench/all_methods.sh acl /tmp/mllmcl-all "sefe keeplora"      # some of them
# A method whose run is already complete in OUT is not run again (its table row is read back).
set -euo pipefail
stream="${1:-dcl}"; root="${2:-artifacts}"; methods="${3:-}"
job=jobs/domain_stream.py; [ "$stream" = acl ] && job=jobs/ability_stream.py
here="$(cd "$(dirname "$0")/.." && pwd)"; cd "$here"
PY="${PYTHON:-python}"
mkdir -p "$root"; root="$(cd "$root" && pwd)"
[ -n "$methods" ] || methods="$("$PY" -c 'from mllmcl.methods import registered_methods as r; print(" ".join(r()))')"
runs=()
for m in $methods; do
  id="all-$stream-$m"
  if [ ! -f "$root/runs/$id/metrics/metrics.json" ]; then
    start=$(date +%s)
    "$PY" "$job" --config "jobs/configs/$stream/${m}_tiny.yaml" storage.root="$root" run.id="$id" run.progress=false \
      scaling.backend=local > "$root/$id.log" 2>&1 || { echo "$m failed: see $root/$id.log"; continue; }
    echo "$stream $m: $(( $(date +%s) - start ))s"
  fi
  runs+=("$root/runs/$id")
done
"$PY" - "${runs[@]}" <<'PY'
import json, sys
from mllmcl.evaluation.compare import comparison_rows, load_run_metrics
from mllmcl import storage

runs = sys.argv[1:]
header, rows = comparison_rows([load_run_metrics(r) for r in runs])
fmt = lambda v: "–" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)  # noqa: E731
print("| " + " | ".join([*header, "train s", "run s"]) + " |")
print("|" + "---|" * (len(header) + 2))
for run, row in zip(runs, rows):
    manifest = json.loads(storage.read_text(storage.join(run, "manifest.json")))
    train = sum(t.get("seconds") or 0.0 for s in manifest["stages"] for t in s.get("train", []))
    total = sum(s.get("seconds") or 0.0 for s in manifest["stages"])
    print("| " + " | ".join([*map(fmt, row), f"{train:.0f}", f"{total:.0f}"]) + " |")
PY
