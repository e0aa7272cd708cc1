"""Detection (``task: detection``): COCO mAP exact at any world size, the default learning, a torchvision detector on
COCO-format files made here, aspect-ratio grouped steps, SyncBN under detection's inputs (an empty head, ranks in
different layers), kill-and-resume, and bad input in one line.
"""

from __future__ import annotations

import contextlib
import copy
import io
from pathlib import Path

import pytest
import torch
from torch import nn

from data import build_datasets
from data.loaders import GlobalStepSampler, aspect_ratio_groups, build_val_loader
from engine.bn import LayerCallsDiffer, SyncBatchNorm, check_layer_calls, convert_sync_batchnorm
from engine.checkpoint import strip_prefixes
from engine.config import load_config
from engine.evaluation import evaluate
from engine.inputs import InputPrep
from engine.runtime.spawn import spawn
from models import build_model
from models.detection import unfreeze_batchnorm
from tasks import DetectionTask
from tests.helpers.coco import NUM_CLASSES, make_coco
from tests.helpers.jobs import (
    REPO_ROOT,
    error_lines,
    killed_and_resumed,
    metric_records,
    run_train,
    run_train_preloaded,
    tiny_overrides,
    torch_load,
)

DET_CONFIG = str(REPO_ROOT / "configs" / "detection.yaml")
VAL_IMAGES = 101  # neither 2 nor 3 divides it: a padded or duplicated image would change the scores



@pytest.fixture(scope="module")
def learned(tmp_path_factory) -> Path:
    """The detection default, shortened, trained on 2 processes with SyncBN: a model that finds the shapes."""
    run = tmp_path_factory.mktemp("detection") / "run"
    args = tiny_overrides(run, data__num_train=160, data__num_val=VAL_IMAGES, data__batch_size=2, train__epochs=3,
                          model__kwargs=None)  # fmt: skip
    rc, _, err = run_train(args, nproc=2, config=DET_CONFIG, timeout=400)
    assert rc == 0, err[-3000:]
    return run


def test_the_detection_default_learns(learned: Path) -> None:
    maps = [record["val_map"] for record in metric_records(learned)]
    assert maps[-1] > maps[0] + 10 and maps[-1] > 25, f"val_map per epoch {maps}: the detector did not learn"
    assert {"val_map50", "val_map75"} <= set(metric_records(learned)[-1])


# ----------------------------------------------------------------------------- exact scores


def _model_and_val(run: str):
    cfg = load_config(str(Path(run) / "config.yaml"), ["data.num_workers=0"])
    model = build_model(cfg.model, cfg.task)
    model.load_state_dict(strip_prefixes(torch_load(Path(run) / "checkpoints" / "last.pt")["model"]))
    return cfg, model.eval(), build_datasets(cfg.data, cfg.model.num_classes, cfg.train.seed)


def _evaluate_worker(rank: int, world_size: int, run: str) -> dict:
    cfg, model, pair = _model_and_val(run)
    loader = build_val_loader(pair.val, cfg.data, rank, world_size, pin_memory=False)
    return evaluate(model, loader, DetectionTask(pair.ground_truth), InputPrep(torch.device("cpu"), *pair.mean_std),
                    cfg.train)  # fmt: skip


