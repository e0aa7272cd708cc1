"""A timm model brings the inputs it was made for (its pretrained config's size, interpolation, crop fraction, mean
and std) to an image folder, for the keys the config leaves unset; what the config sets is kept; other models and
datasets are untouched; a fixed-size model meeting data of another size is one line, not an assertion at the first
forward. Run through the entry script: the trained checkpoint evaluates, predicts and exports with the model's
preprocessing."""

from __future__ import annotations

import pytest
import torch
import yaml

from data import model_inputs
from engine.config import ConfigError, config_to_dict, load_config
from tests.helpers.jobs import error_lines, run_train_preloaded, tiny_overrides
from tests.helpers.photos import make_photo_folder

FOLDER = ["data.name=imagefolder", "data.root=/nowhere", "model.num_classes=3"]  # no files needed to load a config


def _data(overrides: list[str], **kwargs) -> dict:
    return config_to_dict(load_config(None, overrides, defaults=model_inputs, **kwargs))["data"]


def _pick(data: dict) -> tuple:
    return data["image_size"], data["mean"], data["std"], data["interpolation"], data["val_resize_size"]


def test_a_timm_model_brings_its_size_interpolation_crop_and_normalisation_to_an_image_folder() -> None:
    # test_vit: 160 px only, mean/std 0.5, bicubic, crop_pct 0.95 -> evaluation resizes to floor(160 / 0.95)
    assert _pick(_data([*FOLDER, "model.name=timm/test_vit"])) == (160, [0.5] * 3, [0.5] * 3, "bicubic", 168)
    # a tagged name is that tag's config: torchvision's weights, bilinear, 224 / 0.875
    imagenet = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    assert _pick(_data([*FOLDER, "model.name=timm/resnet18.tv_in1k"])) == (224, *imagenet, "bilinear", 256)
    assert _pick(_data([*FOLDER, "model.name=timm/resnet18.a1_in1k"])) == (224, *imagenet, "bicubic", 235)
    # built for another size: that size
    assert _data([*FOLDER, "model.name=timm/test_vit", "model.kwargs={img_size: 64}"])["image_size"] == 64


def test_what_the_config_sets_is_kept(tmp_path) -> None:
    data = _data([*FOLDER, "model.name=timm/test_efficientnet", "data.image_size=96", "data.interpolation=bilinear",
                  "data.mean=[0.3]", "data.std=[0.2]", "data.val_crop_size=80"])  # fmt: skip
    assert _pick(data) == (96, [0.3], [0.2], "bilinear", 84)  # the resize from the crop set: floor(80 / 0.95)
    data = _data([*FOLDER, "model.name=timm/test_efficientnet", "data.image_size=96"])
    assert _pick(data)[::4] == (96, 101)  # the crop is the size set: floor(96 / 0.95)
    config = tmp_path / "mine.yaml"  # a key set in the file counts as set, as an override does
    config.write_text(yaml.safe_dump({"data": {"image_size": 128, "val_resize_size": 140}}))
    data = config_to_dict(load_config(str(config), [*FOLDER, "model.name=timm/test_vit", "model.kwargs={img_size: 128}"],
                                      defaults=model_inputs))["data"]  # fmt: skip
    assert (data["image_size"], data["val_resize_size"], data["mean"]) == (128, 140, [0.5] * 3)


@pytest.mark.parametrize("overrides", [
    [*FOLDER, "model.name=resnet18"],  # torchvision's: the dataset's defaults
    ["model.name=timm/test_efficientnet"],  # generated float data: nothing to normalise, its own size
    ["data.name=cifar10", "model.name=timm/test_efficientnet"],  # CIFAR: its stored 32 px and its statistics
])  # fmt: skip
def test_other_models_and_datasets_keep_their_own(overrides) -> None:
    assert _data(overrides) == config_to_dict(load_config(None, overrides))["data"]


def test_a_task_that_does_not_read_a_key_is_not_given_it() -> None:
    """A task of your own that declares its keys (``Task.config_keys``) refuses another task's keys set in a
    config; the model's values for keys it does not read are left out, not refused as if the user had set them."""
    from tasks.registry import TASKS, Task, register_task

    @register_task("inputs_probe")
    class InputsProbe(Task):
        metrics = ("val_score",)
        config_keys = ("train.label_smoothing",)

    try:
        data = _data([*FOLDER, "task=inputs_probe", "model.name=timm/test_vit"])
    finally:
        TASKS.pop("inputs_probe")
    assert (data["image_size"], data["mean"], data["interpolation"]) == (160, [], "bilinear")  # only the size is read


