"""Predict with a trained checkpoint: images or folders in, the top classes with their probabilities out (for a
segmentation run a mask PNG per image, for a detection run the boxes found), with exactly the preprocessing the run
evaluated with.

    python scripts/predict.py --checkpoint runs/x/checkpoints/best.pt photo.jpg more_photos/
    python scripts/predict.py --checkpoint runs/seg/checkpoints/best.pt images/ --out masks/
    python scripts/predict.py --checkpoint runs/detection/checkpoints/best.pt images/ --min-score 0.5 --out boxes.jsonl
    python scripts/predict.py --checkpoint ... --top-k 3 --batch-size 64 --device cuda --ema --out predictions.jsonl

Classification prints one line per image (``path: class 97.1%, class 1.4%, ...``) and, with ``--out FILE``, writes
a JSON object per line (path, top classes, probabilities); a task of your own describes its images itself
(``Task.predict``). Segmentation writes ``<out>/<image name>.png``: the class
index per pixel at the image's own size (a palette PNG with VOC's colours: class 0 black). Detection prints one line
per image (``path: class 98.2% [x1, y1, x2, y2], ...``, in the image's pixels, scores of at least ``--min-score``)
and, with ``--out FILE``, writes them as a JSON object per line. Images are decoded, resized and cropped as the
run's evaluation did (the checkpoint keeps that as data; a detector resizes them itself), then normalised on the
device.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # so `engine` imports when run as a script

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from data.images import decode_image  # noqa: E402
from data.segmentation import IMAGE_SUFFIXES, voc_palette  # noqa: E402
from engine.errors import UserError  # noqa: E402
from engine.inputs import InputPrep  # noqa: E402
from engine.logging import exit_code  # noqa: E402
from scripts.trained_model import Logits, TrainedModel, load_trained_model  # noqa: E402
from tasks import Task, task_class  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", help="image files, or folders searched for images")
    parser.add_argument("--checkpoint", required=True, help="a checkpoint of this template (e.g. .../best.pt)")
    parser.add_argument("--top-k", type=int, default=5, help="classes per image (at most the number of classes - 1)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="auto", help="auto (cuda when there is one), cpu, cuda, cuda:1, ...")
    parser.add_argument("--ema", action="store_true", help="the EMA's weights (a run with train.ema_decay)")
    parser.add_argument("--min-score", type=float, default=0.5, help="detection: the boxes kept")
    parser.add_argument("--out", help="classification and detection: a .jsonl file; segmentation: the folder for the masks")
    return parser.parse_args(argv)


def image_paths(inputs: list[str]) -> list[str]:
    paths = []
    for item in inputs:
        if os.path.isdir(item):
            paths += sorted(str(p) for p in Path(item).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        elif os.path.isfile(item):
            paths.append(item)
        else:
            raise UserError(f"{item}: no such file or folder")
    if not paths:
        raise UserError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {', '.join(inputs)}")
    return paths


def batches(paths: list[str], trained: TrainedModel, size: int) -> Iterator[tuple[list[str], torch.Tensor]]:
    """Classification: images decoded and preprocessed as evaluation does, ``size`` at a time (equal sizes: the
    preprocessing crops)."""
    preprocessing = trained.preprocessing
    transform = preprocessing.transform()
    for start in range(0, len(paths), size):
        chunk = paths[start : start + size]
        images = [transform(decode_image(p, trained.cfg.data.decoder, reduce_to=preprocessing.resize)) for p in chunk]
        yield chunk, torch.stack(images)


@torch.no_grad()
def classify(paths: list[str], trained: TrainedModel, task: Task, args: argparse.Namespace,
             device: torch.device) -> list[dict]:  # fmt: skip
    """A classification-family task: batches of logits, each image described by the task's ``predict``."""
    model = Logits(trained.model).to(device)
    inputs = InputPrep(device, trained.preprocessing.mean, trained.preprocessing.std)
    results = []
    for chunk, images in batches(paths, trained, args.batch_size):
        for path, (line, record) in zip(chunk, task.predict(model(inputs(images)), trained.class_names, args.top_k)):
            print(f"{path}: {line}")
            results.append({"path": path, **record})
    return results


@torch.no_grad()
def segment(paths: list[str], trained: TrainedModel, out: str, device: torch.device) -> list[str]:
    """One image at a time (each keeps its size, as evaluation scores them); masks at the image's own size."""
    from PIL import Image

    model = Logits(trained.model).to(device)
    inputs = InputPrep(device, trained.preprocessing.mean, trained.preprocessing.std)
    transform, palette = trained.preprocessing.transform(), voc_palette()
    os.makedirs(out, exist_ok=True)
    written = []
    for path in paths:
        image = decode_image(path, trained.cfg.data.decoder)
        logits = model(inputs(transform(image)[None])).float()
        mask = F.interpolate(logits, size=image.shape[-2:], mode="bilinear", align_corners=False).argmax(1)[0]
        png = Image.fromarray(mask.to(torch.uint8).cpu().numpy(), mode="P")
        png.putpalette(palette)
        written.append(os.path.join(out, f"{Path(path).stem}.png"))
        png.save(written[-1])
    return written


@torch.no_grad()
def detect(paths: list[str], trained: TrainedModel, min_score: float, device: torch.device) -> list[dict]:
    """One image at a time, as evaluation scores them; boxes in the image's own pixels."""
    model = trained.model.to(device)
    inputs = InputPrep(device, trained.preprocessing.mean, trained.preprocessing.std)
    results = []
    for path in paths:
        found = model(inputs([decode_image(path, trained.cfg.data.decoder)]))[0]
        keep = found["scores"] >= min_score
        labels = found["labels"][keep].tolist()
        results.append({"path": path, "boxes": [[round(v, 1) for v in box] for box in found["boxes"][keep].tolist()],
                        "classes": [trained.class_names[i] for i in labels], "labels": labels,
                        "scores": found["scores"][keep].tolist()})  # fmt: skip
    return results


def _write_jsonl(results: list[dict], path: str | None) -> None:
    if path:
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in results)


def predict(argv: list[str] | None = None) -> list:
    args = parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)  # fmt: skip
    trained = load_trained_model(args.checkpoint, ema=args.ema)
    if trained.preprocessing is None:
        raise UserError(f"{args.checkpoint}: its run trained on generated samples (data.name={trained.cfg.data.name}), "
                        "not image files, so there is no image preprocessing to apply: predict takes the images of "
                        "a run on image files (data.name=imagefolder, ...); scripts/export.py exports this model for "
                        "tensors like its samples")  # fmt: skip
    task = task_class(trained.cfg.task)
    if task.model_family == "classification" and task.predict is None:
        raise UserError(f"{args.checkpoint}: task {trained.cfg.task} has no prediction format (give its class in "
                        "tasks/ a predict method)")  # fmt: skip
    paths = image_paths(args.inputs)
    if task.model_family == "segmentation":
        written = segment(paths, trained, args.out or "predictions", device)
        print(f"wrote {len(written)} masks to {args.out or 'predictions'}/")
        return written
    if task.model_family == "detection":
        results = detect(paths, trained, args.min_score, device)
        for r in results:
            print(f"{r['path']}: " + (", ".join(f"{c} {100 * p:.1f}% {box}" for c, p, box in
                                                zip(r["classes"], r["scores"], r["boxes"])) or "nothing found"))  # fmt: skip
    else:
        results = classify(paths, trained, task.from_config(trained.cfg), args, device)
    _write_jsonl(results, args.out)
    return results


def main(argv: list[str] | None = None) -> int:
    return exit_code(partial(predict, argv))


if __name__ == "__main__":
    sys.exit(main())
