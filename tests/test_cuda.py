"""Checks that need CUDA (run by ``benchmarks/gpu_check.sh`` when a GPU is there; skipped cleanly without one):
NCCL and torch.nn.SyncBatchNorm at one process, our SyncBatchNorm on CUDA tensors, AMP fp16 with the GradScaler,
bf16, channels_last, torch.compile with inductor, and a short run of the template on the GPU."""

from __future__ import annotations

import copy
import os
import subprocess
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine.bn import SyncBatchNorm, convert_sync_batchnorm
from engine.inputs import InputPrep
from engine.runtime.spawn import REPO_ROOT, child_env
from tests.helpers.jobs import metric_records, run_train, tiny_overrides

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: gpu_check.sh runs for real")
def test_gpu_check_without_a_gpu_says_so_and_exits_0() -> None:
    started = time.monotonic()
    done = subprocess.run(["bash", str(REPO_ROOT / "benchmarks" / "gpu_check.sh")], env=child_env(),
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0 and "gpu_check: no CUDA GPU visible" in done.stdout, done.stdout + done.stderr
    assert time.monotonic() - started < 30  # at once: it imports torch and stops


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 4))


@pytest.mark.cuda
@needs_cuda
def test_our_syncbn_on_cuda_tensors_equals_batchnorm_without_a_group() -> None:
    bn = nn.BatchNorm2d(5).cuda()
    ours = convert_sync_batchnorm(copy.deepcopy(bn), impl="ours")
    assert type(ours) is SyncBatchNorm
    x = torch.randn(6, 5, 7, 7, device="cuda", requires_grad=True)
    torch.testing.assert_close(ours(x), bn(x))
    assert ours.single_value_batches.device.type == "cuda"


@pytest.mark.cuda
@needs_cuda
def test_the_template_trains_on_the_gpu_with_nccl_and_torch_syncbn(tmp_path) -> None:
    """One process on the GPU: NCCL is not needed at world size 1, so this runs torch.nn.SyncBatchNorm (impl auto on
    CUDA), bf16 autocast and channels_last through the real entry script."""
    out = tmp_path / "run"
    rc, stdout, stderr = run_train(tiny_overrides(out, train__amp="bf16", train__channels_last=True), nproc=1)
    assert rc == 0, stderr[-3000:]
    assert "device cuda:0" in stdout and "torch.nn.modules.batchnorm.SyncBatchNorm" in stdout, stdout[-2000:]
    assert len(metric_records(out)) == 2


@pytest.mark.cuda
@needs_cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2 and "RANK" not in os.environ, reason="NCCL over 2 GPUs")
def test_nccl_on_two_gpus_through_torchrun(tmp_path) -> None:
    out = tmp_path / "run"
    rc, stdout, stderr = run_train(tiny_overrides(out), nproc=2)
    assert rc == 0, stderr[-3000:]
    assert "backend nccl" in stdout


@pytest.mark.cuda
@needs_cuda
def test_fp16_grad_scaler_skips_an_inf_step_on_cuda() -> None:
    model = _net().cuda()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cuda")
    before = [p.detach().clone() for p in model.parameters()]
    x, y = torch.randn(8, 3, 16, 16, device="cuda"), torch.randint(0, 4, (8,), device="cuda")
    with torch.autocast("cuda", dtype=torch.float16):
        loss = F.cross_entropy(model(x), y)
    scaler.scale(loss * float("inf")).backward()
    scaler.step(optimizer)
    scaler.update()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before)) and scaler.get_scale() < 2.0**16


@pytest.mark.cuda
@needs_cuda
def test_bf16_channels_last_and_inductor_compile_agree_with_eager() -> None:
    model = convert_sync_batchnorm(_net().cuda().to(memory_format=torch.channels_last))
    compiled = torch.compile(copy.deepcopy(model))  # inductor, the default backend
    inputs = InputPrep(torch.device("cuda"), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), channels_last=True)
    x = inputs(torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8))
    assert x.is_contiguous(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        eager, fused = model(x), compiled(x)
    assert eager.dtype == torch.bfloat16
    torch.testing.assert_close(fused.float(), eager.float(), atol=5e-2, rtol=5e-2)


@pytest.mark.cuda
@needs_cuda
def test_metrics_of_a_gpu_run_are_finite(tmp_path) -> None:
    out = tmp_path / "run"
    rc, _, stderr = run_train(tiny_overrides(out, train__amp="fp16"), nproc=1)
    assert rc == 0, stderr[-3000:]
    records = metric_records(out)
    assert all(r["train_loss"] == r["train_loss"] for r in records)
