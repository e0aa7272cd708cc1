"""Spawn N local processes joined by a gloo process group: the one spawner of tests, scripts and benchmarks; and
the environment of jobs they launch (``child_env``).

``spawn(fn, world_size, *args)`` returns ``[fn(0, W, *args), ..., fn(W-1, W, *args)]``; ``fn`` must be a
module-level function (it is pickled into the spawned processes). Each process gets one thread and a process
group with ``timeout_s``, so a hang fails with the ranks that never reported instead of stalling, and an
exception comes back with its rank and traceback. Training itself is launched by torchrun or srun, not here.
"""

from __future__ import annotations

import os
import pickle
import queue as queue_module
import tempfile
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

from engine.runtime.distributed import cleanup, init_process_group

REPO_ROOT = Path(__file__).resolve().parents[2]
# a job started from inside another job (a test under torchrun or SLURM) must not inherit its place in that job
_PLACE_IN_A_JOB = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                   "SLURM_PROCID", "SLURM_NTASKS", "TORCHELASTIC_RUN_ID")


def child_env(extra: Mapping[str, str] | None = None, threads: int = 1) -> dict[str, str]:
    """The environment for a job launched by a test or a benchmark: this one without its place in any job, with
    ``threads`` threads per process, unbuffered output and the repository importable, plus ``extra``."""
    env = {key: value for key, value in os.environ.items() if key not in _PLACE_IN_A_JOB}
    env.update({"OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO_ROOT)})
    env.update(extra or {})
    return env


class SpawnError(RuntimeError):
    """Some rank raised, died or never reported; the message holds each rank's story."""


def _entry(rank: int, world_size: int, init_file: str, timeout_s: float, fn: Callable, args: tuple, results) -> None:
    """One rank: its result goes to the parent pickled by value. A tensor put on a multiprocessing queue as it is
    travels as a file descriptor that this process serves until it exits; a parent slowed by a loaded machine
    then reads after the exit and fails with FileNotFoundError."""
    torch.set_num_threads(1)
    try:
        init_process_group("gloo", rank, world_size, timeout_s, init_method=f"file://{init_file}")
        results.put((rank, True, pickle.dumps(fn(rank, world_size, *args))))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        cleanup()


def spawn(fn: Callable, world_size: int, *args: Any, timeout_s: float = 60.0) -> list[Any]:
    """Every rank's ``fn(rank, world_size, *args)``, computed in ``world_size`` spawned processes."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "pg_init")
        procs = [
            ctx.Process(target=_entry, args=(r, world_size, init_file, timeout_s, fn, args, results), daemon=True)
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        done: dict[int, Any] = {}
        errors: list[str] = []
        try:
            for _ in range(world_size):
                rank, ok, payload = results.get(timeout=timeout_s + 60)
                if ok:
                    done[rank] = pickle.loads(payload)
                else:
                    errors.append(f"rank {rank} failed:\n{payload}")
        except queue_module.Empty:
            missing = sorted(set(range(world_size)) - set(done) - {int(e.split()[1]) for e in errors})
            errors.append(f"timed out after {timeout_s + 60:.0f}s waiting for ranks {missing}")
        finally:
            for p in procs:
                p.join(timeout=10)
                if p.is_alive():
                    p.kill()
    if errors:
        raise SpawnError("\n".join(errors))
    return [done[r] for r in range(world_size)]
