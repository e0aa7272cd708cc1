"""The model libraries users bring (timm, segmentation_models_pytorch): every BatchNorm converted right or refused by
name. A census over every timm architecture (on the meta device), outputs of each BatchNorm class timm uses equal
after conversion and after revert, SyncBN over ranks equal to one process with timm's BatchNormAct2d, and both
libraries through the template on 2 processes."""

from __future__ import annotations

import copy
import json
import multiprocessing
import re
import subprocess
import sys
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel as DDP

from engine.bn import (
    GhostBatchNorm,
    GhostBatchNormAct,
    SyncBatchNorm,
    SyncBatchNormAct,
    UnsupportedBatchNorm,
    convert_ghost_batchnorm,
    convert_sync_batchnorm,
    revert_sync_batchnorm,
)
from engine.runtime.comm_debug import count_comm
from engine.runtime.spawn import REPO_ROOT, child_env
from tests.helpers.jobs import error_lines, run_train, run_train_preloaded, tiny_overrides, wait_job
from tests.helpers.syncbn import assert_case_passed, case_id, close

timm = pytest.importorskip("timm")

SYNCED, GHOSTS = (SyncBatchNorm, SyncBatchNormAct), (GhostBatchNorm, GhostBatchNormAct)


# --------------------------------------------------------------------------------------------- the census


def _census_worker(names: list[str]) -> dict:
    """Build each model on the meta device, convert to sync and ghost and back, and report what went wrong."""
    import timm as timm_in_worker

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")

    def unchanged(self, *args, **kwargs):
        return self

    # initialisation on meta tensors computes nothing, but dispatching it costs most of a build: skip it
    for method in ("uniform_", "normal_", "erfinv_", "clamp_", "fill_", "zero_", "mul_", "add_", "copy_", "sub_",
                   "div_", "sqrt_", "exponential_", "random_"):  # fmt: skip
        setattr(torch.Tensor, method, unchanged)
    report = {"models": 0, "with_bn": 0, "kinds": {}, "refused": {}, "problems": []}
    for name in names:
        with torch.device("meta"):
            model = timm_in_worker.create_model(name)
        report["models"] += 1
        before = {path: m for path, m in model.named_modules() if isinstance(m, _BatchNorm)}
        if not before:
            continue
        report["with_bn"] += 1
        for kind in {type(m).__name__ for m in before.values()}:
            report["kinds"][kind] = report["kinds"].get(kind, 0) + 1
        types = {path: type(m) for path, m in before.items()}
        children = {path: dict(m.named_children()) for path, m in before.items()}
        try:
            synced = convert_sync_batchnorm(model)
        except UnsupportedBatchNorm as exc:
            classes = {t.__name__ for t in types.values()}
            if not any(c in str(exc) for c in classes):
                report["problems"].append(f"{name}: refused without naming the class: {exc}")
            report["refused"][name] = str(exc)
            continue
        after = dict(synced.named_modules())
        for path, layer in after.items():
            if isinstance(layer, _BatchNorm) and not isinstance(layer, SYNCED):
                report["problems"].append(f"{name}: {path} stays {type(layer).__name__}, not synchronised")
        for path, kids in children.items():
            if any(getattr(after[path], k, None) is not v for k, v in kids.items()):
                report["problems"].append(f"{name}: {path} lost its children {sorted(kids)}")
        reverted = dict(revert_sync_batchnorm(synced).named_modules())
        wrong = [p for p, t in types.items() if type(reverted[p]) is not t]
        if wrong:
            report["problems"].append(f"{name}: revert did not restore {wrong[:3]}")
        ghosts = dict(convert_ghost_batchnorm(revert_sync_batchnorm(synced), 2).named_modules())
        if any(not isinstance(ghosts[p], GHOSTS) for p in types):
            report["problems"].append(f"{name}: ghost conversion missed a layer")
    return report


