"""Is my input pipeline the bottleneck? Images/s per CPU core for each way of decoding and augmenting real JPEGs,
against today's pipeline, and the CPU cores per GPU needed to keep a model fed.

    python benchmarks/bench_image_pipeline.py                       # JPEGs it makes from a photograph
    python benchmarks/bench_image_pipeline.py --images /data/imagenet/val --limit 500 --model-rate 3000

One process, one thread (a loader worker's share of a core), the same files for every variant, interleaved round
by round (the median of the rounds is reported):
  today        PIL decode, torchvision v1 transforms on the PIL image, ToTensor + Normalize in the worker
               (what the template did before the uint8 path, and what torchvision's references still do);
  torchvision  torchvision.io.decode_image (libjpeg-turbo) into a uint8 tensor, transforms v2 on uint8;
  pil          PIL decode into a uint8 tensor, the same crops (a JPEG decoded reduced where the crop allows);
  auto         the template's default: PIL's reduced decode where the crop (or the resize) allows, else torchvision.
Training: random-resized crop to --size and a flip (data.images.RandomResizedCropFile: the crop is drawn before
decoding); evaluation: resize the short side to --size / 0.875 and center-crop (data.imagefolder.EvaluationFile).
The uint8 variants stop at the uint8 image (normalisation happens on the GPU, once per batch).
Cores per GPU = the model's images/s (--model-rate, e.g. a GPU's training throughput) / one core's images/s.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from common import fmt_stat, machine_banner, med, print_table, ratio_stat, verdict  # noqa: E402

from data.imagefolder import EvaluationFile  # noqa: E402
from data.images import RandomResizedCropFile  # noqa: E402
from data.transforms import IMAGENET_MEAN, IMAGENET_STD, classification_preprocessing  # noqa: E402
from engine.config import DataConfig  # noqa: E402
from scripts.sample_images import photo  # noqa: E402

GOALS = {"train": 1.6, "eval": 1.9}  # the uint8 path's rate over today's (issue #24)
SUFFIXES = (".jpg", ".jpeg", ".JPEG", ".png")


def make_photos(folder: str, count: int, size: tuple[int, int]) -> list[str]:
    """``count`` JPEGs of ``size`` from matplotlib's photograph (scripts/sample_images.py), quality 90."""
    paths = [os.path.join(folder, f"{i:04d}.jpg") for i in range(count)]
    for i, path in enumerate(paths):
        photo(size, seed=i).save(path, quality=90)
    return paths


def user_images(root: str, limit: int) -> list[str]:
    found = sorted(str(p) for p in Path(root).rglob("*") if p.suffix in SUFFIXES)
    if not found:
        sys.exit(f"--images: no JPEG or PNG files under {root}")
    return found[:limit]


def pipelines(size: int) -> dict[str, dict[str, Callable[[str], torch.Tensor]]]:
    """phase -> variant -> a function from a file to what a loader worker hands on."""
    from PIL import Image
    from torchvision import transforms as v1

    normalize = [v1.ToTensor(), v1.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    today_train = v1.Compose([v1.RandomResizedCrop(size), v1.RandomHorizontalFlip(), *normalize])
    today_eval = v1.Compose([v1.Resize(round(size / 0.875)), v1.CenterCrop(size), *normalize])

    def today(transform):
        def run(path: str) -> torch.Tensor:
            with Image.open(path) as image:
                return transform(image.convert("RGB"))
        return run

    out: dict[str, dict[str, Callable[[str], torch.Tensor]]] = {"train": {"today": today(today_train)},
                                                                 "eval": {"today": today(today_eval)}}  # fmt: skip
    for decoder in ("torchvision", "pil", "auto"):
        out["train"][decoder] = RandomResizedCropFile(size, decoder)
        evaluation = classification_preprocessing(DataConfig(image_size=size), IMAGENET_MEAN, IMAGENET_STD)
        out["eval"][decoder] = EvaluationFile(evaluation, decoder)
    return out


def images_per_second(fn: Callable[[str], torch.Tensor], paths: list[str]) -> float:
    start = time.perf_counter()
    for i, path in enumerate(paths):
        torch.manual_seed(i)  # the loader's per-sample seeding
        fn(path)
    return len(paths) / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", help="a folder of your JPEGs (searched recursively); default: made here")
    parser.add_argument("--limit", type=int, default=300, help="at most this many of --images")
    parser.add_argument("--count", type=int, default=96, help="JPEGs to make per size when --images is not given")
    parser.add_argument("--size", type=int, default=224, help="the training crop / evaluation size")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per variant")
    parser.add_argument("--model-rate", type=float, default=3000.0,
                        help="images/s the model consumes per GPU (default: about a ResNet-50 in bf16 on an H100)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        if args.images:
            sets = {os.path.basename(os.path.abspath(args.images)): user_images(args.images, args.limit)}
        else:
            sets = {f"{w}x{h}": make_photos(tempfile.mkdtemp(dir=tmp), args.count, (w, h))
                    for w, h in ((500, 375), (1024, 768))}  # fmt: skip
        print(machine_banner(f"setup   : 1 thread, {args.rounds} interleaved rounds, size {args.size}, "
                             f"files: {', '.join(f'{k} ({len(v)})' for k, v in sets.items())}"))
        for phase, variants in pipelines(args.size).items():
            rows = []
            for name, paths in sets.items():
                for fn in variants.values():
                    fn(paths[0])  # warm up imports and caches
                rates: dict[str, list[float]] = {v: [] for v in variants}
                for r in range(args.rounds):
                    for variant in (list(variants) if r % 2 == 0 else list(reversed(variants))):
                        rates[variant].append(images_per_second(variants[variant], paths))
                for variant, values in rates.items():
                    ratio = ratio_stat(values, rates["today"])
                    cores = args.model_rate / med(values)
                    goal = "" if variant == "today" else verdict(med(ratio) >= GOALS[phase])
                    rows.append([name, variant, fmt_stat(values, 1, 0), fmt_stat(ratio, 1, 2), f"{cores:.1f}", goal])
            print_table(["images", "pipeline", "images/s per core", "/ today", "cores per GPU", f"goal >= {GOALS[phase]}x"],
                        rows, f"{phase}: decode + augment, one core (median [min-max] of the rounds)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
