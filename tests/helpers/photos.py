"""Real-image test data: JPEG folders made from the pictures matplotlib ships (``scripts/sample_images.py``), and
the awkward files users have (CMYK, grayscale, 16-bit, truncated, not an image)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from scripts.sample_images import make_photo_folder, photo

__all__ = ["make_awkward_files", "make_photo_folder", "photo"]

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
