"""Contrastive pretraining (``task: contrastive``): the NT-Xent loss over every rank's views is the global batch's
loss with its gradients, the k-NN monitor is the same at any world size, the views are seeded per sample (a killed
run resumes bit-identically), and the default config learns."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.runtime.spawn import spawn
from tasks.contrastive import knn_hits, nt_xent
from tests.helpers.jobs import killed_and_resumed, metric_records, run_train

ROWS, DIM, TEMPERATURE = 6, 5, 0.3  # rows per rank: 3 images x 2 views


def _projections(world: int) -> torch.Tensor:
    return torch.randn(world * ROWS, DIM, generator=torch.Generator().manual_seed(7), dtype=torch.float64)


def _reference(world: int) -> tuple[float, torch.Tensor]:
    """One process, the whole global batch: SimCLR's loss written out, and its gradient."""
    z = _projections(world).requires_grad_()
    unit = F.normalize(z, dim=1)
    logits = unit @ unit.T / TEMPERATURE
    logits.fill_diagonal_(float("-inf"))
    positives = torch.arange(len(z)) ^ 1
    loss = F.cross_entropy(logits, positives)
    loss.backward()
    return loss.item(), z.grad


def _rank_loss_and_grad(rank: int, world: int) -> tuple[float, torch.Tensor]:
    z = _projections(world)[rank * ROWS : (rank + 1) * ROWS].clone().requires_grad_()
    loss = nt_xent(z, TEMPERATURE)
    loss.backward()
    return loss.item(), z.grad


def test_nt_xent_over_ranks_is_the_global_batch_loss_and_gradient() -> None:
    """Each rank's loss over its rows against every rank's: their mean (DDP's average) is the global loss, and each
    rank's gradient is its rows' share of the global one. Dropping the gather's gradient or the other ranks'
    negatives breaks one or the other."""
    world = 3
    want_loss, want_grad = _reference(world)
    results = spawn(_rank_loss_and_grad, world)
    assert sum(loss for loss, _ in results) / world == pytest.approx(want_loss, rel=1e-12)
    got_grad = torch.cat([grad for _, grad in results]) / world  # DDP divides the summed gradients by the world
    assert torch.allclose(got_grad, want_grad, rtol=1e-10, atol=1e-12), (got_grad - want_grad).abs().max()
    one_process = _rank_loss_and_grad(0, 1)  # world size 1: nothing to gather, the loss of its own rows
    assert one_process[0] == pytest.approx(_reference(1)[0], rel=1e-12)


def _knn_on_ranks(rank: int, world: int) -> float:
    return _untrained_knn(["data.num_val=100", "data.batch_size=8", "model.kwargs={width: 4}"], rank, world)


def test_the_knn_monitor_is_the_same_at_any_world_size() -> None:
    """100 validation images of one model, scored on 1, 2 and 3 processes (uneven shards): the same accuracy, as
    every rank's features are gathered before anyone votes (a per-rank vote gives others)."""
    scores = [spawn(_knn_on_ranks, world) for world in (1, 2, 3)]
    assert all(len(set(s)) == 1 for s in scores), scores  # every rank says the same
    assert scores[0][0] == scores[1][0] == scores[2][0], scores


def test_knn_hits_votes_with_the_k_nearest_others() -> None:
    """Two tight clusters and one outlier: each clustered point is voted right by its cluster (not by itself), the
    outlier, nearer to cluster 1 but labelled 0, is voted wrong."""
    features = F.normalize(torch.tensor([[1, 0.0], [1, 0.1], [1, -0.1], [0, 1.0], [0.1, 1], [-0.1, 1], [0.9, 0.5]]), dim=1)
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    assert knn_hits(features, labels, k=2, temperature=0.1) == 6


@pytest.mark.slow
def test_a_killed_contrastive_run_resumes_bit_identically(tmp_path) -> None:
    """The views are drawn per (seed, epoch, sample): a run killed mid-epoch and relaunched ends with the weights,
    the projection head's BatchNorm statistics and the k-NN scores of the uninterrupted run."""
    reference, resumed, _ = killed_and_resumed(tmp_path, "configs/contrastive.yaml", model__projection_dim=16)
    scores = [[{k: r[k] for k in ("epoch", "train_loss", "val_knn_acc1", "lr")} for r in run["train_state"]["history"]]
              for run in (reference, resumed)]  # the records less their timings
    assert scores[0] == scores[1] and len(scores[0]) == 2
    for key, value in reference["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    assert any(key.startswith("head.1.running_mean") for key in reference["model"])  # the head's BatchNorm


def _untrained_knn(overrides: list[str], rank: int = 0, world: int = 1) -> float:
    """The k-NN accuracy of configs/contrastive.yaml's network as initialised (seeded): the floor training must
    beat, and a model to score on several processes."""
    from data import build_datasets
    from data.loaders import build_val_loader
    from engine.config import load_config
    from engine.evaluation import evaluate
    from engine.inputs import InputPrep
    from models import build_model
    from tasks import build_task

    cfg = load_config("configs/contrastive.yaml", overrides)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, cfg.task).eval()
    pair = build_datasets(cfg.data, cfg.model.num_classes, cfg.train.seed)
    loader = build_val_loader(pair.val, cfg.data, rank, world, pin_memory=False)
    return evaluate(model, loader, build_task(cfg), InputPrep(torch.device("cpu")), cfg.train)["val_knn_acc1"]


@pytest.mark.slow
def test_the_default_contrastive_config_learns_on_two_processes(tmp_path) -> None:
    """2 processes, 3 epochs of configs/contrastive.yaml on half its data: the backbone's features classify the
    validation images by k-NN well above the same network untrained (itself above chance, 10 %: generated classes
    are colour patterns that even random features separate in part)."""
    args = ["train.epochs=3", "data.num_train=1024"]
    rc, _, err = run_train([f"output_dir={tmp_path / 'run'}", *args, "train.progress_bar=false",
                            "train.tensorboard=false", "dist.timeout_s=60"], nproc=2, config="configs/contrastive.yaml",
                           timeout=300)  # fmt: skip
    assert rc == 0, err[-3000:]
    scores = [r["val_knn_acc1"] for r in metric_records(tmp_path / "run")]
    untrained = _untrained_knn(args)
    assert scores[-1] > untrained + 5, (untrained, scores)
    # the linear probe of the pretrained backbone (scripts/linear_probe.py), well above chance
    from scripts.linear_probe import probe

    assert probe(["--checkpoint", str(tmp_path / "run" / "checkpoints" / "last.pt"), "--epochs", "50"])["val_acc1"] > 30
