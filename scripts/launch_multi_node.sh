#!/usr/bin/env bash
# N nodes, P processes each. Run the same command on every node with its own NODE_RANK:
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 scripts/launch_multi_node.sh 8 --config configs/imagenet_resnet50.yaml
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 scripts/launch_multi_node.sh 8 --config configs/imagenet_resnet50.yaml
# Exposed: MASTER_ADDR:MASTER_PORT (the rendezvous store, on node 0), and the backend's own
# connections between nodes (NCCL/gloo pick ephemeral ports). Keep these on a trusted cluster network.
# output_dir must be on a filesystem shared by all nodes (checkpoints are written by global rank 0 and read by all).
set -euo pipefail
NPROC=${1:?usage: NNODES=.. NODE_RANK=.. MASTER_ADDR=.. [MASTER_PORT=29500] $0 NPROC --config FILE [overrides]}
shift
cd "$(dirname "$0")/.."
source scripts/torchrun_status.sh  # the workers' exit code (75: relaunch to resume), not torchrun's 1
run_torchrun \
  --nnodes="${NNODES:?set NNODES}" --node_rank="${NODE_RANK:?set NODE_RANK}" \
  --master_addr="${MASTER_ADDR:?set MASTER_ADDR}" --master_port="${MASTER_PORT:-29500}" \
  --nproc_per_node="$NPROC" train_distributed.py "$@"
