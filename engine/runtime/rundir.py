"""The run directory: one live run per ``output_dir`` (a lock), which checkpoint a run resumes or evaluates, what it
says when it resumes or is complete, and the resolved config written beside the checkpoints.

Rank 0 decides (``rank0_decides``), the other ranks hear the answer: one rank looks at the filesystem, all act alike.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import glob
import os
import socket
import time

from engine.checkpoint import CHECKPOINT_DIR, CheckpointError, history_checkpoints, load_checkpoint
from engine.config import Config, dump_config
from engine.errors import ConfigError
from engine.logging import get_logger, metrics_path, restore_metrics
from engine.train_state import TrainState

LOCK_FILE = "run.lock"
DEAD_HOLDER_WAIT_S = 30.0  # a dead run's forked children (loader workers) may hold its lock a few seconds longer


def find_resume_checkpoint(output_dir: str) -> str | None:
    """The newest loadable checkpoint in ``output_dir``: ``last.pt``, else the newest good history file."""
    ckpt_dir = os.path.join(output_dir, CHECKPOINT_DIR)
    candidates = [os.path.join(ckpt_dir, "last.pt"), *history_checkpoints(ckpt_dir)]
    for path in candidates:
        if not os.path.isfile(path):
            continue
        try:
            load_checkpoint(path)
        except CheckpointError as exc:
            get_logger().warning(f"warning: {exc}; trying an older checkpoint")
            continue
        return path
    return None


def has_run_outputs(output_dir: str) -> bool:
    """Whether ``output_dir`` already holds another run's checkpoints or metrics."""
    ckpt_dir = os.path.join(output_dir, CHECKPOINT_DIR)
    return bool(glob.glob(os.path.join(ckpt_dir, "*.pt"))) or os.path.isfile(metrics_path(output_dir))


