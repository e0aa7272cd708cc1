"""Segmentation (``task: segmentation``): exact scores at any world size, SyncBN's promise on a segmentation net,
torchvision's models on VOC- and folder-format data made here, the joint transforms, and the default learning.

Bad segmentation input (mask sizes, class indices, split files, a classification model) is in test_bad_inputs.py.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from data import build_datasets
from data.loaders import build_val_loader, collate
from data.transforms import SegmentationTransform
from engine.config import load_config
from engine.evaluation import evaluate
from engine.inputs import InputPrep
from engine.runtime.spawn import spawn
from models import build_model
from tasks import IGNORE_INDEX, SegmentationTask, main_output
from tests.helpers.jobs import (
    REPO_ROOT,
    child_env,
    error_lines,
    killed_and_resumed,
    metric_records,
    run_train,
    run_train_preloaded,
    tiny_overrides,
    torch_load,
)
from tests.helpers.segmentation import make_segmentation_folder, make_voc

SEG_CONFIG = str(REPO_ROOT / "configs" / "segmentation.yaml")
FOLDER_CLASSES = 5


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """segmentation_folder data: 4 train and 7 validation images of four different sizes, 255 on object borders."""
    return make_segmentation_folder(tmp_path_factory.mktemp("segfolder"), train=4, val=7, num_classes=FOLDER_CLASSES)


# ----------------------------------------------------------------------------- exact scores


def _score_cases(folder: Path) -> dict[str, list[str]]:
    """Two validation sets: images of different sizes scored one at a time, and 7 equal-size images in batches of 3."""
    common = ["data.num_workers=0", "model.kwargs={width: 4}"]
    return {
        "sizes": [*common, "data.name=segmentation_folder", f"data.root={folder}", f"model.num_classes={FOLDER_CLASSES}",
                  "data.val_batch_size=1"],
        "batches": [*common, "data.num_val=7", "data.image_size=24", "data.val_batch_size=3"],
    }


def _model_and_val(overrides: list[str]):
    """A one-layer net (random weights, the same on every rank): its predictions vary from pixel to pixel, over
    every class, which a freshly initialised deep net's do not."""
    cfg = load_config(SEG_CONFIG, overrides)
    torch.manual_seed(0)
    classes = cfg.model.num_classes
    model = torch.nn.Sequential(torch.nn.Conv2d(3, classes, 3, padding=1), torch.nn.BatchNorm2d(classes))
    return cfg, model, build_datasets(cfg.data, cfg.model.num_classes, cfg.train.seed)


def _evaluate_worker(rank: int, world_size: int, folder: str) -> dict[str, dict]:
    results = {}
    for name, overrides in _score_cases(Path(folder)).items():
        cfg, model, pair = _model_and_val(overrides)
        loader = build_val_loader(pair.val, cfg.data, rank, world_size, pin_memory=False)
        inputs = InputPrep(torch.device("cpu"), *pair.mean_std)
        results[name] = evaluate(model, loader, SegmentationTask(cfg.model.num_classes), inputs, cfg.train)
    return results


def _reference(overrides: list[str]) -> dict:
    cfg, model, pair = _model_and_val(overrides)
    return _scores_by_hand(model, pair, cfg.model.num_classes)


def _normalised(image: torch.Tensor, pair) -> torch.Tensor:
    """A uint8 image as the model takes it, computed here: scaled to [0, 1], minus the mean, over the std."""
    if image.dtype != torch.uint8:
        return image
    mean, std = (torch.tensor(v).view(-1, 1, 1) for v in pair.mean_std)
    return (image.float() / 255 - mean) / std


def _scores_by_hand(model: torch.nn.Module, pair, classes: int) -> dict:
    """One process, every image alone, intersections and unions counted with boolean masks (no confusion matrix)."""
    val = pair.val
    model.eval()
    inter, union = torch.zeros(classes, dtype=torch.int64), torch.zeros(classes, dtype=torch.int64)
    hits = labelled = 0
    loss_sum = 0.0
    with torch.no_grad():
        for i in range(len(val)):
            image, mask = val[i]
            logits = main_output(model(_normalised(image, pair)[None]))[0]
            pred, keep = logits.argmax(0), mask != IGNORE_INDEX
            for c in range(classes):
                inter[c] += ((pred == c) & (mask == c) & keep).sum()
                union[c] += (((pred == c) | (mask == c)) & keep).sum()
            hits += ((pred == mask) & keep).sum().item()
            labelled += keep.sum().item()
            loss_sum += F.cross_entropy(logits[None], mask[None], ignore_index=IGNORE_INDEX, reduction="sum").item()
    iou = [100 * i / u if u > 0 else None for i, u in zip(inter.tolist(), union.tolist())]
    present = [v for v in iou if v is not None]
    return {"val_loss": loss_sum / labelled, "val_miou": sum(present) / len(present), "val_pixel_acc": 100 * hits / labelled,
            "val_iou": iou}


