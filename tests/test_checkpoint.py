"""Checkpoints: atomic under SIGKILL at any moment, safe to load, found again on resume, RNG state round-trips."""

from __future__ import annotations

import logging
import multiprocessing
import os
import random
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from engine import checkpoint as ckpt
from engine.config import Config, config_to_dict, load_config
from engine.logging import LOGGER_NAME
from engine.runtime import rundir
from tests.helpers.checkpoints import RunsCode


def fake_state(step: int, numel: int = 1024) -> dict:
    """A checkpoint whose every tensor holds ``step``: a torn or mixed file cannot pass :func:`assert_complete`."""
    return {
        "model": {f"layer{i}.weight": torch.full((numel,), float(step)) for i in range(8)},
        "optimizer": {"state": {0: {"momentum_buffer": torch.full((numel,), float(step))}}, "param_groups": []},
        "train_state": {"epoch": step // 10, "step": step},
        "config": {"model": {"name": "small_cnn"}, "train": {"optimizer": "sgd"}},
        "world_size": 2,
        "global_batch": 32,
    }


def assert_complete(path: Path) -> int:
    state = torch.load(path, map_location="cpu", weights_only=True)
    step = state["train_state"]["step"]
    assert set(state["model"]) == {f"layer{i}.weight" for i in range(8)}
    for tensor in [*state["model"].values(), state["optimizer"]["state"][0]["momentum_buffer"]]:
        assert torch.equal(tensor, torch.full_like(tensor, float(step))), f"{path} is torn"
    return step


def save(out: Path, step: int, keep: int = 2, is_best: bool = False) -> str:
    return ckpt.save_checkpoint(fake_state(step), str(out), keep=keep, is_best=is_best)


# --------------------------------------------------------------------------- layout


def test_layout_last_best_and_pruning(tmp_path: Path) -> None:
    for step in range(1, 6):
        save(tmp_path, step, keep=2, is_best=step == 2)
    d = tmp_path / ckpt.CHECKPOINT_DIR
    history = ckpt.history_checkpoints(str(d))
    assert [Path(p).name for p in history] == ["ckpt_e0000_s00000005.pt", "ckpt_e0000_s00000004.pt"]
    assert os.path.samefile(d / "last.pt", history[0])
    assert assert_complete(d / "best.pt") == 2  # kept although pruned from the history
    assert not list(d.glob(".tmp*"))


def test_stale_temporaries_of_a_killed_writer_are_removed(tmp_path: Path) -> None:
    save(tmp_path, 1)
    d = tmp_path / ckpt.CHECKPOINT_DIR
    (d / ".tmp_abc123.pt").write_bytes(b"half a checkpoint")
    (d / ".tmp_link_999_last.pt").write_bytes(b"x")
    save(tmp_path, 2)
    assert not list(d.glob(".tmp*")), "temporaries of a killed writer pile up (a full checkpoint each)"
    assert not rundir.has_run_outputs(str(tmp_path / "elsewhere"))


# --------------------------------------------------------------------------- kill the writer at any moment


def _writer_loop(output_dir: str, start_step: int, started, ready) -> None:
    torch.set_num_threads(1)
    started.set()
    step = start_step
    while True:
        ckpt.save_checkpoint(fake_state(step, numel=128 * 1024), output_dir, keep=2, is_best=step % 3 == 0)
        if step == start_step:
            ready.set()
        step += 1


def test_sigkill_of_the_writer_never_leaves_a_torn_last(tmp_path: Path) -> None:
    """SIGKILL a process saving ~4.5 MB checkpoints in a loop at 16 random moments: last.pt always loads, whole."""
    mp = multiprocessing.get_context("forkserver")
    mp.set_forkserver_preload(["engine.checkpoint"])
    rng = random.Random(0)
    d = tmp_path / ckpt.CHECKPOINT_DIR
    step, kills_mid_save = 0, 0
    for attempt in range(16):
        started, ready = mp.Event(), mp.Event()
        writer = mp.Process(target=_writer_loop, args=(str(tmp_path), step, started, ready), daemon=True)
        writer.start()
        assert started.wait(60), "the writer did not start"
        if attempt == 0:
            assert ready.wait(60), "the writer never finished a first checkpoint"
        time.sleep(rng.uniform(0.0, 0.3))  # a few saves' worth: kills land in writes, fsyncs, renames, links
        os.kill(writer.pid, signal.SIGKILL)
        writer.join(10)
        assert writer.exitcode == -signal.SIGKILL
        kills_mid_save += bool(list(d.glob(".tmp*")))

        last = assert_complete(d / "last.pt")
        assert last >= step - 1
        for path in [*ckpt.history_checkpoints(str(d)), d / "best.pt"]:
            assert_complete(Path(path))
        assert rundir.find_resume_checkpoint(str(tmp_path)) == str(d / "last.pt")
        step = last + 1
    assert kills_mid_save > 0, "no kill landed inside a save; the test proves nothing"


# --------------------------------------------------------------------------- safe loading and fallback


def test_load_runs_no_code(tmp_path: Path) -> None:
    path, marker = tmp_path / "evil.pt", tmp_path / "CODE_RAN"
    torch.save({"model": RunsCode(marker)}, path)
    with pytest.raises(ckpt.CheckpointError, match="evil.pt is unreadable"):
        ckpt.load_checkpoint(str(path))
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_damaged_checkpoint_is_named(tmp_path: Path, damage: str) -> None:
    path = Path(save(tmp_path, 1))
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 3], "garbage": os.urandom(256), "empty": b""}[damage])
    with pytest.raises(ckpt.CheckpointError, match=f"checkpoint {path} is unreadable"):
        ckpt.load_checkpoint(str(path))


