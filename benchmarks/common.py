"""Shared helpers for the benchmarks: machine banner, robust statistics, interleaved timing, spawning ranks.

Every figure the benchmarks report is a ratio of quantities measured side by side in one run (interleaved
round-robin, median over repeats), because the machines they run on are shared and absolute timings drift.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # `python benchmarks/x.py` puts benchmarks/ first, not the repo root
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

# --------------------------------------------------------------------------------------------- banner


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown cpu"


def code_version() -> str:
    """The commit measured, marked dirty when the working tree differs from it (then the figures are not its)."""
    try:
        git = ["git", "-C", str(REPO_ROOT)]
        sha = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError):
        return "not a git checkout"
    return sha.stdout.strip() + (" + uncommitted changes" if dirty.stdout.strip() else "")


def machine_banner(extra: str = "") -> str:
    """Command, machine, torch, date: the header every result table starts with."""
    launcher = "torchrun --nproc_per_node=$N" if under_torchrun() else "python"
    cmd = " ".join([launcher, *(shlex.quote(a) for a in sys.argv)])
    gpu = ""
    if torch.cuda.is_available():
        gpu = f" | GPU {torch.cuda.get_device_name(0)} x {torch.cuda.device_count()}"
    lines = [
        f"command : {cmd}",
        f"machine : {cpu_model()}, {os.cpu_count()} cores{gpu} | python {platform.python_version()}",
        f"torch   : {torch.__version__}",
        f"date    : {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
    ]
    lines.append(f"code    : {code_version()}")
    malloc = [f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_")]
    if malloc:  # glibc allocator settings change CPU step times (page faults): say when they were set
        lines.append(f"malloc  : {' '.join(malloc)}")
    if extra:
        lines.append(extra)
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- statistics


def med(values: Sequence[float]) -> float:
    return statistics.median(values)


def fmt_stat(values: Sequence[float], scale: float = 1.0, digits: int = 3) -> str:
    """'median [min-max]' of ``values * scale``."""
    v = [x * scale for x in values]
    return f"{statistics.median(v):.{digits}f} [{min(v):.{digits}f}-{max(v):.{digits}f}]"


def ratio_stat(num: Sequence[float], den: Sequence[float]) -> list[float]:
    """Per-repeat ratios (repeat i of the numerator over repeat i of the denominator: measured side by side)."""
    return [a / b for a, b in zip(num, den)]


def verdict(ok: bool) -> str:
    return "MET" if ok else "NOT MET"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str = "") -> str:
    """A GitHub-markdown table (also readable on a terminal); returned as text and printed."""
    rows = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    out = []
    if title:
        out.append(f"\n### {title}\n")
    out.append("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |")
    out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        out.append("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")
    text = "\n".join(out)
    print(text, flush=True)
    return text


# --------------------------------------------------------------------------------------------- timing


def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_times(
    fns: dict[str, Callable[[], Any]],
    repeats: int,
    iters: int,
    device: torch.device,
    barrier: Callable[[], None] | None = None,
    warmup: int = 2,
) -> dict[str, list[float]]:
    """Seconds per call of each fn: ``repeats`` rounds, each timing every fn for ``iters`` calls, round-robin.

    Round-robin keeps a drifting machine from favouring whichever variant ran first; ``barrier`` (a collective)
    lines the ranks up before each timed block so one rank's lateness is not billed to the next variant.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync_device(device)
    out: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(repeats):
        names = list(fns) if r % 2 == 0 else list(reversed(fns))  # ABBA order within the rounds
        for name in names:
            if barrier is not None:
                barrier()
            sync_device(device)
            t0 = time.perf_counter()
            for _ in range(iters):
                fns[name]()
            sync_device(device)
            out[name].append((time.perf_counter() - t0) / iters)
    return out


# --------------------------------------------------------------------------------------------- processes


def run_ranks(fn: Callable, world_size: int, *args: Any, timeout_s: float = 900.0) -> list[Any]:
    """``fn(rank, world_size, *args)`` in ``world_size`` spawned gloo processes (one thread each), as the tests do."""
    from engine.runtime.spawn import spawn

    return spawn(fn, world_size, *args, timeout_s=timeout_s)


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_from_torchrun(backend: str = "auto") -> tuple[int, int, torch.device]:
    """The template's process group from torchrun's environment (NCCL on GPUs, gloo otherwise); (rank, world,
    device)."""
    from engine.config import DistConfig
    from engine.runtime.distributed import init_distributed

    ctx = init_distributed(DistConfig(backend=backend, exit_with_launcher=False))
    return ctx.rank, ctx.world_size, ctx.device


def torchrun_cmd(nproc: int, script: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script, *args]


def train_job(config: str, out: Path, overrides: Sequence[str], nproc: int = 2) -> list[dict]:
    """One run of train_distributed.py (torchrun, 1 thread a process) with ``configs/<config>``, quiet; its
    metrics.jsonl records."""
    args = ["--config", str(REPO_ROOT / "configs" / config), f"output_dir={out}", "train.progress_bar=false",
            "train.tensorboard=false", *overrides]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(torchrun_cmd(nproc, str(REPO_ROOT / "train_distributed.py"), *args), cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True)  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"run {out} failed:\n{done.stderr[-3000:]}")
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def digits_folder(root: Path, side: int = 32) -> Path:
    """scikit-learn's digits as ``root/{train,val}/<digit>/<i>.png`` (RGB, ``side`` px, every fifth image to val)."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i, (image, label) in enumerate(zip(digits.images, digits.target)):
        folder = root / ("val" if i % 5 == 0 else "train") / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (image * (255 / 16)).astype(np.uint8)
        Image.fromarray(pixels).resize((side, side), Image.BICUBIC).convert("RGB").save(folder / f"{i}.png")
    return root