def _map_by_hand(run: str) -> tuple[dict, int]:
    """One process, every image alone, COCO's results written out here and scored by pycocotools directly.

    Each image's forward is the same computation as in the run's processes and the spawned ranks: one image, one
    thread (on a CPU whose kernels split work by thread count, AVX2's for one, another thread count rounds the
    boxes differently, and mAP, a step function of them, moves in its 5th digit)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    cfg, model, pair = _model_and_val(run)
    prep = InputPrep(torch.device("cpu"), *pair.mean_std)
    results = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            for i in range(len(pair.val)):
                image, target = pair.val[i]
                output = model(prep([image]))[0]
                for (x1, y1, x2, y2), score, label in zip(output["boxes"].double().tolist(), output["scores"].tolist(),
                                                          output["labels"].tolist()):  # fmt: skip
                    results.append({"image_id": target["image_id"], "category_id": label, "bbox": [x1, y1, x2 - x1, y2 - y1],
                                    "score": score})  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    with contextlib.redirect_stdout(io.StringIO()):
        truth = COCO()
        truth.dataset = copy.deepcopy(pair.ground_truth)
        truth.createIndex()
        evaluation = COCOeval(truth, truth.loadRes(results), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    stats = [100 * float(v) for v in evaluation.stats[:3]]
    return dict(zip(("val_map", "val_map50", "val_map75"), stats)), len(results)


def test_val_map_is_exact_at_world_sizes_1_2_3(learned: Path) -> None:
    reference, detections = _map_by_hand(str(learned))
    assert detections > VAL_IMAGES and reference["val_map"] > 10, "few detections: a weak test"
    logged = metric_records(learned)[-1]  # what the 2-process run itself scored for these weights
    assert {key: logged[key] for key in reference} == reference
    for world_size in (1, 2, 3):
        for got in spawn(_evaluate_worker, world_size, str(learned), timeout_s=120):
            assert got == reference, world_size


def test_predict_finds_what_evaluation_finds_and_export_says_why_not(learned: Path, tmp_path: Path, capsys) -> None:
    from PIL import Image

    from scripts import export, predict

    cfg, model, pair = _model_and_val(str(learned))
    prep = InputPrep(torch.device("cpu"), *pair.mean_std)
    want = []
    for i in range(3):
        image, _ = pair.val[i]
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(tmp_path / f"{i}.png")  # lossless: the same pixels
        with torch.no_grad():
            found = model(prep([image]))[0]
        keep = found["scores"] >= 0.5
        want.append((found["boxes"][keep], found["labels"][keep].tolist()))
    results = predict.predict(["--checkpoint", str(learned / "checkpoints" / "last.pt"), str(tmp_path),
                               "--out", str(tmp_path / "boxes.jsonl")])  # fmt: skip
    assert [Path(r["path"]).name for r in results] == ["0.png", "1.png", "2.png"]
    for result, (boxes, labels) in zip(results, want):
        assert result["labels"] == labels and len(labels) > 0
        assert torch.allclose(torch.tensor(result["boxes"]).view(-1, 4), boxes, atol=0.05)
        assert result["classes"] == [pair.class_names[k] for k in labels]
    assert len((tmp_path / "boxes.jsonl").read_text().splitlines()) == 3
    out = capsys.readouterr().out
    assert f"{results[0]['classes'][0]} " in out and "%" in out
    assert export.main(["--checkpoint", str(learned / "checkpoints" / "last.pt"), "--out", str(tmp_path / "m")]) == 1
    assert "does not export with torch.export" in capsys.readouterr().err


# ----------------------------------------------------------------------------- data and models


def test_aspect_ratio_grouped_steps_are_equal_on_every_rank_and_the_same_at_any_world_size() -> None:
    sizes = [(96, 128)] * 25 + [(128, 96)] * 19 + [(112, 112)] * 9  # 53 images in three bins
    order = torch.randperm(53, generator=torch.Generator().manual_seed(1)).tolist()
    sizes = [sizes[i] for i in order]

    class Sized:
        def image_sizes(self):  # noqa: ANN202
            return sizes

    groups = aspect_ratio_groups(Sized(), factor=3)
    assert len(set(groups)) == 3
    global_batch = 12
    by_world = {}
    for world in (1, 2, 3, 4):
        per_rank = global_batch // world
        ranks = [list(GlobalStepSampler(range(53), world, r, batch_size=per_rank, groups=groups)) for r in range(world)]
        assert len({len(r) for r in ranks}) == 1, f"unequal batches on {world} processes"
        steps = [sorted(i for r in ranks for i, _ in r[k * (global_batch // world):(k + 1) * (global_batch // world)])
                 for k in range(len(ranks[0]) // (global_batch // world))]  # fmt: skip
        by_world[world] = steps
        assert len(steps) == 53 // global_batch
        flat = [i for step in steps for i in step]
        assert len(flat) == len(set(flat)), "a sample twice in one epoch"
        mixed = sum(len({groups[i] for i in step}) > 1 for step in steps)
        assert mixed <= 1, f"{mixed} steps mix aspect ratios; only the leftovers' last one may"
    assert all(steps == by_world[1] for steps in by_world.values()), "the steps depend on the world size"
    resumed = list(GlobalStepSampler(range(53), 2, 0, batch_size=6, groups=groups))
    sampler = GlobalStepSampler(range(53), 2, 0, batch_size=6, groups=groups)
    sampler.set_epoch(0, start_step=2)
    assert list(sampler) == resumed[12:], "a resume mid-epoch starts elsewhere"


def test_unfreezing_frozen_batchnorm_keeps_the_function_and_what_trains() -> None:
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops import FrozenBatchNorm2d

    torch.manual_seed(0)
    frozen = resnet_fpn_backbone(backbone_name="resnet18", weights=None, norm_layer=FrozenBatchNorm2d, trainable_layers=2)
    for module in frozen.modules():
        if isinstance(module, FrozenBatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.uniform_(0.5, 1.5)
    # in fp64: the two layers round differently (FrozenBatchNorm2d folds scale and shift first), and in fp32 that
    # reaches 1.3e-5 (AVX-512), 3.6e-5 (AVX2) or 0 (scalar kernels) on outputs of magnitude 18 after 20 layers; in
    # fp64 it is 7.5e-14 at most, where an eps of 1e-3 instead of 1e-5 is 7e-2 (measured)
    frozen, x = frozen.double(), torch.randn(2, 3, 64, 64, dtype=torch.float64)
    want = frozen(x)
    thawed = unfreeze_batchnorm(copy.deepcopy(frozen)).eval()
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in thawed.modules())
    got = thawed(x)
    assert all(torch.allclose(got[k], want[k], rtol=0, atol=1e-10) for k in want)
    trains = {name: bn.weight.requires_grad for name, bn in thawed.named_modules() if isinstance(bn, nn.BatchNorm2d)}
    assert trains["body.layer4.0.bn1"] and trains["body.layer3.1.bn2"], "a trainable stage's BatchNorm is frozen"
    assert not trains["body.bn1"] and not trains["body.layer1.0.bn1"], "a frozen stage's BatchNorm trains"


def test_a_coco_format_dataset_trains_a_torchvision_detector_on_2_processes(tmp_path: Path) -> None:
    root = make_coco(tmp_path / "coco", train=4, val=3)
    args = tiny_overrides(tmp_path / "run", data__name="coco", data__root=root, model__num_classes=NUM_CLASSES,
                          model__name="fasterrcnn_resnet50_fpn_v2", data__kwargs="{train_split: train, val_split: val}",
                          model__kwargs="{min_size: 96, max_size: 128}", data__batch_size=1, train__epochs=1,
                          syncbn__precise_bn_samples=2)  # fmt: skip
    rc, out, err = run_train(args, nproc=2, config=DET_CONFIG, timeout=300)
    assert rc == 0, err[-3000:]
    assert "PreciseBN" in out
    (record,) = metric_records(tmp_path / "run")
    assert torch.isfinite(torch.tensor(record["train_loss"])) and 0 <= record["val_map"] <= 100
    checkpoint = torch_load(tmp_path / "run" / "checkpoints" / "last.pt")
    # the image without annotations is not trained on: 3 images, 1 per process, 1 step of 2 (drop_last)
    assert checkpoint["train_state"]["step"] == 1
    assert checkpoint["inference"]["class_names"][:4] == ["__background__", "person", "N/A", "car"]


def test_killed_and_resumed_detection_run_is_bit_identical(tmp_path: Path) -> None:
    """Flips drawn per (seed, epoch, sample), proposals sampled from the rank's own RNG stream (checkpointed), the
    EMA: a run SIGKILLed mid-epoch and relaunched ends with the same bits as one that never stopped."""
    reference, resumed, _ = killed_and_resumed(tmp_path, config=DET_CONFIG, data__num_train=48, data__num_val=6,
                                               data__batch_size=2, train__ema_decay=0.9)  # fmt: skip
    for part, want, got in (("model", reference["model"], resumed["model"]),
                            ("ema", reference["ema"]["model"], resumed["ema"]["model"])):  # fmt: skip
        assert [k for k in want if not torch.equal(want[k], got[k])] == [], part
    timeless = [[{k: v for k, v in r.items() if "time" not in k and "per_s" not in k} for r in run["train_state"]["history"]]
                for run in (reference, resumed)]  # fmt: skip
    assert timeless[0] == timeless[1]


# ----------------------------------------------------------------------------- SyncBN under detection's inputs


class Head(nn.Module):
    """A box head's shape: conv, BatchNorm, ReLU over RoI features; a second BatchNorm layer named differently."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.other = nn.BatchNorm2d(6)

    def forward(self, x: torch.Tensor, skip: bool = False) -> torch.Tensor:
        return self.other(torch.relu(self.conv(x))) if skip else torch.relu(self.bn(self.conv(x)))


