"""Training behaviour end to end: the default job learns, evaluation is exact, SyncBN keeps its promise."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from data import build_datasets
from data.loaders import build_val_loader
from engine.config import load_config
from engine.evaluation import evaluate
from engine.inputs import InputPrep
from engine.runtime.spawn import spawn
from models import build_model
from tasks import ClassificationTask
from tests.helpers.jobs import metric_records, run_train, tiny_overrides

# ----------------------------------------------------------------------------- exact evaluation

EVAL_OVERRIDES = ["data.num_val=103", "data.batch_size=8", "data.num_workers=0", "model.kwargs={width: 4}"]


def _evaluate_worker(rank: int, world_size: int) -> dict[str, float]:
    cfg = load_config("configs/default.yaml", EVAL_OVERRIDES)
    torch.manual_seed(0)  # the same random model on every rank
    model = build_model(cfg.model)
    val = build_datasets(cfg.data, cfg.model.num_classes, cfg.train.seed).val
    loader = build_val_loader(val, cfg.data, rank, world_size, pin_memory=False)
    return evaluate(model, loader, ClassificationTask(), InputPrep(torch.device("cpu")), cfg.train)


def _reference_metrics() -> dict[str, float]:
    """One process, one pass over the whole split, no sampler at all."""
    cfg = load_config("configs/default.yaml", EVAL_OVERRIDES)
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    val = build_datasets(cfg.data, cfg.model.num_classes, cfg.train.seed).val
    images = torch.stack([val[i][0] for i in range(len(val))])
    targets = torch.tensor([val[i][1] for i in range(len(val))])
    with torch.no_grad():
        logits = model(images)
    top5 = logits.topk(5, dim=1).indices == targets[:, None]
    n = len(targets)
    return {"val_loss": F.cross_entropy(logits, targets).item(), "val_acc1": 100 * top5[:, 0].sum().item() / n,
            "val_acc5": 100 * top5.any(1).sum().item() / n}


def test_evaluation_is_exact_at_world_sizes_1_2_3():
    # 103 samples: world size 2 and 3 do not divide it, so any padded duplicate would change the result
    reference = _reference_metrics()
    for world_size in (1, 2, 3):
        results = spawn(_evaluate_worker, world_size)
        for metrics in results:
            assert metrics["val_acc1"] == reference["val_acc1"], (world_size, metrics, reference)
            assert metrics["val_acc5"] == reference["val_acc5"], (world_size, metrics, reference)
            assert metrics["val_loss"] == pytest.approx(reference["val_loss"], rel=1e-6, abs=1e-7)


# ----------------------------------------------------------------------------- real runs


def _weights(run_dir) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())


@pytest.mark.slow
def test_syncbn_makes_n_processes_equal_one_process_on_the_global_batch(tmp_path):
    """The promise: N ranks x batch b with SyncBN end where 1 rank x batch N*b ends; without SyncBN they do not.

    Augmentation stays on: it is a function of (seed, epoch, sample), so it is the same at every world size.
    """
    # a modest lr keeps this 4-wide net out of its chaotic regime, where float rounding (~1e-7) would grow
    # tenfold per step and hide the comparison; the local-BN run still differs by orders of magnitude more
    common = {"train__epochs": 1, "train__lr": 0.05, "data__num_train": 256, "data__num_val": 32}
    runs = {
        "one_process": (1, {"data__batch_size": 32, "syncbn__enabled": True}),
        "two_sync": (2, {"data__batch_size": 16, "syncbn__enabled": True}),
        "two_local": (2, {"data__batch_size": 16, "syncbn__enabled": False}),
    }
    weights = {}
    for name, (nproc, extra) in runs.items():
        out = tmp_path / name
        rc, _, stderr = run_train(tiny_overrides(out, **common, **extra), nproc=nproc)
        assert rc == 0, stderr[-3000:]
        weights[name] = _weights(out)
    synced = _max_diff(weights["two_sync"], weights["one_process"])
    local = _max_diff(weights["two_local"], weights["one_process"])
    assert synced < 1e-4, f"SyncBN run drifted from the single-process run by {synced}"
    assert local > 100 * max(synced, 1e-6), f"local BN should differ clearly (local {local}, synced {synced})"


@pytest.mark.slow
def test_default_job_learns(tmp_path):
    """The shipped default config, on 2 processes: held-out accuracy climbs far above chance (10%)."""
    out = tmp_path / "default"
    rc, stdout, stderr = run_train([f"output_dir={out}", "train.epochs=3", "train.progress_bar=false"], nproc=2,
                                   timeout=300)
    assert rc == 0, stderr[-3000:]
    records = metric_records(out)
    assert len(records) == 3
    assert records[-1]["val_acc1"] > 60, records
    assert records[-1]["train_loss"] < records[0]["train_loss"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra",
    [
        {"train__accumulate_steps": 2, "train__clip_grad_norm": 1.0, "train__amp": "bf16", "train__channels_last": True,
         "syncbn__group_size": 1, "train__optimizer": "adamw", "train__lr": 0.001, "train__schedule": "step",
         "train__step_milestones": "[1]"},
        {"syncbn__enabled": False, "syncbn__virtual_splits": 2, "syncbn__buffer_policy": "reduce"},
    ],
    ids=["accum-clip-bf16-channels_last-groups-adamw-step", "ghost-bn-reduce-buffers"],
)
def test_training_switches_run_on_two_processes(tmp_path, extra):
    out = tmp_path / "run"
    rc, stdout, stderr = run_train(tiny_overrides(out, **extra), nproc=2)
    assert rc == 0, stderr[-8000:]  # room for a native crash's thread stacks above torchrun's summary
    records = metric_records(out)
    assert len(records) == 2 and all(r["val_loss"] == r["val_loss"] for r in records)  # finite, not NaN
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert state["global_batch"] == 16 * 2 * int(extra.get("train__accumulate_steps", 1))
