"""The dataset registry: one builder per name, returning train and val splits."""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch.utils.data import Dataset

from data.transforms import Preprocessing
from engine.config import Config, DataConfig
from engine.config_checks import validate
from engine.errors import DataError

__all__ = ["DATASETS", "DataError", "DatasetPair", "build_datasets", "register_dataset", "with_dataset_classes"]


@dataclass
class DatasetPair:
    """Both splits, and what a trained model needs to be used on new images: the class names (None: the class
    indices) and the evaluation preprocessing (None: samples are float tensors the model takes as they are, as
    generated data's; otherwise uint8 images, normalised on the device by its mean and std). Detection data also
    gives the validation split's ground truth, a COCO instances dict, which its exact evaluation scores against."""

    train: Dataset
    val: Dataset
    num_classes: int
    class_names: list[str] | None = None
    preprocessing: Preprocessing | None = None
    ground_truth: dict[str, Any] | None = None

    def inference(self) -> dict[str, Any]:
        """What a checkpoint keeps so its model can be used on new images (``scripts/predict.py``, ``export.py``):
        plain data, loadable with ``weights_only=True``."""
        return {"class_names": self.class_names,
                "preprocessing": self.preprocessing.as_dict() if self.preprocessing else None}  # fmt: skip

    @property
    def mean_std(self) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
        """What the device normalises uint8 images with ((None, None): float samples, taken as they are)."""
        return (self.preprocessing.mean, self.preprocessing.std) if self.preprocessing else (None, None)


Builder = Callable[..., DatasetPair]
DATASETS: dict[str, Builder] = {}
CLASS_COUNTS: dict[str, int | Callable[[DataConfig], int]] = {}
IMAGE_FILES: set[str] = set()  # datasets that resize image files of any size to the configured sizes
ANY_COUNT_DEFAULT = 10  # a dataset that makes as many classes as it is told (generated data), when not told


def register_dataset(name: str, num_classes: int | Callable[[DataConfig], int] | None = None,
                     image_files: bool = False) -> Callable[[Builder], Builder]:  # fmt: skip
    """Make ``data.name: <name>`` build this: ``builder(cfg: DataConfig, num_classes: int, seed: int, **data.kwargs)
    -> DatasetPair``, whose splits yield ``(image tensor, int label)``, for segmentation ``(image tensor,
    int64 mask (H, W))`` with 255 for pixels to ignore, for detection ``(image tensor, {"boxes", "labels",
    "image_id"})`` (``data/detection.py``). Images are uint8 (3, H, W), normalised on the device as the
    pair's ``preprocessing`` says, or float tensors used as they are (``preprocessing`` None).

    ``num_classes``: what ``model.num_classes: 0`` becomes: the dataset's count, or a function of the data config
    that reads it from the files without loading them (an image folder's class folders); None: the dataset makes
    as many classes as it is given (10 for 0).

    ``image_files``: its samples are image files of any size, resized and cropped to ``data.image_size`` (or the
    crop keys) with ``data.interpolation`` and normalised by ``data.mean`` / ``data.std`` (an image folder): a timm
    model then brings its own values for the keys a config leaves unset (``data/model_inputs.py``)."""

    def wrap(fn: Builder) -> Builder:
        DATASETS[name] = fn
        if num_classes is not None:
            CLASS_COUNTS[name] = num_classes
        if image_files:
            IMAGE_FILES.add(name)
        return fn

    return wrap


def with_dataset_classes(cfg: Config) -> Config:
    """``model.num_classes: 0`` -> the dataset's count (an image folder's class folders, read without loading
    them; generated data: 10), so the model is built with the right head before any data is loaded, and the
    checkpoint's config says the number. A count the files cannot tell yet (no such folder) stays 0: building the
    data then says what is missing."""
    if cfg.model.num_classes:
        return cfg
    count = CLASS_COUNTS.get(cfg.data.name, ANY_COUNT_DEFAULT)
    count = count(cfg.data) if callable(count) else count
    if not count:
        return cfg
    resolved = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_classes=count))
    validate(resolved)  # what depends on the count (top-5 needs more than 5 classes) is checked again
    return resolved


def build_datasets(cfg: DataConfig, num_classes: int, seed: int) -> DatasetPair:
    """Build both splits and check the class count against ``model.num_classes``."""
    if cfg.name not in DATASETS:
        close = difflib.get_close_matches(cfg.name, list(DATASETS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise DataError(f"data.name: unknown dataset '{cfg.name}'{hint}; known: {', '.join(sorted(DATASETS))}")
    try:
        pair = DATASETS[cfg.name](cfg, num_classes, seed, **cfg.kwargs)
    except TypeError as exc:
        if not cfg.kwargs:
            raise
        raise DataError(f"data.kwargs: dataset '{cfg.name}' rejected its arguments: {exc}") from None
    if cfg.mean:  # every dataset's uint8 images normalised as the config says (ours read it already)
        if pair.preprocessing is None:
            raise DataError(f"data.mean: dataset '{cfg.name}' yields float tensors, not uint8 images: there is nothing "
                            "to normalise (remove data.mean and data.std)")
        pair.preprocessing = dataclasses.replace(pair.preprocessing, mean=tuple(cfg.mean), std=tuple(cfg.std))
    if num_classes and pair.num_classes != num_classes:
        raise DataError(
            f"model.num_classes is {num_classes} but dataset '{cfg.name}' at {cfg.root} has {pair.num_classes} classes "
            f"(set model.num_classes={pair.num_classes}, or 0 to take the dataset's)"
        )
    if len(pair.train) == 0 or len(pair.val) == 0:
        raise DataError(f"dataset '{cfg.name}' at {cfg.root}: empty split (train {len(pair.train)}, val {len(pair.val)})")
    return pair
