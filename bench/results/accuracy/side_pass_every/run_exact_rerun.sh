#!/bin/bash
# Reruns the exact default (k=1) on this snapshot, one setting after another (resumes from --out):
# the recorded exact rows of fmnist-resnet20 do not reproduce on this code (digits do).
set -e
cd "$(dirname "$0")/../../../.."
D=bench/results/accuracy/side_pass_every
for s in "$@"; do
  python bench/accuracy.py --settings $s --methods tg --seeds 0 1 2 --targets 0.5 0.25 0.125 --split test \
    --tag exact-rerun \
    --out $D/runs_exact_rerun.jsonl --threads 1 >> $D/log_exact_rerun_$s.txt 2>&1
done
