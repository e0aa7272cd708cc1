"""The user-facing proof script runs and reports PASS (layer table and whole-model mode)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers.jobs import REPO_ROOT, child_env

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("extra", [[], ["--config", "configs/default.yaml"], ["--config", "configs/segmentation.yaml"]],
                         ids=["layers", "model", "segmentation_model"])
def test_verify_syncbn_passes(extra):
    result = subprocess.run([sys.executable, "scripts/verify_syncbn.py", "--nproc", "2", *extra], cwd=REPO_ROOT,
                            env=child_env(), capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "PASS" in result.stdout and "FAIL" not in result.stdout


def test_verify_model_fails_on_a_wrong_tolerance():
    # the check can fail: an impossible tolerance must turn it red
    result = subprocess.run([sys.executable, "scripts/verify_syncbn.py", "--config", "configs/default.yaml",
                             "--atol", "0"], cwd=REPO_ROOT, env=child_env(), capture_output=True, text=True,
                            timeout=180)
    assert result.returncode == 1 and "FAIL" in result.stdout
