#!/usr/bin/env bash
# The main job on a small generated MajorTOM-format dataset: generate -> build -> verify -> inspect.
# Prints every real command before running it. Output goes to ./demo-output (recreated each run).
set -euo pipefail
cd "$(dirname "$0")/.."
out=demo-output
run() { echo "+ $*" >&2; "$@"; }

rm -rf "$out"
run python tools/majortom_fixture.py "$out/majortom" --files 3 --rows 4 --tile-size 1068
run phileo-shard build --source majortom --input "$out/majortom" --output "$out/shards" \
    --shard-size 64MB --workers 2 --max-cloud 90
run phileo-shard verify "$out/shards"
run phileo-shard inspect "$out/shards" --max-samples 4 --preview "$out/preview.png"
echo "demo done: dataset in $out/shards (manifest.json, index.parquet, shards/*.tar), preview in $out/preview.png" >&2
