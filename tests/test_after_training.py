"""After training: pretrained weights fetched once (attempts counted at a proxy), and the run telling what it does
(the banner's image size and weights, a re-planned schedule, the config in TensorBoard, top-5 only where it means
something)."""

from __future__ import annotations

import json

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.helpers.jobs import error_lines, run_train, run_train_preloaded, tiny_overrides
from tests.helpers.proxy import CountingProxy

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
    TensorBoard; training longer says that the schedule is re-planned."""
    out_dir = tmp_path / "run"
    two_classes = {"model.num_classes": 2, "train.epochs": 1, "train.tensorboard": True}
    rc, out, err = run_train_preloaded(tiny_overrides(out_dir, **two_classes))
    assert rc == 0, err[-3000:]
    assert "model small_cnn (2 classes, from scratch) | data synthetic, 32 px |" in out
    (record,) = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert "val_acc1" in record and "val_acc5" not in record and "val_acc5" not in out
    board = EventAccumulator(str(out_dir / "tensorboard")).Reload()
    (text,) = board.Tensors("config/text_summary")
    assert "num_classes: 2" in text.tensor_proto.string_val[0].decode()

    rc, out, err = run_train_preloaded(tiny_overrides(out_dir, **{**two_classes, "train.epochs": 2}))
    assert rc == 0, err[-3000:]
    assert "note: train.epochs 1 -> 2: the learning-rate schedule is re-planned from step 16" in out, out[-2000:]
