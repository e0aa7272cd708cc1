"""Bad input never hangs, never damages an existing run, and always ends in one line naming the problem.

Each case runs the real entry script and asserts: a non-zero exit of the whole job
within a deadline, an ``error...`` line on stderr holding a distinctive substring
(the key, file or rank at fault), and, for cases aimed at an existing run
directory, byte-identical files before and after. Config, data and checkpoint
cases run in one process (forked from a preloaded server: the same code path as
``python train_distributed.py``); cases about ranks and launchers run under torchrun.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests.helpers.checkpoints import RunsCode
from tests.helpers.jobs import (
    error_lines,
    is_alive,
    run_train,
    run_train_preloaded,
    start_train,
    tiny_overrides,
    wait_for_file,
    wait_job,
    worker_pids,
)
from tests.helpers.segmentation import make_voc

DEADLINE_S = 90.0  # any case: a hang is a failure, not a slow pass


@dataclass
class Env:
    """What a case may point at: a scratch dir, a finished run to protect, a small image folder."""

    tmp: Path
    run_dir: Path  # a copy of a finished tiny run (single process, global batch 16)
    images: Path  # imagefolder with 3 classes
    marker: Path  # created only if injected code ran


@dataclass
class Case:
    id: str
    args: Callable[[Env], list[str]]
    expect: str  # substring of an error line
    nproc: int = 1
    config: Callable[[Env], str] | None = None
    protects_run: bool = False  # hash run_dir before/after
    launcher_args: tuple[str, ...] = ()
    crash: bool = False  # an exception in a rank: its traceback, not a one-line error, names the problem
    code: int = 1  # the documented exit code: 1 a bad input, 2 a bad command line


def tiny(env: Env, *extra: str, out: str = "out") -> list[str]:
    return [*tiny_overrides(env.tmp / out), *extra]


def on_run(env: Env, *extra: str) -> list[str]:
    return [*tiny_overrides(env.run_dir, train__epochs=1), *extra]


def write(env: Env, name: str, content: str | bytes) -> str:
    path = env.tmp / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(path)


def truncated_copy(env: Env) -> str:
    data = (env.run_dir / "checkpoints" / "last.pt").read_bytes()
    return write(env, "truncated.pt", data[: len(data) // 2])


def copy_of_last(env: Env) -> str:
    """The run's own weights, but from outside its checkpoints folder: a new run, not a resume."""
    return shutil.copy(env.run_dir / "checkpoints" / "last.pt", env.tmp / "copy.pt")


def truncate_all(env: Env) -> list[str]:
    for path in (env.run_dir / "checkpoints").glob("*.pt"):
        with open(path, "r+b") as f:
            f.truncate(64)
    return []


def malicious_checkpoint(env: Env) -> str:
    path = env.tmp / "evil.pt"
    torch.save({"model": RunsCode(env.marker)}, path)
    return str(path)


def foreign_checkpoint(env: Env) -> str:
    path = env.tmp / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, path)
    return str(path)


def empty_image_root(env: Env) -> str:
    for split in ("train", "val"):
        (env.tmp / "empty_images" / split).mkdir(parents=True, exist_ok=True)
    return str(env.tmp / "empty_images")


def file_in_the_way(env: Env) -> str:
    (env.tmp / "file.txt").write_text("not a directory")
    return str(env.tmp / "file.txt" / "sub")


def bad_voc(env: Env, defect: str | None, *extra: str) -> list[str]:
    """A tiny VOC-format dataset with ``defect`` (see ``make_voc``; None: none), trained by small_segnet."""
    root = make_voc(env.tmp / "voc", defect=defect)
    return tiny(env, "task=segmentation", "model.name=small_segnet", "model.num_classes=21", "data.name=voc",
                f"data.root={root}", "data.image_size=16", "data.batch_size=2", *extra)


