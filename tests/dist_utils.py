"""Run a function in N real processes joined by a gloo process group.

Tests call ``run_distributed(fn, world_size, *args)``; ``fn(rank, world_size, *args)``
must be a module-level function (it is pickled into spawned processes). Each
process gets its own process group with a short timeout, so a hang fails the
test instead of stalling CI, and exceptions come back with the rank that raised.
"""

from __future__ import annotations

import datetime
import os
import tempfile
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, world_size: int, init_file: str, timeout_s: float, fn: Callable, args: tuple, queue) -> None:
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{init_file}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        result = fn(rank, world_size, *args)
        queue.put((rank, True, result))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn: Callable, world_size: int, *args: Any, timeout_s: float = 60.0) -> list[Any]:
    """Return ``[fn(0, ws, *args), ..., fn(ws-1, ws, *args)]`` computed in ``world_size`` processes."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "pg_init")
        procs = [
            ctx.Process(target=_entry, args=(r, world_size, init_file, timeout_s, fn, args, queue), daemon=True)
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        results: dict[int, Any] = {}
        errors: list[str] = []
        try:
            for _ in range(world_size):
                rank, ok, payload = queue.get(timeout=timeout_s + 60)
                if ok:
                    results[rank] = payload
                else:
                    errors.append(f"rank {rank} failed:\n{payload}")
        except Exception as exc:  # queue.Empty: some rank never reported
            errors.append(f"timed out waiting for ranks {sorted(set(range(world_size)) - set(results))}: {exc!r}")
        finally:
            for p in procs:
                p.join(timeout=10)
                if p.is_alive():
                    p.kill()
    if errors:
        raise AssertionError("\n".join(errors))
    return [results[r] for r in range(world_size)]
