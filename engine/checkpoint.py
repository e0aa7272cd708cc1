"""What a checkpoint holds, both ways (``Checkpointer``); atomic writes by rank 0, safe loads, resume discovery,
RNG state, and the output-dir policy (which run may write where, which checkpoint a run resumes).

Layout under ``<output_dir>/checkpoints``: ``ckpt_e{epoch}_s{step}.pt`` (the newest
``keep`` of them), ``last.pt`` (a hard link to the newest) and ``best.pt``. Every file
appears by ``os.replace`` of a fully written, fsynced temporary, so a kill at any
moment leaves either the old or the new complete file, never a torn one.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import glob
import os
import random
import re
import shutil
import socket
import tempfile
import time
from typing import TYPE_CHECKING, Any

import torch

from engine.config import Config, config_to_dict, dump_config, global_batch_size
from engine.distributed import DistContext, gather_objects
from engine.errors import CheckpointError, ConfigError
from engine.faults import FaultInjector
from engine.logging import get_logger, metrics_path, restore_metrics
from engine.trainer import TrainState, consistent_bn_buffers
from engine.watchdog import enter, progress

if TYPE_CHECKING:
    from engine.ema import ModelEma

CHECKPOINT_DIR = "checkpoints"
LOCK_FILE = "run.lock"
DEAD_HOLDER_WAIT_S = 30.0  # a dead run's forked children (loader workers) may hold its lock a few seconds longer
_HISTORY = re.compile(r"ckpt_e(\d+)_s(\d+)\.pt$")


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_torch_save(obj: Any, path: str) -> None:
    """``torch.save`` to a temporary in the same directory, fsync, then rename over ``path``."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=".pt", dir=directory)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600; a checkpoint is as readable as the run's other files
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(directory)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic_link(src: str, dst: str) -> None:
    """Make ``dst`` name the same complete file as ``src`` (hard link, or a copy where links fail)."""
    directory = os.path.dirname(os.path.abspath(dst))
    tmp = os.path.join(directory, f".tmp_link_{os.getpid()}_{os.path.basename(dst)}")
    if os.path.exists(tmp):
        os.remove(tmp)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
    _fsync_dir(directory)


def save_checkpoint(state: dict[str, Any], output_dir: str, keep: int, is_best: bool) -> str:
    """Write a new history checkpoint, point ``last.pt`` (and ``best.pt``) at it, prune old ones. Rank 0 only."""
    ckpt_dir = os.path.join(output_dir, CHECKPOINT_DIR)
    os.makedirs(ckpt_dir, exist_ok=True)
    for stale in glob.glob(os.path.join(ckpt_dir, ".tmp_*")):
        # a writer killed mid-save left it (a whole checkpoint's worth); only rank 0 writes here, so none is live
        with contextlib.suppress(FileNotFoundError):
            os.remove(stale)
    path = os.path.join(ckpt_dir, f"ckpt_e{state['epoch']:04d}_s{state['step']:08d}.pt")
    atomic_torch_save(state, path)
    _atomic_link(path, os.path.join(ckpt_dir, "last.pt"))
    if is_best:
        _atomic_link(path, os.path.join(ckpt_dir, "best.pt"))
    for old in history_checkpoints(ckpt_dir)[keep:]:
        os.remove(old)
    return path


def history_checkpoints(ckpt_dir: str) -> list[str]:
    """History checkpoints, newest first."""
    found = []
    for path in glob.glob(os.path.join(ckpt_dir, "ckpt_e*_s*.pt")):
        match = _HISTORY.search(os.path.basename(path))
        if match:
            found.append(((int(match.group(1)), int(match.group(2))), path))
    return [path for _, path in sorted(found, reverse=True)]


def load_checkpoint(path: str) -> dict[str, Any]:
    """Load with ``weights_only=True`` (no code runs from a checkpoint); a bad file is a one-line error."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, bad pickle, disallowed global: all mean "unusable"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"checkpoint {path} is unreadable (truncated or corrupted?): {reason}") from None
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"checkpoint {path} holds no 'model' state_dict; is it a checkpoint of this template?")
    return state


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


def strip_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop DDP's ``module.`` and torch.compile's ``_orig_mod.`` so weights load into a bare model."""
    out = {}
    for key, value in state_dict.items():
        while key.startswith(("module.", "_orig_mod.")):
            key = key.split(".", 1)[1]
        out[key] = value
    return out


