"""Rank-0 console, progress bar, TensorBoard and ``metrics.jsonl``: all output goes through here.

Other ranks log errors only, so an 8-GPU job prints one story, not eight.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any

import torch

LOGGER_NAME = "ddp"


def setup_logger(rank: int) -> logging.Logger:
    """The one logger: INFO on rank 0, errors only elsewhere (tagged with the rank)."""
    logger = logging.getLogger(LOGGER_NAME)
    logger.handlers.clear()
    logger.propagate = False
    handler = logging.StreamHandler(sys.stdout if rank == 0 else sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s" if rank == 0 else f"[rank {rank}] %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if rank == 0 else logging.ERROR)
    return logger


def get_logger() -> logging.Logger:
    return logging.getLogger(LOGGER_NAME)


class SmoothedValue:
    """A windowed median/average plus the global average of a series (torchvision's, trimmed)."""

    def __init__(self, window: int = 20, fmt: str = "{median:.4f} ({global_avg:.4f})") -> None:
        self.deque: deque[float] = deque(maxlen=window)
        self.total, self.count, self.fmt = 0.0, 0, fmt

    def update(self, value: float, n: int = 1) -> None:
        self.deque.append(value)
        self.count += n
        self.total += value * n

    @property
    def median(self) -> float:
        return sorted(self.deque)[len(self.deque) // 2] if self.deque else 0.0

    @property
    def avg(self) -> float:
        return sum(self.deque) / len(self.deque) if self.deque else 0.0

    @property
    def global_avg(self) -> float:
        return self.total / max(self.count, 1)

    @property
    def value(self) -> float:
        return self.deque[-1] if self.deque else 0.0

    def __str__(self) -> str:
        return self.fmt.format(median=self.median, avg=self.avg, global_avg=self.global_avg, value=self.value)


class MetricLogger:
    """Iterates a loader and reports value, average, ETA, throughput, data time and max memory on rank 0.

    On a terminal it draws a tqdm bar; otherwise (CI, log files) it prints one line every ``print_freq`` steps.
    """

    def __init__(self, header: str, print_freq: int, enabled: bool, progress_bar: bool) -> None:
        self.meters: dict[str, SmoothedValue] = {}
        self.header, self.print_freq, self.enabled = header, print_freq, enabled
        self.use_bar = enabled and progress_bar and sys.stderr.isatty()

    def update(self, **values: float) -> None:
        for name, value in values.items():
            self.meters.setdefault(name, SmoothedValue()).update(float(value))

    def __str__(self) -> str:
        return "  ".join(f"{name} {meter}" for name, meter in self.meters.items())

    def log_every(self, iterable: Iterable, total: int, batch_size: int) -> Iterator:
        iter_time, data_time = SmoothedValue(fmt="{avg:.3f}"), SmoothedValue(fmt="{avg:.3f}")
        bar = None
        if self.use_bar:
            from tqdm import tqdm

            bar = tqdm(total=total, desc=self.header, dynamic_ncols=True, leave=False)
        start = end = time.perf_counter()
        for i, obj in enumerate(iterable):
            data_time.update(time.perf_counter() - end)
            yield obj
            iter_time.update(time.perf_counter() - end)
            end = time.perf_counter()
            if not self.enabled:
                continue
            rate = batch_size / max(iter_time.avg, 1e-9)
            if bar is not None:
                bar.set_postfix_str(f"{self}  {rate:.0f} samples/s/process", refresh=False)
                bar.update(1)
            elif i % self.print_freq == 0 or i == total - 1:
                eta = datetime.timedelta(seconds=int(iter_time.global_avg * (total - i - 1)))
                get_logger().info(
                    f"{self.header} [{i + 1}/{total}]  eta {eta}  {self}  {rate:.0f} samples/s/process  "
                    f"time {iter_time}  data {data_time}{_max_memory()}"
                )
        if bar is not None:
            bar.close()
        self.elapsed = time.perf_counter() - start


def _max_memory() -> str:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return f"  max mem {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB"
    return ""


class MetricsWriter:
    """One JSON object per epoch in ``metrics.jsonl`` plus TensorBoard scalars; a no-op off rank 0."""

    def __init__(self, output_dir: str, enabled: bool, tensorboard: bool) -> None:
        self.enabled = enabled
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.tb = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=os.path.join(output_dir, "tensorboard"))

    def write(self, record: dict[str, Any], step: int) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if key != "epoch" and isinstance(value, (int, float)):
                    self.tb.add_scalar(_tb_tag(key), value, step)
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _tb_tag(key: str) -> str:
    split, _, name = key.partition("_")
    return f"{split}/{name}" if split in ("train", "val") and name else f"misc/{key}"