def test_scores_exact_at_world_sizes_1_2_3(folder: Path) -> None:
    # 7 validation images: world sizes 2 and 3 do not divide them, so a padded duplicate would change the scores
    references = {name: _reference(overrides) for name, overrides in _score_cases(folder).items()}
    for name, reference in references.items():
        assert sum(1 for v in reference["val_iou"] if v) >= 3, f"{name}: predictions of few classes: a weak test"
    for world_size in (1, 2, 3):
        for rank_results in spawn(_evaluate_worker, world_size, str(folder)):
            for name, reference in references.items():
                got = rank_results[name]
                for key in ("val_miou", "val_pixel_acc", "val_iou"):
                    assert got[key] == pytest.approx(reference[key], rel=1e-12), (world_size, name, key)
                assert got["val_loss"] == pytest.approx(reference["val_loss"], rel=1e-5), (world_size, name)


# ----------------------------------------------------------------------------- the promise, on a segmentation net


def _promise_args(out: Path, **extra: object) -> list[str]:
    # no rescale (data.augment false) and crops the size of the images: every pixel labelled, equal counts per rank,
    # so DDP's mean of per-rank mean losses is the global mean, and the samples of step k are the same at any world size
    return tiny_overrides(out, model__num_classes=7, data__image_size=16, data__num_train=16, data__num_val=8,
                          data__augment=False, train__epochs=1, train__lr=0.4, **extra)


def _weights(run: Path) -> torch.Tensor:
    state = torch_load(run / "checkpoints" / "last.pt")["model"]
    return torch.cat([v.float().flatten() for k, v in sorted(state.items()) if "single_value" not in k])


@pytest.mark.slow
def test_syncbn_two_processes_of_one_image_end_where_one_process_of_two_ends(tmp_path: Path) -> None:
    rc, _, err = run_train_preloaded(_promise_args(tmp_path / "one", data__batch_size=2), config=SEG_CONFIG)
    assert rc == 0, err[-3000:]
    for name, syncbn in (("sync", True), ("local", False)):
        args = _promise_args(tmp_path / name, data__batch_size=1, syncbn__enabled=syncbn)
        rc, _, err = run_train(args, nproc=2, config=SEG_CONFIG)
        assert rc == 0, err[-3000:]
    one, sync, local = (_weights(tmp_path / name) for name in ("one", "sync", "local"))
    assert (sync - one).abs().max() < 1e-4, "2 x 1 with SyncBN does not end where 1 x 2 ends"
    assert (local - one).abs().max() > 1e-2, "2 x 1 without SyncBN ends where 1 x 2 ends: the test cannot tell"


def test_killed_and_resumed_segmentation_run_is_bit_identical(tmp_path: Path) -> None:
    """Random scale, flip and crop (ignore-padded) are drawn per (seed, epoch, sample): a run SIGKILLed mid-epoch and
    relaunched ends with the same bits as one that never stopped."""
    reference, resumed, _ = killed_and_resumed(
        tmp_path, task="segmentation", model__name="small_segnet", model__num_classes=7,
        data__name="synthetic_segmentation", data__image_size=16, data__scale_range="[0.5, 2.0]")
    want, got = reference["model"], resumed["model"]
    assert [k for k in want if not torch.equal(want[k], got[k])] == []
    assert [r["val_iou"] for r in reference["train_state"]["history"]] == [
        r["val_iou"] for r in resumed["train_state"]["history"]]


# ----------------------------------------------------------------------------- torchvision models on files



@pytest.mark.slow
def test_deeplabv3_with_aux_head_trains_on_a_voc_layout_in_two_processes(tmp_path: Path) -> None:
    root = make_voc(tmp_path / "voc", train=4, val=3)
    args = tiny_overrides(tmp_path / "run", data__name="voc", data__root=root, model__name="deeplabv3_mobilenet_v3_large",
                          model__num_classes=21, model__aux_loss_weight=0.5, data__image_size=32, data__base_size=32,
                          data__batch_size=1, data__val_batch_size=1, train__epochs=1, model__kwargs="{}")
    rc, out, err = run_train(args, nproc=2, config=SEG_CONFIG)
    assert rc == 0, err[-3000:]
    (record,) = metric_records(tmp_path / "run")
    assert torch.isfinite(torch.tensor(record["train_loss"]))
    state = torch_load(tmp_path / "run" / "checkpoints" / "best.pt")["model"]
    assert any(key.startswith("aux_classifier") for key in state), "the auxiliary head was not built"
    # the scores the run logged are those of its checkpoint, counted here image by image
    cfg = load_config(str(tmp_path / "run" / "config.yaml"))
    model = build_model(cfg.model, cfg.task)
    model.load_state_dict(state)
    want = _scores_by_hand(model, build_datasets(cfg.data, 21, cfg.train.seed), 21)
    assert record["val_iou"] == pytest.approx(want["val_iou"], abs=1e-6)
    assert record["val_miou"] == pytest.approx(want["val_miou"], abs=1e-6)
    assert record["val_pixel_acc"] == pytest.approx(want["val_pixel_acc"], abs=1e-6)


