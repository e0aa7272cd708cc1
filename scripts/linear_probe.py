"""Linear probe of a pretrained backbone: its features frozen, a linear classifier trained on the labelled training
split, scored exactly on the validation split (every image once). The standard measure of what self-supervised
pretraining (``task: contrastive``) learned; it works on any classification-family checkpoint.

    python scripts/linear_probe.py --checkpoint runs/contrastive/checkpoints/best.pt
    python scripts/linear_probe.py --checkpoint ... --epochs 100 --lr 0.1 data.root=/other/labelled/images

The features are the backbone's (a contrastive model's ``features``; another classifier's input to its last
Linear), computed once in evaluation mode from the run's evaluation preprocessing (no augmentation), then the
classifier trains on them in one process: full-batch gradient descent with momentum on cross-entropy,
deterministic. Overrides after the options change the data (``data.root``, ``data.num_train``...).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # so `engine` imports when run as a script

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from data import build_datasets  # noqa: E402
from data.loaders import build_val_loader  # noqa: E402
from engine.config import apply_overrides  # noqa: E402
from engine.inputs import InputPrep  # noqa: E402
from engine.logging import exit_code  # noqa: E402
from models.registry import strip_classifier  # noqa: E402
from scripts.trained_model import load_trained_model  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a checkpoint of this template (e.g. .../best.pt)")
    parser.add_argument("--epochs", type=int, default=200, help="full-batch steps of the classifier")
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--ema", action="store_true", help="the EMA's weights (a run with train.ema_decay)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="data overrides")
    return parser.parse_args(argv)


def backbone_of(model: nn.Module) -> nn.Module:
    """What the features come from: a contrastive model's backbone, or any classifier without its last Linear."""
    if hasattr(model, "backbone"):
        return model.backbone
    strip_classifier(model, "--checkpoint")
    return model


@torch.no_grad()
def features(backbone: nn.Module, loader: torch.utils.data.DataLoader, inputs: InputPrep) -> tuple[torch.Tensor, torch.Tensor]:
    out, labels = [], []
    for images, targets in loader:
        out.append(backbone(inputs(images)).float())
        labels.append(torch.as_tensor(targets))
    return torch.cat(out), torch.cat(labels)


def train_classifier(train: tuple[torch.Tensor, torch.Tensor], args: argparse.Namespace, classes: int) -> nn.Linear:
    """A linear layer on standardised features, full-batch SGD with momentum: the same classifier every time."""
    x, y = train
    torch.manual_seed(0)
    classifier = nn.Linear(x.shape[1], classes)
    optimizer = torch.optim.SGD(classifier.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    for _ in range(args.epochs):
        optimizer.zero_grad()
        F.cross_entropy(classifier(x), y).backward()
        optimizer.step()
    return classifier


def probe(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    trained = load_trained_model(args.checkpoint, ema=args.ema)
    cfg = apply_overrides(trained.cfg, ["data.augment=false", *args.overrides])
    data = dataclasses.replace(cfg.data, num_workers=0)
    pair = build_datasets(data, cfg.model.num_classes, cfg.train.seed)
    inputs = InputPrep(torch.device("cpu"), *pair.mean_std)
    backbone = backbone_of(trained.model).eval()
    train = features(backbone, build_val_loader(pair.train, data, 0, 1, pin_memory=False), inputs)
    val = features(backbone, build_val_loader(pair.val, data, 0, 1, pin_memory=False), inputs)
    mean, std = train[0].mean(0), train[0].std(0).clamp(min=1e-6)  # standardised by the training features
    classifier = train_classifier(((train[0] - mean) / std, train[1]), args, pair.num_classes)
    with torch.no_grad():
        predicted = classifier((val[0] - mean) / std).argmax(1)
    result = {"val_acc1": 100 * (predicted == val[1]).double().mean().item(), "train_samples": len(train[1]),
              "val_samples": len(val[1]), "features": train[0].shape[1]}  # fmt: skip
    print(f"linear probe of {args.checkpoint}: val_acc1 {result['val_acc1']:.2f} ({result['features']} features, "
          f"{result['train_samples']} training and {result['val_samples']} validation images)")
    return result


def main(argv: list[str] | None = None) -> int:
    return exit_code(partial(probe, argv))


if __name__ == "__main__":
    sys.exit(main())
