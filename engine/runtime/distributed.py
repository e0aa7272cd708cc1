"""Who am I, which device, which backend; the process group; workers tied to their launcher; its teardown.

This is the only module that reads the launcher's environment. It understands
torchrun / ``torch.distributed.launch`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``),
the legacy ``--local_rank`` / ``--local-rank`` argument, SLURM's ``srun``
(``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``, ``SLURM_STEP_NODELIST``),
and a plain ``python train.py`` (one process, no process group at all).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import datetime
import gc
import json
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from engine.config import DistConfig
from engine.errors import ConfigError, LaunchError


@dataclass(frozen=True)
class LaunchEnv:
    """What the launcher told this process: its place in the job and where rank 0 listens."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    launcher: str  # single | torchrun | slurm
    master_addr: str | None = None
    master_port: int | None = None


@dataclass
class DistContext:
    """Everything later steps need to know about the distributed run, passed explicitly."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str | None  # None: single process, no process group
    launcher: str
    sync_group: Any = None  # process group for SyncBN (None = the whole world)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.backend is not None


def _int_env(environ: Mapping[str, str], name: str) -> int:
    try:
        return int(environ[name])
    except ValueError:
        raise LaunchError(f"environment variable {name}={environ[name]!r} is not an integer") from None


def first_slurm_host(nodelist: str) -> str:
    """First hostname of a SLURM node list such as ``gpu[003-005,010],login1`` (no ``scontrol`` needed)."""
    match = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise LaunchError(f"cannot parse SLURM node list {nodelist!r}; set MASTER_ADDR")
    prefix, _, ranges = match.groups()
    if ranges is None:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def detect_launch_env(local_rank_arg: int | None = None, environ: Mapping[str, str] | None = None) -> LaunchEnv:
    """Read rank and world size from torchrun, SLURM, or nothing (a single process)."""
    environ = os.environ if environ is None else environ
    if "WORLD_SIZE" in environ and "RANK" in environ:
        world_size = _int_env(environ, "WORLD_SIZE")
        local_rank = _int_env(environ, "LOCAL_RANK") if "LOCAL_RANK" in environ else (local_rank_arg or 0)
        return LaunchEnv(
            rank=_int_env(environ, "RANK"),
            world_size=world_size,
            local_rank=local_rank,
            local_world_size=_int_env(environ, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in environ else world_size,
            # torch.distributed.launch passes --local-rank; torchrun sets LOCAL_RANK and passes nothing
            launcher="torchrun" if local_rank_arg is None else "torch.distributed.launch",
            master_addr=environ.get("MASTER_ADDR"),
            master_port=_int_env(environ, "MASTER_PORT") if "MASTER_PORT" in environ else None,
        )
    if "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ:
        nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST") or "127.0.0.1"
        job_id = int(environ.get("SLURM_JOB_ID", "0") or 0)
        world_size = _int_env(environ, "SLURM_NTASKS")
        return LaunchEnv(
            rank=_int_env(environ, "SLURM_PROCID"),
            world_size=world_size,
            local_rank=_int_env(environ, "SLURM_LOCALID") if "SLURM_LOCALID" in environ else 0,
            local_world_size=_slurm_tasks_on_node(environ, world_size),
            launcher="slurm",
            master_addr=environ.get("MASTER_ADDR") or first_slurm_host(nodelist),
            # a port derived from the job id lets two jobs share a node without colliding
            master_port=_int_env(environ, "MASTER_PORT") if "MASTER_PORT" in environ else 15000 + job_id % 20000,
        )
    return LaunchEnv(rank=0, world_size=1, local_rank=local_rank_arg or 0, local_world_size=1, launcher="single")


def record_error_for_launcher(message: str) -> None:
    """Hand ``message`` to torchrun's error-file protocol, so its failure summary names it as the root cause
    (instead of "To enable traceback see ..."); a no-op under other launchers."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        info = {"py_callstack": message, "timestamp": str(int(time.time()))}  # shown as the failure's "traceback"
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"message": {"message": message, "extraInfo": info}}, f)


