"""A task of the user's own, added as docs/tasks.md says (one file in ``tasks/`` plus its import, nothing in ``engine/``),
runs the whole life of a run: it trains on 2 processes with an exact score, its metric picks ``best.pt``, a SIGKILL
mid-epoch resumes bit-identically, and ``scripts/predict.py`` describes images with it.

The task file is docs/tasks.md's block, so the documented example is the tested one. Its dataset (multi-hot labels: a
bright quadrant per class) is a user's dataset file beside it, on uint8 images with an evaluation preprocessing so
that prediction on image files works.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers.jobs import REPO_ROOT, child_env, copy_repository, error_lines, run_train, tiny_overrides, torch_load

pytestmark = pytest.mark.slow

SIDE, CLASSES = 16, 4
DATASET = f'''
import torch

from data.registry import DatasetPair, register_dataset
from data.transforms import Preprocessing
from engine.config import DataConfig

QUADRANTS = ["top_left", "top_right", "bottom_left", "bottom_right"]


def quadrant_image(labels: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """uint8 (3, {SIDE}, {SIDE}): a bright quadrant for each label that is on."""
    image = noise.clone()
    half = {SIDE} // 2
    for k, on in enumerate(labels.tolist()):
        if on:
            rows, cols = divmod(k, 2)
            image[:, rows * half : (rows + 1) * half, cols * half : (cols + 1) * half] += 150
    return image


@register_dataset("quadrants")
def build_quadrants(cfg: DataConfig, num_classes: int, seed: int) -> DatasetPair:
    generator = torch.Generator().manual_seed(seed)

    def split(count: int) -> torch.utils.data.TensorDataset:
        labels = (torch.rand(count, {CLASSES}, generator=generator) < 0.4).float()
        noise = torch.randint(0, 100, (count, 3, {SIDE}, {SIDE}), generator=generator, dtype=torch.uint8)
        images = torch.stack([quadrant_image(y, n) for y, n in zip(labels, noise)])
        return torch.utils.data.TensorDataset(images, labels)

    preprocessing = Preprocessing((0.3, 0.3, 0.3), (0.3, 0.3, 0.3), resize={SIDE}, crop={SIDE})
    return DatasetPair(split(cfg.num_train), split(cfg.num_val), {CLASSES}, class_names=QUADRANTS,
                       preprocessing=preprocessing)
'''


def _readme_task_file() -> str:
    blocks = re.findall(r"```python\n(# tasks/multilabel\.py\n.*?)```", (REPO_ROOT / "docs" / "tasks.md").read_text(), re.S)
    assert len(blocks) == 1, "docs/tasks.md shows tasks/multilabel.py once"
    return blocks[0]


@pytest.fixture(scope="module")
def user_repo(tmp_path_factory) -> Path:
    """The repository as a user leaves it after adding the task and its dataset: two new files, two import lines."""
    repo = copy_repository(tmp_path_factory.mktemp("own_task") / "repo")
    (repo / "tasks" / "multilabel.py").write_text(_readme_task_file())
    (repo / "data" / "quadrants.py").write_text(DATASET)
    for package, module in (("tasks", "multilabel"), ("data", "quadrants")):
        init = repo / package / "__init__.py"
        init.write_text(init.read_text() + f"from {package} import {module}  # noqa: E402, F401  isort: skip\n")
    return repo


def _overrides(run: Path, **extra: object) -> list[str]:
    keys = dict(task="multilabel", data__name="quadrants", model__num_classes=CLASSES, data__image_size=SIDE,
                train__lr=0.5, train__epochs=3, train__checkpoint_every_steps=3, data__augment=False)  # fmt: skip
    return tiny_overrides(run, **(keys | extra))


def _validation_images() -> torch.Tensor:
    from engine.config import DataConfig

    namespace: dict = {}
    exec(DATASET.replace('@register_dataset("quadrants")', ""), namespace)  # the run's split, built here
    pair = namespace["build_quadrants"](DataConfig(num_train=256, num_val=128, image_size=SIDE), CLASSES, 0)
    return pair.val.tensors


def _normalised(images: torch.Tensor) -> torch.Tensor:
    return ((images.float() / 255) - 0.3) / 0.3


def _average_precision_by_hand(model: torch.nn.Module) -> float:
    """mAP of ``model`` on the validation split computed here, in one process, the textbook way: per class, the
    precision at each positive sample's rank (no ties in float scores), averaged over the positives."""
    images, labels = _validation_images()
    with torch.no_grad():
        scores = model(_normalised(images))
    aps = []
    for c in range(CLASSES):
        ranked = labels[scores[:, c].argsort(descending=True), c].double()
        hits = ranked.cumsum(0)
        positives = ranked.nonzero().squeeze(1)
        aps.append((hits[positives] / (positives + 1)).mean().item())
    return 100 * sum(aps) / len(aps)