def _head_worker(rank: int, world_size: int) -> dict:
    torch.manual_seed(0)
    reference = Head()
    head = convert_sync_batchnorm(copy.deepcopy(reference))
    assert isinstance(head.bn, SyncBatchNorm)
    features = torch.randn(5, 4, 7, 7, generator=torch.Generator().manual_seed(1))
    mine = features if rank == 0 else features[:0]  # rank 1's images gave no proposals
    out = head(mine)
    (out * features[: len(out)].mean(1, keepdim=True)[:, :1]).sum().backward()
    # the reference: one process, plain BatchNorm, the only features there are
    want = reference(features)
    (want * features.mean(1, keepdim=True)[:, :1]).sum().backward()
    same = {
        "output": rank == 1 or torch.allclose(out, want.detach(), atol=1e-5),
        "running_mean": torch.allclose(head.bn.running_mean, reference.bn.running_mean, atol=1e-6),
        "running_var": torch.allclose(head.bn.running_var, reference.bn.running_var, atol=1e-6),
    }
    # ranks in different layers: with the check, one line naming both, on every rank
    check_layer_calls(head)
    try:
        head(features, skip=rank == 1)
        message = None
    except LayerCallsDiffer as exc:
        message = str(exc)
    return {"same": same, "grad": head.conv.weight.grad.clone(), "message": message,
            "reference_grad": reference.conv.weight.grad.clone()}  # fmt: skip


