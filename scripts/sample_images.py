"""A small image-classification folder to try the real-image path on, made from the pictures matplotlib ships (a
photograph, a render, a logo: one class each), in the layout ``configs/imagefolder.yaml`` reads.

    python scripts/sample_images.py my_images              # my_images/{train,val}/<class>/<i>.jpg
    python scripts/sample_images.py my_images --train 40 --val 10 --size 320 240

Each image is a random crop of its class's picture (40-100 % of the area) with a small colour shift, as JPEG.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image

SOURCES = ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png", "logo2.png")  # a photograph, a render, a logo


def source(name: str) -> Image.Image:
    import matplotlib

    with Image.open(os.path.join(matplotlib.get_data_path(), "sample_data", name)) as image:
        return image.convert("RGB")


def photo(size: tuple[int, int] = (500, 375), seed: int = 0, name: str = SOURCES[0]) -> Image.Image:
    """A ``size`` picture from ``name``: a random crop of 40-100 % of its area, a little colour shift."""
    rng = np.random.default_rng(seed)
    image = source(name)
    width, height = image.size
    scale = rng.uniform(0.4, 1.0) ** 0.5
    w, h = max(8, int(width * scale)), max(8, int(height * scale))
    left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
    crop = np.asarray(image.crop((left, top, left + w, top + h)).resize(size, Image.BILINEAR), dtype=np.float32)
    shifted = np.clip(crop * rng.uniform(0.85, 1.15, 3) + rng.uniform(-12, 12, 3), 0, 255).astype(np.uint8)
    return Image.fromarray(shifted)


def make_photo_folder(root: Path, train: int = 16, val: int = 6, size: tuple[int, int] = (96, 72)) -> Path:
    """``root/{train,val}/<class>/<i>.jpg``: one class per source picture, JPEG quality 90."""
    for split, count in (("train", train), ("val", val)):
        for c, name in enumerate(SOURCES):
            folder = root / split / os.path.splitext(name)[0].lower()
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                seed = 1000 * c + i + (500 if split == "val" else 0)
                photo(size, seed, name).save(folder / f"{i}.jpg", quality=90)
    return root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", help="the folder to make")
    parser.add_argument("--train", type=int, default=32, help="training images per class")
    parser.add_argument("--val", type=int, default=8, help="validation images per class")
    parser.add_argument("--size", type=int, nargs=2, default=(160, 120), metavar=("WIDTH", "HEIGHT"))
    args = parser.parse_args(argv)
    make_photo_folder(Path(args.root), args.train, args.val, tuple(args.size))
    print(f"wrote {len(SOURCES) * (args.train + args.val)} JPEGs of {len(SOURCES)} classes to {args.root}/{{train,val}}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
