#!/usr/bin/env bash
# One node, N processes (one per GPU; on a CPU-only machine, N CPU processes over gloo).
#   scripts/launch_single_node.sh 8 --config configs/imagenet_resnet50.yaml train.epochs=90
# --standalone runs the rendezvous on this machine only (loopback, a free port): nothing is exposed.
set -euo pipefail
NPROC=${1:?usage: $0 NPROC --config FILE [section.key=value ...]}
shift
cd "$(dirname "$0")/.."
source scripts/torchrun_status.sh  # the workers' exit code (75: relaunch to resume), not torchrun's 1
run_torchrun --standalone --nproc_per_node="$NPROC" train_distributed.py "$@"