def cpus_per_process(environ: Mapping[str, str] | None = None, cgroup: str = "/sys/fs/cgroup/cpu.max") -> int:
    """The CPUs this process may use (its affinity, capped by a container's CPU quota: cgroup v2's ``cpu.max``),
    shared by the processes the launcher started on this node; under srun, the task's ``--cpus-per-task`` (with
    SLURM's CPU binding a task's affinity is already its own share, without it the whole node's)."""
    environ = os.environ if environ is None else environ
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        with open(cgroup, encoding="ascii") as f:
            quota, period = f.read().split()
        if quota != "max":
            cpus = min(cpus, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    per_task = environ.get("SLURM_CPUS_PER_TASK", "")
    if "LOCAL_WORLD_SIZE" not in environ and "SLURM_PROCID" in environ and per_task.isdigit():
        return max(1, min(cpus, int(per_task)))  # srun's task: its --cpus-per-task (its affinity may be all of them)
    text = environ.get("LOCAL_WORLD_SIZE") or environ.get("SLURM_NTASKS_PER_NODE") or "1"
    return max(1, cpus // max(1, int(text) if text.isdigit() else 1))


def set_cpu_threads(loader_workers: int) -> None:
    """torch's CPU threads for this process: ``OMP_NUM_THREADS`` when set (torchrun sets 1 for several processes);
    otherwise the CPUs this process may use (:func:`cpus_per_process`) less its loader workers, at least one. torch's
    own default takes every core of the machine, also those of a container's quota or of the other processes of
    the node, and threads that outnumber the CPUs wait on each other."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, cpus_per_process() - loader_workers))


def launch_rank(environ: Mapping[str, str] | None = None) -> int:
    """This process's global rank as the launcher set it, for messages (0 when absent or unreadable)."""
    environ = os.environ if environ is None else environ
    text = environ.get("RANK", environ.get("SLURM_PROCID", "0"))
    return int(text) if text.isdigit() else 0


def launch_world_size(local_rank_arg: int | None = None) -> int:
    """The world size the launcher announced, known before any process group exists."""
    return detect_launch_env(local_rank_arg).world_size


def _slurm_tasks_on_node(environ: Mapping[str, str], world_size: int) -> int:
    # SLURM_TASKS_PER_NODE looks like "4(x2)" or "4,3"; the first count is this layout's per-node size.
    text = environ.get("SLURM_TASKS_PER_NODE", "")
    match = re.match(r"(\d+)", text)
    return int(match.group(1)) if match else world_size


# who started us, read as early as this module loads: (this process, its parent); a process forked later from this
# one (a preloading fork server) has the importer itself as its parent
_IMPORTED_BY = (os.getpid(), os.getppid())
_PR_SET_PDEATHSIG = 1


def _expected_parent() -> int:
    importer, its_parent = _IMPORTED_BY
    return its_parent if os.getpid() == importer else importer


def exit_with_launcher() -> None:
    """Die with the process that started this one (torchrun's agent, srun's step daemon, the user's shell).

    torchrun starts each worker in a session of its own, so a SIGKILL of the launcher (an OOM killer, a scheduler,
    ``kill -9`` of its process group) would leave the workers training, and writing checkpoints, as orphans. On
    Linux the kernel delivers SIGKILL to this process when its parent dies (``PR_SET_PDEATHSIG``); a parent that
    died before the request took effect is caught by comparing the parent pid with the one seen at import.
    Elsewhere a daemon thread watches the parent pid once a second. A worker killed this way mid-save leaves no
    torn checkpoint: files appear by atomic rename only.
    """
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0:
            if os.getppid() != _expected_parent():  # the parent died before the kernel watched it for us
                os._exit(1)
            return
    threading.Thread(target=_watch_parent, name="parent-watch", daemon=True).start()


def _watch_parent() -> None:
    parent = _expected_parent()
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def select_backend(requested: str, cuda_available: bool) -> str:
    """NCCL on GPUs, gloo on CPUs; an explicit choice that cannot work is an error, not a silent switch."""
    if requested == "auto":
        return "nccl" if cuda_available else "gloo"
    if requested == "nccl" and not cuda_available:
        raise ConfigError("dist.backend: nccl needs CUDA, but no GPU is visible; use auto or gloo")
    return requested


def init_distributed(cfg: DistConfig, local_rank_arg: int | None = None, syncbn_group_size: int = 0,
                     output_dir: str | None = None) -> DistContext:  # fmt: skip
    """Tie this worker to its launcher, set the device, create the process group (only when world size > 1) and
    the SyncBN groups; with ``output_dir``, the collectives' flight-recorder traces land there on a failure."""
    if cfg.exit_with_launcher:
        exit_with_launcher()
    if output_dir is not None:
        keep_collective_traces(output_dir)
    env = detect_launch_env(local_rank_arg)
    if env.world_size < 1 or not 0 <= env.rank < env.world_size:
        raise LaunchError(f"launcher gave rank {env.rank} of world size {env.world_size}")
    if syncbn_group_size and env.world_size % syncbn_group_size:
        raise ConfigError(f"syncbn.group_size: {syncbn_group_size} does not divide the world size {env.world_size}")
    cuda = torch.cuda.is_available() and cfg.backend != "gloo"
    backend = select_backend(cfg.backend, torch.cuda.is_available())
    if cuda:
        if env.local_rank >= torch.cuda.device_count():
            raise LaunchError(
                f"local rank {env.local_rank} has no GPU: only {torch.cuda.device_count()} visible "
                "(launch at most one process per GPU)"
            )
        torch.cuda.set_device(env.local_rank)  # before anything touches CUDA, so NCCL binds the right GPU
        device = torch.device("cuda", env.local_rank)
    else:
        device = torch.device("cpu")
    if env.world_size == 1:
        return DistContext(0, 1, env.local_rank, 1, device, None, env.launcher)

    if env.launcher == "slurm":
        os.environ.setdefault("MASTER_ADDR", env.master_addr or "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(env.master_port))
    init_process_group(backend, env.rank, env.world_size, cfg.timeout_s, device=device)
    ctx = DistContext(env.rank, env.world_size, env.local_rank, env.local_world_size, device, backend, env.launcher)
    if syncbn_group_size and syncbn_group_size != env.world_size:
        # every rank must create every subgroup, in the same order
        ctx.sync_group, _ = dist.new_subgroups(group_size=syncbn_group_size)
    return ctx


def init_process_group(backend: str, rank: int, world_size: int, timeout_s: float, init_method: str = "env://",
                       device: torch.device | None = None) -> None:  # fmt: skip
    """The one place a process group is created (the entry, the scripts, and the ranks that tests and benchmarks
    spawn): always with a timeout, so a collective waiting on a dead peer fails instead of hanging."""
    dist.init_process_group(
        backend=backend,
        init_method=init_method,
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
        device_id=device if backend == "nccl" else None,
    )


TRACE_DIR = "flight_recorder"  # under output_dir: rank_<r>, one file per rank
_trace_prefix: str | None = None


def keep_collective_traces(output_dir: str) -> None:
    """Where each rank's flight-recorder trace goes: ``output_dir/flight_recorder/rank_<r>`` (torch records every
    rank's recent collectives by default: op, sizes, state, Python stack). NCCL writes it itself when a collective
    times out (``TORCH_NCCL_DUMP_ON_TIMEOUT``); on any backend the run writes it when a collective fails or the
    watchdog fires (:func:`dump_collective_trace`). Variables the user set win."""
    global _trace_prefix
    _trace_prefix = os.path.join(os.path.abspath(output_dir), TRACE_DIR, "rank_")
    os.environ.setdefault("TORCH_NCCL_DUMP_ON_TIMEOUT", "1")
    os.environ.setdefault("TORCH_FR_DUMP_TEMP_FILE", _trace_prefix)
    if torch.cuda.is_available():  # NCCL's own dump opens the file: its folder must exist
        os.makedirs(os.path.dirname(_trace_prefix), exist_ok=True)


def dump_collective_trace() -> str | None:
    """This rank's flight-recorder trace, written beside the other ranks' (``python -m
    torch.distributed.flight_recorder.fr_trace DIR -p rank_`` reads them together); the folder, or None without a
    process group or a run directory. Never raises: a trace helps explain an error, it must not replace it."""
    if _trace_prefix is None or not (dist.is_available() and dist.is_initialized()):
        return None
    try:
        from torch._C._distributed_c10d import _dump_fr_trace

        path = f"{_trace_prefix}{dist.get_rank()}"
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(f"{path}.tmp", "wb") as f:
            f.write(_dump_fr_trace())
        os.replace(f"{path}.tmp", path)
        return os.path.dirname(path)
    except Exception:
        return None


def collective_timed_out(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective that waited ``dist.timeout_s`` for a rank that never came (gloo, NCCL)."""
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("timed out" in text or "collective operation timeout" in text)


# what a collective raises when another process of the job is gone: that process's error is the one to read
_PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "remote process exited")


def lost_a_peer(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective failing because another rank's process ended (gloo, NCCL), not a problem
    of this rank: that rank says what went wrong, this one need not add a traceback."""
    return isinstance(exc, RuntimeError) and any(text in str(exc) for text in _PEER_LOST)


def cleanup() -> None:
    """Destroy the process group, and free what holds it, while Python is fully alive: the exit code is ours.

    DDP sits in a reference cycle: left to the interpreter's shutdown, it and the process group it holds (gloo's
    worker threads, their last tensors) would be freed after Python stopped running threads, and a native thread
    that then needs the GIL aborts the process (``terminate called without an active exception``, exit -6: a few
    finished runs in a hundred on a loaded machine).
    """
    gc.collect()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()
