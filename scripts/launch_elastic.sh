#!/usr/bin/env bash
# Multi-node with c10d rendezvous (no fixed node ranks; restarts crashed workers up to MAX_RESTARTS times).
#   NNODES=2 RDZV_ENDPOINT=10.0.0.1:29400 JOB_ID=exp1 scripts/launch_elastic.sh 8 --config configs/imagenet_resnet50.yaml
# Workers resume from output_dir's last checkpoint after a restart (train.resume: auto).
set -euo pipefail
# Restarted gloo workers must not reuse the dead round's addresses from torchrun's shared store
# (pytorch/pytorch#135712); a fresh store per round makes --max_restarts work.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
NPROC=${1:?usage: NNODES=.. RDZV_ENDPOINT=host:port JOB_ID=.. $0 NPROC --config FILE [overrides]}
shift
cd "$(dirname "$0")/.."
exec torchrun \
  --nnodes="${NNODES:?set NNODES}" --nproc_per_node="$NPROC" \
  --rdzv_backend=c10d --rdzv_endpoint="${RDZV_ENDPOINT:?set RDZV_ENDPOINT}" --rdzv_id="${JOB_ID:-ddp-syncbn}" \
  --max_restarts="${MAX_RESTARTS:-3}" train_distributed.py "$@"