@pytest.mark.slow
def test_census_of_every_timm_architecture_on_the_meta_device() -> None:
    """Each BatchNorm-bearing timm architecture converts (every _BatchNorm synchronised, BatchNormAct2d keeping its
    drop and act, revert restoring the classes, ghost conversion complete) or is refused naming the class."""
    names = timm.list_models()
    with multiprocessing.get_context("spawn").Pool(2) as pool:  # a worker per core: the census halves
        reports = pool.map(_census_worker, [names[0::2], names[1::2]])
    problems = [p for r in reports for p in r["problems"]]
    assert problems == [], "\n".join(problems[:20])
    total = {key: sum(r[key] for r in reports) for key in ("models", "with_bn")}
    kinds = {k: sum(r["kinds"].get(k, 0) for r in reports) for k in {k for r in reports for k in r["kinds"]}}
    print(f"timm {timm.__version__}: {total['models']} architectures, {total['with_bn']} with BatchNorm, {kinds}, "
          f"refused: {sorted(k for r in reports for k in r['refused'])}")
    # the census saw what it is about (timm 1.0.31: 1,371 architectures, 743 with BatchNorm, 435 with BatchNormAct2d)
    assert total["models"] == len(names) and total["with_bn"] > 500 and kinds.get("BatchNormAct2d", 0) > 300
    # every class timm's architectures use has a converter: a refusal would mean a new class to register
    refused = {name: why for r in reports for name, why in r["refused"].items()}
    assert refused == {}, list(refused.items())[:5]


def test_a_batchnorm_subclass_with_its_own_forward_is_refused_by_name() -> None:
    """timm's SplitBatchNorm2d (auxiliary BatchNorms per batch split) cannot be synchronised faithfully."""
    from timm.layers import convert_splitbn_model

    model = convert_splitbn_model(timm.create_model("resnet10t", num_classes=3), num_splits=2)
    with pytest.raises(UnsupportedBatchNorm) as caught:
        convert_sync_batchnorm(model)
    message = str(caught.value)
    assert "'bn1' (timm.layers.split_batchnorm.SplitBatchNorm2d)" in message or "SplitBatchNorm2d" in message
    assert "register_batchnorm" in message and "\n" not in message


def test_a_norm_that_keeps_running_stats_but_is_not_batchnorm_is_named_in_a_warning() -> None:
    """InPlaceABN and custom norms are not _BatchNorm: they stay per-process, and the conversion says so."""

    class RunningNorm(nn.Module):  # the shape of inplace_abn's InPlaceABN: running stats, no _BatchNorm
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("running_mean", torch.zeros(3))
            self.register_buffer("running_var", torch.ones(3))

    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), RunningNorm())
    with pytest.warns(UserWarning, match=r"^2 \(.*RunningNorm\) keeps running statistics .* stays per-process"):
        convert_sync_batchnorm(model)


# --------------------------------------------------------------------------------------------- real tensors


def _with_random_statistics(model: nn.Module) -> nn.Module:
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            m.running_mean.copy_(torch.rand(m.num_features, generator=gen) * 2 - 1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return model.eval()


@pytest.mark.parametrize(("name", "size", "kind"), [("mobilenetv3_small_050", 64, "BatchNormAct2d"),
                                                      ("resnet10t", 64, "BatchNorm2d"),
                                                      ("efficientvit_m0", 224, "BatchNorm1d")])  # fmt: skip
def test_each_batchnorm_class_timm_uses_gives_the_same_outputs_after_convert_and_revert(name, size, kind) -> None:
    torch.manual_seed(0)
    model = _with_random_statistics(timm.create_model(name, num_classes=5))
    assert kind in {type(m).__name__ for m in model.modules()}
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        want = model(x)
        synced = convert_sync_batchnorm(copy.deepcopy(model))
        got = synced(x)
        back = revert_sync_batchnorm(synced)(x)
        torch_converted = torch.nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model))(x)
    scale = want.abs().max()
    assert (got - want).abs().max() <= 1e-6 * scale and (back - want).abs().max() <= 1e-6 * scale
    if kind == "BatchNormAct2d":  # what torch's converter does to it: the activations are gone
        assert (torch_converted - want).abs().max() > 1e-2 * scale


# --------------------------------------------------------------------------------------------- over ranks


def _timm_net(seed: int) -> nn.Module:
    """In fp64: BatchNorm over a few images divides by small variances, which fp32 rounding would not survive."""
    torch.manual_seed(seed)
    return timm.create_model("mobilenetv3_small_050", num_classes=3).double()


