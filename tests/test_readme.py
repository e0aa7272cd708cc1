"""The README is a contract: its training commands work in the order it shows them, and its Python blocks run.

The commands run in a copy of the repository (they write ``runs/`` relative to where they run), shortened only by
overrides appended at the end that keep the model and every output path (1 epoch on 256 samples).
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.jobs import REPO_ROOT, child_env

pytestmark = pytest.mark.slow

README = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
SHORT = ["train.epochs=1", "data.num_train=256", "data.num_val=64", "train.print_freq=1000",
         "train.progress_bar=false", "train.tensorboard=false"]


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def _training_commands_of_the_first_steps() -> list[str]:
    """The README's training commands up to its launch table, in order: what a new user runs first."""
    first_steps = README.split("## Launching", 1)[0]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", first_steps, flags=re.S):
        for line in block.splitlines():
            command = line.split("#", 1)[0].strip()
            if "train_distributed.py" in command:
                commands.append(command)
    return commands


@pytest.fixture(scope="module")
def repo_copy(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("repo")
    for name in ("train_distributed.py", "configs", "engine", "data", "models"):
        source = REPO_ROOT / name
        if source.is_dir():
            shutil.copytree(source, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, root / name)
    return root


def test_the_readmes_training_commands_work_in_the_order_shown(repo_copy: Path) -> None:
    commands = _training_commands_of_the_first_steps()
    assert len(commands) >= 2 and commands[0].startswith("torchrun"), commands  # the default job, then 1 process
    for command in commands:
        argv = shlex.split(command)
        argv = [sys.executable, "-m", "torch.distributed.run", *argv[1:]] if argv[0] == "torchrun" else \
            [sys.executable, *argv[1:]]
        done = subprocess.run([*argv, *SHORT], cwd=repo_copy, env=child_env(), capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, f"{command}\n{done.stderr[-3000:]}"


def test_the_readmes_python_blocks_run(repo_copy: Path) -> None:
    """Each block as a user pastes it, in a fresh interpreter at the repository root, after the default job."""
    if not (repo_copy / "runs" / "default" / "checkpoints" / "best.pt").exists():
        test_the_readmes_training_commands_work_in_the_order_shown(repo_copy)
    blocks = _blocks("python")
    assert blocks
    for block in blocks:
        done = subprocess.run([sys.executable, "-c", block], cwd=repo_copy, env=child_env(), capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, f"{block}\n{done.stderr[-3000:]}"