def check_model_compatible(model_state: dict[str, torch.Tensor], target: torch.nn.Module, path: str) -> None:
    """Refuse weights of another model with a message naming the first mismatch."""
    expected = target.state_dict()
    missing = sorted(set(expected) - set(model_state))
    unexpected = sorted(set(model_state) - set(expected))
    if missing or unexpected:
        first = (missing or unexpected)[0]
        raise CheckpointError(
            f"checkpoint {path} is for another model: {len(missing)} missing and {len(unexpected)} unexpected keys "
            f"(first: '{first}')"
        )
    for key, tensor in expected.items():
        if tuple(model_state[key].shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"checkpoint {path} is for another model: '{key}' has shape {tuple(model_state[key].shape)}, "
                f"this model expects {tuple(tensor.shape)} (check model.name / model.num_classes)"
            )


# --------------------------------------------------------------------------- RNG state


def capture_rng_state() -> dict[str, Any]:
    """This process's RNG states as plain data that ``weights_only`` loading accepts."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": _to_lists(random.getstate())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    try:
        import numpy as np

        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        state["numpy"] = [kind, torch.from_numpy(keys.astype("int64")), pos, has_gauss, gauss]
    except ImportError:
        pass
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"])
    random.setstate(_to_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, gauss))


def _to_lists(obj: Any) -> Any:
    return [_to_lists(x) for x in obj] if isinstance(obj, tuple) else obj


def _to_tuples(obj: Any) -> Any:
    return tuple(_to_tuples(x) for x in obj) if isinstance(obj, list) else obj


def check_run_compatible(
    ckpt: dict[str, Any], model_name: str, global_batch: int, world_size: int, path: str, optimizer: str | None = None
) -> str:
    """Refuse a checkpoint of another model, optimizer or global batch; warn when only the world size changed."""
    saved = ckpt.get("config", {})
    saved_model = saved.get("model", {}).get("name")
    if saved_model is not None and saved_model != model_name:
        raise CheckpointError(f"checkpoint {path} was trained with model.name={saved_model}, this run uses {model_name}")
    saved_optimizer = saved.get("train", {}).get("optimizer")
    if optimizer is not None and saved_optimizer is not None and saved_optimizer != optimizer:
        # another optimizer's state (momentum vs. Adam moments) would load, then crash at the first step
        raise CheckpointError(
            f"checkpoint {path} was trained with train.optimizer={saved_optimizer}, this run uses {optimizer} "
            "(keep the optimizer to resume, or start a new output_dir from these weights)"
        )
    saved_batch = ckpt.get("global_batch")
    if saved_batch is not None and saved_batch != global_batch:
        raise CheckpointError(
            f"checkpoint {path} was trained with global batch {saved_batch}, this run has {global_batch} "
            "(keep data.batch_size x world size x train.accumulate_steps, or start a new output_dir)"
        )
    saved_world = ckpt.get("world_size")
    if saved_world is not None and saved_world != world_size:
        return (
            f"warning: resuming a world-size-{saved_world} run on {world_size} processes with the same global batch: "
            "training continues, but is no longer bit-exact"
        )
    return ""


# --------------------------------------------------------------------------- the run's checkpoints, both ways


class Checkpointer:
    """Owns what a checkpoint of this template holds: the model (a plain state_dict), optimizer, scheduler, grad
    scaler, ``TrainState``, every rank's RNG streams, the resolved config, world size and global batch.

    ``save`` is a collective (every rank passes: the ranks' RNG states are gathered, and without SyncBN the BN
    buffers are made consistent first); only global rank 0 writes. ``resume`` restores all of it on every rank.
    """

    def __init__(self, cfg: Config, ctx: DistContext, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler,
                 ema: ModelEma | None = None) -> None:
        self.cfg, self.ctx = cfg, ctx
        self.model, self.optimizer, self.scheduler, self.scaler, self.ema = model, optimizer, scheduler, scaler, ema
        self.global_batch = global_batch_size(cfg, ctx.world_size)
        self.faults = FaultInjector.from_config(cfg.debug, ctx.rank, cfg.output_dir)  # test-only

    def save(self, state: TrainState, is_best: bool = False) -> None:
        if self.faults is not None:
            self.faults.at("before_checkpoint", state.step)
        enter("in a checkpoint's collectives", in_collective=True)
        consistent_bn_buffers(self.model, self.cfg.syncbn)
        if self.ema is not None:
            consistent_bn_buffers(self.ema.module, self.cfg.syncbn)
        rng = gather_objects(capture_rng_state())  # a collective: every rank passes here
        if self.ctx.is_main:
            enter("writing a checkpoint", in_collective=False)
            self._write(state, is_best, rng)
        progress()
        if self.faults is not None:
            self.faults.at("after_checkpoint", state.step)

    def _write(self, state: TrainState, is_best: bool, rng: list[dict[str, Any]]) -> None:
        checkpoint = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "train_state": state.state_dict(),
            "epoch": state.epoch,
            "step": state.step,
            "best_acc1": state.best_acc1,
            "config": config_to_dict(self.cfg),
            "world_size": self.ctx.world_size,
            "global_batch": self.global_batch,
            "rng": rng,
        }
        if self.ema is not None:
            checkpoint["ema"] = self.ema.state_dict()
        save_checkpoint(checkpoint, self.cfg.output_dir, keep=self.cfg.train.keep_checkpoints, is_best=is_best)

    def load_model(self, path: str) -> dict[str, Any]:
        """Load the model's weights from ``path`` (any rank, any world size); returns the whole checkpoint."""
        loaded = load_checkpoint(path)
        weights = strip_prefixes(loaded["model"])  # also a checkpoint saved from a DDP or compiled model
        check_model_compatible(weights, self.model, path)
        self.model.load_state_dict(weights)
        return loaded

    def resume(self, path: str, state: TrainState) -> None:
        """Continue the run saved at ``path``: weights, optimizer, schedule, scaler, position and RNG streams."""
        loaded = self.load_model(path)
        warning = check_run_compatible(loaded, self.cfg.model.name, self.global_batch, self.ctx.world_size, path,
                                       optimizer=self.cfg.train.optimizer)
        if warning:
            get_logger().warning(warning)
        self.optimizer.load_state_dict(loaded["optimizer"])
        self.scheduler.load_state_dict(loaded["scheduler"])
        self.scaler.load_state_dict(loaded["scaler"])
        state.load_state_dict(loaded["train_state"])
        if self.ema is not None and "ema" in loaded:
            self.ema.load_state_dict(loaded["ema"])
        elif self.ema is not None:
            get_logger().warning(f"warning: {path} holds no EMA; it starts from the resumed weights")
            self.ema.module.load_state_dict(self.model.state_dict())
        if loaded["world_size"] == self.ctx.world_size:  # each rank gets back its own RNG streams
            restore_rng_state(loaded["rng"][self.ctx.rank])
        if self.ctx.is_main:
            restore_metrics(self.cfg.output_dir, state.history, finished_epochs=state.epoch)
        epochs = self.cfg.train.epochs
        if state.epoch >= epochs:
            get_logger().info(
                f"run complete: {path} has finished all {state.epoch} epochs (train.epochs={epochs}); to train longer "
                f"set train.epochs to more than {state.epoch}, to start afresh choose another output_dir"
            )
        else:
            get_logger().info(f"resumed from {path}: epoch {state.epoch + 1}, step {state.step}")

    def write_config(self) -> None:
        """The resolved config beside the checkpoints (rank 0), so ``--config`` on it reproduces the run."""
        if self.ctx.is_main:
            dump_config(self.cfg, os.path.join(self.cfg.output_dir, "config.yaml"))


# --------------------------------------------------------------------------- the output-dir policy


def prepare_output_dir(cfg: Config) -> str | None:
    """Rank 0: take the run directory's lock, make ``output_dir`` writable and pick the checkpoint to resume
    (None: a fresh run), never clobbering another run's files. Evaluation only: just the checkpoint to evaluate."""
    if cfg.train.eval_only:  # writes nothing, takes no lock: it may run beside the training run
        return _checkpoint_to_evaluate(cfg)
    out = cfg.output_dir
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
