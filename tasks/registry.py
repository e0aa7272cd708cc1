"""Tasks by name: ``task: <name>`` in the config picks the class registered with ``@register_task("<name>")``.

A task decides what the rest of the template leaves open: the training loss of a batch, how validation is scored
(exactly, at any world size), the names of its scores, which models serve it and what a prediction prints.
Launch, SyncBN, DDP, samplers, checkpoints and resume are shared by every task. Adding one is a file in ``tasks/``
plus its import in ``tasks/__init__.py`` (README: Your own task).
"""

from __future__ import annotations

import abc
import difflib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
from torch import Tensor, nn

from engine.errors import ConfigError, DataError

if TYPE_CHECKING:
    from torch.utils.data import Dataset

    from engine.config import Config, ModelConfig

__all__ = ["MODEL_FAMILIES", "TASKS", "Scorer", "Task", "build_task", "foreign_keys", "main_output", "register_task",
           "task_class"]

MODEL_FAMILIES = ("classification", "segmentation", "detection")  # what a model's output is (models/registry.py)
TASKS: dict[str, type[Task]] = {}


class Scorer(Protocol):
    """One evaluation's scores: ``update`` per validation batch on each rank (no collective inside: ranks hold
    different numbers of batches), then ``result`` once, a collective every rank reaches, returning the same
    ``{"val_<name>": value}`` on every rank."""

    def update(self, output: Any, targets: Any) -> None: ...

    def result(self) -> dict[str, Any]: ...


class Task(abc.ABC):
    """What a task decides. Subclasses set ``metrics`` and implement ``training_loss`` and ``scorer``."""

    metrics: ClassVar[tuple[str, ...]] = ()
    """The scores ``train.best_metric`` may name (higher is better; ``auto`` picks the first). The run derives the
    EMA's (``<name>_ema``) and checks the config against these before any process starts."""
    model_family: ClassVar[str] = "classification"
    """The models that serve the task, by their output: classification (logits (N, classes): any local, torchvision
    or timm classifier), segmentation (logits (N, classes, H, W)) or detection (torchvision's detector API)."""
    dense: ClassVar[bool] = False
    """One image is many values per BatchNorm statistic (pixels, proposals): a batch of one is normalisable."""
    config_keys: ClassVar[tuple[str, ...] | None] = None
    """The task's own config keys (``"data.base_size"``, ...): what other tasks ignore. A run of another task that
    sets one is refused in one line naming the key and the task it belongs to. None (your own task, by default):
    the task may read any key, and none is refused."""
    predict: ClassVar[Callable[[Tensor, list[str], int], list[tuple[str, dict[str, Any]]]] | None] = None
    """``scripts/predict.py`` for a classification-family task: a method ``predict(logits, class_names, top_k)``
    giving, per image of a batch, the line predict prints and the JSON record it writes. None: the task has no
    prediction format, and predict says so in one line (it trains, resumes and exports all the same)."""

    @classmethod
    def from_config(cls, cfg: Config, ground_truth: dict[str, Any] | None = None) -> Task:
        """The task for this run (``ground_truth``: a detection dataset's validation split as COCO instances)."""
        return cls()

    @classmethod
    def adapt_model(cls, model: nn.Module, cfg: ModelConfig) -> nn.Module:
        """The model of the task's family as the task trains it (``build_model`` calls this, so the entry script and
        every script rebuild the same module): unchanged, unless the task reshapes it (contrastive: a projection
        head in place of the classifier)."""
        return model

    def training_split(self, dataset: Dataset) -> Dataset:
        """The training split as the task trains on it: unchanged, unless a training sample is something else than
        the dataset's (contrastive: two augmented views of each image). Its randomness is seeded per (seed, epoch,
        sample) by the loader, as the dataset's own augmentation is."""
        return dataset

    @abc.abstractmethod
    def training_loss(self, model: nn.Module, images: Any, targets: Any) -> Tensor:
        """The mean loss of a training batch; the task runs the forward (a detector takes the targets too)."""

    @abc.abstractmethod
    def scorer(self, device: torch.device) -> Scorer:
        """A fresh scorer for one evaluation."""



class OutputLossTask(Task):
    """A task whose loss is a function of the model's output and the targets (classification, segmentation)."""

    @abc.abstractmethod
    def loss(self, output: Any, targets: Any) -> Tensor:
        """The mean loss of ``output`` against ``targets``."""

    def training_loss(self, model: nn.Module, images: Any, targets: Any) -> Tensor:
        return self.loss(model(images), targets)


def register_task(name: str) -> Callable[[type[Task]], type[Task]]:
    """Make ``task: <name>`` use this class. Its ``metrics`` and ``model_family`` are checked here, at import."""

    def wrap(cls: type[Task]) -> type[Task]:
        if not cls.metrics or not all(m.startswith("val_") and not m.endswith("_ema") for m in cls.metrics):
            raise TypeError(f"task {name}: metrics must name the scorer's val_* scores (got {cls.metrics!r})")
        if cls.model_family not in MODEL_FAMILIES:
            raise TypeError(f"task {name}: model_family must be one of {', '.join(MODEL_FAMILIES)}")
        TASKS[name] = cls
        return cls

    return wrap


def task_class(name: str) -> type[Task]:
    """The class registered as ``name``; an unknown name is one line naming the registered ones."""
    if name not in TASKS:
        close = difflib.get_close_matches(name, sorted(TASKS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"task: unknown task '{name}'{hint}; registered: {', '.join(sorted(TASKS))} "
                          "(your own: @register_task in tasks/, imported in tasks/__init__.py)")
    return TASKS[name]


def model_family(task: str) -> str:
    """The family of models that serve ``task`` (a family's own name is its own family)."""
    return task if task in MODEL_FAMILIES else task_class(task).model_family


def best_metrics(name: str) -> tuple[str, ...]:
    """What ``train.best_metric`` may name for task ``name``: its metrics, then the EMA's."""
    metrics = task_class(name).metrics
    return (*metrics, *(f"{m}_ema" for m in metrics))


def foreign_keys(task: str) -> dict[str, list[str]]:
    """The config keys that other registered tasks declare as their own and ``task`` does not, each with the tasks
    it belongs to (none for a task that declares no keys of its own: it may read any)."""
    own = task_class(task).config_keys
    if own is None:
        return {}
    owners: dict[str, list[str]] = {}
    for name, cls in sorted(TASKS.items()):
        for key in cls.config_keys or ():
            if key not in own:
                owners.setdefault(key, []).append(name)
    return owners


def build_task(cfg: Config, ground_truth: dict[str, Any] | None = None) -> Task:
    """The task named by ``cfg.task`` (detection: with the validation split's ground truth as a COCO instances dict,
    which a detection dataset provides)."""
    cls = task_class(cfg.task)
    detection = cls.model_family == "detection"
    if detection and ground_truth is None:
        raise DataError(f"data.name: dataset '{cfg.data.name}' gives no COCO ground truth for task {cfg.task} "
                        "(a detection dataset's DatasetPair sets ground_truth)")
    if ground_truth is not None and not detection:
        raise DataError(f"data.name: '{cfg.data.name}' is a detection dataset but task is {cfg.task}; set task: detection")
    return cls.from_config(cfg, ground_truth)


def main_output(output: Tensor | dict[str, Tensor]) -> Tensor:
    """The logits a model's output holds: torchvision's segmentation models return ``{"out": ..., "aux": ...}``."""
    return output["out"] if isinstance(output, dict) else output
