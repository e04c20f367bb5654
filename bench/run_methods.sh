#!/usr/bin/env bash
# Run every core method on one stream with the default settings and print the
# comparison table (the closing-note table of the stream runner).
#   bench/run_methods.sh dcl /tmp/mllmcl-runs            # ~45 min on 2 cores
#   bench/run_methods.sh acl /tmp/mllmcl-runs "mr_lora lora_ft"
set -euo pipefail
stream="${1:-dcl}"; root="${2:-artifacts}"; methods="${3:-mr_lora lora_ft replay joint zero_shot}"
job=jobs/domain_stream.py; [ "$stream" = acl ] && job=jobs/ability_stream.py
here="$(cd "$(dirname "$0")/.." && pwd)"; cd "$here"
PY="${PYTHON:-python}"
runs=()
for m in $methods; do
  start=$(date +%s)
  scripts/loopback.sh "$PY" "$job" method.name="$m" storage.root="$root" run.id="bench-$stream-$m" run.progress=false \
    > "$root/bench-$stream-$m.log" 2>&1 || { echo "$m failed: see $root/bench-$stream-$m.log"; continue; }
  echo "$stream $m: $(( $(date +%s) - start ))s"
  runs+=("$root/runs/bench-$stream-$m")
done
"$PY" jobs/compare.py "${runs[@]}"
