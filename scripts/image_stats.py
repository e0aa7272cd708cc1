"""The per-channel mean and standard deviation of an image folder's training images, as the ``data.mean`` and
``data.std`` lines to paste into a config (grayscale scans, medical or satellite images are far from ImageNet's).

    python scripts/image_stats.py my_images            # my_images/train/<class>/<image>, every image
    python scripts/image_stats.py my_images --limit 2000

Images are decoded as training decodes them (RGB, uint8, scaled to [0, 1]); the statistics are over every pixel of
the images read, in float64, so a large folder does not lose precision. A folder whose three channels agree
(grayscale saved as RGB) gets one value each, which the template applies to every channel.
"""

from __future__ import annotations

import argparse
import os
import sys
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # so `data` imports when run as a script

import torch  # noqa: E402

from data.images import decode_image  # noqa: E402
from engine.errors import UserError  # noqa: E402
from engine.logging import exit_code  # noqa: E402


def channel_statistics(paths: list[str]) -> tuple[list[float], list[float]]:
    """Mean and standard deviation per channel of every pixel of ``paths`` (scaled to [0, 1]); one value each when
    the channels are equal in every image."""
    total, squares, count, gray = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64), 0, True
    for path in paths:
        image = decode_image(path).to(torch.float64).flatten(1) / 255
        total += image.sum(1)
        squares += image.square().sum(1)
        count += image.shape[1]
        gray = gray and bool((image == image[:1]).all())
    mean = total / count
    std = (squares / count - mean.square()).clamp_min(0).sqrt()
    mean, std = (mean[:1], std[:1]) if gray else (mean, std)
    return [round(m, 4) for m in mean.tolist()], [round(s, 4) for s in std.tolist()]


def report(root: str, limit: int = 0) -> tuple[list[float], list[float]]:
    """Print (and return) the statistics of ``root``/train as config lines."""
    from torchvision.datasets import ImageFolder

    train = os.path.join(root, "train")
    if not os.path.isdir(train):
        raise UserError(f"{root}: no train/ folder (expected {root}/train/<class>/<image>)")
    try:  # the files an image-folder run trains on, listed as it lists them
        paths = [path for path, _ in ImageFolder(train, loader=str).samples]
    except (FileNotFoundError, RuntimeError) as exc:
        raise UserError(f"{train}: no images in class folders ({str(exc).splitlines()[0]})") from None
    if limit and len(paths) > limit:
        paths = paths[:: -(-len(paths) // limit)]
    mean, std = channel_statistics(paths)
    print(f"# {len(paths)} images of {train}\ndata:\n  mean: {mean}\n  std: {std}")
    return mean, std


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", help="the folder data.root names (its train/ split is read)")
    parser.add_argument("--limit", type=int, default=0, help="read at most this many images, spread over the folder")
    args = parser.parse_args(argv)
    return exit_code(partial(report, args.root, args.limit))


if __name__ == "__main__":
    sys.exit(main())
