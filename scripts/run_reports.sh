#!/usr/bin/env bash
# Regenerate the latency reports in reports/ on this machine (run it on a quiet machine:
# other load widens the intervals, and the reports flag unstable figures).
set -uo pipefail
cd "$(dirname "$0")/.."
DK=.venv/bin/deploykit
mkdir -p results
for sweep in ${SWEEPS:-repvgg-fusion-cpu convnext-fc-vs-conv ghost-cpu-vs-gpu repvgg-fusion cpu-targets}; do
  echo "== $sweep $(date -u +%H:%M:%S)"
  $DK bench --sweep "sweeps/$sweep.yaml" --results "results/$sweep.jsonl" \
    && $DK report latency "results/$sweep.jsonl" --out "reports/$sweep" --force
done
echo "== done $(date -u +%H:%M:%S)"
