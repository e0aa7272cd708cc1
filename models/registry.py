"""The model registry: local builders first, then ``timm/<name>`` and ``smp/<Architecture>``, then torchvision's
classification, segmentation and detection models by name."""

from __future__ import annotations

import difflib
from collections.abc import Callable

from torch import nn

from engine.config import ModelConfig
from engine.errors import ModelError
from models.detection import build_torchvision_detector
from models.libraries import build_smp, build_timm
from models.pretrained import from_the_cache
from tasks.registry import MODEL_FAMILIES, model_family, task_class

__all__ = ["MODELS", "ModelError", "build_model", "register_model"]


Builder = Callable[..., nn.Module]
LIBRARIES = {"timm": build_timm, "smp": build_smp}  # model.name: <library>/<its name for the model>
MODELS: dict[str, Builder] = {}
MODEL_TASKS: dict[str, str] = {}  # local model name -> the task its output is for


def register_model(name: str, task: str = "classification") -> Callable[[Builder], Builder]:
    """Make ``model.name: <name>`` build this for the tasks of family ``task`` (classification, segmentation or
    detection); the builder gets ``num_classes`` and ``model.kwargs``. A
    classification model returns logits (N, classes); a segmentation model logits (N, classes, H, W) at the input's
    size (or a lower one: the loss upsamples), or torchvision's ``{"out": ..., "aux": ...}``; a detection model is
    called as torchvision's detectors are (``models/detection.py``)."""

    def wrap(fn: Builder) -> Builder:
        MODELS[name] = fn
        MODEL_TASKS[name] = task
        return fn

    return wrap


def _torchvision_models(task: str) -> list[str]:
    from torchvision import models as tvm

    return tvm.list_models(module={"segmentation": tvm.segmentation, "detection": tvm.detection}.get(task, tvm))


def _task_of(name: str) -> str | None:
    if name in MODELS:
        return MODEL_TASKS[name]
    for task in MODEL_FAMILIES:
        if name in _torchvision_models(task):
            return task
    return None


def _local(task: str) -> str:
    return ", ".join(name for name in sorted(MODELS) if MODEL_TASKS[name] == task)


def build_model(cfg: ModelConfig, task: str = "classification") -> nn.Module:
    """The model named by ``cfg.name`` with ``cfg.num_classes`` outputs for ``task`` (any model of the task's
    family: a classifier serves every classification-family task), made what the task needs of it (contrastive: a
    projection head in place of the classifier), on the CPU, in float32. With ``cfg.pretrained`` its weights are
    fetched into the library's cache first (a no-op when some process of the job fetched them already) and the
    build reads that cache only."""
    model = _build(cfg, model_family(task))
    return task_class(task).adapt_model(model, cfg)


def _build(cfg: ModelConfig, task: str) -> nn.Module:
    library, _, name = cfg.name.partition("/")
    if library in LIBRARIES and name:
        return LIBRARIES[library](name, cfg, task)
    model_task = _task_of(cfg.name)
    if model_task is None:
        close = difflib.get_close_matches(cfg.name, sorted(MODELS) + _torchvision_models(task), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ModelError(f"model.name: unknown model '{cfg.name}'{hint}; local: {_local(task)}, "
                         f"any torchvision {task} model, timm/<name> or smp/<Architecture>")
    if model_task != task:
        raise ModelError(f"model.name: '{cfg.name}' is a {model_task} model but task is {task}; "
                         f"pick a {task} model (local: {_local(task)})")
    kwargs = dict(cfg.kwargs)
    if cfg.name in MODELS:
        if cfg.pretrained:
            raise ModelError(f"model.pretrained: local model '{cfg.name}' has no pretrained weights")
        return _call(MODELS[cfg.name], cfg, num_classes=cfg.num_classes, **kwargs)
    from torchvision import models as tvm

    builder = tvm.get_model_builder(cfg.name)
    with from_the_cache(cfg, task):
        if task == "detection":
            return build_torchvision_detector(builder, cfg)
        if task == "segmentation":
            # pretrained: the backbone's ImageNet weights (the head is new, sized by num_classes); otherwise none, and
            # no download (torchvision's deeplabv3 builders fetch the backbone's by default)
            kwargs.setdefault("weights_backbone", "DEFAULT" if cfg.pretrained else None)
            if cfg.aux_loss_weight > 0:
                kwargs.setdefault("aux_loss", True)
            return _call(builder, cfg, num_classes=cfg.num_classes, **kwargs)
        if not cfg.pretrained:
            return _call(builder, cfg, num_classes=cfg.num_classes, **kwargs)
        # pretrained heads have a fixed size: load them, then replace the classifier
        kwargs.setdefault("weights", "DEFAULT")
        model = _call(builder, cfg, **kwargs)
    _replace_classifier(model, cfg.num_classes)
    return model


def _call(builder: Builder, cfg: ModelConfig, **kwargs) -> nn.Module:
    try:
        return builder(**kwargs)
    except TypeError as exc:
        raise ModelError(f"model.kwargs: {cfg.name} rejected its arguments: {exc}") from None
    except NotImplementedError as exc:  # torchvision's lraspp: "This model does not use auxiliary loss"
        raise ModelError(f"model.aux_loss_weight: {cfg.name}: {exc} (set model.aux_loss_weight=0)") from None


def _replace_classifier(model: nn.Module, num_classes: int) -> None:
    parent, key, linear = find_classifier(model, "model.pretrained")
    setattr(parent, key, nn.Linear(linear.in_features, num_classes))


def strip_classifier(model: nn.Module, key: str) -> int:
    """Replace the model's last classifier Linear by the identity, so it returns the features that Linear took;
    their size. ``key`` names the setting in the error when there is no such Linear."""
    parent, name, linear = find_classifier(model, key)
    setattr(parent, name, nn.Identity())
    return linear.in_features


def find_classifier(model: nn.Module, key: str) -> tuple[nn.Module, str, nn.Linear]:
    """The last Linear of a classifier (``fc``, ``classifier``, ``head``, ``heads``, or the end of one of them as a
    Sequential: torchvision's and the local models' layouts) with the module holding it and its name there; a model
    without one is an error naming ``key``."""
    for attr in ("fc", "classifier", "head", "heads"):
        head = getattr(model, attr, None)
        if isinstance(head, nn.Sequential):
            parent, name, head = head, str(len(head) - 1), head[-1]
        else:
            parent, name = model, attr
        if isinstance(head, nn.Linear):
            return parent, name, head
    raise ModelError(f"{key}: cannot find the classifier of {type(model).__name__} (fc, classifier or head)")