SINGLE = [
    Case("unknown_key", lambda e: tiny(e, "train.epoch=3"), "did you mean 'train.epochs'"),
    Case("unknown_section", lambda e: tiny(e, "trian.epochs=3"), "unknown config key 'trian'"),
    Case("wrong_type_int", lambda e: tiny(e, "train.epochs=three"), "train.epochs: expected int"),
    Case("wrong_type_bool", lambda e: tiny(e, "data.augment=maybe"), "data.augment: expected bool"),
    Case("section_not_mapping", lambda e: tiny(e, "train=5"), "train: expected a mapping"),
    Case("bad_choice", lambda e: tiny(e, "train.amp=fp8"), "train.amp: 'fp8' is not one of off, bf16, fp16"),
    Case("zero_batch", lambda e: tiny(e, "data.batch_size=0"), "data.batch_size: must be >= 1"),
    Case("negative_batch", lambda e: tiny(e, "data.batch_size=-4"), "data.batch_size: must be >= 1"),
    Case("bn_batch_of_one_without_syncbn", lambda e: tiny(e, "syncbn.enabled=false", "data.batch_size=1"),
         "BatchNorm needs >= 2 samples"),
    Case("negative_lr", lambda e: tiny(e, "train.lr=-0.1"), "train.lr: must be > 0"),
    Case("missing_config", lambda e: tiny(e), "config file not found", config=lambda e: str(e.tmp / "nope.yaml")),
    Case("non_yaml_config", lambda e: tiny(e), "is not valid YAML",
         config=lambda e: write(e, "bad.yaml", "model: [unclosed\n  name: {\n")),
    Case("binary_config", lambda e: tiny(e), "bin.yaml",
         config=lambda e: write(e, "bin.yaml", b"\x89PNG\r\n\x1a\n\x00\xff\xfe\x80")),
    Case("config_not_mapping", lambda e: tiny(e), "must hold a mapping",
         config=lambda e: write(e, "list.yaml", "- a\n- b\n")),
    Case("python_tag_in_config", lambda e: tiny(e), "python/object/apply:os.system",
         config=lambda e: write(e, "evil.yaml", f"train: !!python/object/apply:os.system ['touch {e.marker}']\n")),
    Case("python_tag_in_override",
         lambda e: tiny(e, f"train.resume=!!python/object/apply:os.system [touch {e.marker}]"), "malformed override"),
    Case("override_without_value", lambda e: tiny(e, "train.epochs"),
         "error: malformed override 'train.epochs': expected section.key=value", code=2),
    Case("config_file_without_--config", lambda e: tiny(e, "configs/imagefolder.yaml"),
         "did you mean --config configs/imagefolder.yaml?", code=2),
    Case("misspelled_option", lambda e: ["--confg", "configs/default.yaml", *tiny(e)], "unrecognized arguments: --confg",
         code=2),
    Case("override_empty_key_part", lambda e: tiny(e, "train..epochs=3"), "malformed override"),
    Case("override_into_a_value", lambda e: tiny(e, "train.epochs.x=3"), "'epochs' is not a section"),
    Case("missing_data_root", lambda e: tiny(e, "data.name=imagefolder", f"data.root={e.tmp}/no_such_root"),
         "data.root: folder not found"),
    Case("empty_image_folder", lambda e: tiny(e, "data.name=imagefolder", f"data.root={empty_image_root(e)}"),
         "holds no images"),
    Case("unknown_model", lambda e: tiny(e, "model.name=resnet51"), "unknown model 'resnet51'"),
    Case("unknown_dataset", lambda e: tiny(e, "data.name=cifar1000"), "unknown dataset 'cifar1000'"),
    Case("num_classes_mismatch", lambda e: tiny(e, "data.name=imagefolder", f"data.root={e.images}", "model.num_classes=10"),
         "model.num_classes is 10 but dataset 'imagefolder'"),
    Case("bad_model_kwargs", lambda e: tiny(e, "model.kwargs={depth: 3}"),
         "model.kwargs: small_cnn rejected its arguments: SmallCNN.__init__() got an unexpected keyword argument 'depth'"),
    Case("best_metric_of_another_task", lambda e: tiny(e, "task=segmentation", "train.best_metric=val_acc1"),
         "train.best_metric: val_acc1 is not a metric of task segmentation"),
    Case("aux_loss_without_segmentation", lambda e: tiny(e, "model.aux_loss_weight=0.5"),
         "model.aux_loss_weight: belongs to task segmentation and does nothing for task classification"),
    Case("classification_model_for_segmentation", lambda e: tiny(e, "task=segmentation", "model.name=resnet18"),
         "'resnet18' is a classification model but task is segmentation"),
    Case("segmentation_model_for_classification", lambda e: tiny(e, "model.name=small_segnet"),
         "'small_segnet' is a segmentation model but task is classification"),
    Case("mask_of_another_size", lambda e: bad_voc(e, "mask_size"), "2007_000000.png: mask is 37x30 but its image"),
    Case("class_index_beyond_num_classes", lambda e: bad_voc(e, "class_index"),
         "2007_000000.png: class index 30 >= model.num_classes 21"),
    Case("missing_split_file", lambda e: bad_voc(e, "no_val_list"), "ImageSets/Segmentation/val.txt not found"),
    Case("one_image_through_deeplab_image_pooling_without_syncbn",
         lambda e: bad_voc(e, None, "model.name=deeplabv3_mobilenet_v3_large", "model.kwargs={}", "data.batch_size=1",
                           "syncbn.enabled=false"), "a BatchNorm layer got one value per channel (input torch.Size([1, "),
    Case("fewer_samples_than_a_batch", lambda e: tiny(e, "data.num_train=8"), "no full step"),
    Case("unwritable_output_dir", lambda e: [*tiny(e), f"output_dir={file_in_the_way(e)}"], "output_dir: cannot write"),
    Case("missing_checkpoint", lambda e: tiny(e, f"train.resume={e.tmp}/none.pt"), "checkpoint not found"),
    Case("truncated_checkpoint", lambda e: tiny(e, f"train.resume={truncated_copy(e)}"), "truncated.pt is unreadable"),
    Case("checkpoint_with_code", lambda e: tiny(e, f"train.resume={malicious_checkpoint(e)}"), "evil.pt is unreadable"),
    Case("not_a_checkpoint_of_ours", lambda e: tiny(e, f"train.resume={foreign_checkpoint(e)}"), "holds no 'model'"),
    Case("eval_only_without_checkpoint", lambda e: tiny(e, "train.eval_only=true"),
         "train.eval_only: no {out}/checkpoints/last.pt to evaluate; train first"),
    # against a finished run: refuse, and leave every byte of it alone
    Case("resume_none_over_a_run", lambda e: on_run(e, "train.resume=none"), "already holds a run", protects_run=True),
    Case("checkpoint_of_another_model", lambda e: on_run(e, "model.kwargs={width: 8}"), "is for another model",
         protects_run=True),
    Case("other_global_batch", lambda e: on_run(e, "data.batch_size=8"), "global batch 16", protects_run=True),
    Case("other_optimizer", lambda e: on_run(e, "train.optimizer=adamw"),
         "was trained with train.optimizer=sgd, this run uses adamw", protects_run=True),
    Case("every_checkpoint_truncated", lambda e: [*truncate_all(e), *on_run(e)], "unreadable: best.pt, ckpt_e",
         protects_run=True),
    Case("foreign_checkpoint_into_a_run", lambda e: on_run(e, f"train.resume={copy_of_last(e)}"),
         "already holds a run", protects_run=True),
]
if not torch.cuda.is_available():
    SINGLE.append(Case("nccl_without_gpu", lambda e: tiny(e, "dist.backend=nccl"), "nccl needs CUDA"))