def test_a_task_of_ones_own_trains_scores_exactly_resumes_and_predicts(user_repo: Path, tmp_path: Path) -> None:
    assert not any("multilabel" in p.read_text() for p in (REPO_ROOT / "engine").rglob("*.py"))

    # 1. uninterrupted, 2 processes
    rc, out, err = run_train(_overrides(tmp_path / "reference"), nproc=2, cwd=user_repo, timeout=240)
    assert rc == 0, err[-3000:]
    records = [json.loads(line) for line in (tmp_path / "reference" / "metrics.jsonl").read_text().splitlines()]
    assert {"val_loss", "val_map"} <= records[0].keys() and "done: best val_map" in out, out[-2000:]
    assert records[-1]["val_map"] > 90, records  # it learned the quadrants: BCE and the scorer are wired right
    reference = torch_load(tmp_path / "reference" / "checkpoints" / "last.pt")
    assert reference["config"]["train"]["best_metric"] == "val_map"

    # the run's score is the exact one: every rank's samples once, whatever the split
    from engine.config import ModelConfig
    from models import build_model

    model = build_model(ModelConfig(num_classes=CLASSES, kwargs={"width": 4}), "classification")
    model.load_state_dict({k.removeprefix("module."): v for k, v in reference["model"].items()})
    assert records[-1]["val_map"] == pytest.approx(_average_precision_by_hand(model.eval()), abs=1e-9)

    # 2. SIGKILLed mid-epoch (step 13, after the step-12 checkpoint), then the same command again
    killed = _overrides(tmp_path / "run", debug__fault_kind="sigkill", debug__fault_step=13, debug__fault_once=True)
    rc, _, err = run_train(killed, nproc=2, cwd=user_repo, timeout=240)
    assert rc != 0, "the fault did not fire"
    rc, out, err = run_train(killed, nproc=2, cwd=user_repo, timeout=240)
    assert rc == 0 and "resumed from" in out, err[-3000:]
    resumed = torch_load(tmp_path / "run" / "checkpoints" / "last.pt")
    for key, value in reference["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    assert (tmp_path / "run" / "checkpoints" / "best.pt").exists()

    # 3. predict describes image files with the task's own format: the classes the model gives >= 1/2, as here
    from torchvision.io import write_png

    best = torch_load(tmp_path / "run" / "checkpoints" / "best.pt")
    model.load_state_dict({k.removeprefix("module."): v for k, v in best["model"].items()})
    images = _validation_images()[0][:4]
    for i, image in enumerate(images):
        write_png(image, str(tmp_path / f"{i}.png"))
    done = subprocess.run([sys.executable, "scripts/predict.py", "--checkpoint", str(tmp_path / "run" / "checkpoints"
                           / "best.pt"), *(str(tmp_path / f"{i}.png") for i in range(4)), "--out",
                           str(tmp_path / "p.jsonl")],
                          cwd=user_repo, env=child_env(), capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    predicted = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    with torch.no_grad():
        probabilities = model(_normalised(images)).sigmoid()
    names = ["top_left", "top_right", "bottom_left", "bottom_right"]
    assert [r["classes"] for r in predicted] == [[n for n, p in zip(names, row) if p >= 0.5] for row in probabilities]
    assert torch.tensor([r["probabilities"] for r in predicted]) == pytest.approx(probabilities, abs=1e-5)
    assert len(done.stdout.splitlines()) == 4 and "%" in done.stdout

    # 4. export and BatchNorm recalibration take the task as any other
    for script in (["scripts/export.py", "--checkpoint", str(tmp_path / "run" / "checkpoints" / "best.pt"), "--out",
                    str(tmp_path / "exported" / "model")],
                   ["scripts/recalibrate_bn.py", "--config", str(tmp_path / "run" / "config.yaml"), "--checkpoint",
                    str(tmp_path / "run" / "checkpoints" / "best.pt"), "syncbn.precise_bn_samples=64"]):  # fmt: skip
        done = subprocess.run([sys.executable, *script], cwd=user_repo, env=child_env(), capture_output=True,
                              text=True, timeout=180)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "exported" / "model.json").read_text())["task"] == "multilabel"
    assert "val_map" in done.stdout and (tmp_path / "run" / "checkpoints" / "best_recalibrated.pt").exists()


def test_a_task_without_a_prediction_format_says_so_in_one_line(user_repo: Path, tmp_path: Path) -> None:
    """The same task with its ``predict`` removed still trains; predict refuses it by name, not as classification."""
    text = (user_repo / "tasks" / "multilabel.py").read_text()
    stripped = re.sub(r"    def predict\(.*?return results\n", "", text, flags=re.S)
    assert stripped != text
    (user_repo / "tasks" / "multilabel.py").write_text(stripped)
    try:
        rc, _, err = run_train(_overrides(tmp_path / "run", train__epochs=1), cwd=user_repo, timeout=120)
        assert rc == 0, err[-3000:]
        done = subprocess.run([sys.executable, "scripts/predict.py", "--checkpoint", str(tmp_path / "run" /
                               "checkpoints" / "last.pt"), str(user_repo / "configs")], cwd=user_repo,
                              env=child_env(), capture_output=True, text=True, timeout=120)  # fmt: skip
    finally:
        (user_repo / "tasks" / "multilabel.py").write_text(text)
    assert done.returncode == 1 and error_lines(done.stderr) == [
        f"error: {tmp_path / 'run' / 'checkpoints' / 'last.pt'}: task multilabel has no prediction format (give its "
        "class in tasks/ a predict method)"
    ], done.stderr[-2000:]
