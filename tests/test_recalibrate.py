"""``scripts/recalibrate_bn.py`` end to end: a trained run's checkpoint recalibrated on 2 processes."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.helpers.jobs import REPO_ROOT, child_env, run_train_preloaded, tiny_overrides

pytestmark = pytest.mark.slow


def test_recalibrate_writes_a_checkpoint_with_population_statistics(tmp_path) -> None:
    run_dir = tmp_path / "run"
    rc, out, err = run_train_preloaded(tiny_overrides(run_dir, train__epochs=1))
    assert rc == 0, err[-3000:]
    best = run_dir / "checkpoints" / "best.pt"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "scripts/recalibrate_bn.py", "--config", str(run_dir / "config.yaml"), "--checkpoint", str(best),
               "syncbn.precise_bn_samples=128"]
    done = subprocess.run(command, cwd=REPO_ROOT, env=child_env(), capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "recalibrated" in done.stdout and "before" in done.stdout and "after" in done.stdout, done.stdout
    written = torch.load(run_dir / "checkpoints" / "best_recalibrated.pt", weights_only=True)
    original = torch.load(best, weights_only=True)
    assert written.keys() == original.keys()
    changed = [k for k in original["model"] if "running" in k and not torch.equal(original["model"][k],
                                                                                  written["model"][k])]
    same = [k for k in original["model"] if "running" not in k and "num_batches" not in k
            and not torch.equal(original["model"][k], written["model"][k])]
    assert changed and not same  # new statistics, the same weights

    # and it resumes like any checkpoint: evaluate it
    rc, out, err = run_train_preloaded(tiny_overrides(tmp_path / "eval", train__eval_only=True,
                                                      train__resume=run_dir / "checkpoints" / "best_recalibrated.pt"))
    assert rc == 0 and "val_acc1" in out, err[-3000:]