def prepare_output_dir(cfg: Config) -> str | None:
    """Rank 0: take the run directory's lock, make ``output_dir`` writable and pick the checkpoint to resume
    (None: a fresh run), never clobbering another run's files. Evaluation only: just the checkpoint to evaluate."""
    if cfg.train.eval_only:  # writes nothing, takes no lock: it may run beside the training run
        return _checkpoint_to_evaluate(cfg)
    out = cfg.output_dir
    if not os.path.exists(out):
        _created.add(os.path.abspath(out))
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"output_dir: cannot write to {out}: {exc.strerror or exc}") from None
    lock_output_dir(out)  # before anything else here: a refused run must touch nothing
    try:
        os.makedirs(os.path.join(out, CHECKPOINT_DIR), exist_ok=True)
        probe = os.path.join(out, f".write_test_{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as exc:
        raise ConfigError(f"output_dir: cannot write to {out}: {exc.strerror or exc}") from None
    resume = cfg.train.resume
    if resume == "none":
        if has_run_outputs(out):
            raise ConfigError(
                f"output_dir {out} already holds a run; set train.resume=auto to continue it or choose another output_dir"
            )
        return None
    if resume == "auto":
        path = find_resume_checkpoint(out)
        if path is None and has_run_outputs(out):
            ckpt_dir = os.path.join(out, CHECKPOINT_DIR)
            names = sorted(name for name in os.listdir(ckpt_dir) if name.endswith(".pt") and not name.startswith("."))
            raise ConfigError(
                f"output_dir {out} holds a run but no loadable checkpoint in {ckpt_dir} "
                f"(unreadable: {', '.join(names) or 'none'}); move it away or choose another output_dir"
            )
        return path
    load_checkpoint(resume)  # fail here, on rank 0, with the file's name
    own = os.path.join(os.path.abspath(out), CHECKPOINT_DIR)
    if has_run_outputs(out) and os.path.dirname(os.path.abspath(resume)) != own:
        # starting from another run's weights here would overwrite this run's checkpoints
        raise ConfigError(
            f"output_dir {out} already holds a run; to start from {resume} choose another output_dir "
            "(or train.resume=auto to continue the run there)"
        )
    return resume


def _checkpoint_to_evaluate(cfg: Config) -> str | None:
    """``train.resume=PATH``, or with ``auto`` the run's ``last.pt`` / ``best.pt`` (``train.eval_checkpoint``)."""
    if cfg.train.resume != "auto":
        load_checkpoint(cfg.train.resume)  # fail here, on rank 0, with the file's name
        return cfg.train.resume
    path = os.path.join(cfg.output_dir, CHECKPOINT_DIR, f"{cfg.train.eval_checkpoint}.pt")
    if os.path.isfile(path):
        load_checkpoint(path)
        return path
    if cfg.model.pretrained:
        return None
    raise ConfigError(f"train.eval_only: no {path} to evaluate; train first, point output_dir at a run, "
                      "or set train.resume=PATH")


# --------------------------------------------------------------------------- one live run per output_dir

_held_locks: dict[str, int] = {}  # output_dir -> open descriptor; the kernel releases the lock when we die
_created: set[str] = set()  # output_dirs this process made


def release_output_dirs() -> None:
    """At exit: the lock file goes (a run that ended has no holder to name; one killed outright leaves it, naming
    a dead process, which the next start takes over). A run directory this process took but in which no run began
    (a start that failed before the resolved config was written) gets back to how it was: no empty
    ``checkpoints/``, and no directory at all when this process made it."""
    for key, fd in list(_held_locks.items()):
        with contextlib.suppress(OSError):  # removed while held: a start racing this exit finds no live holder
            os.remove(os.path.join(key, LOCK_FILE))
        if not os.path.exists(os.path.join(key, "config.yaml")) and not has_run_outputs(key):
            for path in (os.path.join(key, CHECKPOINT_DIR), key):
                if path != key or key in _created:
                    with contextlib.suppress(OSError):  # not empty, or already gone: leave it
                        os.rmdir(path)
        os.close(fd)
        del _held_locks[key]


def lock_output_dir(output_dir: str) -> None:
    """Hold an exclusive lock on ``output_dir`` for the life of this process (rank 0 of a run).

    ``flock`` on ``<output_dir>/run.lock``, which names the holder (host, pid, start time). A live holder: a
    one-line error naming it, at once. A dead holder's lock is gone with it (the kernel releases it), so a relaunch,
    ``torchrun --max-restarts`` or a SLURM requeue takes it over silently; when the file names a dead process of
    this host whose forked children still hold the lock, it is awaited for up to ``DEAD_HOLDER_WAIT_S``. On a
    filesystem without working locks (some network filesystems): a warning, and the run goes on unguarded.
    """
    key = os.path.abspath(output_dir)
    if key in _held_locks:
        return
    fd = os.open(os.path.join(output_dir, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + DEAD_HOLDER_WAIT_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            holder = _lock_holder(fd)
            if _holder_is_dead(holder) and time.monotonic() < deadline:
                time.sleep(0.2)
                continue
            os.close(fd)
            raise ConfigError(
                f"output_dir {output_dir} is in use by a live run ({_describe(holder)}); wait for it to end, "
                "stop it, or choose another output_dir"
            ) from None
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            get_logger().warning(f"warning: cannot lock output_dir {output_dir} ({exc.strerror}): this filesystem has "
                                 "no working file locks; make sure no other run writes there")
            return
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"host={socket.gethostname()} pid={os.getpid()} started={started}\n".encode(), 0)
    _held_locks[key] = fd


def _lock_holder(fd: int) -> dict[str, str]:
    text = os.pread(fd, 4096, 0).decode("utf-8", errors="replace")
    return dict(part.split("=", 1) for part in text.split() if "=" in part)


def _describe(holder: dict[str, str]) -> str:
    if not holder:
        return "holder unknown"
    return f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, started {holder.get('started', '?')}"


def _holder_is_dead(holder: dict[str, str]) -> bool:
    """Whether the lock file names a process of this host that no longer runs (its children may still hold it)."""
    pid = holder.get("pid", "")
    if holder.get("host") != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def announce_resume(cfg: Config, path: str, state: TrainState, is_main: bool) -> None:
    """Say where a resumed run continues (or that it is complete and how to train longer); rank 0 makes
    ``metrics.jsonl`` hold exactly the finished epochs' lines again (a kill may have cut or outrun it)."""
    if is_main:
        restore_metrics(cfg.output_dir, state.history, finished_epochs=state.epoch)
    epochs = cfg.train.epochs
    if state.epoch >= epochs:
        get_logger().info(
            f"run complete: {path} has finished all {state.epoch} epochs (train.epochs={epochs}); to train longer "
            f"set train.epochs to more than {state.epoch}, to start afresh choose another output_dir"
        )
    else:
        get_logger().info(f"resumed from {path}: epoch {state.epoch + 1}, step {state.step}")


def write_config(cfg: Config, is_main: bool) -> None:
    """The resolved config beside the checkpoints (rank 0), so ``--config`` on it reproduces the run."""
    if is_main:
        dump_config(cfg, os.path.join(cfg.output_dir, "config.yaml"))
