#!/usr/bin/env bash
# The main job on a small generated MajorTOM-format dataset: generate -> build -> verify -> inspect ->
# pretrain a few steps under torchrun (2 ranks, gloo on CPU / nccl on GPU) -> fine-tune that checkpoint on
# a generated PhilEO-Bench-format dataset (n-shot build, roads task, test metrics).
# Prints every real command before running it. Output goes to ./demo-output (recreated each run).
set -euo pipefail
cd "$(dirname "$0")/.."
out=demo-output
run() { echo "+ $*" >&2; "$@"; }

rm -rf "$out"
run python tools/majortom_fixture.py "$out/majortom" --files 3 --rows 4 --tile-size 1068
run phileo-shard build --source majortom --input "$out/majortom" --output "$out/shards" \
    --shard-size 24MB --workers 2 --max-cloud 90
run phileo-shard verify "$out/shards"
run phileo-shard inspect "$out/shards" --max-samples 4 --preview "$out/preview.png"
run torchrun --standalone --nproc-per-node 2 -m training.cli pretrain --shards "$out/shards/manifest.json" \
    --model geoaware-unet-tiny --output "$out/run" --steps 6 --batch-size 4 --crops-per-tile 8 --num-workers 1 \
    --warmup-steps 2 --log-every 2 --ckpt-every 3 --record-keys "$out/run/keys"
echo "pretraining metrics: $out/run/metrics.jsonl, checkpoints: $out/run/checkpoints" >&2
run python tools/phileo_bench_fixture.py "$out/bench-npy" --layout zip --tiles 1
run phileo-shard build --source phileo-bench --input "$out/bench-npy" --output "$out/bench" \
    --task roads --n-shot 4
run torchrun --standalone --nproc-per-node 2 -m training.cli finetune --task roads --model geoaware-unet-tiny \
    --init "$out/run/checkpoints/ckpt-000000006.pt" --mode frozen --shards "$out/bench/roads-n4/train" \
    --val-shards "$out/bench/roads-n4/val" --test-shards "$out/bench/test" --output "$out/finetune" \
    --epochs 2 --warmup-epochs 0 --lr 1e-2 --batch-size 2 --num-workers 1
echo "fine-tuning: $out/finetune/metrics.json (test RMSE), previews.png, history.jsonl" >&2
echo "demo done: dataset in $out/shards (manifest.json, index.parquet, shards/*.tar), preview in $out/preview.png" >&2
