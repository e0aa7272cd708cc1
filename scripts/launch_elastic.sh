#!/usr/bin/env bash
# Multi-node with c10d rendezvous: no fixed node ranks, crashed workers restarted up to MAX_RESTARTS times, and with
# NNODES=MIN:MAX an elastic job: when a node dies the others restart with fewer processes and continue the run (from
# output_dir's last checkpoint, at the new world size), and a node that joins makes the next round larger.
#   NNODES=2 RDZV_ENDPOINT=10.0.0.1:29400 JOB_ID=exp1 scripts/launch_elastic.sh 8 --config configs/imagenet_resnet50.yaml
#   NNODES=1:4 RDZV_ENDPOINT=10.0.0.1:29400 JOB_ID=exp1 scripts/launch_elastic.sh 8 --config configs/imagenet_resnet50.yaml
# A run continues exactly on another number of processes when its config fixes data.global_batch_size (the shipped
# CIFAR, ImageNet and VOC configs do); README: Fault tolerance. RDZV_CONF passes torchrun's --rdzv_conf (for example
# last_call_timeout=5: how long a round waits for more nodes once MIN have joined; default 30 s).
set -euo pipefail
# Restarted gloo workers must not reuse the dead round's addresses from torchrun's shared store
# (pytorch/pytorch#135712); a fresh store per round makes restarts work.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
NPROC=${1:?usage: NNODES=N|MIN:MAX RDZV_ENDPOINT=host:port JOB_ID=.. $0 NPROC --config FILE [overrides]}
shift
cd "$(dirname "$0")/.."
source scripts/torchrun_status.sh  # the workers' exit code (75: relaunch to resume), not torchrun's 1
run_torchrun \
  --nnodes="${NNODES:?set NNODES}" --nproc_per_node="$NPROC" \
  --rdzv_backend=c10d --rdzv_endpoint="${RDZV_ENDPOINT:?set RDZV_ENDPOINT}" --rdzv_id="${JOB_ID:-ddp-syncbn}" \
  ${RDZV_CONF:+--rdzv_conf="$RDZV_CONF"} --max_restarts="${MAX_RESTARTS:-3}" train_distributed.py "$@"
