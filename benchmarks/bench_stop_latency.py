"""How early must a scheduler's warning come? The time from a stop signal (SIGUSR1, as SLURM's ``--signal`` sends it)
to rank 0's checkpoint on disk and to every rank's exit, on 2 processes, for a model of a few milliseconds a step
and for one of a few hundred, with the step time and the checkpoint's size beside them.

    python benchmarks/bench_stop_latency.py               # ~3 min on 2 CPU cores
    python benchmarks/bench_stop_latency.py --trials 3 --models small_cnn

Each trial starts a run, waits for its first checkpoint, sends SIGUSR1 to rank 1 alone at a random moment, and
times the new ``last.pt`` and the launcher's exit. The signal is acted on at the next step (every step asks "was
any rank asked to stop?"), so the expected latency is one step, plus the checkpoint write, plus the ranks' exit.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_banner, print_table, torchrun_cmd  # noqa: E402

MODELS = {"small_cnn": ["model.name=small_cnn"], "resnet18": ["model.name=resnet18_cifar", "data.batch_size=64"]}


def _rank1(launcher: int) -> int:
    """The worker torchrun started with RANK=1 (a child of the launcher)."""
    for _ in range(600):
        try:
            children = Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split()
        except OSError:
            children = []
        for pid in children:
            try:
                if b"RANK=1" in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                    return int(pid)
            except OSError:
                continue
        time.sleep(0.1)
    raise SystemExit("rank 1 did not start")


def trial(out: Path, overrides: list[str]) -> tuple[float, float, float]:
    """(signal -> checkpoint written, signal -> every rank exited, the run's median step time), in seconds."""
    args = ["--config", str(REPO_ROOT / "configs" / "default.yaml"), f"output_dir={out}", "data.num_train=65536",
            "train.epochs=1", "train.checkpoint_every_steps=20", "train.progress_bar=false", "train.print_freq=10",
            "train.tensorboard=false", *overrides]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(torchrun_cmd(2, str(REPO_ROOT / "train_distributed.py"), *args), cwd=REPO_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)  # fmt: skip
    last = out / "checkpoints" / "last.pt"
    rank1 = _rank1(proc.pid)
    while not last.exists():
        time.sleep(0.05)
    time.sleep(random.uniform(0.5, 2.0))
    before, sent = last.stat().st_mtime_ns, time.time()
    os.kill(rank1, signal.SIGUSR1)
    written = None
    while proc.poll() is None:
        if written is None and last.exists() and last.stat().st_mtime_ns != before:
            written = time.time()
        time.sleep(0.005)
    exited = time.time()
    stdout = proc.stdout.read()
    times = [float(line.split("time ")[1].split()[0]) for line in stdout.splitlines() if "  time " in line]
    if "stop signal received: checkpoint saved" not in stdout or written is None:
        raise SystemExit(f"the run did not stop as expected:\n{stdout[-2000:]}")
    return written - sent, exited - sent, statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench_stop_"))
    print(machine_banner(f"{args.trials} trials per model, 2 processes, SIGUSR1 to rank 1"))
    rows = []
    for name in args.models:
        results = [trial(root / f"{name}_{i}", MODELS[name]) for i in range(args.trials)]
        size = (root / f"{name}_0" / "checkpoints" / "last.pt").stat().st_size / 2**20
        ckpt, exit_, step = (sorted(r[k] for r in results) for k in range(3))
        rows.append([name, f"{statistics.median(step) * 1000:.0f}", f"{size:.1f}",
                     f"{statistics.median(ckpt):.2f} [{ckpt[0]:.2f}-{ckpt[-1]:.2f}]",
                     f"{statistics.median(exit_):.2f} [{exit_[0]:.2f}-{exit_[-1]:.2f}]"])  # fmt: skip
    print_table(["model", "step ms", "checkpoint MiB", "signal -> checkpoint on disk, s", "signal -> all ranks exited, s"],
                rows)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
