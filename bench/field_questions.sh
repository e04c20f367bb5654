#!/usr/bin/env bash
# The numbers of the README's "Task orders, routers and their cost" section, on one stream:
#  1. the router table: MR-LoRA at the default budget, then its experts re-routed by every other
#     router (jobs/reroute.py), tabulated by jobs/compare.py --routers;
#  2. the orders table: MR-LoRA, LoRA-FT and replay in 3 orders (paper, reverse, random:1) at the
#     orders sweep's budget (sweeps/orders_dcl.yaml: 200 train / 100 test samples, 3 epochs), mean ± std.
# In this process (scaling.backend=local: the same runner and methods without Ray's start-up per fit);
# sweeps/orders_dcl.yaml runs the same grid as a Ray Tune sweep on a cluster.
#   bench/field_questions.sh dcl /tmp/mllmcl-field          # ~35 min on 2 cores
#   bench/field_questions.sh acl /tmp/mllmcl-field
set -euo pipefail
stream="${1:-dcl}"; root="${2:-artifacts}"
job=jobs/domain_stream.py; [ "$stream" = acl ] && job=jobs/ability_stream.py
here="$(cd "$(dirname "$0")/.." && pwd)"; cd "$here"
PY="${PYTHON:-python}"
mkdir -p "$root"
run() { local id=$1; shift; local start; start=$(date +%s)
  "$PY" "$job" storage.root="$root" run.id="$id" run.progress=false scaling.backend=local "$@" > "$root/$id.log" 2>&1 \
    || { echo "$id failed: see $root/$id.log"; return 1; }
  echo "$id: $(( $(date +%s) - start ))s"; }

run "field-$stream-mr_lora"
start=$(date +%s)
"$PY" jobs/reroute.py "$root/runs/field-$stream-mr_lora" scaling.backend=local run.progress=false > "$root/reroute-$stream.log" 2>&1 \
  || { echo "reroute failed: see $root/reroute-$stream.log"; exit 1; }
echo "reroute (4 routers): $(( $(date +%s) - start ))s"
"$PY" jobs/compare.py --routers "$root"/runs/field-"$stream"-mr_lora* | sed -n '1,/^$/p'

budget=(data.limit=200 data.synthetic_test=100 train.epochs=3)
runs=()
for m in mr_lora lora_ft replay; do
  for order in paper reverse random:1; do
    id="order-$stream-$m-${order/:/}"
    run "$id" method.name="$m" data.order="$order" "${budget[@]}" && runs+=("$root/runs/$id")
  done
done
"$PY" jobs/compare.py "${runs[@]}" | sed -n '1,/^$/p'
