"""The model registry: local builders first, then torchvision's classification models by name."""

from __future__ import annotations

import difflib
from collections.abc import Callable

from torch import nn

from engine.config import ModelConfig
from engine.errors import ModelError

__all__ = ["MODELS", "ModelError", "build_model", "register_model"]


Builder = Callable[..., nn.Module]
MODELS: dict[str, Builder] = {}


def register_model(name: str) -> Callable[[Builder], Builder]:
    """Make ``model.name: <name>`` build this; the builder gets ``num_classes`` and ``model.kwargs``."""

    def wrap(fn: Builder) -> Builder:
        MODELS[name] = fn
        return fn

    return wrap


def _torchvision_builder(name: str) -> Builder | None:
    from torchvision import models as tvm

    return tvm.get_model_builder(name) if name in tvm.list_models(module=tvm) else None


def build_model(cfg: ModelConfig) -> nn.Module:
    """The model named by ``cfg.name`` with ``cfg.num_classes`` outputs, on the CPU, in float32."""
    kwargs = dict(cfg.kwargs)
    if cfg.name in MODELS:
        if cfg.pretrained:
            raise ModelError(f"model.pretrained: local model '{cfg.name}' has no pretrained weights")
        builder = MODELS[cfg.name]
    else:
        builder = _torchvision_builder(cfg.name)
        if builder is None:
            from torchvision import models as tvm

            known = sorted(MODELS) + tvm.list_models(module=tvm)
            close = difflib.get_close_matches(cfg.name, known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ModelError(f"model.name: unknown model '{cfg.name}'{hint}; local: {', '.join(sorted(MODELS))}, "
                             "or any torchvision classification model")
        if cfg.pretrained:
            kwargs.setdefault("weights", "DEFAULT")
    try:
        if cfg.pretrained:
            # pretrained heads have a fixed size: load them, then replace the classifier below
            model = builder(**kwargs)
            _replace_classifier(model, cfg.num_classes)
        else:
            model = builder(num_classes=cfg.num_classes, **kwargs)
    except TypeError as exc:
        raise ModelError(f"model.kwargs: {cfg.name} rejected its arguments: {exc}") from None
    return model


def _replace_classifier(model: nn.Module, num_classes: int) -> None:
    for attr in ("fc", "classifier", "head", "heads"):
        head = getattr(model, attr, None)
        if isinstance(head, nn.Sequential):
            parent, key, head = head, str(len(head) - 1), head[-1]
        else:
            parent, key = model, attr
        if isinstance(head, nn.Linear):
            setattr(parent, key, nn.Linear(head.in_features, num_classes))
            return
    raise ModelError(f"model.pretrained: cannot find the classifier of {type(model).__name__} to resize")
