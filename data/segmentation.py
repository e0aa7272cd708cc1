"""Segmentation datasets on disk: Pascal VOC 2012 (``voc``) and any folder of images with integer masks
(``segmentation_folder``). A sample is (uint8 image (3, H, W), int64 mask (H, W)), where 255 marks pixels that
count for nothing (VOC's object borders, crop padding); the image is normalised on the device.

Files are checked where it is cheap: every listed image and mask must exist when the dataset is built (one line
naming the first missing file); a mask of another size than its image, or holding a class index >= the model's
``num_classes`` other than 255, is reported by the rank that loads it, naming the file.
"""

from __future__ import annotations

import os

import torch
from torch.utils.data import Dataset

from data.images import decode_image
from data.registry import DataError, DatasetPair, register_dataset
from data.transforms import IMAGENET_MEAN, IMAGENET_STD, Preprocessing, SegmentationTransform
from engine.config import DataConfig
from engine.errors import SampleError
from tasks import IGNORE_INDEX

VOC_CLASS_NAMES = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
                   "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
                   "tvmonitor"]  # fmt: skip
VOC_CLASSES = len(VOC_CLASS_NAMES)  # background + 20 object classes
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def voc_palette() -> list[int]:
    """PASCAL VOC's colour map, 256 RGB triples: class 0 black, then colours from the class index's bits (what
    every VOC mask's palette holds; predicted masks are written with it)."""
    colours = []
    for index in range(256):
        r = g = b = 0
        bits = index
        for shift in range(7, -1, -1):
            r, g, b = r | (bits & 1) << shift, g | (bits >> 1 & 1) << shift, b | (bits >> 2 & 1) << shift
            bits >>= 3
        colours += [r, g, b]
    return colours


class SegmentationFiles(Dataset):
    """(image path, mask path) pairs; images decoded as RGB by ``decoder``, masks as the class indices of an L- or
    P-mode PNG (a palette PNG's indices are the classes, as in VOC)."""

    def __init__(self, pairs: list[tuple[str, str]], num_classes: int, transform: SegmentationTransform,
                 decoder: str = "auto") -> None:  # fmt: skip
        self.pairs, self.num_classes, self.transform, self.decoder = pairs, num_classes, transform, decoder

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        from PIL import Image
        from torchvision.transforms.functional import pil_to_tensor

        image_path, mask_path = self.pairs[index]
        image = decode_image(image_path, self.decoder)
        with Image.open(mask_path) as mask:
            if mask.mode not in ("L", "P"):
                raise SampleError(
                    f"{mask_path}: a mask must be a single-channel PNG of class indices (mode L or P), got mode {mask.mode}"
                )
            target = pil_to_tensor(mask)[0]
        if image.shape[-2:] != target.shape:
            raise SampleError(
                f"{mask_path}: mask is {target.shape[1]}x{target.shape[0]} but its image {image_path} is "
                f"{image.shape[2]}x{image.shape[1]}"
            )
        self._check_classes(target, mask_path)
        image, target = self.transform(image, target)
        return image, target.long()

    def _check_classes(self, target: torch.Tensor, mask_path: str) -> None:
        bad = target[(target != IGNORE_INDEX) & (target >= self.num_classes)]
        if bad.numel():
            raise SampleError(
                f"{mask_path}: class index {int(bad.max())} >= model.num_classes {self.num_classes} "
                f"(masks hold 0..{self.num_classes - 1}, or {IGNORE_INDEX} to ignore a pixel)"
            )


def segmentation_preprocessing(cfg: DataConfig) -> Preprocessing:
    """Evaluation: the short side at ``data.base_size`` (0: as stored), normalised by ``data.mean`` / ``data.std``
    (default: ImageNet's statistics)."""
    return Preprocessing(tuple(cfg.mean) or IMAGENET_MEAN, tuple(cfg.std) or IMAGENET_STD, resize=cfg.base_size)


def segmentation_transforms(cfg: DataConfig, fill: tuple[float, ...]) -> tuple[SegmentationTransform, ...]:
    """Training: rescale (not with ``data.augment: false``), flip (``data.hflip_prob``), crop to ``data.image_size``
    (padding: ``fill``);
    evaluation: the short side at ``data.base_size``."""
    scale = cfg.scale_range if cfg.augment else (1.0, 1.0)
    train = SegmentationTransform(cfg.image_size, cfg.base_size, scale, train=True, fill=fill, hflip_prob=cfg.hflip_prob)
    val = SegmentationTransform(cfg.image_size, cfg.base_size, scale, train=False, fill=fill)
    return train, val


def _check_files(pairs: list[tuple[str, str]], what: str) -> list[tuple[str, str]]:
    for pair in pairs:
        for path in pair:
            if not os.path.isfile(path):
                raise DataError(f"data.root: {what}: {path} not found")
    return pairs


