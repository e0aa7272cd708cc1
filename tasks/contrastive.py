"""Self-supervised contrastive pretraining (SimCLR): two augmented views of each image, a projection head with
BatchNorm on the backbone, the NT-Xent loss with every rank's views as negatives, and a k-NN monitor.

Where SyncBN matters: SimCLR normalises over the global batch ("global BN") because per-device statistics let the
model find a shortcut (the views of one image sit in one device's batch and share its statistics); with SyncBN in
backbone and head every statistic is the global batch's. ``syncbn.norm_batch_size`` and ghost BatchNorm work as
elsewhere, to measure what it changes.

Validation needs labels only there: each validation image's backbone features vote for its class among its ``k``
nearest neighbours in the rest of the validation split (cosine similarity, votes weighted ``exp(sim / t)``: the
usual monitor), every rank's features gathered first, so the score is the same at any world size.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from engine.comm import all_gather_with_grad, gather_objects, get_rank
from tasks.registry import Task, register_task

if TYPE_CHECKING:
    from engine.config import Config, DataConfig, ModelConfig

VIEWS = 2


class ProjectionModel(nn.Module):
    """A backbone (a classifier of the registry without its last Linear) and SimCLR's projection head (Linear,
    BatchNorm, ReLU, Linear); the output holds both: ``out`` for the loss, ``features`` for the k-NN monitor and
    for what the backbone is pretrained for."""

    def __init__(self, backbone: nn.Module, features: int, projection_dim: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Sequential(nn.Linear(features, features, bias=False), nn.BatchNorm1d(features),
                                  nn.ReLU(inplace=True), nn.Linear(features, projection_dim))  # fmt: skip

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        features = self.backbone(images)
        return {"out": self.head(features), "features": features}


class TwoViews(Dataset):
    """Each sample as ``VIEWS`` augmented views of its image, stacked (V, C, H, W), with its label (unused in
    training). Crops and flips on any image; colour jitter, grayscale and blur on uint8 images (float samples, as
    generated data's, have no colour range to jitter). Drawn from torch's RNG, which the loader seeds per (seed,
    epoch, sample): a resumed run draws the same views."""

    def __init__(self, dataset: Dataset, cfg: DataConfig) -> None:
        from torchvision.transforms import v2

        self.dataset = dataset
        self.geometric = v2.Compose([v2.RandomResizedCrop(cfg.image_size, scale=tuple(cfg.view_crop_scale), antialias=True),
                                     v2.RandomHorizontalFlip(cfg.hflip_prob)])  # fmt: skip
        s = cfg.view_color_jitter
        colour = [v2.RandomApply([v2.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=0.8)] if s > 0 else []
        colour += [v2.RandomGrayscale(cfg.view_grayscale)] if cfg.view_grayscale > 0 else []
        blur = v2.GaussianBlur(2 * (cfg.image_size // 20) + 1, sigma=(0.1, 2.0))
        colour += [v2.RandomApply([blur], p=cfg.view_blur)] if cfg.view_blur > 0 else []
        self.colour = v2.Compose(colour) if colour else None

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Tensor, Any]:
        image, label = self.dataset[index]
        return torch.stack([self._view(image) for _ in range(VIEWS)]), label

    def _view(self, image: Tensor) -> Tensor:
        view = self.geometric(image)
        return self.colour(view) if self.colour is not None and view.dtype == torch.uint8 else view


def nt_xent(projections: Tensor, temperature: float) -> Tensor:
    """SimCLR's loss for this rank's rows (2B, D: the views of each image next to each other), against every row
    of every rank (``all_gather_with_grad``): each row's positive is its image's other view, its negatives the
    2BW - 2 others. The mean over this rank's rows; DDP's gradient average makes it the global batch's mean."""
    local = F.normalize(projections.to(torch.promote_types(projections.dtype, torch.float32)), dim=1)  # fp32 at least
    every = all_gather_with_grad(local)
    logits = local @ every.T / temperature
    rows = torch.arange(len(local), device=local.device)
    columns = rows + get_rank() * len(local)  # this rank's rows among every rank's
    logits[rows, columns] = float("-inf")  # a view is not its own negative
    return F.cross_entropy(logits, columns ^ 1)  # rows 2i and 2i + 1: the two views of image i


@register_task("contrastive")
class ContrastiveTask(Task):
    """SimCLR: NT-Xent over the global batch's views; the k-NN accuracy (percent) of the backbone's features on
    the labelled validation split."""

    metrics = ("val_knn_acc1",)
    model_family = "classification"  # any classifier's backbone: local, torchvision, timm
    config_keys = ("data.mean", "data.std", "data.val_resize_size", "data.val_crop_size", "data.interpolation",
                   "model.projection_dim", "data.view_crop_scale", "data.view_color_jitter", "data.view_grayscale",
                   "data.view_blur", "train.temperature", "train.knn_k", "train.knn_temperature")

    def __init__(self, temperature: float, knn_k: int, knn_temperature: float, data: DataConfig) -> None:
        self.temperature, self.knn_k, self.knn_temperature, self.data = temperature, knn_k, knn_temperature, data

    @classmethod
    def from_config(cls, cfg: Config, ground_truth: dict[str, Any] | None = None) -> ContrastiveTask:
        return cls(cfg.train.temperature, cfg.train.knn_k, cfg.train.knn_temperature, cfg.data)

    @classmethod
    def adapt_model(cls, model: nn.Module, cfg: ModelConfig) -> nn.Module:
        from models.registry import strip_classifier  # the registry imports the tasks: found when first asked

        return ProjectionModel(model, strip_classifier(model, "model.name"), cfg.projection_dim)

    def training_split(self, dataset: Dataset) -> Dataset:
        return TwoViews(dataset, self.data)

    def training_loss(self, model: nn.Module, images: Tensor, targets: Tensor) -> Tensor:
        return nt_xent(model(images.flatten(0, 1))["out"], self.temperature)  # (N, V, C, H, W) -> (N V, C, H, W)

    def scorer(self, device: torch.device) -> KnnScorer:
        return KnnScorer(self.knn_k, self.knn_temperature)


class KnnScorer:
    """Keeps this rank's normalised features and labels; ``result`` gathers every rank's and scores them all."""

    def __init__(self, k: int, temperature: float) -> None:
        self.k, self.temperature = k, temperature
        self.features: list[Tensor] = []
        self.labels: list[Tensor] = []

    def update(self, output: dict[str, Tensor], targets: Tensor) -> None:
        self.features.append(F.normalize(output["features"].float(), dim=1).cpu())
        self.labels.append(targets.cpu())

    def result(self) -> dict[str, float]:
        """Collective: every rank calls it once, after its last batch."""
        parts = gather_objects((self.features, self.labels))
        features = torch.cat([f for part in parts for f in part[0]])
        labels = torch.cat([y for part in parts for y in part[1]])
        return {"val_knn_acc1": 100 * knn_hits(features, labels, self.k, self.temperature) / max(len(labels), 1)}


def knn_hits(features: Tensor, labels: Tensor, k: int, temperature: float, chunk: int = 1024) -> int:
    """How many samples the others classify right: each sample's ``k`` most similar others (cosine: the features
    are normalised) vote for their labels with weight ``exp(similarity / temperature)``. In chunks of rows, so the
    similarity matrix is never whole."""
    classes, k = int(labels.max()) + 1 if len(labels) else 1, min(k, len(labels) - 1)
    hits = 0
    for start in range(0, len(labels), chunk):
        similarity = features[start : start + chunk] @ features.T
        rows = torch.arange(len(similarity))
        similarity[rows, rows + start] = float("-inf")  # leave one out
        top = similarity.topk(k, dim=1)
        votes = torch.zeros(len(similarity), classes).scatter_add_(1, labels[top.indices], (top.values / temperature).exp())
        hits += int((votes.argmax(1) == labels[start : start + chunk]).sum())
    return hits
