"""The uint8 image path: files decoded right (or named in one line), augmentation drawn from today's distributions,
normalisation on the device equal to normalisation in the worker, and a JPEG folder that learns and resumes
bit-identically."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data.images import DECODERS, RandomResizedCropFile, decode_image
from data.transforms import IMAGENET_MEAN, IMAGENET_STD, classification_preprocessing
from engine.config import DataConfig
from engine.errors import SampleError
from engine.inputs import InputPrep
from tests.helpers.jobs import REPO_ROOT, killed_and_resumed, metric_records, run_train
from tests.helpers.photos import make_awkward_files, make_photo_folder, photo

IMAGEFOLDER = str(REPO_ROOT / "configs" / "imagefolder.yaml")


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """3 classes (a photograph, a render, a logo), 16 training and 6 validation JPEGs each, 96x72."""
    return make_photo_folder(tmp_path_factory.mktemp("photos"))


def _as_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)


# --------------------------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("decoder", DECODERS)
def test_awkward_files_are_decoded_right_or_named_in_one_line(tmp_path, decoder) -> None:
    files = make_awkward_files(tmp_path)
    with Image.open(files["reference.png"]) as image:
        rgb, gray = _as_tensor(image), torch.from_numpy(np.asarray(image.convert("L")).copy())

    def decoded(name: str) -> torch.Tensor:
        out = decode_image(str(files[name]), decoder)
        assert out.dtype == torch.uint8 and out.shape == (3, 90, 120), (name, out.dtype, out.shape)
        return out

    assert (decoded("cmyk.jpg").float() - rgb.float()).abs().mean() < 4  # JPEG's loss, not inverted ink
    assert (decoded("gray.jpg").float() - gray.float()).abs().mean() < 2
    assert torch.equal(decoded("gray16.png"), gray.expand(3, -1, -1))  # 16 bits scaled to 8, not clipped
    with Image.open(files["palette.png"]) as image:  # the palette's own colours (a web palette, dithered)
        assert torch.equal(decoded("palette.png"), _as_tensor(image.convert("RGB")))
    for name in ("truncated.jpg", "not_an_image.jpg"):
        with pytest.raises(SampleError) as caught:
            decode_image(str(files[name]), decoder)
        message = str(caught.value)
        assert message.startswith(f"{files[name]}: cannot decode the image (") and "\n" not in message


def test_reduced_size_decoding_at_evaluation_covers_the_resize(tmp_path) -> None:
    """A large JPEG evaluated at 224 px: decoded at half size (DCT domain), never below the resize, and what
    evaluation makes of it is the full decode's result to within a few levels."""
    path = tmp_path / "large.jpg"
    photo((1024, 768), seed=3).save(path, quality=90)
    preprocessing = classification_preprocessing(DataConfig(image_size=224), IMAGENET_MEAN, IMAGENET_STD)
    reduced = decode_image(str(path), "auto", reduce_to=preprocessing.resize)
    full = decode_image(str(path), "torchvision")
    assert preprocessing.resize <= min(reduced.shape[-2:]) < min(full.shape[-2:])
    transform = preprocessing.transform()
    difference = (transform(reduced).float() - transform(full).float()).abs().mean()
    assert difference < 3, difference


# --------------------------------------------------------------------------------------------- augmentation