def test_voc_reads_the_augmented_split_through_data_kwargs(tmp_path: Path) -> None:
    voc = make_voc(tmp_path, train=4, val=3) / "VOCdevkit" / "VOC2012"
    (voc / "SegmentationClass").rename(voc / "SegmentationClassAug")
    lists = voc / "ImageSets" / "Segmentation"
    names = (lists / "train.txt").read_text().split() + (lists / "val.txt").read_text().split()
    # DeepLab's list format: image and mask paths
    (lists / "train_aug.txt").write_text("".join(f"/JPEGImages/{n}.jpg /SegmentationClassAug/{n}.png\n" for n in names))
    cfg = load_config(SEG_CONFIG, ["data.name=voc", f"data.root={tmp_path}", "model.num_classes=21",
                                   "data.kwargs={train_split: train_aug, masks: SegmentationClassAug}"])
    pair = build_datasets(cfg.data, 21, cfg.train.seed)
    assert (len(pair.train), len(pair.val)) == (7, 3)
    assert pair.train[6][1].shape == (cfg.data.image_size, cfg.data.image_size)


def test_lraspp_trains_on_a_segmentation_folder(tmp_path: Path, folder: Path) -> None:
    # validation batches of 2 images of different sizes: padded, the padding ignored
    args = tiny_overrides(tmp_path / "run", data__name="segmentation_folder", data__root=folder,
                          model__name="lraspp_mobilenet_v3_large", model__num_classes=FOLDER_CLASSES, model__kwargs="{}",
                          data__image_size=32, data__batch_size=2, data__val_batch_size=2, train__epochs=1,
                          train__tensorboard=True)
    rc, out, err = run_train_preloaded(args, config=SEG_CONFIG)
    assert rc == 0, err[-3000:]
    (record,) = metric_records(tmp_path / "run")
    assert len(record["val_iou"]) == FOLDER_CLASSES and "val_miou" in out
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    per_class = {f"val/iou/{c}" for c, iou in enumerate(record["val_iou"]) if iou is not None}
    assert {"val/miou", "val/pixel_acc", "val/loss", *per_class} <= set(events.Tags()["scalars"])


def test_a_bad_mask_met_by_a_loader_worker_is_one_line(tmp_path: Path) -> None:
    """The error a DataLoader worker raises comes back wrapped in the worker's traceback: still one line."""
    root = make_voc(tmp_path / "voc", defect="class_index")
    args = tiny_overrides(tmp_path / "run", data__name="voc", data__root=root, model__num_classes=21,
                          data__image_size=16, data__batch_size=2, data__num_workers=1)
    rc, out, err = run_train(args, config=SEG_CONFIG)
    assert rc == 1, err[-3000:]
    assert error_lines(err) == [f"error: {root}/VOCdevkit/VOC2012/SegmentationClass/2007_000000.png: class index 30 >= "
                                "model.num_classes 21 (masks hold 0..20, or 255 to ignore a pixel)"], err[-3000:]
    assert "Traceback" not in err, err[-3000:]


@pytest.mark.slow
def test_a_bad_mask_on_one_rank_ends_the_job_with_its_line_and_no_peer_traceback(tmp_path: Path) -> None:
    """The rank that loads the bad file says so; its peer, waiting in a SyncBN collective, loses the connection
    and says only that another process ended first (or is stopped by torchrun before it can): no traceback."""
    root = make_voc(tmp_path / "voc", defect="class_index")
    args = tiny_overrides(tmp_path / "run", data__name="voc", data__root=root, model__num_classes=21,
                          data__image_size=16, data__batch_size=1)
    rc, out, err = run_train(args, nproc=2, config=SEG_CONFIG, timeout=90)
    assert rc != 0
    assert any("2007_000000.png: class index 30 >= model.num_classes 21" in line for line in error_lines(err)), err[-3000:]
    assert "Connection closed by peer" not in err and "]: Traceback" not in err, err[-3000:]


