"""Tiny segmentation datasets on disk, as users lay them out: Pascal VOC 2012 (JPEG images, palette-PNG masks with
255 on object borders, split lists) and ``segmentation_folder`` (images/ + masks/), with optional defects."""

from __future__ import annotations

from pathlib import Path

import torch

from data.segmentation import voc_palette


def sample(seed: int, height: int, width: int, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An RGB uint8 image and a mask of a few class rectangles with a 255 border around each (VOC style)."""
    gen = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=gen)
    mask = torch.zeros(height, width, dtype=torch.uint8)
    for _ in range(2):
        cls = int(torch.randint(1, num_classes, (), generator=gen))
        top, left = int(torch.randint(0, height // 2, (), generator=gen)), int(torch.randint(0, width // 2, (), generator=gen))
        mask[top : top + height // 3 + 2, left : left + width // 3 + 2] = 255
        mask[top + 1 : top + height // 3 + 1, left + 1 : left + width // 3 + 1] = cls
        image[:, mask == cls] = (image[:, mask == cls] // 4 + 40 * cls % 256).to(torch.uint8)
    return image, mask


def _save(image: torch.Tensor, mask: torch.Tensor, image_path: Path, mask_path: Path, palette: bool) -> None:
    from PIL import Image

    Image.fromarray(image.permute(1, 2, 0).numpy()).save(image_path)
    m = Image.fromarray(mask.numpy())  # uint8: mode L
    if palette:
        m = m.convert("P")
        m.putpalette(voc_palette())
    m.save(mask_path)


SIZES = [(30, 40), (40, 30), (36, 36), (33, 45)]  # (height, width): images of different sizes, as in VOC


def make_voc(root: Path, train: int = 4, val: int = 3, num_classes: int = 21, defect: str | None = None) -> Path:
    """``root/VOCdevkit/VOC2012`` with ``train`` + ``val`` images; ``defect``: ``mask_size`` (one mask of another
    size), ``class_index`` (a mask holding class 30), ``no_val_list`` (no val.txt)."""
    voc = root / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True, exist_ok=True)
    names = {"train": [f"2007_{i:06d}" for i in range(train)], "val": [f"2008_{i:06d}" for i in range(val)]}
    for k, name in enumerate(names["train"] + names["val"]):
        image, mask = sample(k, *SIZES[k % len(SIZES)], num_classes)
        if defect == "mask_size" and k == 0:
            mask = mask[:, :-3]
        if defect == "class_index" and k == 0:
            mask[0, 0] = 30
        _save(image, mask, voc / "JPEGImages" / f"{name}.jpg", voc / "SegmentationClass" / f"{name}.png", palette=True)
    for split, listed in names.items():
        if not (defect == "no_val_list" and split == "val"):
            (voc / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(listed) + "\n")
    return root


def make_segmentation_folder(root: Path, train: int = 4, val: int = 5, num_classes: int = 5) -> Path:
    """``root/{train,val}/{images,masks}/`` with PNG images and L-mode masks of different sizes."""
    for split, count in (("train", train), ("val", val)):
        for sub in ("images", "masks"):
            (root / split / sub).mkdir(parents=True, exist_ok=True)
        for k in range(count):
            image, mask = sample(100 * (split == "val") + k, *SIZES[k % len(SIZES)], num_classes)
            _save(image, mask, root / split / "images" / f"im{k}.png", root / split / "masks" / f"im{k}.png", palette=False)
    return root
