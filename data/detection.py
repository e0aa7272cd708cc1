"""Detection data: an image of its own size and a target dict per sample, and the validation split's ground truth as
a COCO instances dict, which the exact COCO evaluation scores against.

A sample is ``(uint8 image (3, H, W), {"boxes": float32 (n, 4) x1 y1 x2 y2 in pixels, "labels": int64 (n,),
"image_id": int})``. Labels are category ids, with 0 the background (torchvision's convention: COCO's ids as they
are, ``model.num_classes`` 91). The model resizes and normalises images itself (torchvision's detectors do, and map
their boxes back to the image as stored), so evaluation images are decoded as stored and nothing else, and
training adds a horizontal flip with its boxes, drawn from torch's RNG (seeded per sample by the train loader, so a
resumed run flips the same images). Scale jitter is the model's too: a list ``model.kwargs.min_size`` makes
torchvision's detectors train each image at one of those short sides, drawn from the rank's own RNG stream (saved in
every checkpoint), as torchvision's own recipes do.

- ``synthetic_detection``: generated shapes and their boxes, deterministic from the seed, learnable on a CPU in
  minutes; images in three aspect ratios, so aspect-ratio grouping has something to group;
- ``coco``: ``root/annotations/instances_<split>.json`` and ``root/<split>/`` (COCO 2017's layout); crowd boxes
  are ignored in training (and marked crowd for the evaluation, as COCO scores them), images without a box left are
  dropped from training as torchvision's reference does; every evaluation image counts.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from data.images import decode_image
from data.registry import DataError, DatasetPair, register_dataset
from data.synthetic_segmentation import SHAPES, shape_mask
from data.transforms import Preprocessing
from engine.config import DataConfig
from engine.errors import SampleError

# the model normalises (torchvision's detectors take [0, 1] images): the device only scales uint8 to [0, 1]
DETECTION_PREPROCESSING = Preprocessing(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
BOX_TOLERANCE = 1.0  # pixels a box may cross the image's edge (COCO's own rounding); clipped to the image
Target = dict[str, Any]


def hflip(image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
    """The image mirrored left-right, and its boxes with it."""
    boxes = target["boxes"].clone()
    boxes[:, [0, 2]] = image.shape[-1] - target["boxes"][:, [2, 0]]
    return image.flip(-1), target | {"boxes": boxes}


class DetectionSamples(Dataset):
    """Images (held, or loaded by ``load(index)``) with their targets, flipped horizontally with probability
    ``hflip_prob`` (training's augmentation; 0: evaluation).
    ``image_sizes()`` gives every image's (height, width) without decoding, for aspect-ratio grouping."""

    def __init__(self, load: Callable[[int], torch.Tensor], targets: list[Target], sizes: list[tuple[int, int]],
                 hflip_prob: float) -> None:  # fmt: skip
        self.load, self.targets, self.sizes, self.hflip_prob = load, targets, sizes, hflip_prob

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Target]:
        image, target = self.load(index), self.targets[index]
        if self.hflip_prob and torch.rand(()) < self.hflip_prob:
            image, target = hflip(image, target)
        return image, target

    def image_sizes(self) -> list[tuple[int, int]]:
        return self.sizes


def _target(boxes: list[list[float]], labels: list[int], image_id: int) -> Target:
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).view(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64), "image_id": image_id}  # fmt: skip


# --------------------------------------------------------------------------------------------- synthetic


def _synthetic_split(count: int, num_classes: int, size: int, colours: torch.Tensor, first_id: int,
                     generator: torch.Generator) -> tuple[list[torch.Tensor], list[Target]]:  # fmt: skip
    """``count`` images of one to three shapes (class k: shape k mod 3 in class k's colour) on a smooth texture."""
    long = size * 4 // 3
    shapes = [(size, long), (long, size), (size, size)]  # landscape, portrait, square
    images, targets = [], []
    for i in range(count):
        height, width = shapes[int(torch.randint(len(shapes), (), generator=generator))]
        coarse = torch.rand(1, 3, 4, 4, generator=generator)
        image = 0.25 + 0.5 * F.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)[0]
        yy, xx = torch.meshgrid(torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32),
                                indexing="ij")  # fmt: skip
        boxes, labels = [], []
        for _ in range(int(torch.randint(1, 4, (), generator=generator))):
            label = int(torch.randint(1, num_classes, (), generator=generator))
            r = size * (0.08 + 0.17 * torch.rand((), generator=generator).item())
            cy = r + (height - 2 * r) * torch.rand((), generator=generator).item()
            cx = r + (width - 2 * r) * torch.rand((), generator=generator).item()
            inside = shape_mask(SHAPES[(label - 1) % len(SHAPES)], yy, xx, cy, cx, r)
            image[:, inside] = colours[label][:, None]
            ys, xs = inside.nonzero(as_tuple=True)
            boxes.append([xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1])
            labels.append(label)
        image = image + 0.08 * torch.randn(image.shape, generator=generator)
        images.append((image.clamp(0, 1) * 255).round().to(torch.uint8))
        targets.append(_target(boxes, labels, first_id + i))
    return images, targets