def _batches(seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """64 px: the last BatchNorms see 2x2 positions per image (at 32 px, one: statistics of 4 values make the
    training chaotic, and a 1e-13 difference grows to 1e-4 in three steps, in any implementation)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 64, 64, generator=gen, dtype=torch.float64), torch.randint(0, 3, (n,), generator=gen)


def timm_syncbn_matches_one_process(rank: int, ws: int) -> None:
    """2 processes x 2 images with SyncBN (BatchNormAct2d -> SyncBatchNormAct) end where 1 process x 4 images with
    the plain timm model ends: weights and running statistics after three SGD steps."""
    errs: list[str] = []
    ref = _timm_net(0)
    model = DDP(convert_sync_batchnorm(copy.deepcopy(ref)), broadcast_buffers=False)
    opt_ref, opt = (torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for m in (ref, model))
    per_rank = 2
    mine = slice(rank * per_rank, (rank + 1) * per_rank)
    for step in range(3):
        x, y = _batches(10 + step, ws * per_rank)
        opt.zero_grad()
        F.cross_entropy(model(x[mine]), y[mine]).backward()
        opt.step()
        opt_ref.zero_grad()
        F.cross_entropy(ref(x), y).backward()
        opt_ref.step()
    for (name, p), p_ref in zip(model.module.named_parameters(), ref.parameters(), strict=True):
        close(errs, f"param {name}", p, p_ref, atol=1e-9)
    for (name, b), b_ref in zip(model.module.named_buffers(), ref.buffers(), strict=True):
        close(errs, f"buffer {name}", b, b_ref, atol=1e-9)
    assert not errs, "\n".join(errs[:10])


def timm_ghost_matches_local_bn_on_ranks(rank: int, ws: int) -> None:
    """Ghost BatchNorm of ws splits in one process == ws ranks of DDP with timm's local BatchNormAct2d."""
    errs: list[str] = []
    ddp = DDP(_timm_net(1))
    ghost = convert_ghost_batchnorm(_timm_net(1), ws)
    x, y = _batches(20, ws * 2)
    mine = slice(rank * 2, (rank + 1) * 2)
    out = ddp(x[mine])
    F.cross_entropy(out, y[mine]).backward()
    out_ghost = ghost(x)
    F.cross_entropy(out_ghost, y).backward()
    close(errs, "output", out_ghost[mine], out, atol=1e-9)
    for (name, p), p_ref in zip(ghost.named_parameters(), ddp.module.parameters(), strict=True):
        close(errs, f"grad {name}", p.grad, p_ref.grad, atol=1e-9)
    assert not errs, "\n".join(errs[:10])


def ddp_inference_on_one_rank(rank: int, ws: int) -> None:
    """torch's test_ddp_inference: SyncBN without running stats in DDP (broadcast_buffers=True), evaluated on rank 0
    alone. The layer owns no buffer, so DDP has nothing to broadcast: no collective, no hang."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU())
    ddp = DDP(convert_sync_batchnorm(model), broadcast_buffers=True)
    assert list(ddp.module.named_buffers()) == []
    if rank == 0:
        ddp.eval()
        with torch.no_grad(), count_comm() as comm:
            out = ddp(torch.randn(2, 3, 8, 8))
        assert out.shape == (2, 4, 6, 6) and comm.collectives == [], comm.collectives
    dist.barrier()


CASES = tuple((case, None) for case in (timm_syncbn_matches_one_process, timm_ghost_matches_local_bn_on_ranks,
                                        ddp_inference_on_one_rank))  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_distributed_case(case) -> None:
    assert_case_passed(CASES, 2, case)


# --------------------------------------------------------------------------------------------- the template


@pytest.mark.slow
def test_a_timm_model_through_the_template_with_precise_bn_and_ema(tmp_path) -> None:
    out = tmp_path / "run"
    args = tiny_overrides(out, **{"model.name": "timm/mobilenetv3_small_050", "model.kwargs": "{}", "train.epochs": 1,
                                  "syncbn.precise_bn_samples": 64, "train.ema_decay": 0.9,
                                  "train.ema_buffers": "precise"})  # fmt: skip
    rc, stdout, stderr = run_train(args, nproc=2, timeout=240)
    assert rc == 0, stderr[-3000:]
    assert "engine.bn.layers.SyncBatchNormAct" in stdout and "PreciseBN: running stats of" in stdout, stdout[-2000:]
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"val_acc1", "val_acc1_ema"} <= set(record) and record["train_loss"] == record["train_loss"]


@pytest.mark.slow
def test_an_smp_unet_with_a_timm_encoder_trains_for_segmentation(tmp_path) -> None:
    out = tmp_path / "run"
    args = tiny_overrides(out, **{"model.name": "smp/Unet", "model.num_classes": 4,
                                  "model.kwargs": "{encoder_name: tu-mobilenetv3_small_050, "
                                                  "decoder_channels: [32, 16, 16, 8, 8]}",
                                  "data.name": "synthetic_segmentation", "data.image_size": 32, "data.batch_size": 2,
                                  "data.num_train": 16, "data.num_val": 8, "train.epochs": 1})  # fmt: skip
    rc, stdout, stderr = run_train(args, nproc=2, timeout=240, config=str(REPO_ROOT / "configs" / "segmentation.yaml"))
    assert rc == 0, stderr[-3000:]
    # the decoder's plain BatchNorm2d and the encoder's BatchNormAct2d, each synchronised as what it is
    assert re.search(r"\d+ x engine\.bn\.layers\.SyncBatchNorm\b(?!Act)", stdout), stdout[-2000:]
    assert re.search(r"\d+ x engine\.bn\.layers\.SyncBatchNormAct\b", stdout), stdout[-2000:]
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert 0 <= record["val_miou"] <= 100


@pytest.mark.parametrize(("overrides", "expect"), [
    ({"model.name": "timm/mobilenetv3_smal_050"}, "model.name: timm has no model 'mobilenetv3_smal_050' (did you "
                                                  "mean 'timm/mobilenetv3_small_050'?)"),
    ({"model.name": "smp/Unet"}, "model.name: smp/Unet is a segmentation model but task is classification; "
                                 "set task: segmentation"),
    ({"model.name": "smp/Unett", "task": "segmentation"}, "(did you mean 'smp/Unet'?)"),
], ids=["misspelled-timm-name", "smp-under-classification", "misspelled-smp-architecture"])
def test_bad_model_library_input_is_one_line(tmp_path, overrides, expect) -> None:
    rc, _, err = run_train_preloaded(tiny_overrides(tmp_path / "out", **overrides))
    lines = error_lines(err)
    assert rc == 1 and len(lines) == 1 and expect in lines[0], err[-3000:]
    assert "Traceback" not in err


def test_pretrained_timm_weights_not_in_the_cache_are_one_line_naming_the_file(tmp_path) -> None:
    """An offline machine with an empty Hugging Face cache: the file and the cache to put it in, once, no traceback."""
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    args = tiny_overrides(tmp_path / "out", **{"model.name": "timm/resnet10t", "model.pretrained": True})
    rc, _, err = run_train(args, nproc=2, env=env)
    lines = error_lines(err)
    assert rc != 0 and len(lines) == 1, err[-3000:]
    assert lines[0].startswith("error: model.pretrained: cannot fetch the weights of timm/resnet10t")
    assert "put model.safetensors of huggingface.co/timm/resnet10t." in lines[0] and f"cache {tmp_path}" in lines[0]


def test_a_users_batchnorm_subclass_is_refused_in_one_line_naming_it(tmp_path) -> None:
    """Through the entry script on 2 processes: which layer, which class, and how to register it; nothing trained."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
               "tests.helpers.custom_batchnorm", "--config", str(REPO_ROOT / "configs" / "default.yaml"),
               *tiny_overrides(tmp_path / "out", **{"model.name": "net_with_custom_bn", "model.kwargs": "{}"})]
    proc = subprocess.Popen(command, cwd=REPO_ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)  # fmt: skip
    rc, _, err = wait_job(proc)
    lines = error_lines(err)
    assert rc != 0 and len(lines) == 1, err[-3000:]
    assert lines[0] == (
        "error: model.name: net_with_custom_bn: BatchNorm layer '1' (tests.helpers.custom_models.ScaledBatchNorm2d) "
        "is a BatchNorm subclass with its own forward, which a synchronised layer would drop; register how to convert "
        "it: engine.bn.register_batchnorm(tests.helpers.custom_models.ScaledBatchNorm2d, family) (README: BatchNorm "
        "layers of your own)")
    assert not list((tmp_path / "out" / "checkpoints").glob("*.pt"))
