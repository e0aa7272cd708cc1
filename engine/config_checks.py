"""Validation of a run's config: every impossible value, and every key that does nothing for the configured task,
is one line naming the key. Runs before any process group exists (``engine/config.py`` calls it after loading and
after each resolution)."""

from __future__ import annotations

from typing import Any

from engine.errors import ConfigError


def validate(cfg: Any) -> None:
    """Reject impossible values with the key that holds them (``cfg``: an ``engine.config.Config``)."""
    from tasks import task_class

    task = task_class(cfg.task)
    checks = [
        (cfg.model.num_classes >= 0, "model.num_classes", "must be >= 1 (0: the dataset's)"),
        (cfg.data.batch_size >= 1, "data.batch_size", "must be >= 1 (it is per process)"),
        (cfg.data.global_batch_size >= 0, "data.global_batch_size", "must be >= 0 (0 = off)"),
        (cfg.data.val_batch_size >= 0, "data.val_batch_size", "must be >= 0 (0 = data.batch_size)"),
        (cfg.data.num_workers == "auto" or cfg.data.num_workers >= 0, "data.num_workers", "must be >= 0 or auto"),
        (cfg.data.image_size >= 8, "data.image_size", "must be >= 8"),
        (len(cfg.data.mean) == len(cfg.data.std), "data.std", "needs as many values as data.mean (both, or neither)"),
        (all(s > 0 for s in cfg.data.std), "data.std", "must be > 0 per channel"),
        (0 <= cfg.data.hflip_prob <= 1, "data.hflip_prob", "must be in [0, 1]"),
        (_interval(cfg.data.crop_scale, top=1), "data.crop_scale", "must be [low, high] with 0 < low <= high <= 1"),
        (_interval(cfg.data.crop_ratio), "data.crop_ratio", "must be [low, high] with 0 < low <= high"),
        (cfg.data.train_crop_size == 0 or cfg.data.train_crop_size >= 8, "data.train_crop_size",
         "must be >= 8 (0 = data.image_size)"),
        (cfg.data.val_resize_size >= 0, "data.val_resize_size", "must be >= 0 (0 = val_crop_size / 0.875)"),
        (cfg.data.val_crop_size == 0 or cfg.data.val_crop_size >= 8, "data.val_crop_size", "must be >= 8 (0 = data.image_size)"),
        (cfg.data.auto_augment != "none" or not cfg.data.auto_augment_kwargs, "data.auto_augment_kwargs",
         "needs data.auto_augment"),
        (0 <= cfg.data.random_erase <= 1, "data.random_erase", "must be in [0, 1]"),
        (cfg.data.augment or cfg.data.auto_augment == "none", "data.auto_augment", "needs data.augment: true"),
        (cfg.data.augment or cfg.data.random_erase == 0, "data.random_erase", "needs data.augment: true"),
        (cfg.train.mixup_alpha >= 0, "train.mixup_alpha", "must be >= 0 (0 = off)"),
        (cfg.train.cutmix_alpha >= 0, "train.cutmix_alpha", "must be >= 0 (0 = off)"),
        (cfg.data.num_train >= 1, "data.num_train", "must be >= 1"),
        (cfg.data.num_val >= 1, "data.num_val", "must be >= 1"),
        (cfg.data.channels >= 1, "data.channels", "must be >= 1"),
        (cfg.train.epochs >= 1, "train.epochs", "must be >= 1"),
        (cfg.train.lr > 0, "train.lr", "must be > 0"),
        (cfg.train.base_batch_size >= 1, "train.base_batch_size", "must be >= 1"),
        (0 <= cfg.train.momentum < 1, "train.momentum", "must be in [0, 1)"),
        (cfg.train.weight_decay == "auto" or cfg.train.weight_decay >= 0, "train.weight_decay", "must be >= 0 or auto"),
        (cfg.train.warmup_epochs >= 0, "train.warmup_epochs", "must be >= 0"),
        (0 < cfg.train.step_gamma <= 1, "train.step_gamma", "must be in (0, 1]"),
        (cfg.train.min_lr >= 0, "train.min_lr", "must be >= 0"),
        (0 <= cfg.train.label_smoothing < 1, "train.label_smoothing", "must be in [0, 1)"),
        (cfg.train.temperature > 0, "train.temperature", "must be > 0"),
        (cfg.train.knn_k >= 1, "train.knn_k", "must be >= 1"),
        (cfg.train.knn_temperature > 0, "train.knn_temperature", "must be > 0"),
        (cfg.model.projection_dim >= 1, "model.projection_dim", "must be >= 1"),
        (_interval(cfg.data.view_crop_scale, top=1), "data.view_crop_scale",
         "must be [low, high] with 0 < low <= high <= 1"),
        (cfg.data.view_color_jitter >= 0, "data.view_color_jitter", "must be >= 0 (0 = off)"),
        (0 <= cfg.data.view_grayscale <= 1, "data.view_grayscale", "must be in [0, 1]"),
        (0 <= cfg.data.view_blur <= 1, "data.view_blur", "must be in [0, 1]"),
        (cfg.train.accumulate_steps >= 1, "train.accumulate_steps", "must be >= 1"),
        (cfg.train.clip_grad_norm >= 0, "train.clip_grad_norm", "must be >= 0 (0 = off)"),
        (cfg.train.checkpoint_every_steps >= 0, "train.checkpoint_every_steps", "must be >= 0 (0 = per epoch)"),
        (cfg.train.keep_checkpoints >= 1, "train.keep_checkpoints", "must be >= 1"),
        (cfg.train.agree_every_steps >= 1, "train.agree_every_steps", "must be >= 1"),
        (cfg.train.print_freq >= 1, "train.print_freq", "must be >= 1"),
        (0 <= cfg.train.ema_decay < 1, "train.ema_decay", "must be in [0, 1) (0 = off)"),
        (cfg.train.ema_every >= 1, "train.ema_every", "must be >= 1"),
        (cfg.train.ema_decay > 0 or not cfg.train.best_metric.endswith("_ema"), "train.best_metric",
         "an EMA metric needs train.ema_decay > 0"),
        (not (1 <= cfg.model.num_classes <= 5 and cfg.train.best_metric.startswith("val_acc5")), "train.best_metric",
         "top-5 accuracy needs more than 5 classes (model.num_classes)"),
        (cfg.train.resume != "", "train.resume", "must be auto, none or a checkpoint path"),
        (cfg.syncbn.group_size >= 0, "syncbn.group_size", "must be >= 0 (0 = whole world)"),
        (cfg.syncbn.virtual_splits >= 1, "syncbn.virtual_splits", "must be >= 1"),
        (cfg.syncbn.precise_bn_samples >= 0, "syncbn.precise_bn_samples", "must be >= 0 (0 = off)"),
        (cfg.syncbn.norm_batch_size >= 0, "syncbn.norm_batch_size", "must be >= 0 (0 = off)"),
        (not (cfg.syncbn.enabled and cfg.syncbn.virtual_splits > 1), "syncbn.virtual_splits",
         "ghost BatchNorm (virtual_splits > 1) needs syncbn.enabled: false"),
        (not (cfg.train.grad_checkpointing and cfg.syncbn.enabled and cfg.syncbn.impl == "torch"), "syncbn.impl",
         "torch's SyncBatchNorm counts a checkpoint's replay twice and communicates again; with "
         "train.grad_checkpointing use auto or ours (ours on every device)"),
        (cfg.data.batch_size % cfg.syncbn.virtual_splits == 0, "syncbn.virtual_splits",
         f"must divide data.batch_size ({cfg.data.batch_size})"),
        # (a dense net normalises over pixels too: one image per statistic is a batch of H x W values)
        (cfg.syncbn.enabled or task.dense or cfg.data.batch_size // cfg.syncbn.virtual_splits >= 2,
         "data.batch_size", "BatchNorm needs >= 2 samples per process (per virtual split) when syncbn.enabled is false"),
        (cfg.model.aux_loss_weight >= 0, "model.aux_loss_weight", "must be >= 0 (0 = no auxiliary head)"),
        (cfg.data.base_size >= 0, "data.base_size", "must be >= 0 (0 = images as stored)"),
        (cfg.data.aspect_ratio_group_factor >= 0, "data.aspect_ratio_group_factor", "must be >= 0 (0 = off)"),
        (_interval(cfg.data.scale_range), "data.scale_range", "must be [low, high] with 0 < low <= high"),
        (cfg.dist.timeout_s > 0, "dist.timeout_s", "must be > 0"),
        (cfg.dist.step_timeout_s >= 0, "dist.step_timeout_s", "must be >= 0 (0 = off)"),
        (cfg.output_dir.strip() != "", "output_dir", "must not be empty"),
    ]
    for ok, key, message in checks:
        if not ok:
            raise ConfigError(f"{key}: {message}, got {_lookup(cfg, key)!r}")
    _refuse_other_tasks_keys(cfg)
    if cfg.train.eval_only and cfg.train.resume == "none" and not cfg.model.pretrained:
        raise ConfigError("train.eval_only: needs a checkpoint: train.resume=auto (output_dir's, see "
                          "train.eval_checkpoint), train.resume=PATH, or model.pretrained")


def _refuse_other_tasks_keys(cfg: Any) -> None:
    """A key another task reads (its ``config_keys``), set away from its default, would do nothing in this run."""
    from tasks.registry import foreign_keys

    defaults = type(cfg)()
    for key, owners in foreign_keys(cfg.task).items():
        if _lookup(cfg, key) != _lookup(defaults, key):
            raise ConfigError(f"{key}: belongs to task {' or '.join(owners)} and does nothing for task {cfg.task}; "
                              f"remove it (or set task: {owners[0]})")


def _interval(values: list[float], top: float = float("inf")) -> bool:
    """``[low, high]`` with 0 < low <= high <= top."""
    return len(values) == 2 and 0 < values[0] <= values[1] <= top


def _lookup(cfg: Any, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node
