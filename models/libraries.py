"""Models from the libraries people bring, by name: ``timm/<name>`` (any ``timm.create_model`` name) and
``smp/<Architecture>`` (segmentation_models_pytorch: Unet, UnetPlusPlus, FPN, PSPNet, DeepLabV3, DeepLabV3Plus,
Linknet, MAnet, PAN, UPerNet, Segformer, DPT). Each library is imported only when one of its models is asked for.

Their BatchNorm layers, timm's ``BatchNormAct2d`` included, convert through ``engine.bn``'s registry like any other.
"""

from __future__ import annotations

import difflib

from torch import nn

from engine.config import ModelConfig
from engine.errors import ModelError
from models.pretrained import from_the_cache
from tasks.registry import model_family


def _library(module: str, package: str) -> object:
    try:
        return __import__(module)
    except ImportError:
        raise ModelError(f"model.name: needs the {package} package (pip install -r requirements.txt)") from None


def build_timm(name: str, cfg: ModelConfig, task: str) -> nn.Module:
    """``timm/<name>``: a timm classifier with ``model.num_classes`` outputs; ``model.kwargs`` go to
    ``timm.create_model`` (e.g. ``drop_rate``, ``drop_path_rate``, ``in_chans``)."""
    timm = _library("timm", "timm")
    if model_family(task) != "classification":
        raise ModelError(f"model.name: timm/{name} is a classification model but task is {task}; for segmentation "
                         f"use a timm encoder in smp: model.name=smp/Unet model.kwargs={{encoder_name: tu-{name}}}")
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=1)
        hint = f" (did you mean 'timm/{close[0]}'?)" if close else " (timm.list_models() lists them)"
        raise ModelError(f"model.name: timm has no model '{name}'{hint}")
    with from_the_cache(cfg, task):
        try:
            return timm.create_model(name, pretrained=cfg.pretrained, num_classes=cfg.num_classes, **cfg.kwargs)
        except TypeError as exc:
            raise ModelError(f"model.kwargs: timm/{name} rejected its arguments: {exc}") from None


def build_smp(arch: str, cfg: ModelConfig, task: str) -> nn.Module:
    """``smp/<Architecture>``: a segmentation_models_pytorch model with ``model.num_classes`` output channels;
    ``model.kwargs`` go to its constructor (``encoder_name``: any smp encoder, or ``tu-<timm name>``). Pretrained:
    the encoder's ImageNet weights."""
    smp = _library("segmentation_models_pytorch", "segmentation-models-pytorch")
    architectures = {cls.__name__: cls for cls in smp.MODEL_ARCHITECTURES_MAPPING.values()}
    if arch not in architectures:
        close = difflib.get_close_matches(arch, list(architectures), n=1)
        hint = f" (did you mean 'smp/{close[0]}'?)" if close else ""
        raise ModelError(f"model.name: segmentation_models_pytorch has no architecture '{arch}'{hint}; "
                         f"known: {', '.join(sorted(architectures))}")
    if model_family(task) != "segmentation":
        raise ModelError(f"model.name: smp/{arch} is a segmentation model but task is {task}; set task: segmentation")
    if cfg.aux_loss_weight > 0:
        raise ModelError(f"model.aux_loss_weight: smp/{arch} has no auxiliary segmentation head (set it to 0)")
    kwargs = dict(cfg.kwargs)
    encoder = kwargs.setdefault("encoder_name", "resnet34")
    if cfg.pretrained:  # the encoder's ImageNet weights (tu- encoders: timm's default pretrained tag)
        kwargs.setdefault("encoder_weights", True if encoder.startswith("tu-") else "imagenet")
    else:
        kwargs["encoder_weights"] = None
    with from_the_cache(cfg, task):
        try:
            return architectures[arch](classes=cfg.num_classes, **kwargs)
        except ModelError:
            raise
        except (TypeError, KeyError, ValueError) as exc:  # smp says "Wrong encoder name ..." as a KeyError
            reason = exc.args[0] if exc.args else exc
            raise ModelError(f"model.kwargs: smp/{arch} rejected its arguments: {reason}") from None
