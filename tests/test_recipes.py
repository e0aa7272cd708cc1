"""The data and training knobs a ported recipe needs: each changes what the pipeline produces (flip, crop, sizes,
interpolation, mean and std, the augmentation policies, random erasing, MixUp/CutMix), a key of another task is
refused in one line, an image folder counts its classes, and torchvision's published ResNet-50 recipe loads with
its documented values and runs. (The resume with all of them on: ``test_image_pipeline``; predict with a run's own
mean, std and sizes: ``test_after_training``.)"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from PIL import Image

from data import build_datasets
from data.imagefolder import EvaluationFile, train_transform
from data.images import RandomResizedCropFile
from data.transforms import classification_preprocessing, train_policies
from engine.config import ConfigError, DataConfig, load_config
from engine.inputs import InputPrep
from tasks.classification import ClassificationTask, batch_mix
from tests.helpers.jobs import REPO_ROOT, metric_records, run_train_preloaded
from tests.helpers.photos import make_photo_folder

RECIPE = str(REPO_ROOT / "configs" / "torchvision_resnet50_v2.yaml")


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    return make_photo_folder(tmp_path_factory.mktemp("photos"), train=2, val=1)


def _left_dark_square(path: Path) -> Path:
    """A 48 px square image whose left half is black and right half white: a mirror is told apart at a glance."""
    pixels = torch.zeros(48, 48, 3, dtype=torch.uint8)
    pixels[:, 24:] = 255
    Image.fromarray(pixels.numpy()).save(path)
    return path


def _draws(transform, path: Path, seeds: range) -> list[torch.Tensor]:
    out = []
    for seed in seeds:
        torch.manual_seed(seed)
        out.append(transform(str(path)))
    return out


def test_hflip_prob_zero_never_mirrors_one_always_does(tmp_path) -> None:
    path = _left_dark_square(tmp_path / "half.png")
    whole = {"scale": (1.0, 1.0), "ratio": (1.0, 1.0)}  # the crop is the image: only the flip can change it
    for prob, left_is_dark in ((0.0, True), (1.0, False), (0.5, None)):
        crops = _draws(RandomResizedCropFile(16, "auto", hflip_prob=prob, **whole), path, range(12))
        dark_left = [bool(c[:, :, :8].float().mean() < c[:, :, 8:].float().mean()) for c in crops]
        assert dark_left == [left_is_dark] * 12 if left_is_dark is not None else 0 < sum(dark_left) < 12


def test_crop_scale_and_ratio_bound_the_crop(tmp_path) -> None:
    """A crop of the full area at aspect 1 sees the whole image (both halves); a small one mostly one colour."""
    path = _left_dark_square(tmp_path / "half.png")
    tight = _draws(RandomResizedCropFile(16, "auto", scale=(0.02, 0.03), ratio=(1.0, 1.0), hflip_prob=0), path, range(8))
    assert sum(bool(c.float().std() < 1) for c in tight) >= 6  # within one half: a single colour
    loose = _draws(RandomResizedCropFile(16, "auto", scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip_prob=0), path, range(3))
    assert all(torch.equal(c, loose[0]) for c in loose) and loose[0].float().std() > 100


def test_evaluation_sizes_and_interpolation_follow_the_keys(tmp_path) -> None:
    path = tmp_path / "photo.jpg"
    make_photo_folder(tmp_path / "folder", train=1, val=1)
    next((tmp_path / "folder" / "val").rglob("*.jpg")).rename(path)
    cfg = DataConfig(image_size=32)
    assert (p := classification_preprocessing(cfg, (0.5,), (0.5,))).resize == 37 and p.crop == 32  # 32 / 0.875
    sized = dataclasses.replace(cfg, val_resize_size=50, val_crop_size=40, mean=[0.2], std=[0.3])
    p = classification_preprocessing(sized, (0.5,), (0.5,))
    assert (p.resize, p.crop, p.mean, p.std) == (50, 40, (0.2,), (0.3,))
    assert EvaluationFile(p, "auto")(str(path)).shape == (3, 40, 40)
    bicubic = classification_preprocessing(dataclasses.replace(sized, interpolation="bicubic"), (0.5,), (0.5,))
    assert not torch.equal(EvaluationFile(bicubic, "auto")(str(path)), EvaluationFile(p, "auto")(str(path)))


def test_mean_and_std_are_what_the_device_normalises_with(photos) -> None:
    cfg = DataConfig(name="imagefolder", root=str(photos), mean=[0.25, 0.5, 0.75], std=[0.5, 0.25, 0.125])
    pair = build_datasets(cfg, 3, seed=0)
    assert pair.mean_std == ((0.25, 0.5, 0.75), (0.5, 0.25, 0.125))
    white = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    got = InputPrep(torch.device("cpu"), *pair.mean_std)(white)[0, :, 0, 0]
    assert torch.allclose(got, torch.tensor([1.5, 2.0, 2.0]))  # (1 - mean) / std
    with pytest.raises(Exception, match="data.mean: dataset 'synthetic' yields float tensors"):
        build_datasets(DataConfig(mean=[0.5], std=[0.5], num_train=8, num_val=8), 10, seed=0)


@pytest.mark.parametrize("policy", ["trivialaugment_wide", "randaugment", "augmix", "autoaugment_imagenet",
                                    "autoaugment_cifar10", "autoaugment_svhn"])  # fmt: skip
def test_each_auto_augment_policy_changes_the_training_images(photos, policy) -> None:
    path = next((photos / "train").rglob("*.jpg"))
    base = DataConfig(image_size=24, hflip_prob=0.0)
    plain = train_transform(base, classification_preprocessing(base, (0.5,), (0.5,)))
    cfg = dataclasses.replace(base, auto_augment=policy)
    augmented = train_transform(cfg, classification_preprocessing(cfg, (0.5,), (0.5,)))
    pairs = [(a, b) for a, b in zip(_draws(plain, path, range(6)), _draws(augmented, path, range(6)))]
    assert all(b.dtype == torch.uint8 and b.shape == (3, 24, 24) for _, b in pairs)  # the uint8 path
    assert sum(not torch.equal(a, b) for a, b in pairs) >= 3


def test_auto_augment_parameters_reach_the_policy_and_a_wrong_one_is_named() -> None:
    (policy,) = train_policies(DataConfig(auto_augment="randaugment", auto_augment_kwargs={"num_ops": 3, "magnitude": 5}),
                               (0, 0, 0))  # fmt: skip
    assert (policy.num_ops, policy.magnitude) == (3, 5)
    with pytest.raises(ConfigError, match=r"^data.auto_augment_kwargs: augmix rejected \{'magnitude': 5\}"):
        train_policies(DataConfig(auto_augment="augmix", auto_augment_kwargs={"magnitude": 5}), (0, 0, 0))


def test_random_erase_paints_a_rectangle_of_the_mean_colour() -> None:
    (erase,) = train_policies(DataConfig(random_erase=1.0), (10, 20, 30))
    torch.manual_seed(0)
    image = torch.full((3, 32, 32), 200, dtype=torch.uint8)
    erased = erase(image)
    painted = (erased != image).any(0)
    assert 0 < painted.sum() < 32 * 32
    assert erased[:, painted].unique(dim=1).tolist() == [[10], [20], [30]]


def test_mixup_and_cutmix_give_soft_targets_the_loss_takes() -> None:
    images, labels = torch.randn(8, 3, 16, 16), torch.arange(8) % 4
    for alphas in ((0.2, 0.0), (0.0, 1.0), (0.2, 1.0)):
        mix = batch_mix(4, *alphas)
        torch.manual_seed(1)
        mixed, targets = mix(images, labels)
        assert targets.shape == (8, 4) and torch.allclose(targets.sum(1), torch.ones(8))
        assert (targets.max(1).values < 1).all()  # every row a mixture of two labels
        assert not torch.equal(mixed, images)
    task = ClassificationTask(0.1, 4, batch_mix(4, 0.2, 0.0))
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 4))
    torch.manual_seed(2)
    loss = task.training_loss(model, images, labels)
    torch.manual_seed(2)
    mixed, soft = task.mix(images, labels)  # the same draw: the loss is the soft-target cross-entropy of the mix
    want = torch.nn.functional.cross_entropy(model(mixed), soft, label_smoothing=0.1)
    assert torch.equal(loss, want)
    assert batch_mix(4, 0.0, 0.0) is None


@pytest.mark.parametrize(("overrides", "message"), [
    (["data.scale_range=[1.0, 2.0]"], "data.scale_range: belongs to task segmentation and does nothing for task classification"),
    (["task=segmentation", "data.crop_scale=[0.5, 1.0]"], "data.crop_scale: belongs to task classification and does nothing"),
    (["task=contrastive", "train.mixup_alpha=0.2"], "train.mixup_alpha: belongs to task classification and does nothing "
                                                     "for task contrastive"),
    (["task=detection", "data.mean=[0.5]", "data.std=[0.5]"], "data.mean: belongs to task classification or contrastive "
                                                               "or segmentation and does nothing for task detection"),
    (["data.auto_augment=randaugment", "data.augment=false"], "data.auto_augment: needs data.augment: true"),
    (["data.mean=[0.5]"], "data.std: needs as many values as data.mean"),
])  # fmt: skip
def test_a_key_that_does_nothing_for_the_task_is_refused_in_one_line(overrides, message) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_an_image_folder_counts_its_classes_when_num_classes_is_0(photos, tmp_path) -> None:
    from data import with_dataset_classes

    def classes(*overrides: str) -> int:
        return with_dataset_classes(load_config(None, ["data.name=imagefolder", *overrides])).model.num_classes

    assert classes(f"data.root={photos}", "model.num_classes=0") == 3
    assert classes(f"data.root={photos}", "model.num_classes=5") == 5  # a number: kept (then checked against the data)
    assert classes(f"data.root={tmp_path}", "model.num_classes=0") == 0  # no folder yet: building the data says so
    assert load_config(str(REPO_ROOT / "configs" / "imagefolder.yaml")).model.num_classes == 0
    with pytest.raises(ConfigError, match="^train.best_metric: top-5 accuracy needs more than 5 classes"):
        classes(f"data.root={photos}", "model.num_classes=0", "train.best_metric=val_acc5")  # 3 class folders
    with pytest.raises(Exception, match=r"model.num_classes is 5 but dataset 'imagefolder' .* has 3 classes \(set "
                                        r"model.num_classes=3, or 0 to take the dataset's\)"):
        build_datasets(DataConfig(name="imagefolder", root=str(photos)), 5, seed=0)


def test_torchvisions_resnet50_recipe_has_its_published_values_and_runs_two_steps(photos, tmp_path) -> None:
    cfg = load_config(RECIPE, world_size=8)
    d, t = cfg.data, cfg.train
    assert (cfg.model.name, d.batch_size, d.global_batch_size) == ("resnet50", 128, 1024)  # --batch-size 128 x 8
    assert (d.train_crop_size, d.val_resize_size, d.val_crop_size, d.interpolation) == (176, 232, 224, "bilinear")
    assert (d.auto_augment, d.random_erase, d.hflip_prob) == ("trivialaugment_wide", 0.1, 0.5)
    assert (t.lr, t.lr_scaling, t.epochs, t.schedule, t.warmup_epochs) == (0.5, "none", 600, "cosine", 5)
    assert (t.optimizer, t.momentum, t.weight_decay, t.label_smoothing) == ("sgd", 0.9, 2e-5, 0.1)
    assert (t.mixup_alpha, t.cutmix_alpha, t.ema_every) == (0.2, 1.0, 32)
    assert t.ema_decay == pytest.approx(1 - (1 - 0.99998) * 8 * 128 * 32 / 600)  # torchvision's adjustment

    out = tmp_path / "smoke"
    rc, stdout, stderr = run_train_preloaded(
        [f"output_dir={out}", f"data.root={photos}", "data.global_batch_size=0", "data.batch_size=3",
         "data.num_workers=0", "data.train_crop_size=48", "data.val_resize_size=56", "data.val_crop_size=48",
         "train.epochs=1", "train.progress_bar=false", "train.tensorboard=false"], config=RECIPE)  # fmt: skip
    assert rc == 0, stderr[-3000:]
    assert "lr 0.5 (train.lr as written)" in stdout and "data imagefolder, 48 px |" in stdout
    assert "[2/2]" in stdout  # 6 images, 3 a step
    (record,) = metric_records(out)
    assert {"val_acc1", "val_acc1_ema"} <= record.keys()


def test_a_rate_the_model_cannot_take_is_named_in_the_first_epoch(tmp_path) -> None:
    """A loss that climbs far above its first value in the first epoch is a warning naming the rate (it used to end
    as a quiet chance-level accuracy); a healthy run says nothing of the kind."""
    from tests.helpers.jobs import tiny_overrides

    rc, out, err = run_train_preloaded(tiny_overrides(tmp_path / "wild", model__kwargs="{width: 16}", train__lr=80,
                                                      train__warmup_epochs=0, train__epochs=1,
                                                      train__agree_every_steps=1))  # fmt: skip
    assert rc == 0, err[-3000:]
    warnings = [line for line in (out + err).splitlines() if "training is diverging at lr" in line]
    assert len(warnings) == 1 and "with small_cnn; lower train.lr" in warnings[0], out[-2000:]  # the rate and the model
    rc, out, err = run_train_preloaded(tiny_overrides(tmp_path / "calm", model__kwargs="{width: 16}", train__epochs=1,
                                                      train__agree_every_steps=1))  # fmt: skip
    assert rc == 0 and "diverging" not in out + err