# ----------------------------------------------------------------------------- transforms and collation


def test_joint_transform_moves_image_and_mask_together() -> None:
    mask = torch.zeros(80, 60, dtype=torch.uint8)
    mask[10:50, 6:40] = 3
    mask[60:, 20:] = 255
    image = torch.where(mask == 3, 3.0, 0.0).expand(3, -1, -1).clone()  # each labelled pixel's value is its label
    transform = SegmentationTransform(crop_size=48, base_size=60, scale_range=[0.5, 2.0], train=True)
    for seed in range(20):
        torch.manual_seed(seed)
        out_image, out_mask = transform(image, mask)
        torch.manual_seed(seed)
        again = transform(image, mask)
        assert torch.equal(out_image, again[0]) and torch.equal(out_mask, again[1]), "not a function of the seed"
        assert out_image.shape == (3, 48, 48) and out_mask.shape == (48, 48)
        labelled = (out_mask == 0) | (out_mask == 3)
        agree = (out_image[0][labelled] - out_mask[labelled].float()).abs() < 1.5  # edges blur (bilinear)
        assert agree.float().mean() > 0.95, f"seed {seed}: image and mask moved apart"
        assert set(out_mask.unique().tolist()) <= {0, 3, 255}, "a mask was interpolated, not resampled"


def test_padded_collation_ignores_the_padding() -> None:
    small = (torch.ones(3, 4, 5), torch.zeros(4, 5, dtype=torch.int64))
    large = (torch.ones(3, 6, 3), torch.ones(6, 3, dtype=torch.int64))
    images, masks = collate([small, large])
    assert images.shape == (2, 3, 6, 5) and masks.shape == (2, 6, 5)
    assert (masks[0, 4:] == IGNORE_INDEX).all() and (masks[1, :, 3:] == IGNORE_INDEX).all()
    assert (images[0, :, 4:] == 0).all() and (masks != IGNORE_INDEX).sum() == 4 * 5 + 6 * 3


def test_aux_head_adds_its_weighted_loss() -> None:
    targets = torch.randint(0, 3, (2, 4, 4))
    targets[0, 0] = IGNORE_INDEX
    out, aux = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    task = SegmentationTask(3, aux_weight=0.5)
    main = F.cross_entropy(out, targets, ignore_index=IGNORE_INDEX)
    assert task.loss({"out": out, "aux": aux}, targets) == pytest.approx(
        (main + 0.5 * F.cross_entropy(aux, targets, ignore_index=IGNORE_INDEX)).item(), rel=1e-6)
    assert task.loss(out, targets) == pytest.approx(main.item(), rel=1e-6)
    assert task.loss(out, torch.full_like(targets, IGNORE_INDEX)).item() == 0.0  # nothing labelled: 0, not NaN


# ----------------------------------------------------------------------------- the default


@pytest.mark.slow
def test_segmentation_default_learns(tmp_path: Path) -> None:
    """configs/segmentation.yaml, 2 processes of 2 images, 2 of its epochs: far above predicting the background."""
    args = [f"output_dir={tmp_path / 'run'}", "train.epochs=2", "train.progress_bar=false", "train.tensorboard=false",
            "dist.timeout_s=60"]
    rc, out, err = run_train(args, nproc=2, config=SEG_CONFIG, timeout=240)
    assert rc == 0, err[-3000:]
    records = metric_records(tmp_path / "run")
    # predicting one class everywhere scores at most 100 / 7 (one IoU of at most 100, six of 0)
    assert records[-1]["val_miou"] > 40, records


@pytest.mark.slow
def test_compare_bn_modes_writes_its_table_and_plot(tmp_path: Path) -> None:
    out = tmp_path / "bn_modes"
    command = [sys.executable, "scripts/compare_bn_modes.py", "--nproc", "2", "--modes", "ghost,sync+precise",
               "--out", str(out), "--precise-samples", "16", "train.epochs=1", "data.num_train=32", "data.num_val=8",
               "data.image_size=16", "model.kwargs={width: 4}", "dist.timeout_s=60"]
    result = subprocess.run(command, cwd=REPO_ROOT, env=child_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    rows = [line for line in (out / "bn_modes.md").read_text().splitlines() if line.startswith("| ")]
    assert [row.split("|")[1].strip() for row in rows[1:]] == ["ghost", "sync+precise"]
    assert [row.split("|")[2].strip() for row in rows[1:]] == ["1", "4"]  # normalisation batches
    assert (out / "bn_modes.png").read_bytes()[:4] == b"\x89PNG"
