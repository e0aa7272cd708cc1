"""What a checkpoint holds, both ways (``Checkpointer``): atomic writes by rank 0, safe loads, RNG streams, and the
checks that a checkpoint fits the run about to load it. Which checkpoint a run resumes is ``engine.runtime.rundir``'s call.

Layout under ``<output_dir>/checkpoints``: ``ckpt_e{epoch}_s{step}.pt`` (the newest
``keep`` of them), ``last.pt`` (a hard link to the newest) and ``best.pt``. Every file
appears by ``os.replace`` of a fully written, fsynced temporary, so a kill at any
moment leaves either the old or the new complete file, never a torn one.
"""

from __future__ import annotations

import contextlib
import glob
import os
import random
import re
import shutil
import tempfile
from typing import Any

import torch

from engine.comm import gather_objects
from engine.config import Config, config_from_dict, config_to_dict, global_batch_size, normalisation_batch
from engine.ema import ModelEma
from engine.errors import CheckpointError
from engine.logging import get_logger
from engine.runtime.distributed import DistContext
from engine.train_state import TrainState

CHECKPOINT_DIR = "checkpoints"
# the train.* keys the learning-rate schedule is planned from
SCHEDULE_KEYS = ("epochs", "lr", "lr_scaling", "base_batch_size", "schedule", "warmup_epochs", "step_milestones",
                 "step_gamma", "min_lr")
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


def save_checkpoint(checkpoint: dict[str, Any], output_dir: str, keep: int, is_best: bool) -> str:
    """Write a new history checkpoint, point ``last.pt`` (and ``best.pt``) at it, prune old ones. Rank 0 only."""
    ckpt_dir = os.path.join(output_dir, CHECKPOINT_DIR)
    os.makedirs(ckpt_dir, exist_ok=True)
    for stale in glob.glob(os.path.join(ckpt_dir, ".tmp_*")):
        # a writer killed mid-save left it (a whole checkpoint's worth); only rank 0 writes here, so none is live
        with contextlib.suppress(FileNotFoundError):
            os.remove(stale)
    where = checkpoint["train_state"]
    path = os.path.join(ckpt_dir, f"ckpt_e{where['epoch']:04d}_s{where['step']:08d}.pt")
    atomic_torch_save(checkpoint, path)
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


def check_run_compatible(ckpt: dict[str, Any], cfg: Config, world_size: int, path: str) -> str:
    """Refuse a checkpoint of another model, optimizer, global batch or normalisation batch; on another number of
    processes, the line that says how the run continues."""
    saved = ckpt.get("config", {})
    model_name, optimizer, global_batch = cfg.model.name, cfg.train.optimizer, global_batch_size(cfg, world_size)
    saved_model = saved.get("model", {}).get("name")
    if saved_model is not None and saved_model != model_name:
        raise CheckpointError(f"checkpoint {path} was trained with model.name={saved_model}, this run uses {model_name}")
    saved_optimizer = saved.get("train", {}).get("optimizer")
    if saved_optimizer is not None and saved_optimizer != optimizer:
        # another optimizer's state (momentum vs. Adam moments) would load, then crash at the first step
        raise CheckpointError(
            f"checkpoint {path} was trained with train.optimizer={saved_optimizer}, this run uses {optimizer} "
            "(keep the optimizer to resume, or start a new output_dir from these weights)"
        )
    saved_batch = ckpt.get("global_batch")
    if saved_batch is not None and saved_batch != global_batch:
        raise CheckpointError(
            f"checkpoint {path} was trained with global batch {saved_batch}, this run has {global_batch} "
            "(keep data.batch_size x world size x train.accumulate_steps, set data.global_batch_size, or start a new "
            "output_dir)"
        )
    saved_world = ckpt.get("world_size")
    if saved_world is None or saved_world == world_size:
        return ""
    before, now = normalisation_batch(config_from_dict(saved), saved_world), normalisation_batch(cfg, world_size)
    if before != now:
        raise CheckpointError(
            f"checkpoint {path}: its run normalised BatchNorm over {before} samples on {saved_world} processes; this "
            f"run would over {now} on {world_size}: set syncbn.norm_batch_size={before} to keep it"
        )
    return (f"resumed a {saved_world}-process run on {world_size} process{'es' if world_size > 1 else ''}: global "
            f"batch {global_batch}, "
            f"normalisation batch {now}, step {ckpt['train_state']['step']}; per-rank random streams (dropout and "
            "the like) start afresh from train.seed + rank (augmentation is per sample, unchanged)")


def config_changes(saved: dict[str, Any], cfg: Config, shown: int = 8) -> str:
    """The keys whose values differ from the checkpoint's run (``section.key old -> new``), besides those said
    elsewhere: the schedule's (re-planned) and the per-process batch (derived for the world size). A resumed run
    changed on purpose says it; one whose config resolved differently (a new default) does not change silently."""
    now = config_to_dict(cfg)
    said = {f"train.{key}" for key in SCHEDULE_KEYS} | {"data.batch_size"}
    changed = [f"{section}.{key} {old} -> {now[section][key]}"
               for section, values in saved.items() if isinstance(values, dict) and isinstance(now.get(section), dict)
               for key, old in values.items()
               if key in now[section] and old != now[section][key] and f"{section}.{key}" not in said]  # fmt: skip
    more = f" and {len(changed) - shown} more" if len(changed) > shown else ""
    return ", ".join(changed[:shown]) + more