MULTI = [
    Case("more_processes_than_samples", lambda e: tiny(e, "data.num_train=1"), "no full step", nproc=2),
    Case("syncbn_group_not_dividing_world", lambda e: tiny(e, "syncbn.group_size=3"), "does not divide", nproc=2),
    Case("rank_raises_in_first_forward",
         lambda e: tiny(e, "debug.fault_kind=raise", "debug.fault_rank=1", "debug.fault_step=0"),
         "injected fault on rank 1 at step 0", nproc=2, crash=True),
    Case("rank_raises_mid_epoch",
         lambda e: tiny(e, "debug.fault_kind=raise", "debug.fault_rank=1", "debug.fault_step=5"),
         "injected fault on rank 1 at step 5", nproc=2, crash=True),
    Case("nan_loss_on_one_rank",
         lambda e: tiny(e, "debug.fault_kind=nan", "debug.fault_rank=1", "debug.fault_step=3"),
         "loss is NaN or infinite at step 3", nproc=2),
]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A tiny finished single-process run (1 epoch, checkpoints every 4 steps, 2 kept)."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    args = tiny_overrides(run_dir, train__epochs=1, train__checkpoint_every_steps=4, train__keep_checkpoints=2)
    rc, out, err = run_train_preloaded(args, timeout=DEADLINE_S)
    assert rc == 0, err
    return run_dir


@pytest.fixture(scope="module")
def image_root(tmp_path_factory) -> Path:
    """``root/{train,val}/<class>/*.png`` with 3 classes of 8x8 images."""
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    for split in ("train", "val"):
        for c, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (8, 8), colour).save(folder / f"{i}.png")
    return root


def tree_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``, by relative path (new, lost or changed files all show); the run
    directory's lock file names its latest holder, so it is the one file a later launch may rewrite."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != "run.lock")
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def make_env(tmp_path: Path, finished_run: Path, image_root: Path) -> Env:
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    return Env(tmp_path, run_dir, image_root, tmp_path / "CODE_RAN")


