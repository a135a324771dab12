#!/bin/bash
# Runs tg.prune(side_pass_every=8) on the accuracy benchmark, one setting after another (resumes from --out).
set -e
cd "$(dirname "$0")/../../../.."
D=bench/results/accuracy/side_pass_every
for s in digits-a digits-b fmnist-resnet20 fmnist-mbv2 fmnist-full-cnn; do
  python bench/accuracy.py --settings $s --methods tg --seeds 0 1 2 --targets 0.5 0.25 0.125 --split test \
    --tg-kwargs '{"side_pass_every": 8}' --tag every8 \
    --out $D/runs_every8.jsonl --threads 1 >> $D/log_$s.txt 2>&1
done
