"""The run's configuration: schema, YAML loading, ``section.key=value`` overrides (typed by
``engine/config_parsing.py``), validation, dump.

Everything here runs before any process group exists, so a typo fails fast on
every rank with no collective to hang in. The schema is plain dataclasses; the
type hints are the single source of truth for what a key accepts.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import yaml

from engine.config_checks import validate
from engine.config_parsing import apply_override, build_dataclass, suggest_file
from engine.errors import ConfigError

if TYPE_CHECKING:
    from tasks.registry import Task

__all__ = ["Config", "ConfigError", "apply_overrides", "config_from_dict", "config_to_dict", "dump_config", "global_batch_size",
           "load_config"]

DEFAULT_WEIGHT_DECAY = {"sgd": 5e-4, "adamw": 0.05}  # train.weight_decay: auto (ResNet SGD recipes; AdamW's, as timm's)


def task_of(cfg: Config) -> type[Task]:
    """The task class ``cfg.task`` names (``tasks/``): its metric names, model family and density decide what the
    config accepts. Imported when first asked, so ``--help`` and a malformed command line answer before torch's
    import."""
    from tasks import task_class

    return task_class(cfg.task)


@dataclass
class ModelConfig:
    name: str = "small_cnn"
    num_classes: int = 10  # 0: the dataset's (an image folder's class folders, CIFAR's, VOC's, COCO's)
    pretrained: bool = False  # the library's weights, fetched once per node into its cache (docs/models.md)
    aux_loss_weight: float = 0.0  # segmentation: > 0 builds the auxiliary head and adds its weighted loss
    unfreeze_bn: bool = False  # detection: the backbone's FrozenBatchNorm2d made trainable BatchNorm2d (for SyncBN)
    projection_dim: int = 128  # contrastive: the projection head's output size
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra constructor arguments


@dataclass
class DataConfig:
    name: str = "synthetic"
    root: str = "./data_cache"
    batch_size: int = 32  # per process
    global_batch_size: int = 0  # > 0: the batch of a step over all processes; decides batch_size per world size
    val_batch_size: int = 0  # per process; 0 = same as batch_size (detection: 1)
    num_workers: int | Literal["auto"] = "auto"  # auto: from the CPUs each process of this node gets
    image_size: int = 32  # segmentation: the training crop
    base_size: int = 0  # segmentation: short side before the random scale, and for evaluation; 0 = as stored
    scale_range: list[float] = field(default_factory=lambda: [0.5, 2.0])  # segmentation: random rescale factors
    augment: bool = True
    mean: list[float] = field(default_factory=list)  # per channel (one value: every channel); []: the dataset's
    std: list[float] = field(default_factory=list)  # per channel (one value: every channel); []: the dataset's
    hflip_prob: float = 0.5  # training's horizontal flip (0: never mirror: digits, text, some medical images)
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # classification: random-resized crop's area
    crop_ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])  # classification: its aspect ratio range
    train_crop_size: int = 0  # classification: the training crop; 0 = data.image_size
    val_resize_size: int = 0  # classification: evaluation's short side; 0 = val_crop_size / 0.875 (CIFAR: the crop)
    val_crop_size: int = 0  # classification: evaluation's center crop; 0 = data.image_size
    interpolation: Literal["bilinear", "bicubic", "nearest"] = "bilinear"  # resizing images (training and evaluation)
    auto_augment: Literal["none", "trivialaugment_wide", "randaugment", "augmix", "autoaugment_imagenet",
                          "autoaugment_cifar10", "autoaugment_svhn"] = "none"  # classification: torchvision v2's policies
    auto_augment_kwargs: dict[str, Any] = field(default_factory=dict)  # their parameters ({magnitude: 9}, {severity: 3})
    random_erase: float = 0.0  # classification: probability of erasing a random rectangle (torchvision's recipes: 0.1)
    decoder: Literal["auto", "torchvision", "pil"] = "auto"  # image files: auto picks the fastest that reads them
    aspect_ratio_group_factor: int = 3  # detection: each step's images from one of 2k+2 aspect-ratio bins (0 = off)
    drop_last: bool = True
    view_crop_scale: list[float] = field(default_factory=lambda: [0.2, 1.0])  # contrastive: each view's crop area
    view_color_jitter: float = 0.5  # contrastive: SimCLR's colour strength s (jitter 0.8s, hue 0.2s, p 0.8); 0 = off
    view_grayscale: float = 0.2  # contrastive: probability of a grayscale view
    view_blur: float = 0.0  # contrastive: probability of a Gaussian blur (SimCLR: 0.5 on ImageNet, none on CIFAR)
    download: bool = False  # cifar only: opt in to downloading
    # synthetic/fake datasets only
    num_train: int = 4096
    num_val: int = 1024
    channels: int = 3
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra keyword arguments for the dataset's builder


@dataclass
class TrainConfig:
    epochs: int = 10
    lr: float = 0.1  # at base_batch_size when lr_scaling is linear
    lr_scaling: Literal["none", "linear", "sqrt"] = "linear"
    base_batch_size: int = 256
    optimizer: Literal["sgd", "adamw"] = "sgd"
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float | Literal["auto"] = "auto"  # auto: 5e-4 for sgd, 0.05 for adamw (each one's usual value)
    schedule: Literal["cosine", "poly", "step", "constant"] = "cosine"
    warmup_epochs: float = 0.0
    step_milestones: list[int] = field(default_factory=lambda: [30, 60, 80])  # epochs, for schedule=step
    step_gamma: float = 0.1
    min_lr: float = 0.0
    label_smoothing: float = 0.0
    mixup_alpha: float = 0.0  # classification: MixUp's Beta(a, a) on each batch; 0 = off (torchvision's recipes: 0.2)
    cutmix_alpha: float = 0.0  # classification: CutMix's Beta(a, a); 0 = off; both > 0: one of the two per batch
    temperature: float = 0.2  # contrastive: NT-Xent's temperature
    knn_k: int = 20  # contrastive: neighbours of the k-NN monitor (val_knn_acc1)
    knn_temperature: float = 0.07  # contrastive: the k-NN monitor's vote temperature
    accumulate_steps: int = 1
    clip_grad_norm: float = 0.0  # 0 = off
    amp: Literal["off", "bf16", "fp16"] = "off"
    channels_last: bool = False
    grad_checkpointing: bool = False  # recompute the model's blocks in backward: less activation memory
    compile: bool = False
    seed: int = 0
    resume: str = "auto"  # auto | none | path/to/checkpoint.pt
    eval_only: bool = False
    eval_checkpoint: Literal["last", "best"] = "last"  # eval_only with resume auto: which of output_dir's checkpoints
    checkpoint_every_steps: int = 0  # 0 = end of epoch only
    keep_checkpoints: int = 2
    agree_every_steps: int = 10  # ranks agree on losses (NaN check); also before every checkpoint (stops: every step)
    ema_decay: float = 0.0  # > 0: keep an EMA of the weights (evaluated and saved beside the model)
    ema_warmup: bool = True  # decay min(d, (1 + u) / (10 + u)) after u updates
    ema_every: int = 1  # optimizer steps between EMA updates
    ema_buffers: Literal["average", "copy", "precise"] = "copy"  # the EMA's BatchNorm buffers
    best_metric: str = "auto"  # picks best.pt: one of the task's metrics or the EMA's (auto: the task's first)
    print_freq: int = 20
    progress_bar: bool = True
    tensorboard: bool = True  # false: no TensorBoard even where train.trackers names it
    trackers: list[Literal["tensorboard", "wandb", "mlflow"]] = field(default_factory=lambda: ["tensorboard"])
    tracker_project: str = "ddp-syncbn"  # the W&B project, the MLflow experiment


@dataclass
class SyncBNConfig:
    enabled: bool = True
    impl: Literal["auto", "torch", "ours"] = "auto"
    collective: Literal["auto", "all_gather", "all_reduce"] = "auto"  # ours: the forward collective (auto: by world size)
    group_size: int = 0  # 0 = the whole world; k = groups of k consecutive ranks
    virtual_splits: int = 1  # >1: ghost BatchNorm (only with enabled: false)
    buffer_policy: Literal["broadcast", "reduce"] = "broadcast"  # SyncBN off: make BN buffers consistent
    precise_bn_samples: int = 0  # > 0: PreciseBN over this many training samples before each evaluation
    norm_batch_size: int = 0  # > 0: samples per BatchNorm statistic; decides enabled, group_size, virtual_splits
    check_calls: bool = False  # every SyncBN call first checks that all ranks are in the same layer (one line if not)


@dataclass
class DistConfig:
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    timeout_s: float = 300.0
    find_unused_parameters: bool = False
    step_timeout_s: float = 1800.0  # no step finished for this long: the stuck rank ends the job (0 = off)
    exit_with_launcher: bool = True  # a worker exits when the process that started it dies


@dataclass
class DebugConfig:
    """Test-only fault injection; off unless fault_step >= 0."""

    fault_step: int = -1
    fault_rank: int = 0
    fault_kind: Literal["raise", "exit", "nan", "sigkill", "hang", "signal"] = "raise"
    fault_point: Literal["step", "before_checkpoint", "after_checkpoint"] = "step"  # where, for raise/exit/sigkill/hang
    fault_once: bool = False  # with a marker in output_dir, so a restarted job passes the step
    record_samples: bool = False  # each rank appends the sample indices it trains on to output_dir/samples_rank<r>.txt


@dataclass
class Config:
    output_dir: str = "runs/default"
    task: str = "classification"  # a registered task (tasks/): decides targets, loss and metrics
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    syncbn: SyncBNConfig = field(default_factory=SyncBNConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)


def load_config(path: str | None, overrides: list[str] = (), world_size: int = 1,
                defaults: Callable[[Config, set[str]], dict[str, Any]] | None = None) -> Config:
    """Read YAML (safe loader), apply overrides in order, type-check and validate; ``data.global_batch_size`` and
    ``syncbn.norm_batch_size`` are resolved for ``world_size`` processes (the launcher's, known before any process
    group exists). ``defaults(cfg, given)``: values for keys the file and the overrides leave unset (``given`` holds
    the ``section.key`` names they set), as ``{"section.key": value}``: what a plug-in knows better than the schema
    (``data.model_inputs``: the input size and normalisation a timm model was made for); a key the configured task
    does not read (``Task.config_keys``) is not filled."""
    raw: dict[str, Any] = {}
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"config file not found: {path}{suggest_file(path)}")
        try:
            with open(path, encoding="utf-8") as f:
                raw = yaml.safe_load(f)
        except yaml.YAMLError as exc:
            where = getattr(exc, "problem_mark", None)
            line = f" line {where.line + 1}" if where else ""
            raise ConfigError(f"config file {path}{line} is not valid YAML: {getattr(exc, 'problem', exc)}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"config file {path} is not a text YAML file") from None
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(raw).__name__}")
    for override in overrides:
        apply_override(raw, override)
    cfg = config_from_dict(raw)
    given = {f"{section}.{key}" for section, keys in raw.items() if isinstance(keys, dict) for key in keys}
    if defaults is not None:
        from tasks.registry import foreign_keys

        unread = given | set(foreign_keys(cfg.task))  # set by the user, or a key this task does not read (refused)
        filled = {key: value for key, value in defaults(cfg, given).items() if key not in unread}
        for dotted, value in filled.items():
            section, key = dotted.split(".")
            raw[section] = {**(raw.get(section) or {}), key: value}
        if filled:
            cfg = config_from_dict(raw)
    cfg = resolve_defaults(cfg)
    return resolve_norm_batch(resolve_global_batch(cfg, world_size, "data.batch_size" in given), world_size)


def config_from_dict(raw: dict[str, Any]) -> Config:
    """A config from plain data (a checkpoint's ``config``, a parsed YAML file), type-checked and validated."""
    cfg = build_dataclass(Config, raw, "")
    validate(cfg)
    return cfg


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """``cfg`` (a checkpoint's, say) with ``section.key=value`` overrides applied, validated again."""
    raw = config_to_dict(cfg)
    for override in overrides:
        apply_override(raw, override)
    return config_from_dict(raw)


def resolve_defaults(cfg: Config) -> Config:
    """``train.best_metric: auto`` -> the task's headline metric (val_acc1, val_miou, val_map); another task's metric
    is an error naming the ones this task has. Detection evaluates one image per batch unless told otherwise
    (``data.val_batch_size`` 0): a batch pads its images to a common size, which changes the predictions near the
    borders, so only single-image batches score the same at any world size (torchvision's reference does the same).
    ``train.weight_decay: auto`` -> the optimizer's usual value (:data:`DEFAULT_WEIGHT_DECAY`)."""
    from tasks.registry import best_metrics

    metrics = best_metrics(cfg.task)
    if cfg.train.best_metric not in ("auto", *metrics):
        raise ConfigError(f"train.best_metric: {cfg.train.best_metric} is not a metric of task {cfg.task} "
                          f"(it has {', '.join(metrics)})")
    train = dataclasses.replace(cfg.train, best_metric=metrics[0]) if cfg.train.best_metric == "auto" else cfg.train
    if train.weight_decay == "auto":
        train = dataclasses.replace(train, weight_decay=DEFAULT_WEIGHT_DECAY[train.optimizer])
    data = cfg.data
    if task_of(cfg).model_family == "detection" and data.val_batch_size == 0:
        data = dataclasses.replace(data, val_batch_size=1)
    return dataclasses.replace(cfg, train=train, data=data)


def resolve_global_batch(cfg: Config, world_size: int, batch_given: bool = False) -> Config:
    """``data.global_batch_size: G`` -> ``data.batch_size`` = G / (world size x ``train.accumulate_steps``), so the
    same config makes the same run on any number of processes that splits G. A world size that cannot, or a
    ``data.batch_size`` given beside G that contradicts it, is one line naming what can."""
    g, accum = cfg.data.global_batch_size, cfg.train.accumulate_steps
    if g == 0:
        return cfg
    if g % (world_size * accum):
        can = [str(w) for w in range(1, g // accum + 1) if g % (w * accum) == 0]
        raise ConfigError(f"data.global_batch_size: {g} cannot be split over {world_size} processes x {accum} "
                          f"accumulation steps (train.accumulate_steps); process counts that can: {', '.join(can)}")
    batch = g // (world_size * accum)
    if batch_given and cfg.data.batch_size != batch:
        raise ConfigError(f"data.batch_size: {cfg.data.batch_size} per process contradicts data.global_batch_size {g} "
                          f"on {world_size} processes x {accum} accumulation steps ({batch} per process); set one of "
                          "them (data.global_batch_size=0 keeps the batch per process)")
    resolved = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, batch_size=batch))
    validate(resolved)
    return resolved


def norm_batch_choices(batch: int, world_size: int, smallest: int = 2) -> list[int]:
    """Normalisation batches deliverable with ``batch`` per process on ``world_size`` processes: ghost splits of
    one process's batch (batch / s, at least ``smallest``), one process's batch, SyncBN groups of k consecutive
    ranks (batch x k)."""
    ghost = [batch // s for s in range(1, batch + 1) if batch % s == 0 and batch // s >= smallest]
    groups = [batch * k for k in range(1, world_size + 1) if world_size % k == 0]
    return sorted(set(ghost + groups))


def resolve_norm_batch(cfg: Config, world_size: int) -> Config:
    """``syncbn.norm_batch_size: N`` -> SyncBN over groups of N / batch ranks, or ghost BatchNorm with batch / N
    splits per process, or plain local BatchNorm when N is the per-process batch; an N that cannot be delivered
    exactly is an error naming the key and the nearest valid values."""
    n, batch = cfg.syncbn.norm_batch_size, cfg.data.batch_size
    if n == 0:
        return cfg
    # a segmentation net normalises over pixels too: a statistic of one image is still many values
    choices = norm_batch_choices(batch, world_size, smallest=1 if task_of(cfg).dense else 2)
    if n not in choices:
        below = [c for c in choices if c < n][-1:]
        above = [c for c in choices if c > n][:1]
        raise ConfigError(
            f"syncbn.norm_batch_size: {n} cannot be delivered with data.batch_size {batch} on {world_size} "
            f"processes; nearest valid: {' or '.join(map(str, below + above))}"
        )
    if n > batch:  # SyncBN over groups of n / batch ranks (0: the whole world)
        group = n // batch
        syncbn = dataclasses.replace(cfg.syncbn, enabled=True, group_size=0 if group == world_size else group,
                                     virtual_splits=1)
    else:  # one process's batch, split into ghost batches of n (1 split: plain local BatchNorm)
        syncbn = dataclasses.replace(cfg.syncbn, enabled=False, group_size=0, virtual_splits=batch // n)
    resolved = dataclasses.replace(cfg, syncbn=syncbn)
    validate(resolved)
    return resolved


def global_batch_size(cfg: Config, world_size: int) -> int:
    """Samples per optimizer step over all processes: the batch the learning rate and a resume are defined by."""
    return cfg.data.batch_size * world_size * cfg.train.accumulate_steps


def normalisation_batch(cfg: Config, world_size: int) -> int:
    """Samples per BatchNorm statistic in a training forward: SyncBN's group (every rank, or
    ``syncbn.group_size`` consecutive ones) x the per-process batch, one process's batch, or a ghost split of it."""
    if cfg.syncbn.enabled:
        return cfg.data.batch_size * (cfg.syncbn.group_size or world_size)
    return cfg.data.batch_size // cfg.syncbn.virtual_splits


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Plain data (dicts, lists, str, numbers): safe for YAML, JSON and ``torch.load(weights_only=True)``."""
    return dataclasses.asdict(cfg)


def config_text(cfg: Config) -> str:
    """The resolved config as YAML, as ``config.yaml`` holds it: ``--config`` on it reproduces the run (a per-process
    batch derived from ``data.global_batch_size`` is left out: it is derived again, for any world size)."""
    data = config_to_dict(cfg)
    if cfg.data.global_batch_size:
        del data["data"]["batch_size"]
    return yaml.safe_dump(data, sort_keys=False)


def dump_config(cfg: Config, path: str) -> None:
    """Write :func:`config_text` to ``path``."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(config_text(cfg))
