#!/usr/bin/env bash
# Every registered method's tiny preset on both synthetic streams at a reduced budget, in this
# process (scaling.backend=local), and one JSON of their accuracy matrices and metrics: the
# before/after check of a restructuring (same seed, same threads -> the same matrices).
#   bench/method_matrices.sh /tmp/matrices            # ~6 min on 2 cores
#   bench/method_matrices.sh /tmp/matrices "mr_lora lora_ft" "dcl"
# Writes <out>/matrices.json ({"<stream>/<method>": {"matrix": ..., "metrics": ...}}).
set -euo pipefail
out="${1:?usage: bench/method_matrices.sh OUT [methods] [streams]}"
methods="${2:-zero_shot lora_ft replay joint olora moelora disco_select mr_lora}"
streams="${3:-dcl acl}"
here="$(cd "$(dirname "$0")/.." && pwd)"; mkdir -p "$out"; out="$(cd "$out" && pwd)"; cd "$here"
PY="${PYTHON:-python}"
BUDGET="scaling.backend=local data.limit=60 train.epochs=2 method.router_epochs=4 run.progress=false"
for s in $streams; do
  job=jobs/domain_stream.py; [ "$s" = acl ] && job=jobs/ability_stream.py
  for m in $methods; do
    start=$(date +%s)
    # shellcheck disable=SC2086
    "$PY" "$job" --config "jobs/configs/$s/${m}_tiny.yaml" $BUDGET \
      storage.root="$out" run.id="$s-$m" > "$out/$s-$m.log" 2>&1 || { echo "$s $m failed: see $out/$s-$m.log"; exit 1; }
    echo "$s $m: $(( $(date +%s) - start ))s"
  done
done
"$PY" - "$out" $streams -- $methods <<'PY'
import json, sys
out = sys.argv[1]; i = sys.argv.index("--")
res = {}
for s in sys.argv[2:i]:
    for m in sys.argv[i + 1:]:
        d = f"{out}/runs/{s}-{m}/metrics"
        res[f"{s}/{m}"] = {"matrix": json.load(open(f"{d}/accuracy_matrix.json")),
                           "metrics": json.load(open(f"{d}/metrics.json"))}
json.dump(res, open(f"{out}/matrices.json", "w"), indent=1, sort_keys=True)
print(f"{out}/matrices.json")
PY