# --------------------------------------------------------------------------- the run's checkpoints, both ways


class Checkpointer:
    """Owns what a checkpoint of this template holds: the model (a plain state_dict), optimizer, scheduler, grad
    scaler, ``TrainState``, every rank's RNG streams, the resolved config, world size and global batch, the EMA
    when the run keeps one, and how to use the model (``inference``: class names, evaluation preprocessing). It
    saves and loads them; when statistics are settled, or which checkpoint a run resumes, is decided elsewhere
    (``engine.bn.settle``, ``engine.runtime.rundir``).
    """

    def __init__(self, cfg: Config, ctx: DistContext, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler,
                 ema: ModelEma | None = None, inference: dict[str, Any] | None = None) -> None:  # fmt: skip
        self.cfg, self.ctx, self.inference = cfg, ctx, inference or {}
        self.model, self.optimizer, self.scheduler, self.scaler, self.ema = model, optimizer, scheduler, scaler, ema
        self.global_batch = global_batch_size(cfg, ctx.world_size)

    def gather(self, state: TrainState) -> dict[str, Any] | None:
        """The checkpoint of the run as it stands, on rank 0 (None elsewhere). A collective: every rank's RNG
        streams are gathered, so every rank calls it."""
        rng = gather_objects(capture_rng_state())
        if not self.ctx.is_main:
            return None
        checkpoint = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "train_state": state.state_dict(),
            "config": config_to_dict(self.cfg),
            "inference": self.inference,  # class names and evaluation preprocessing: how to use the model
            "world_size": self.ctx.world_size,
            "global_batch": self.global_batch,
            "rng": rng,
        }
        if self.ema is not None:
            checkpoint["ema"] = self.ema.state_dict()
        return checkpoint

    def _replan_schedule(self, saved: dict[str, Any], planned: list[float], state_step: int) -> None:
        """The run's schedule keys differ from the checkpoint's (``train.epochs`` raised to train longer, say): the
        learning rate follows this run's plan from the resumed step on, and the log says so."""
        changed = {key: (saved[key], getattr(self.cfg.train, key)) for key in SCHEDULE_KEYS
                   if key in saved and saved[key] != getattr(self.cfg.train, key)}  # fmt: skip
        if not changed:
            return
        before = self.optimizer.param_groups[0]["lr"]
        self.scheduler.base_lrs = planned
        for group, lr, factor in zip(self.optimizer.param_groups, planned, self.scheduler.lr_lambdas):
            group["initial_lr"], group["lr"] = lr, lr * factor(self.scheduler.last_epoch)
        what = ", ".join(f"train.{key} {old} -> {new}" for key, (old, new) in changed.items())
        get_logger().info(f"note: {what}: the learning-rate schedule is re-planned from step {state_step} "
                          f"(lr {before:.4g} -> {self.optimizer.param_groups[0]['lr']:.4g})")

    def write(self, checkpoint: dict[str, Any] | None, is_best: bool = False) -> None:
        """Write what :meth:`gather` returned (rank 0; a no-op elsewhere), atomically."""
        if checkpoint is not None:
            save_checkpoint(checkpoint, self.cfg.output_dir, keep=self.cfg.train.keep_checkpoints, is_best=is_best)

    def load_model(self, path: str) -> dict[str, Any]:
        """Load the model's weights from ``path`` (any rank, any world size); returns the whole checkpoint."""
        loaded = load_checkpoint(path)
        weights = strip_prefixes(loaded["model"])  # also a checkpoint saved from a DDP or compiled model
        check_model_compatible(weights, self.model, path)
        self.model.load_state_dict(weights)
        return loaded

    def resume(self, path: str, state: TrainState) -> dict[str, Any]:
        """Continue the run saved at ``path``: weights, optimizer, schedule, scaler, position, RNG streams and EMA.
        Returns the loaded checkpoint."""
        loaded = self.load_model(path)
        moved = check_run_compatible(loaded, self.cfg, self.ctx.world_size, path)
        if moved:
            get_logger().info(moved)
        planned = [group["initial_lr"] for group in self.optimizer.param_groups]  # this run's lr, before loading
        self.optimizer.load_state_dict(loaded["optimizer"])
        self.scheduler.load_state_dict(loaded["scheduler"])
        self._replan_schedule(loaded.get("config", {}).get("train", {}), planned, state_step=loaded["train_state"]["step"])
        if changed := config_changes(loaded.get("config", {}), self.cfg):
            get_logger().info(f"note: this run's config differs from the checkpoint's run in {changed}; the rest of "
                              "the run uses this run's values")
        self.scaler.load_state_dict(loaded["scaler"])
        state.load_state_dict(loaded["train_state"])
        if self.ema is not None and "ema" in loaded:
            self.ema.load_state_dict(loaded["ema"])
        elif self.ema is not None:
            get_logger().warning(f"warning: {path} holds no EMA; it starts from the resumed weights")
            self.ema.module.load_state_dict(self.model.state_dict())
        if loaded["world_size"] == self.ctx.world_size:  # each rank gets back its own RNG streams
            restore_rng_state(loaded["rng"][self.ctx.rank])
        return loaded