def voc_root(root: str) -> str:
    """The VOC2012 folder: ``root`` itself, or torchvision's ``root/VOCdevkit/VOC2012``."""
    nested = os.path.join(root, "VOCdevkit", "VOC2012")
    return nested if os.path.isdir(nested) else root


@register_dataset("voc", num_classes=VOC_CLASSES)
def build_voc(cfg: DataConfig, num_classes: int, seed: int, train_split: str = "train", val_split: str = "val",
              masks: str = "SegmentationClass") -> DatasetPair:
    """Pascal VOC 2012 segmentation: ``JPEGImages/``, ``SegmentationClass/`` (palette PNGs) and the split lists
    ``ImageSets/Segmentation/{train,val}.txt`` (1464 and 1449 images). The augmented set of DeepLab's papers (SBD's
    10,582 training masks) is ``data.kwargs: {train_split: train_aug, masks: SegmentationClassAug}``, with its list
    and masks put beside VOC's."""
    if num_classes != VOC_CLASSES:
        raise DataError(f"model.num_classes is {num_classes} but voc has {VOC_CLASSES} classes (background + 20); "
                        f"set model.num_classes={VOC_CLASSES}")
    root = voc_root(cfg.root)
    if not os.path.isdir(root):
        raise DataError(f"data.root: folder not found: {cfg.root}")
    preprocessing = segmentation_preprocessing(cfg)
    train_tf, val_tf = segmentation_transforms(cfg, preprocessing.fill())
    splits = []
    for split, transform in ((train_split, train_tf), (val_split, val_tf)):
        listing = os.path.join(root, "ImageSets", "Segmentation", f"{split}.txt")
        if not os.path.isfile(listing):
            raise DataError(f"data.root: split file {listing} not found (expected the VOC2012 layout: JPEGImages/, "
                            f"{masks}/, ImageSets/Segmentation/{split}.txt)")
        with open(listing, encoding="utf-8") as f:
            # a name per line (VOC), or DeepLab's "/JPEGImages/<name>.jpg /SegmentationClassAug/<name>.png"
            names = [os.path.splitext(os.path.basename(line.split()[0]))[0] for line in f if line.strip()]
        pairs = [(os.path.join(root, "JPEGImages", f"{name}.jpg"), os.path.join(root, masks, f"{name}.png"))
                 for name in names]
        splits.append(SegmentationFiles(_check_files(pairs, listing), num_classes, transform, cfg.decoder))
    return DatasetPair(*splits, VOC_CLASSES, class_names=VOC_CLASS_NAMES, preprocessing=preprocessing)


def _folder_pairs(split_dir: str) -> list[tuple[str, str]]:
    images_dir, masks_dir = os.path.join(split_dir, "images"), os.path.join(split_dir, "masks")
    for folder in (images_dir, masks_dir):
        if not os.path.isdir(folder):
            raise DataError(f"data.root: no folder {folder} (expected data.root/{{train,val}}/{{images,masks}}/)")
    masks = {os.path.splitext(name)[0]: name for name in os.listdir(masks_dir)}
    pairs = []
    for name in sorted(os.listdir(images_dir)):
        stem, suffix = os.path.splitext(name)
        if suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if stem not in masks:
            raise DataError(f"data.root: image {os.path.join(images_dir, name)} has no mask {stem}.png in {masks_dir}")
        pairs.append((os.path.join(images_dir, name), os.path.join(masks_dir, masks[stem])))
    return pairs


def mask_classes_unknown(cfg: DataConfig) -> int:
    raise DataError("model.num_classes: set it for segmentation_folder (its masks do not say how many classes there "
                    "are: the largest class index + 1)")


@register_dataset("segmentation_folder", num_classes=mask_classes_unknown)
def build_segmentation_folder(cfg: DataConfig, num_classes: int, seed: int) -> DatasetPair:
    """``root/{train,val}/images/<name>.<jpg|png|...>`` with ``root/{train,val}/masks/<name>.png`` (class indices,
    255 = ignore): any dataset with integer masks. The classes are ``model.num_classes``."""
    if not os.path.isdir(cfg.root):
        raise DataError(f"data.root: folder not found: {cfg.root}")
    preprocessing = segmentation_preprocessing(cfg)
    train_tf, val_tf = segmentation_transforms(cfg, preprocessing.fill())
    train, val = (
        SegmentationFiles(_folder_pairs(os.path.join(cfg.root, split)), num_classes, transform, cfg.decoder)
        for split, transform in (("train", train_tf), ("val", val_tf))
    )
    return DatasetPair(train, val, num_classes, preprocessing=preprocessing)
