"""Real-image test data: JPEG folders made from the photographs and pictures matplotlib ships (mpl-data/sample_data),
and the awkward files users have (CMYK, grayscale, 16-bit, truncated, not an image)."""

from __future__ import annotations

import os
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


def make_awkward_files(folder: Path) -> dict[str, Path]:
    """The files real datasets hold: a CMYK and a grayscale JPEG, a 16-bit grayscale PNG, a palette PNG with
    transparency, a truncated JPEG, and a file that is not an image."""
    folder.mkdir(parents=True, exist_ok=True)
    image = photo((120, 90), seed=7)
    files = {name: folder / name for name in ("cmyk.jpg", "gray.jpg", "gray16.png", "palette.png", "truncated.jpg",
                                              "not_an_image.jpg", "reference.png")}  # fmt: skip
    image.save(files["reference.png"])
    image.convert("CMYK").save(files["cmyk.jpg"], quality=95)
    image.convert("L").save(files["gray.jpg"], quality=95)
    Image.fromarray(np.asarray(image.convert("L")).astype(np.uint16) * 257).save(files["gray16.png"])
    image.convert("P").save(files["palette.png"], transparency=0)
    image.save(files["truncated.jpg"], quality=95)
    data = files["truncated.jpg"].read_bytes()
    files["truncated.jpg"].write_bytes(data[: len(data) // 2])
    files["not_an_image.jpg"].write_text("these are not the pixels you are looking for")
    return files
