"""After training: a checkpoint that knows how to use itself (predict scores what the run's evaluation scored,
export gives the eager outputs), pretrained weights fetched once (attempts counted at a proxy), and the run telling
what it does (the banner's image size and weights, a re-planned schedule, the config in TensorBoard, top-5 only
where it means something)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from engine.bn import SyncBatchNorm, convert_sync_batchnorm
from engine.runtime.spawn import REPO_ROOT
from tests.helpers.jobs import error_lines, metric_records, run_train, run_train_preloaded, tiny_overrides
from tests.helpers.photos import make_photo_folder
from tests.helpers.proxy import CountingProxy
from tests.helpers.segmentation import make_segmentation_folder

RESNET18 = "resnet18-f37072fd.pth"  # torchvision's ResNet18_Weights.IMAGENET1K_V1
PRETRAINED = {"model.name": "resnet18", "model.pretrained": True, "model.kwargs": "{}", "data.num_train": 64,
              "data.num_val": 16, "train.epochs": 1}  # fmt: skip


@pytest.mark.slow
def test_pretrained_weights_offline_with_an_empty_cache_one_line_and_one_attempt(tmp_path) -> None:
    """2 processes, no network (a proxy that refuses), an empty TORCH_HOME: rank 0 tries once, nobody else tries,
    and one line, printed once, names the file and where to put it."""
    with CountingProxy() as proxy:
        env = {**proxy.env(), "TORCH_HOME": str(tmp_path / "torch")}
        rc, out, err = run_train(tiny_overrides(tmp_path / "run", **PRETRAINED), nproc=2, env=env)
    assert rc == 1
    assert [r.rsplit(" ", 1)[0] for r in proxy.requests] == ["CONNECT download.pytorch.org:443"], proxy.requests
    lines = error_lines(err)
    assert len(lines) == 1, err[-3000:]
    path = tmp_path / "torch" / "hub" / "checkpoints" / RESNET18
    assert lines[0].startswith("error: model.pretrained: cannot fetch the weights of resnet18 (")
    assert lines[0].endswith(f"put https://download.pytorch.org/models/{RESNET18} at {path} "
                             f"(TORCH_HOME={tmp_path / 'torch'})")  # fmt: skip


@pytest.mark.slow
def test_pretrained_weights_in_the_cache_load_on_every_rank_without_a_request(tmp_path) -> None:
    from torchvision.models import resnet18

    cached = tmp_path / "torch" / "hub" / "checkpoints" / RESNET18
    cached.parent.mkdir(parents=True)
    torch.manual_seed(7)
    weights = resnet18().state_dict()
    torch.save(weights, cached)
    with CountingProxy() as proxy:
        env = {**proxy.env(), "TORCH_HOME": str(tmp_path / "torch")}
        rc, out, err = run_train(tiny_overrides(tmp_path / "run", **PRETRAINED, **{"train.lr": 1e-9}), nproc=2,
                                 env=env)  # fmt: skip
    assert rc == 0, err[-3000:]
    assert proxy.requests == []
    assert "resnet18 (10 classes, pretrained)" in out
    trained = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)["model"]
    # the cached backbone, barely moved by two steps at lr 1e-9 (the 10-class head is new)
    assert torch.allclose(trained["conv1.weight"], weights["conv1.weight"], atol=1e-6)


def test_the_run_says_what_it_does(tmp_path) -> None:
    """The banner names the image size and the weights; a 2-class run reports no top-5; its config is in
    TensorBoard; training longer says that the schedule is re-planned, and which other keys changed."""
    out_dir = tmp_path / "run"
    two_classes = {"model.num_classes": 2, "train.epochs": 1, "train.tensorboard": True}
    rc, out, err = run_train_preloaded(tiny_overrides(out_dir, **two_classes))
    assert rc == 0, err[-3000:]
    assert "model small_cnn (2 classes, from scratch) | data synthetic, 32 px |" in out
    (record,) = metric_records(out_dir)
    assert "val_acc1" in record and "val_acc5" not in record and "val_acc5" not in out
    board = EventAccumulator(str(out_dir / "tensorboard")).Reload()
    (text,) = board.Tensors("config/text_summary")
    assert "num_classes: 2" in text.tensor_proto.string_val[0].decode()

    longer = {**two_classes, "train.epochs": 2, "train.label_smoothing": 0.1, "data.augment": False}
    rc, out, err = run_train_preloaded(tiny_overrides(out_dir, **longer))
    assert rc == 0, err[-3000:]
    assert "note: train.epochs 1 -> 2: the learning-rate schedule is re-planned from step 16" in out, out[-2000:]
    # the other keys changed on the way are said once too (the schedule's not twice)
    assert ("note: this run's config differs from the checkpoint's run in data.augment True -> False, "
            "train.label_smoothing 0.0 -> 0.1; the rest of the run uses this run's values") in out, out[-2000:]
    rc, out, err = run_train_preloaded(tiny_overrides(out_dir, **longer))  # the same config again: nothing to say
    assert rc == 0 and "run complete" in out and "differs from the checkpoint" not in out, out[-2000:]


# --------------------------------------------------------------------------------------------- predict and export

IMAGEFOLDER = str(REPO_ROOT / "configs" / "imagefolder.yaml")
SEGMENTATION = str(REPO_ROOT / "configs" / "segmentation.yaml")


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory) -> Path:
    """A 2-process run on a JPEG folder of 3 classes (counted from the folder), with an EMA and an evaluation of its
    own (mean, std, sizes, interpolation): (output_dir, image root)."""
    root = tmp_path_factory.mktemp("classifier")
    photos = make_photo_folder(root / "photos")
    args = [f"output_dir={root / 'run'}", f"data.root={photos}", "model.name=small_cnn", "data.image_size=32",
            "data.mean=[0.45]", "data.std=[0.25]", "data.val_resize_size=40", "data.val_crop_size=32",
            "data.interpolation=bicubic", "data.batch_size=8", "data.num_workers=0", "train.epochs=3", "train.lr=0.02",
            "train.warmup_epochs=0", "train.ema_decay=0.9", "train.progress_bar=false", "train.tensorboard=false"]
    rc, out, err = run_train(args, nproc=2, config=IMAGEFOLDER, timeout=300)
    assert rc == 0, err[-3000:]
    return root


@pytest.mark.slow
def test_a_checkpoint_knows_how_to_use_itself_and_predict_scores_the_runs_val_acc1(classifier_run) -> None:
    from scripts.predict import predict

    best = classifier_run / "run" / "checkpoints" / "best.pt"
    state = torch.load(best, weights_only=True)
    assert state["inference"]["class_names"] == ["grace_hopper", "logo2", "minduka_present_blue_pack"]
    assert state["config"]["model"]["num_classes"] == 3  # the class folders
    assert state["inference"]["preprocessing"] == {"mean": [0.45], "std": [0.25], "resize": 40, "crop": 32,
                                                   "interpolation": "bicubic"}  # fmt: skip
    out = classifier_run / "predictions.jsonl"
    results = predict(["--checkpoint", str(best), str(classifier_run / "photos" / "val"), "--out", str(out),
                       "--batch-size", "5"])  # fmt: skip
    assert [json.loads(line) for line in out.read_text().splitlines()] == results
    right = sum(Path(r["path"]).parent.name == r["classes"][0] for r in results)
    best_epoch = state["train_state"]["history"][state["train_state"]["epoch"] - 1]
    assert len(results) == 18 and 100 * right / len(results) == best_epoch["val_acc1"]
    assert all(len(r["classes"]) == 2 for r in results)  # top-k: at most classes - 1
    ema = predict(["--checkpoint", str(best), str(classifier_run / "photos" / "val"), "--ema"])
    assert 100 * sum(Path(r["path"]).parent.name == r["classes"][0] for r in ema) / 18 == best_epoch["val_acc1_ema"]


@pytest.mark.slow
def test_export_gives_the_eager_outputs_and_the_preprocessing_beside_it(classifier_run, tmp_path) -> None:
    from scripts.export import export, export_program
    from scripts.trained_model import Logits, load_trained_model

    best = str(classifier_run / "run" / "checkpoints" / "best.pt")
    onnx = importlib.util.find_spec("onnxruntime") is not None
    written = export(["--checkpoint", best, "--out", str(tmp_path / "model"), *(["--onnx"] if onnx else [])])
    trained = load_trained_model(best)
    images = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        want = Logits(trained.model)(images)
    program = torch.export.load(written[0])
    assert torch.allclose(program.module()(images), want, atol=1e-5)
    meta = json.loads(Path(written[1]).read_text())
    assert meta["class_names"] == trained.class_names and meta["preprocessing"]["crop"] == 32
    if onnx:
        import onnxruntime

        (got,) = onnxruntime.InferenceSession(written[2]).run(None, {"images": images.numpy()})
        assert torch.allclose(torch.from_numpy(got), want, atol=1e-4)
    # a model as training holds it (SyncBatchNorm): reverted, exported, the same outputs
    synced = convert_sync_batchnorm(load_trained_model(best).model)
    assert any(isinstance(m, SyncBatchNorm) for m in synced.modules())
    with torch.no_grad():
        assert torch.allclose(export_program(synced, images[:2]).module()(images), want, atol=1e-5)


@pytest.mark.slow
def test_predicted_masks_score_the_runs_val_miou_and_a_segmentation_model_exports(tmp_path) -> None:
    from scripts.export import export
    from scripts.predict import predict

    folder = make_segmentation_folder(tmp_path / "seg", train=6, val=5, num_classes=4)
    args = [f"output_dir={tmp_path / 'run'}", "data.name=segmentation_folder", f"data.root={folder}",
            "model.num_classes=4", "model.kwargs={width: 8}", "data.image_size=24", "data.batch_size=2",
            "data.val_batch_size=1", "data.num_workers=0", "train.epochs=2", "train.progress_bar=false",
            "train.tensorboard=false"]  # fmt: skip
    rc, out, err = run_train_preloaded(args, config=SEGMENTATION)
    assert rc == 0, err[-3000:]
    best = tmp_path / "run" / "checkpoints" / "best.pt"
    record = torch.load(best, weights_only=True)["train_state"]["history"][-1]
    masks = predict(["--checkpoint", str(best), str(folder / "val" / "images"), "--out", str(tmp_path / "masks")])
    inter, union = torch.zeros(4), torch.zeros(4)
    for path in masks:
        pred = torch.from_numpy(np.array(Image.open(path)))
        truth = torch.from_numpy(np.array(Image.open(folder / "val" / "masks" / Path(path).name)))
        keep = truth != 255
        for c in range(4):
            inter[c] += ((pred == c) & (truth == c) & keep).sum()
            union[c] += (((pred == c) | (truth == c)) & keep).sum()
    present = union > 0
    assert len(masks) == 5 and 100 * (inter[present] / union[present]).mean().item() == pytest.approx(
        record["val_miou"], abs=1e-4)
    written = export(["--checkpoint", str(best), "--out", str(tmp_path / "seg_model")])
    program = torch.export.load(written[0])
    assert program.module()(torch.randn(3, 3, 24, 24)).shape == (3, 4, 24, 24)


def test_the_default_jobs_model_exports_and_predict_says_what_input_it_takes(tmp_path) -> None:
    """After the three commands: a run on generated samples exports (for tensors like its samples); predict, which
    takes image files, says so in one line."""
    from scripts.export import export
    from scripts.predict import main as predict_main

    bad = tiny_overrides(tmp_path / "bad", train__epochs=1, data__channels=1)
    rc, _, err = run_train_preloaded(bad)  # a model for 3 channels: one line naming the keys
    assert rc == 1 and error_lines(err) == ["error: data.channels: the images have 1 channels but the model's first "
                                            "layer takes 3; make them agree (data.channels, or the model's input "
                                            "channels in model.kwargs, e.g. in_channels or in_chans)"], err[-3000:]
    args = tiny_overrides(tmp_path / "run", train__epochs=1, data__channels=1, model__kwargs="{width: 4, in_channels: 1}")
    rc, _, err = run_train_preloaded(args)
    assert rc == 0, err[-3000:]
    best = str(tmp_path / "run" / "checkpoints" / "best.pt")
    written = export(["--checkpoint", best, "--out", str(tmp_path / "model")])
    meta = json.loads(Path(written[1]).read_text())
    assert meta["preprocessing"] is None and meta["input"].startswith("float32 (N, 1, 32, 32)"), meta
    assert torch.export.load(written[0]).module()(torch.randn(3, 1, 32, 32)).shape == (3, 10)
    assert predict_main(["--checkpoint", best, str(tmp_path)]) == 1