def test_syncbn_with_an_empty_head_on_one_rank_and_ranks_in_different_layers() -> None:
    results = spawn(_head_worker, 2, timeout_s=60)
    for rank, result in enumerate(results):
        assert all(result["same"].values()), (rank, result["same"])
        assert result["message"] is not None and "rank 0 in bn" in result["message"] and "rank 1 in other" in result["message"]
    # DDP would average the conv's gradient over ranks: the sum of the two ranks' is the one-process gradient
    total = results[0]["grad"] + results[1]["grad"]
    assert torch.allclose(total, results[0]["reference_grad"], atol=1e-4)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("defect", "expect"),
    [
        ("box_outside", "lies outside the 160x120 image"),
        ("negative_size", "has a negative width or height"),
        ("bad_category", "category_id 8 is outside the classes the model predicts"),
        ("missing_image", "image(s) of"),
        ("detector_under_classification", "is a detection model but task is classification"),
        ("detection_data_under_classification", "is a detection dataset but task is classification"),
    ],
)
def test_bad_detection_input_is_one_line(tmp_path: Path, defect: str, expect: str) -> None:
    from tests.helpers.coco import DEFECTS

    root = make_coco(tmp_path / "coco", train=3, val=2, defect=defect if defect in DEFECTS else None)
    args = tiny_overrides(tmp_path / "run", data__name="coco", data__root=root, model__num_classes=NUM_CLASSES,
                          data__kwargs="{train_split: train, val_split: val}", model__kwargs=None)  # fmt: skip
    if defect == "detector_under_classification":
        args += ["task=classification", "data.name=synthetic", "model.name=fasterrcnn_mobilenet_v3_large_fpn"]
    if defect == "detection_data_under_classification":
        args += ["task=classification", "model.name=small_cnn"]
    rc, _, err = run_train_preloaded(args, config=DET_CONFIG, timeout=90)
    lines = error_lines(err)
    assert rc == 1 and len(lines) == 1 and expect in lines[0], err[-2000:]
    assert "Traceback" not in err
