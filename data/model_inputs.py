"""The inputs a timm model was made for, as data keys: its pretrained config's input size, interpolation, crop
fraction (``crop_pct``) and normalisation, the values timm's own ``train.py`` takes when its flags are left out.

``load_config(..., defaults=model_inputs)`` fills with them the data keys a config leaves unset, for datasets of
image files (``register_dataset(..., image_files=True)``: an image folder), which can be resized to any size. Other
datasets keep their own: generated data has no normalisation to take, CIFAR its stored 32 px and statistics. A
model that takes one input size only (a ViT's position embedding) and data of another size are one line here, naming
both fixes, instead of an assertion at the first forward.

It lives with the data, as timm's ``resolve_data_config`` lives in ``timm.data``: the data's preprocessing is what
the model asks for. timm is imported only for ``timm/<name>`` models.
"""

from __future__ import annotations

import math
from typing import Any

from data.registry import IMAGE_FILES
from engine.config import Config
from engine.errors import ConfigError


def model_inputs(cfg: Config, given: set[str]) -> dict[str, Any]:
    """The data keys a ``timm/<name>`` model's pretrained config sets (``load_config`` keeps those in ``given``, set
    by the user, as they are); nothing for other models, for datasets that are not image files, or for a name timm
    does not know (building the model says so)."""
    pretrained = _timm_pretrained_cfg(cfg.model.name)
    if pretrained is None:
        return {}
    size = cfg.model.kwargs.get("img_size", pretrained.input_size[-1] if _square(pretrained.input_size) else None)
    image_size = size if isinstance(size, int) and "data.image_size" not in given else cfg.data.image_size
    filled: dict[str, Any] = {}
    if cfg.data.name in IMAGE_FILES:
        crop = cfg.data.val_crop_size or image_size  # timm's evaluation: the short side to crop / crop_pct, the crop
        filled = {"data.image_size": image_size, "data.interpolation": pretrained.interpolation,
                  "data.val_resize_size": math.floor(crop / pretrained.crop_pct)}  # fmt: skip
        if len(pretrained.mean) == cfg.model.kwargs.get("in_chans", 3) and not {"data.mean", "data.std"} & given:
            filled |= {"data.mean": list(pretrained.mean), "data.std": list(pretrained.std)}  # a pair, or neither
    if pretrained.fixed_input_size and not cfg.model.kwargs.get("dynamic_img_size") and isinstance(size, int):
        _check_fixed_size(cfg, size, filled.get("data.image_size", cfg.data.image_size))
    return filled


def _timm_pretrained_cfg(name: str) -> Any:
    library, _, name = name.rpartition("/")
    if library != "timm":
        return None
    try:
        from timm.models import get_pretrained_cfg
    except ImportError:  # building the model says which package to install
        return None
    return get_pretrained_cfg(name)  # a tagged name (resnet50.a1_in1k): that tag's; none: the default tag's


def _square(input_size: tuple[int, ...]) -> bool:
    return input_size[-1] == input_size[-2]


def _check_fixed_size(cfg: Config, size: int, image_size: int) -> None:
    """A model built for ``size`` px only must not meet data of another size."""
    sides = {cfg.data.train_crop_size or image_size, cfg.data.val_crop_size or image_size}
    if sides == {size}:
        return
    other = ", ".join(f"{side} px" for side in sorted(sides - {size}))
    rebuild = f"model.kwargs={{img_size: {sides.pop()}}} or " if len(sides) == 1 else ""  # one size: build for it
    raise ConfigError(
        f"data.image_size: {cfg.model.name} takes {size} px images only (its input size is fixed), but the data gives "
        f"{other}; set data.image_size={size} (and no other crop sizes), or build the model for the data: "
        f"{rebuild}model.kwargs={{dynamic_img_size: true}}"
    )
