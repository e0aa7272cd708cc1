"""A hand-made COCO-format dataset: JPEG photographs with boxes in ``annotations/instances_<split>.json``, COCO 2017's
layout, with what real COCO holds (non-contiguous category ids, a crowd box, a box of no area, an image without
annotations) and, on request, one defect of the kind users' files have."""

from __future__ import annotations

import json
from pathlib import Path

from tests.helpers.photos import photo

CATEGORIES = [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}, {"id": 7, "name": "train"}]
NUM_CLASSES = 8  # the largest id + 1: labels are the category ids, 0 the background
SIZES = [(160, 120), (120, 160), (144, 144), (160, 120), (120, 160), (160, 120), (144, 144)]  # (width, height)
DEFECTS = ("box_outside", "negative_size", "bad_category", "missing_image")


def _boxes(index: int, width: int, height: int) -> list[tuple[list[float], int, int]]:
    """(bbox xywh, category, iscrowd) for image ``index``: two or three objects."""
    boxes = [([0.1 * width, 0.15 * height, 0.4 * width, 0.5 * height], CATEGORIES[index % 3]["id"], 0),
             ([0.55 * width, 0.4 * height, 0.35 * width, 0.45 * height], CATEGORIES[(index + 1) % 3]["id"], 0)]
    if index % 3 == 2:
        boxes.append(([0.5 * width, 0.05 * height, 0.3 * width, 0.25 * height], 1, 1))  # a crowd
    if index == 1:
        boxes.append(([10.0, 10.0, 0.0, 12.0], 3, 0))  # no area: dropped
    return boxes


def make_coco(root: Path, train: int = 4, val: int = 3, defect: str | None = None) -> Path:
    """``root/{train,val}/*.jpg`` and ``root/annotations/instances_{train,val}.json``; ``defect`` (one of
    ``DEFECTS``) breaks the training split's first image's annotations or file. The last training image has no
    annotation (dropped from training); validation keeps its crowd boxes."""
    annotation_id = 1
    for split, count, offset in (("train", train, 0), ("val", val, train)):
        folder = root / split
        folder.mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for i in range(count):
            width, height = SIZES[(offset + i) % len(SIZES)]
            name = f"{offset + i:012d}.jpg"
            photo((width, height), seed=offset + i).save(folder / name, quality=90)
            images.append({"id": 100 + offset + i, "file_name": name, "width": width, "height": height})
            if split == "train" and i == count - 1:
                continue
            for bbox, category, crowd in _boxes(offset + i, width, height):
                annotations.append({"id": annotation_id, "image_id": 100 + offset + i, "category_id": category,
                                    "bbox": bbox, "area": bbox[2] * bbox[3], "iscrowd": crowd})
                annotation_id += 1
        if split == "train" and defect is not None:
            _break(annotations, folder, images[0], defect)
        (root / "annotations").mkdir(exist_ok=True)
        instances = {"images": images, "annotations": annotations, "categories": CATEGORIES}
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(instances))
    return root


def _break(annotations: list[dict], folder: Path, image: dict, defect: str) -> None:
    first = annotations[0]
    if defect == "box_outside":
        first["bbox"] = [image["width"] - 10.0, 5.0, 40.0, 20.0]
    elif defect == "negative_size":
        first["bbox"] = [5.0, 5.0, -20.0, 10.0]
    elif defect == "bad_category":
        first["category_id"] = NUM_CLASSES
    elif defect == "missing_image":
        (folder / image["file_name"]).unlink()
    else:
        raise ValueError(defect)