def ground_truth(targets: list[Target], sizes: list[tuple[int, int]], category_names: dict[int, str]) -> dict[str, Any]:
    """A split's targets as a COCO instances dict: what the evaluation scores against."""
    images = [{"id": t["image_id"], "height": h, "width": w} for t, (h, w) in zip(targets, sizes)]
    annotations = []
    for target in targets:
        for (x1, y1, x2, y2), label in zip(target["boxes"].tolist(), target["labels"].tolist()):
            annotations.append({"id": len(annotations) + 1, "image_id": target["image_id"], "category_id": label,
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
    categories = [{"id": k, "name": name} for k, name in sorted(category_names.items())]
    return {"images": images, "annotations": annotations, "categories": categories}


@register_dataset("synthetic_detection")
def build_synthetic_detection(cfg: DataConfig, num_classes: int, seed: int) -> DatasetPair:
    """``data.num_train`` / ``data.num_val`` images whose short side is ``data.image_size``, ``model.num_classes``
    classes (the background included)."""
    if num_classes < 2:
        raise DataError(f"model.num_classes: synthetic_detection needs >= 2 classes (background + shapes), got {num_classes}")
    generator = torch.Generator().manual_seed(seed)
    colours = torch.rand(num_classes, 3, generator=generator)
    names = {k: f"{SHAPES[(k - 1) % len(SHAPES)]}{'' if k <= len(SHAPES) else k}" for k in range(1, num_classes)}
    splits = []
    train_flip = cfg.hflip_prob if cfg.augment else 0.0
    for count, first_id, flip in ((cfg.num_train, 0, train_flip), (cfg.num_val, cfg.num_train, 0.0)):
        images, targets = _synthetic_split(count, num_classes, cfg.image_size, colours, first_id, generator)
        sizes = [tuple(image.shape[-2:]) for image in images]
        splits.append((DetectionSamples(images.__getitem__, targets, sizes, flip), targets, sizes))
    (train, _, _), (val, val_targets, val_sizes) = splits
    return DatasetPair(train, val, num_classes, class_names=["__background__", *names.values()],
                       preprocessing=DETECTION_PREPROCESSING, ground_truth=ground_truth(val_targets, val_sizes, names))


# --------------------------------------------------------------------------------------------- COCO


class CocoFiles:
    """Loads image ``index`` of a COCO split from its folder, checking it has the size its annotations assume."""

    def __init__(self, folder: str, images: list[dict[str, Any]], decoder: str) -> None:
        self.folder, self.images, self.decoder = folder, images, decoder

    def __call__(self, index: int) -> torch.Tensor:
        record = self.images[index]
        path = os.path.join(self.folder, record["file_name"])
        image = decode_image(path, self.decoder)
        if tuple(image.shape[-2:]) != (record["height"], record["width"]):
            raise SampleError(f"{path}: the image is {image.shape[-1]}x{image.shape[-2]} but its annotations say "
                              f"{record['width']}x{record['height']}")
        return image


def _load_instances(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise DataError(f"data.root: annotation file {path} not found (expected COCO's layout: "
                        "annotations/instances_<split>.json beside the <split>/ image folder)")
    try:
        with open(path, encoding="utf-8") as f:
            instances = json.load(f)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable JSON file ({exc})") from None
    missing = [key for key in ("images", "annotations", "categories") if key not in instances]
    if missing:
        raise DataError(f"{path}: not a COCO instances file (no {', '.join(missing)})")
    return instances


def _check_annotation(annotation: dict[str, Any], image: dict[str, Any], num_classes: int, path: str) -> None:
    """A box the model cannot learn from, or a class it cannot predict, is one line naming the annotation."""
    where = f"{path}: annotation {annotation.get('id')} of {image['file_name']}"
    category = annotation["category_id"]
    if not 1 <= category < num_classes:
        raise DataError(f"{where}: category_id {category} is outside the classes the model predicts (1 to "
                        f"{num_classes - 1}: model.num_classes {num_classes} counts the background 0)")
    x, y, w, h = annotation["bbox"]
    if w < 0 or h < 0:
        raise DataError(f"{where}: bbox {annotation['bbox']} has a negative width or height")
    width, height = image["width"], image["height"]
    if x < -BOX_TOLERANCE or y < -BOX_TOLERANCE or x + w > width + BOX_TOLERANCE or y + h > height + BOX_TOLERANCE:
        raise DataError(f"{where}: bbox {annotation['bbox']} (x, y, width, height) lies outside the "
                        f"{width}x{height} image")


def _coco_split(cfg: DataConfig, split: str, num_classes: int, train: bool) -> tuple[DetectionSamples, dict]:
    path = os.path.join(cfg.root, "annotations", f"instances_{split}.json")
    instances = _load_instances(path)
    folder = os.path.join(cfg.root, split)
    if not os.path.isdir(folder):
        raise DataError(f"data.root: image folder {folder} not found (beside {path})")
    present = set(os.listdir(folder))
    absent = [image["file_name"] for image in instances["images"] if image["file_name"] not in present]
    if absent:
        raise DataError(f"data.root: {len(absent)} image(s) of {path} missing from {folder}, e.g. {absent[0]}")
    by_image: dict[int, list[dict[str, Any]]] = {image["id"]: [] for image in instances["images"]}
    records = {image["id"]: image for image in instances["images"]}
    for annotation in instances["annotations"]:
        if annotation["image_id"] not in records:
            raise DataError(f"{path}: annotation {annotation.get('id')} names image {annotation['image_id']}, "
                            "which the file does not list")
        _check_annotation(annotation, records[annotation["image_id"]], num_classes, path)
        by_image[annotation["image_id"]].append(annotation)
    kept, targets = [], []
    for image in instances["images"]:
        boxes, labels = [], []
        for annotation in by_image[image["id"]]:
            if annotation.get("iscrowd", 0):
                continue  # a crowd region is no object to learn; the evaluation marks it crowd (matches ignored)
            x, y, w, h = annotation["bbox"]
            x1, y1 = max(x, 0.0), max(y, 0.0)
            x2, y2 = min(x + w, image["width"]), min(y + h, image["height"])
            if x2 > x1 and y2 > y1:  # COCO holds a few boxes of no area: no object to learn either
                boxes.append([x1, y1, x2, y2])
                labels.append(annotation["category_id"])
        if train and not boxes:
            continue  # torchvision's reference trains on images with at least one box
        kept.append(image)
        targets.append(_target(boxes, labels, image["id"]))
    if not kept:
        raise DataError(f"{path}: no image with a box to {'train on' if train else 'evaluate'}")
    sizes = [(image["height"], image["width"]) for image in kept]
    samples = DetectionSamples(CocoFiles(folder, kept, cfg.decoder), targets, sizes,
                               cfg.hflip_prob if train and cfg.augment else 0.0)
    return samples, instances


@register_dataset("coco", num_classes=91)
def build_coco(cfg: DataConfig, num_classes: int, seed: int, train_split: str = "train2017",
               val_split: str = "val2017") -> DatasetPair:  # fmt: skip
    """COCO instances (2017 by default; any dataset in COCO's format, with ``data.kwargs`` naming its splits).
    Labels are the category ids, so ``model.num_classes`` is the largest id + 1 (COCO: 91)."""
    if not os.path.isdir(cfg.root):
        raise DataError(f"data.root: folder not found: {cfg.root}")
    train, _ = _coco_split(cfg, train_split, num_classes, train=True)
    val, instances = _coco_split(cfg, val_split, num_classes, train=False)
    names = {category["id"]: category["name"] for category in instances["categories"]}
    class_names = ["__background__"] + [names.get(k, "N/A") for k in range(1, num_classes)]
    return DatasetPair(train, val, num_classes, class_names=class_names, preprocessing=DETECTION_PREPROCESSING,
                       ground_truth=instances)