def _crop_and_flip(outputs: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(area scale, log aspect ratio, flipped) of each random-resized crop of the 256 x 256 image whose red channel
    is x and green channel y, read back from the output's first and last pixel centres."""
    red, green = outputs[:, 0].float(), outputs[:, 1].float()
    size = outputs.shape[-1]
    span_x = (red[:, :, -1] - red[:, :, 0]).mean(1) * size / (size - 1)
    span_y = (green[:, -1, :] - green[:, 0, :]).mean(1) * size / (size - 1)
    flipped = span_x < 0
    width, height = span_x.abs() + 1, span_y + 1
    return (width * height / 256**2).numpy(), torch.log(width / height).numpy(), flipped.numpy()


def _two_sample_ks(a: np.ndarray, b: np.ndarray) -> float:
    grid = np.sort(np.concatenate([a, b]))
    return float(np.abs(np.searchsorted(np.sort(a), grid, "right") / len(a)
                        - np.searchsorted(np.sort(b), grid, "right") / len(b)).max())  # fmt: skip


@pytest.mark.parametrize("suffix", ["png", "jpg"])
def test_random_resized_crop_and_flip_have_todays_distribution(tmp_path, suffix) -> None:
    """Today's pipeline (PIL image, torchvision v1 RandomResizedCrop + flip) and the uint8 one on the file (its crop
    drawn before decoding; from a JPEG, decoded reduced where the crop allows): crop area, aspect ratio and flip
    from 2,000 draws each (other seeds), the same distributions by a two-sample Kolmogorov-Smirnov test (critical
    value 0.061 at the 0.1 % level)."""
    from torchvision import transforms as v1

    y, x = torch.meshgrid(torch.arange(256), torch.arange(256), indexing="ij")
    image = Image.fromarray(torch.stack([x, y, torch.zeros_like(x)], -1).to(torch.uint8).numpy())
    path = tmp_path / f"coordinates.{suffix}"
    image.save(path, **({"quality": 100, "subsampling": 0} if suffix == "jpg" else {}))
    today = v1.Compose([v1.RandomResizedCrop(32), v1.RandomHorizontalFlip(), v1.PILToTensor()])
    new = RandomResizedCropFile(32, "auto")
    draws = 2000
    old_out, new_out = [], []
    for i in range(draws):
        torch.manual_seed(i)
        old_out.append(today(image))
        torch.manual_seed(10**6 + i)
        new_out.append(new(str(path)))
    old, fresh = _crop_and_flip(torch.stack(old_out)), _crop_and_flip(torch.stack(new_out))
    for name, a, b in (("scale", old[0], fresh[0]), ("log ratio", old[1], fresh[1])):
        assert _two_sample_ks(a, b) < 0.061, name
    assert old[0].min() > 0.0 and old[0].max() <= 1.0 and abs(fresh[2].mean() - 0.5) < 0.04
    assert abs(old[2].mean() - fresh[2].mean()) < 0.05


def test_a_crop_decoded_reduced_is_the_crop_decoded_whole(tmp_path) -> None:
    """The same draws (seed) through a reduced decode (auto) and a full one (torchvision): the same crop of the
    same picture, to within what the DCT-domain reduction blurs."""
    path = tmp_path / "large.jpg"
    photo((1024, 768), seed=5).save(path, quality=92)
    reduced, whole = [], []
    for i in range(40):
        for decoder, out in (("auto", reduced), ("torchvision", whole)):
            torch.manual_seed(i)
            out.append(RandomResizedCropFile(128, decoder)(str(path)).float())
    differences = torch.stack([(a - b).abs().mean() for a, b in zip(reduced, whole)])
    assert differences.max() < 8 and differences.mean() < 3.5, differences  # measured: 5.9 and 2.6 levels


# --------------------------------------------------------------------------------------------- normalisation


def test_normalising_on_the_device_equals_normalising_in_the_worker() -> None:
    """InputPrep on a uint8 batch == torchvision's ToTensor + Normalize per image (the worker-side way)."""
    from torchvision import transforms as v1

    gen = torch.Generator().manual_seed(0)
    batch = torch.randint(0, 256, (4, 3, 20, 24), generator=gen, dtype=torch.uint8)
    worker = v1.Compose([v1.ToTensor(), v1.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    want = torch.stack([worker(image.permute(1, 2, 0).numpy()) for image in batch])
    got = InputPrep(torch.device("cpu"), IMAGENET_MEAN, IMAGENET_STD, channels_last=True)(batch)
    assert got.dtype == torch.float32 and got.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(got, want, rtol=0, atol=2e-6)


# --------------------------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_the_imagefolder_config_learns_on_a_jpeg_folder(tmp_path, photos) -> None:
    out = tmp_path / "run"
    args = [f"output_dir={out}", f"data.root={photos}", "model.name=small_cnn", "model.num_classes=3",
            "data.image_size=32", "data.batch_size=8", "data.num_workers=1", "train.epochs=6", "train.warmup_epochs=0",
            "train.lr=0.02", "train.progress_bar=false", "train.tensorboard=false"]  # fmt: skip
    rc, stdout, stderr = run_train(args, nproc=2, config=IMAGEFOLDER, timeout=300)
    assert rc == 0, stderr[-3000:]
    records = metric_records(out)
    assert records[-1]["val_acc1"] >= 75, [r["val_acc1"] for r in records]  # chance: 33
    assert records[-1]["train_loss"] < records[0]["train_loss"]


@pytest.mark.slow
def test_kill_and_resume_is_bit_identical_on_the_uint8_path_with_every_recipe_knob_on(tmp_path, photos) -> None:
    """Flip, crop, sizes, interpolation, mean/std, TrivialAugment, random erasing, MixUp and CutMix all drawn per
    (seed, epoch, sample) or from the checkpointed RNG: the resumed run is the uninterrupted one, bit for bit."""
    knobs = dict(data__hflip_prob=0.3, data__crop_scale=[0.3, 1.0], data__crop_ratio=[0.5, 2.0], data__train_crop_size=28,
                 data__val_resize_size=36, data__val_crop_size=32, data__interpolation="bicubic", data__mean=[0.4],
                 data__std=[0.3], data__auto_augment="trivialaugment_wide", data__random_erase=0.5,
                 train__mixup_alpha=0.2, train__cutmix_alpha=1.0, train__label_smoothing=0.1)  # fmt: skip
    reference, resumed, _ = killed_and_resumed(tmp_path, data__name="imagefolder", data__root=photos, model__num_classes=0,
                                               data__image_size=32, data__batch_size=4, **knobs)  # fmt: skip
    want, got = reference["model"], resumed["model"]
    assert [k for k in want if not torch.equal(want[k], got[k])] == []
    assert reference["inference"]["preprocessing"]["mean"] == [0.4] and reference["config"]["model"]["num_classes"] == 3
