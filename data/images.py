"""Image files to uint8 tensors (3, H, W), decoded by ``data.decoder``, and the random-resized crop of training
taken from a file (its crop drawn before decoding, so a large JPEG is decoded no larger than the crop needs).

- ``torchvision``: ``torchvision.io.decode_image`` (libjpeg-turbo, libpng): JPEG (RGB, grayscale, CMYK), PNG (8 and
  16 bit, palette, alpha), GIF, WebP, straight into a tensor; about twice PIL's rate plus ``ToTensor``;
- ``pil``: PIL, for the formats torchvision does not read (BMP, TIFF, ...); a JPEG is decoded at 1/2, 1/4 or 1/8
  of its size in the DCT domain (``Image.draft``) where that still covers what is needed;
- ``auto``: PIL's reduced decode where it applies (a JPEG at least twice the size needed), torchvision where it
  reads the file, PIL otherwise.

A file that no decoder reads (truncated, not an image) is one line naming it (``SampleError``), raised by the rank
that loads it.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence

import torch

from data.transforms import interpolation
from engine.errors import SampleError

DECODERS = ("auto", "torchvision", "pil")
# torchvision 0.29 says on every call that TorchCodec will take over image decoding; its decoders work as they did
warnings.filterwarnings("ignore", "The image decoding and encoding capabilities of TorchVision", DeprecationWarning)
_SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def decode_image(path: str, decoder: str = "auto", reduce_to: int = 0) -> torch.Tensor:
    """The RGB image at ``path`` as uint8 (3, H, W). ``reduce_to`` > 0 (evaluation): the short side may come back
    smaller than stored, never below ``reduce_to``, where a JPEG decodes at a reduced size."""
    data = _read(path)
    size = jpeg_size(data) if reduce_to and decoder != "torchvision" else None
    factor = _reduction(min(size), reduce_to) if size else 1
    return _decode(data, path, decoder, factor)


class RandomResizedCropFile:
    """Training's random-resized crop (``scale``: its area fraction, ``ratio``: its aspect range; torchvision's
    defaults) and horizontal flip (``hflip_prob``), from an image file to a uint8 (3, size, size) tensor. The crop
    is drawn from the JPEG header's size before decoding, so where the crop is at least twice ``size`` the file is
    decoded at 1/2, 1/4 or 1/8 (the crop's resolution is never below ``size``); the draws are those of
    torchvision's transforms, from torch's RNG."""

    def __init__(self, size: int, decoder: str = "auto", *, scale: Sequence[float] = (0.08, 1.0),
                 ratio: Sequence[float] = (3 / 4, 4 / 3), interpolation: str = "bilinear",
                 hflip_prob: float = 0.5) -> None:  # fmt: skip
        self.size, self.decoder, self.scale, self.ratio = size, decoder, tuple(scale), tuple(ratio)
        self.interpolation, self.hflip_prob = interpolation, hflip_prob

    def __call__(self, path: str) -> torch.Tensor:
        from torchvision import transforms as v1
        from torchvision.transforms.v2 import functional as F

        data = _read(path)
        size = jpeg_size(data) if self.decoder != "torchvision" else None
        image = None if size else _decode(data, path, self.decoder, 1)  # not a JPEG: its size from the pixels
        height, width = size or image.shape[-2:]
        shape_only = torch.empty(1, 1, 1).expand(1, height, width)
        top, left, crop_h, crop_w = v1.RandomResizedCrop.get_params(shape_only, self.scale, self.ratio)
        if image is None:
            image = _decode(data, path, self.decoder, _reduction(min(crop_h, crop_w), self.size))
        if image.shape[-2:] != (height, width):  # decoded reduced: the same crop, its edges in those pixels
            sy, sx = image.shape[-2] / height, image.shape[-1] / width
            top, bottom = round(top * sy), round((top + crop_h) * sy)
            left, right = round(left * sx), round((left + crop_w) * sx)
            crop_h, crop_w = max(1, bottom - top), max(1, right - left)
        crop = F.resized_crop(image, top, left, crop_h, crop_w, [self.size, self.size],
                              interpolation(self.interpolation), antialias=True)  # fmt: skip
        return crop.flip(-1) if torch.rand(1) < self.hflip_prob else crop


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) from a JPEG's frame header, or None for another format (read from the bytes: PIL's
    ``Image.open`` costs a fifth of a decode)."""
    if data[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 9 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF or 0xD0 <= marker <= 0xD7 or marker == 0x01:  # fill byte, markers without a length
            i += 1 if marker == 0xFF else 2
            continue
        if marker in _SOF_MARKERS:
            return int.from_bytes(data[i + 5 : i + 7], "big"), int.from_bytes(data[i + 7 : i + 9], "big")
        i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    return None


def _reduction(side: int, needed: int) -> int:
    """The largest JPEG DCT reduction (1, 2, 4 or 8) that keeps ``side`` at least ``needed``."""
    factor = 1
    while factor < 8 and needed and side >= 2 * factor * needed:
        factor *= 2
    return factor


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise SampleError(f"{path}: cannot read the image ({exc.strerror or exc})") from None


def _decode(data: bytes, path: str, decoder: str, factor: int) -> torch.Tensor:
    """``data`` (the file's bytes) decoded; ``factor`` > 1: a JPEG at 1/factor of its size, by PIL."""
    try:
        if decoder == "pil" or factor > 1:
            return _decode_pil(data, factor)
        try:
            return _decode_torchvision(data)
        except RuntimeError:
            if decoder == "torchvision":
                raise
            return _decode_pil(data, 1)  # a format torchvision does not read
    except (OSError, RuntimeError, ValueError, SyntaxError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:150]
        raise SampleError(f"{path}: cannot decode the image ({reason})") from None


def _decode_torchvision(data: bytes) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_image

    image = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    return _to_uint8(image)


def _to_uint8(image: torch.Tensor) -> torch.Tensor:
    """16-bit images (PNG) scaled to 8 bits, not clipped."""
    if image.dtype == torch.uint8:
        return image
    return (image.to(torch.int32) * 255 + 32767).div(65535, rounding_mode="floor").to(torch.uint8)


def _decode_pil(data: bytes, factor: int) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        if factor > 1 and image.format == "JPEG":  # draft picks the DCT scale that keeps this size or more
            image.draft("RGB", (-(-image.size[0] // factor), -(-image.size[1] // factor)))
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grayscale: PIL's RGB conversion would clip
            gray = torch.from_numpy(np.array(image, dtype=np.int32))
            return _to_uint8(gray).expand(3, -1, -1).clone()
        array = np.array(image.convert("RGB"))
    return torch.from_numpy(array).permute(2, 0, 1)
