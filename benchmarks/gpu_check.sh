#!/usr/bin/env bash
# Every check that needs CUDA, in one command, for the day a GPU is lent (about 8 minutes on one GPU):
#   1. the CUDA-marked tests (tests/test_cuda.py: torch.nn.SyncBatchNorm and NCCL, our SyncBN on CUDA tensors,
#      AMP fp16 with the GradScaler, bf16, channels_last, torch.compile with inductor, the template on the GPU);
#   2. the SyncBN layer benchmark on the GPU (ours vs torch.nn.SyncBatchNorm vs local BN, bf16, channels_last);
#   3. ResNet-50 images/s (bf16, channels_last, compiled or not) with SyncBN on and off;
#   4. the input pipeline's images/s per CPU core, and the cores per GPU it takes to feed step 3's rate.
# Without a GPU it says so and exits 0 at once. Logs go to ${OUT:-runs/gpu_check}/.
#   bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: no CUDA GPU visible (torch.cuda.is_available() is False): nothing to check here"
  exit 0
fi
out=${OUT:-runs/gpu_check}
mkdir -p "$out"
failed=()
step() {  # step NAME COMMAND...: run it, its output on the console and in $out/NAME.log
  local name=$1; shift
  echo "== $name: $*"
  if ! timeout 300 "$@" 2>&1 | tee "$out/$name.log"; then failed+=("$name"); fi
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
step cuda_tests python -m pytest -q -m cuda tests/test_cuda.py -p no:cacheprovider
step syncbn_layer python -m torch.distributed.run --standalone --nproc_per_node=1 benchmarks/bench_syncbn_layer.py \
  --gpu --dtype bf16 --channels-last --quick
step resnet50 python -m torch.distributed.run --standalone --nproc_per_node=1 benchmarks/bench_end_to_end_gpu.py \
  --steps 20 --repeats 2
rate=$(awk '/^FASTEST_SYNCBN_IMAGES_PER_S/ {print $2}' "$out/resnet50.log")
step input_pipeline python benchmarks/bench_image_pipeline.py --count 48 --rounds 3 --model-rate "${rate:-3000}"
if [ ${#failed[@]} -gt 0 ]; then echo "gpu_check: FAILED: ${failed[*]} (logs in $out/)"; exit 1; fi
echo "gpu_check: all checks ran; logs in $out/"