def test_truncated_last_falls_back_to_previous_good(tmp_path: Path, caplog) -> None:
    save(tmp_path, 1)
    save(tmp_path, 2)
    d = tmp_path / ckpt.CHECKPOINT_DIR
    with open(d / "last.pt", "r+b") as f:  # in place: the newest history file (same inode) is torn too
        f.truncate(100)
    logger = logging.getLogger(LOGGER_NAME)
    propagate, logger.propagate = logger.propagate, True  # let caplog see the template's logger
    try:
        with caplog.at_level(logging.WARNING, logger=LOGGER_NAME):
            found = rundir.find_resume_checkpoint(str(tmp_path))
    finally:
        logger.propagate = propagate
    assert found == str(d / "ckpt_e0000_s00000001.pt")
    assert str(d / "last.pt") in caplog.text


def test_replaced_last_falls_back_to_newest_history(tmp_path: Path) -> None:
    save(tmp_path, 1)
    save(tmp_path, 2)
    d = tmp_path / ckpt.CHECKPOINT_DIR
    (d / "last.pt").unlink()
    (d / "last.pt").write_bytes(b"PK\x03\x04 not really")
    assert rundir.find_resume_checkpoint(str(tmp_path)) == str(d / "ckpt_e0000_s00000002.pt")


def test_no_good_checkpoint_left(tmp_path: Path) -> None:
    save(tmp_path, 1, keep=1)
    (tmp_path / ckpt.CHECKPOINT_DIR / "last.pt").write_bytes(b"")  # truncates the only history file too
    assert rundir.find_resume_checkpoint(str(tmp_path)) is None
    assert rundir.has_run_outputs(str(tmp_path))  # so a new run there is refused, not started over it


# --------------------------------------------------------------------------- compatibility


def _config(*overrides: str, world: int = 2) -> Config:
    return load_config(None, ["data.batch_size=16", *overrides], world)


def test_run_compatibility() -> None:
    saved = fake_state(1)  # 2 processes x 16, SyncBN over both: global and normalisation batch 32
    saved["config"] = config_to_dict(_config())
    saved["global_batch"] = 32
    assert ckpt.check_run_compatible(saved, _config(), 2, "p") == ""
    moved = ckpt.check_run_compatible(saved, _config("data.batch_size=8", world=4), 4, "p")
    assert moved.startswith("resumed a 2-process run on 4 processes: global batch 32, normalisation batch 32, step 1;")
    with pytest.raises(ckpt.CheckpointError, match="model.name=small_cnn"):
        ckpt.check_run_compatible(saved, _config("model.name=resnet18"), 2, "p")
    with pytest.raises(ckpt.CheckpointError, match="global batch 32"):
        ckpt.check_run_compatible(saved, _config("data.batch_size=32"), 2, "p")
    with pytest.raises(ckpt.CheckpointError, match="train.optimizer=sgd"):
        ckpt.check_run_compatible(saved, _config("train.optimizer=adamw"), 2, "p")
    # groups of 2 ranks at 4 processes normalise over 16: not the run's 32
    with pytest.raises(ckpt.CheckpointError, match="normalised BatchNorm over 32 samples on 2 processes; this run "
                                                   "would over 16 on 4: set syncbn.norm_batch_size=32"):
        ckpt.check_run_compatible(saved, _config("data.batch_size=8", "syncbn.group_size=2", world=4), 4, "p")


def test_model_compatibility() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    ckpt.check_model_compatible(model.state_dict(), model, "p")
    other = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.BatchNorm1d(5))
    with pytest.raises(ckpt.CheckpointError, match="'0.weight' has shape"):
        ckpt.check_model_compatible(other.state_dict(), model, "p")
    with pytest.raises(ckpt.CheckpointError, match="another model"):
        ckpt.check_model_compatible({"fc.weight": torch.zeros(1)}, model, "p")
    prefixed = {f"module._orig_mod.{k}": v for k, v in model.state_dict().items()}
    assert ckpt.strip_prefixes(prefixed).keys() == model.state_dict().keys()


# --------------------------------------------------------------------------- RNG


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path: Path) -> None:
    torch.manual_seed(1)
    random.seed(2)
    np.random.seed(3)
    torch.randn(3)
    random.random()
    np.random.rand()
    path = tmp_path / "rng.pt"
    torch.save({"rng": [ckpt.capture_rng_state()]}, path)
    expected = (torch.randn(5), random.random(), np.random.rand(4))
    torch.manual_seed(99)
    random.seed(99)
    np.random.seed(99)
    ckpt.restore_rng_state(torch.load(path, weights_only=True)["rng"][0])
    again = (torch.randn(5), random.random(), np.random.rand(4))
    assert torch.equal(expected[0], again[0]) and expected[1] == again[1]
    np.testing.assert_array_equal(expected[2], again[2])
