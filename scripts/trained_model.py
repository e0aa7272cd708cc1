"""A checkpoint as a model ready to use on new images: the run's model rebuilt from the checkpoint's own config, its
weights (or its EMA's), plain BatchNorm, and how to feed it (class names, the evaluation preprocessing). Shared by
``scripts/predict.py`` and ``scripts/export.py``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from data.transforms import Preprocessing
from engine.bn import revert_sync_batchnorm
from engine.checkpoint import check_model_compatible, load_checkpoint, strip_prefixes
from engine.config import Config, config_from_dict
from engine.errors import CheckpointError
from models import build_model
from tasks import main_output


@dataclass
class TrainedModel:
    model: nn.Module  # eval mode, plain BatchNorm, on the CPU
    cfg: Config  # the run's
    class_names: list[str]
    preprocessing: Preprocessing | None  # None: the run trained on generated tensors, not on image files


class Logits(nn.Module):
    """The model's main output as one tensor (torchvision's segmentation models return a dict): what inference and
    export take."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return main_output(self.model(images))


def load_trained_model(path: str, ema: bool = False) -> TrainedModel:
    checkpoint = load_checkpoint(path)
    cfg = config_from_dict(checkpoint["config"])
    inference = checkpoint.get("inference") or {}
    if ema and "ema" not in checkpoint:
        raise CheckpointError(f"checkpoint {path} holds no EMA (its run had train.ema_decay=0); drop --ema")
    model = build_model(dataclasses.replace(cfg.model, pretrained=False), cfg.task)  # the weights are here
    weights = strip_prefixes(checkpoint["ema"]["model"] if ema else checkpoint["model"])
    check_model_compatible(weights, model, path)
    model.load_state_dict(weights)
    names = inference.get("class_names") or [str(i) for i in range(cfg.model.num_classes)]
    preprocessing = Preprocessing.from_dict(inference["preprocessing"]) if inference.get("preprocessing") else None
    return TrainedModel(revert_sync_batchnorm(model).eval(), cfg, names, preprocessing)
