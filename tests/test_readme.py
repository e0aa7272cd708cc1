"""The README and docs/ are a contract: every CPU command they show runs, in the order shown (README first), and
what they say of the output holds (a rerun says the run is complete; each Python block prints what its ``# prints:`` line says).

The commands run in a copy of the repository (they write ``runs/`` relative to where they run), shortened only by
overrides appended at the end that keep the model and every output path (1 epoch on 256 samples). Skipped, by rule:
installs (already done), the test suite itself, commands the README marks as for GPUs, and SLURM's.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.jobs import REPO_ROOT, child_env, copy_repository

pytestmark = pytest.mark.slow

# the README, then docs/ (one topic per file, linked from it), in that order
README = "\n".join(p.read_text(encoding="utf-8") for p in [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))])
SHORT = ["train.epochs=1", "data.num_train=256", "data.num_val=64", "train.print_freq=1000",
         "train.progress_bar=false", "train.tensorboard=false"]
NOT_HERE = ("pip install", "pytest", "GPU", "srun", "sbatch", "scontrol", "#SBATCH")


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def readme_commands() -> list[str]:
    """Every command of the README's bash blocks, in order, continuation lines joined, comments dropped."""
    commands = []
    for block in _blocks("bash"):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            if line.strip() and not line.strip().startswith("#") and not any(s in line for s in NOT_HERE):
                commands.append(line.split("  #", 1)[0].strip())
    return commands


def _argv(command: str) -> list[str]:
    argv = shlex.split(command)
    if argv[0] == "torchrun":
        argv = [sys.executable, "-m", "torch.distributed.run", *argv[1:]]
    elif argv[0] == "python":
        argv = [sys.executable, *argv[1:]]
    return [*argv, *SHORT] if "train_distributed.py" in command else argv


def _run(command: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(_argv(command), cwd=cwd, env=child_env(), capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def repo_copy(tmp_path_factory) -> Path:
    return copy_repository(tmp_path_factory.mktemp("readme") / "repo")


def test_the_readme_shows_the_commands_this_test_runs() -> None:
    commands = readme_commands()
    assert commands[0].startswith("torchrun --standalone --nproc_per_node=2 train_distributed.py"), commands
    assert any("model.name=cifar_resnet20" in c and "output_dir=runs/try1" in c for c in commands)  # a continuation
    assert any("scripts/verify_syncbn.py --config" in c for c in commands)


def test_every_cpu_command_runs_in_the_order_shown_and_a_rerun_says_complete(repo_copy: Path) -> None:
    commands = readme_commands()
    for command in commands:
        done = _run(command, repo_copy)
        assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    # "Run the same command again and it resumes (a finished run says it is complete)"
    again = _run(commands[0], repo_copy)
    assert again.returncode == 0 and "run complete:" in again.stdout, again.stdout[-2000:]
    assert (repo_copy / "runs" / "default" / "checkpoints" / "best.pt").exists()


def test_the_readmes_python_blocks_run_and_print_what_they_say(repo_copy: Path) -> None:
    """Each block as a user pastes it, in a fresh interpreter at the repository root, after the default job."""
    if not (repo_copy / "runs" / "default" / "checkpoints" / "best.pt").exists():
        done = _run(readme_commands()[0], repo_copy)
        assert done.returncode == 0, done.stderr[-3000:]
    blocks = _blocks("python")
    assert blocks
    for block in blocks:
        done = subprocess.run([sys.executable, "-c", block], cwd=repo_copy, env=child_env(), capture_output=True,
                              text=True, timeout=120)  # fmt: skip
        assert done.returncode == 0, f"{block}\n{done.stderr[-3000:]}"
        for promised in re.findall(r"^# prints: (.*)$", block, flags=re.M):
            assert promised in done.stdout, f"{block}\nprinted:\n{done.stdout[-2000:]}"
