"""``scripts/recalibrate_bn.py`` end to end: a trained run's checkpoint recalibrated on 2 processes, its statistics
checked against population statistics computed here over the same samples."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from data import build_datasets
from data.loaders import build_precise_batches
from engine.config import load_config
from engine.inputs import InputPrep
from models import build_model
from tests.helpers.jobs import REPO_ROOT, child_env, run_train_preloaded, tiny_overrides
from tests.helpers.syncbn import population_statistics

pytestmark = pytest.mark.slow
SAMPLES = 128  # 4 global batches of 2 x 16


def _reference(run_dir, checkpoint) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The checkpoint's weights in the plain model, over the samples PreciseBN's slice gives 2 processes of 16: the
    same samples in global batches of 32 (SyncBN over 2 ranks normalises as one process of 32 does)."""
    cfg = load_config(str(run_dir / "config.yaml"), ["data.batch_size=32"])
    model = build_model(cfg.model)
    model.load_state_dict(checkpoint["model"])
    train = build_datasets(cfg.data, cfg.model.num_classes, cfg.train.seed).train
    prepare = InputPrep(torch.device("cpu"))  # generated float images: taken as they are
    batches = [images for images, _ in build_precise_batches(train, cfg, 0, 1, pin_memory=False, inputs=prepare)]
    return population_statistics(model, batches[: SAMPLES // 32])


def test_recalibrate_writes_the_population_statistics_of_the_same_samples(tmp_path) -> None:
    run_dir = tmp_path / "run"
    rc, out, err = run_train_preloaded(tiny_overrides(run_dir, train__epochs=1))
    assert rc == 0, err[-3000:]
    best = run_dir / "checkpoints" / "best.pt"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "scripts/recalibrate_bn.py", "--config", str(run_dir / "config.yaml"), "--checkpoint", str(best),
               f"syncbn.precise_bn_samples={SAMPLES}"]  # fmt: skip
    done = subprocess.run(command, cwd=REPO_ROOT, env=child_env(), capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "recalibrated" in done.stdout and "before" in done.stdout and "after" in done.stdout, done.stdout
    assert f"from {SAMPLES} training samples" in done.stdout
    written = torch.load(run_dir / "checkpoints" / "best_recalibrated.pt", weights_only=True)
    original = torch.load(best, weights_only=True)
    assert written.keys() == original.keys()
    same = [k for k in original["model"] if "running" not in k and "num_batches" not in k
            and not torch.equal(original["model"][k], written["model"][k])]  # fmt: skip
    assert not same  # the same weights
    want = _reference(run_dir, original)
    assert len(want) == 7  # small_cnn's BatchNorm layers
    for name, (mean, var) in want.items():
        got_mean, got_var = written["model"][f"{name}.running_mean"], written["model"][f"{name}.running_var"]
        assert torch.allclose(got_mean.double(), mean, rtol=1e-4, atol=1e-5), name
        assert torch.allclose(got_var.double(), var, rtol=1e-4, atol=1e-5), name
        assert not torch.allclose(original["model"][f"{name}.running_var"].double(), var, rtol=1e-2), name

    # and it resumes like any checkpoint: evaluate it
    rc, out, err = run_train_preloaded(tiny_overrides(tmp_path / "eval", train__eval_only=True,
                                                      train__resume=run_dir / "checkpoints" / "best_recalibrated.pt"))
    assert rc == 0 and "val_acc1" in out, err[-3000:]