@pytest.mark.parametrize(("overrides", "sizes"), [
    (["model.name=timm/test_vit"], "32 px"),  # the default job's generated 32 px images
    ([*FOLDER, "model.name=timm/test_vit", "data.image_size=128"], "128 px"),
    ([*FOLDER, "model.name=timm/test_vit", "data.train_crop_size=144"], "144 px"),
])  # fmt: skip
def test_a_fixed_size_model_and_data_of_another_size_are_one_line(overrides, sizes) -> None:
    expected = f"takes 160 px images only .* the data gives {sizes}; set data.image_size=160"
    with pytest.raises(ConfigError, match=expected) as error:
        load_config(None, overrides, defaults=model_inputs)
    # building it for the data is offered where the data has one size (a 144 px crop evaluated at 160 has two)
    assert ("{img_size: " in str(error.value)) == ("train_crop_size" not in overrides[-1])
    load_config(None, [*overrides, "model.kwargs={dynamic_img_size: true}"], defaults=model_inputs)  # the other fix


def test_the_entry_script_says_it_in_one_line_before_anything_starts(tmp_path) -> None:
    rc, out, err = run_train_preloaded(tiny_overrides(tmp_path / "vit", model__name="timm/test_vit", model__kwargs=None))
    assert rc == 1 and error_lines(err) == [
        "error: data.image_size: timm/test_vit takes 160 px images only (its input size is fixed), but the data gives "
        "32 px; set data.image_size=160 (and no other crop sizes), or build the model for the data: "
        "model.kwargs={img_size: 32} or model.kwargs={dynamic_img_size: true}"], err[-2000:]  # fmt: skip
    assert not (tmp_path / "vit").exists()
    rc, out, err = run_train_preloaded(tiny_overrides(tmp_path / "vit32", model__name="timm/test_vit",
                                                      model__kwargs="{img_size: 32}", train__epochs=1))  # fmt: skip
    assert rc == 0, err[-3000:]


def test_a_timm_model_trains_evaluates_and_predicts_with_its_own_inputs(tmp_path) -> None:
    """Through the entry script on a JPEG folder with nothing about the inputs in the config: a 160 px-only ViT
    trains (at 32 px, the schema's default, its first forward would fail), and the checkpoint, which predict and
    export read, keeps the model's preprocessing."""
    photos = make_photo_folder(tmp_path / "photos", train=2, val=1)
    out = tmp_path / "run"
    config = tmp_path / "vit.yaml"
    config.write_text(yaml.safe_dump({
        "output_dir": str(out), "model": {"name": "timm/test_vit", "num_classes": 0},
        "data": {"name": "imagefolder", "root": str(photos), "batch_size": 3, "num_workers": 0},
        "train": {"epochs": 1, "progress_bar": False, "tensorboard": False},
    }))  # fmt: skip
    rc, stdout, err = run_train_preloaded([], config=str(config))
    assert rc == 0, err[-3000:]
    assert "data imagefolder, 160 px" in stdout
    saved = yaml.safe_load((out / "config.yaml").read_text())["data"]
    assert _pick(saved) == (160, [0.5] * 3, [0.5] * 3, "bicubic", 168)
    checkpoint = torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert checkpoint["inference"]["preprocessing"] == {"mean": [0.5] * 3, "std": [0.5] * 3, "resize": 168, "crop": 160,
                                                        "interpolation": "bicubic"}  # fmt: skip


def test_images_far_smaller_than_the_model_was_made_for_are_named_once(tmp_path) -> None:
    """Generated data keeps its 32 px; a timm model made for 160 px is warned about it (at this ratio
    efficientnet_b0 on the default job stays at chance), and not at 48 px, more than a quarter of its size."""
    rc, out, err = run_train_preloaded(tiny_overrides(tmp_path / "small", model__name="timm/test_efficientnet",
                                                      model__kwargs=None, train__epochs=1))  # fmt: skip
    assert rc == 0, err[-3000:]
    warnings = [line for line in out.splitlines() if line.startswith("warning: timm/test_efficientnet was made for")]
    assert warnings == ["warning: timm/test_efficientnet was made for 160 px images and gets 32 px (its last feature "
                        "map is 1x1): it may not learn at this size; set data.image_size (its own 160, or more than "
                        "40)"], out[-2000:]  # fmt: skip
    rc, out, err = run_train_preloaded(tiny_overrides(tmp_path / "enough", model__name="timm/test_efficientnet",
                                                      model__kwargs=None, train__epochs=1, data__image_size=48))  # fmt: skip
    assert rc == 0 and "was made for" not in out, err[-3000:]


def test_torchvisions_fixed_size_vit_refusing_the_data_is_one_line(tmp_path) -> None:
    """torchvision's VisionTransformer asserts its size at the first forward: one line naming the key and the fix,
    not the assertion's traceback."""
    rc, out, err = run_train_preloaded(tiny_overrides(tmp_path / "tv", model__name="vit_b_16",
                                                      model__kwargs="{image_size: 64}", train__epochs=1))  # fmt: skip
    assert rc == 1 and error_lines(err) == [
        "error: data.image_size: the model takes 64 px images only but got 32 px; set data.image_size=64 (and no other "
        "crop sizes), or build the model for the data: model.kwargs={image_size: 32}"], err[-2000:]  # fmt: skip
    assert "Traceback" not in err