def assert_failed_cleanly(rc: int, err: str, expect: str, single: bool, crash: bool = False, code: int = 1) -> None:
    assert rc == code, f"exit code {rc} for a bad input, not the documented {code}\n{err[-3000:]}"
    lines = err.splitlines() if crash else error_lines(err)
    assert any(expect in line for line in lines), f"no error line with {expect!r}; stderr:\n{err[-3000:]}"
    if single:
        assert "Traceback" not in err, err[-3000:]
        assert len(lines) == 1, lines


@pytest.mark.parametrize("case", SINGLE, ids=[c.id for c in SINGLE])
def test_bad_input_single_process(case: Case, tmp_path: Path, finished_run: Path, image_root: Path) -> None:
    env = make_env(tmp_path, finished_run, image_root)
    args = case.args(env)
    config = case.config(env) if case.config else None
    before = tree_hashes(env.run_dir)
    rc, out, err = run_train_preloaded(args, timeout=DEADLINE_S, config=config)
    assert_failed_cleanly(rc, err, case.expect.replace("{out}", str(env.tmp / "out")), single=True, code=case.code)
    assert not env.marker.exists(), "code from a config or checkpoint ran"
    out = env.tmp / "out"  # a start that failed before training leaves nothing; a run that began keeps its config
    assert not out.exists() or (out / "config.yaml").exists(), f"a failed start left {sorted(out.iterdir())}"
    if case.protects_run:
        assert tree_hashes(env.run_dir) == before, "the existing run's files changed"


@pytest.mark.slow
@pytest.mark.parametrize("case", MULTI, ids=[c.id for c in MULTI])
def test_bad_input_two_processes(case: Case, tmp_path: Path) -> None:
    env = Env(tmp_path, tmp_path / "run", tmp_path / "images", tmp_path / "CODE_RAN")
    start = time.monotonic()
    rc, out, err = run_train(case.args(env), nproc=case.nproc, timeout=DEADLINE_S, launcher_args=case.launcher_args)
    assert_failed_cleanly(rc, err, case.expect, single=False, crash=case.crash, code=case.code)
    assert time.monotonic() - start < DEADLINE_S


@pytest.mark.slow
def test_rank_that_dies_brings_the_job_down(tmp_path: Path) -> None:
    """A rank that exits hard mid-epoch (no exception, no goodbye) ends the job well before dist.timeout_s."""
    args = tiny_overrides(tmp_path / "run", debug__fault_kind="exit", debug__fault_rank=1, debug__fault_step=3,
                          dist__timeout_s=60)
    start = time.monotonic()
    rc, out, err = run_train(args, nproc=2, timeout=DEADLINE_S)
    assert rc != 0
    assert "exitcode" in err and ": 3" in err, err[-3000:]  # torchrun names the rank that died and its code
    assert time.monotonic() - start < 45


def test_port_already_in_use(tmp_path: Path) -> None:
    """A rendezvous port held by another process: the launch fails within the deadline instead of hanging."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        port = held.getsockname()[1]
        launcher = ["--rdzv-backend=static", "--nnodes=1", "--node-rank=0", "--master-addr=127.0.0.1",
                    f"--master-port={port}"]
        start = time.monotonic()
        rc, out, err = run_train(tiny_overrides(tmp_path / "run"), nproc=2, timeout=DEADLINE_S, launcher_args=launcher)
    assert rc != 0
    assert str(port) in err or "address already in use" in err.lower(), err[-3000:]
    assert time.monotonic() - start < 60
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_ctrl_c_stops_the_whole_job(tmp_path: Path) -> None:
    """SIGINT to the job's process group (a terminal's Ctrl-C) ends every process; what was saved stays loadable."""
    run_dir = tmp_path / "run"
    proc = start_train(tiny_overrides(run_dir, train__epochs=50, train__checkpoint_every_steps=2), nproc=2)
    try:
        workers = worker_pids(proc.pid, 2)
        wait_for_file(run_dir / "checkpoints" / "last.pt", proc)
        os.killpg(proc.pid, signal.SIGINT)
    finally:
        rc, out, err = wait_job(proc, timeout=60)
    assert rc != 0
    assert err.count("interrupted: the same command resumes from the last checkpoint") == 1, err[-3000:]  # rank 0
    for pid in workers:
        assert not is_alive(pid), f"worker {pid} outlived the launcher"
    torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
