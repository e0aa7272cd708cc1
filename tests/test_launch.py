"""Every way people launch the script, each a real job of processes over gloo, plus its outputs."""

from __future__ import annotations

import gc
import os
import pickle
import socket
import stat
import subprocess
import sys
import weakref

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from engine.runtime.distributed import cleanup
from engine.runtime.spawn import spawn
from tests.helpers.jobs import TRAIN_SCRIPT, child_env, metric_records, run_train, run_train_preloaded, tiny_overrides, wait_job

CONFIG = "configs/default.yaml"
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=child_env(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def wait_all(procs: list[subprocess.Popen], timeout: float = 120) -> list[tuple[int, str, str]]:
    results = [wait_job(p, timeout) for p in procs]
    for rc, out, err in results:
        assert rc == 0, f"exit {rc}\n{out[-2000:]}\n{err[-3000:]}"
    return results


def assert_trained(output_dir, world_size: int, launcher: str, stdout: str) -> None:
    assert f"world size {world_size} ({launcher})" in stdout, stdout[-2000:]
    assert stdout.count("== DDP + SyncBN template") == 1  # rank 0 only
    state = torch.load(os.path.join(output_dir, "checkpoints", "last.pt"), weights_only=True)
    assert state["world_size"] == world_size


def test_single_process_outputs_and_auto_resume(tmp_path):
    out = tmp_path / "run"
    rc, stdout, stderr = run_train(tiny_overrides(out, train__tensorboard=True), nproc=1)
    assert rc == 0, stderr
    assert_trained(out, 1, "single", stdout)
    assert "backend none" in stdout
    assert stderr.count("\n") < 5, stderr  # no warnings or tracebacks on a clean run
    assert not (out / "run.lock").exists()  # a run that ended has no holder to name

    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["output_dir"] == str(out) and resolved["train"]["epochs"] == 2
    records = metric_records(out)
    assert [r["epoch"] for r in records] == [1, 2]
    for record in records:
        assert set(record) == {"epoch", "train_loss", "val_loss", "val_acc1", "val_acc5", "lr", "samples_per_s",
                               "train_time_s", "epoch_time_s"}
        assert 0 < record["train_time_s"] < record["epoch_time_s"]  # throughput excludes the evaluation
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(out / "tensorboard"))

    for name in ("last.pt", "best.pt"):
        state = torch.load(out / "checkpoints" / name, weights_only=True)
        assert {"model", "optimizer", "scheduler", "scaler", "train_state", "config"} <= set(state)
        assert not any(k.startswith(("module.", "_orig_mod.")) for k in state["model"])
        assert state["config"]["model"]["name"] == "small_cnn"
    last = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert last["train_state"]["epoch"] == 2 and last["train_state"]["step"] == 2 * (256 // 16)

    # the same command with more epochs continues the run instead of starting over
    rc, stdout, stderr = run_train(tiny_overrides(out, train__epochs=3), nproc=1)
    assert rc == 0, stderr
    assert "resumed from" in stdout and "epoch 3, step 32" in stdout
    records = metric_records(out)
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert torch.load(out / "checkpoints" / "last.pt", weights_only=True)["train_state"]["step"] == 48


def test_torchrun_two_processes(tmp_path):
    out = tmp_path / "run"
    rc, stdout, stderr = run_train(tiny_overrides(out, train__epochs=1), nproc=2)
    assert rc == 0, stderr
    assert_trained(out, 2, "torchrun", stdout)
    assert "backend gloo" in stdout and "synchronised over all 2 ranks" in stdout
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in state["model"])  # saved from the unwrapped model


def test_legacy_launch_passes_local_rank_dash(tmp_path):
    """``python -m torch.distributed.launch`` (deprecated, still common) passes ``--local-rank=N``."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.launch", "--nproc_per_node=2", f"--master_port={free_port()}",
           TRAIN_SCRIPT, "--config", CONFIG, *tiny_overrides(out, train__epochs=1)]
    ((_, stdout, _),) = wait_all([start(cmd)])
    assert_trained(out, 2, "torch.distributed.launch", stdout)


def test_legacy_local_rank_underscore_argument(tmp_path):
    """Old launchers pass ``--local_rank N`` and set no LOCAL_RANK: the argument must be honoured."""
    out = tmp_path / "run"
    port = free_port()
    procs = []
    for rank in range(2):
        env = {"RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        cmd = [sys.executable, TRAIN_SCRIPT, "--local_rank", str(rank), "--config", CONFIG,
               *tiny_overrides(out, train__epochs=1)]
        procs.append(start(cmd, env))
    results = wait_all(procs)
    assert_trained(out, 2, "torch.distributed.launch", results[0][1])
    assert results[1][1] == ""  # rank 1 prints nothing


@pytest.mark.parametrize("rendezvous", ["static", "c10d"])
def test_two_nodes_on_loopback(tmp_path, rendezvous):
    """Two torchrun "nodes" of one process each, meeting on 127.0.0.1."""
    out = tmp_path / "run"
    port = free_port()
    procs = []
    for node_rank in range(2):
        if rendezvous == "static":
            launcher = ["--nnodes=2", f"--node_rank={node_rank}", "--master_addr=127.0.0.1", f"--master_port={port}"]
        else:
            launcher = ["--nnodes=2", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=loop"]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", *launcher, TRAIN_SCRIPT,
               "--config", CONFIG, *tiny_overrides(out, train__epochs=1)]
        procs.append(start(cmd))
    results = wait_all(procs)
    main_out = next(out_ for _, out_, _ in results if "== DDP" in out_)
    assert_trained(out, 2, "torchrun", main_out)


def test_slurm_environment(tmp_path):
    """``srun`` starts every task itself and sets only SLURM_* variables."""
    out = tmp_path / "run"
    port = free_port()
    procs = []
    for rank in range(2):
        env = {"SLURM_PROCID": str(rank), "SLURM_NTASKS": "2", "SLURM_LOCALID": str(rank), "SLURM_JOB_ID": "77",
               "SLURM_JOB_NODELIST": "127.0.0.1", "SLURM_TASKS_PER_NODE": "2", "MASTER_PORT": str(port)}
        cmd = [sys.executable, TRAIN_SCRIPT, "--config", CONFIG, *tiny_overrides(out, train__epochs=1)]
        procs.append(start(cmd, env))
    results = wait_all(procs)
    assert_trained(out, 2, "slurm", results[0][1])


def test_a_finished_run_says_so_and_eval_only_evaluates_its_checkpoints(tmp_path):
    out = tmp_path / "run"
    args = tiny_overrides(out, train__epochs=1, train__tensorboard=True, train__print_freq=4)
    rc, stdout, stderr = run_train_preloaded(args)
    assert rc == 0, stderr
    events = sorted(os.listdir(out / "tensorboard"))
    board = EventAccumulator(str(out / "tensorboard")).Reload()
    steps = {tag: [e.step for e in board.Scalars(tag)] for tag in board.Tags()["scalars"]}
    for tag in ("step/loss", "step/lr", "step/samples_per_s"):  # every print_freq steps: 16 steps in the epoch
        assert steps[tag] == [4, 8, 12, 16], (tag, steps)
    assert steps["val/acc1"] == [1] and steps["train/loss"] == [1]  # and one point per epoch
    umask = os.umask(0)
    os.umask(umask)
    for name in ("last.pt", "best.pt", "config.yaml", "metrics.jsonl"):  # checkpoints too follow the umask
        assert stat.S_IMODE(os.stat(out / name if name.endswith(("yaml", "jsonl")) else out / "checkpoints" / name)
                            .st_mode) == 0o666 & ~umask, name

    rc, stdout, stderr = run_train_preloaded(args)  # the same command again
    assert rc == 0, stderr
    assert "run complete" in stdout and "train.epochs" in stdout and "resumed from" not in stdout
    assert sorted(os.listdir(out / "tensorboard")) == events  # no empty event file per re-run

    for which in ("last", "best"):
        rc, stdout, stderr = run_train_preloaded([*args, "train.eval_only=true", f"train.eval_checkpoint={which}"])
        assert rc == 0, stderr
        assert f"evaluating {out / 'checkpoints' / which}.pt" in stdout and "val_acc1" in stdout

    fresh = tmp_path / "fresh"
    rc, stdout, stderr = run_train_preloaded(tiny_overrides(fresh, train__eval_only=True))
    assert rc == 1 and "train.eval_only: no" in stderr, stderr
    assert not (fresh / "checkpoints").exists()  # an eval-only run leaves nothing behind


def _ddp_outlives_its_frame_until_cleanup(rank: int, world_size: int) -> tuple[bool, bool]:
    def train_a_step() -> weakref.ref:
        model = torch.nn.parallel.DistributedDataParallel(torch.nn.BatchNorm1d(2))
        model(torch.randn(4, 2)).sum().backward()
        return weakref.ref(model)

    gc.disable()  # as when no automatic collection happens to run before the exit
    try:
        ddp = train_a_step()
        alive_after_its_frame = ddp() is not None  # a reference cycle: only a collection frees it
        cleanup()
        return alive_after_its_frame, ddp() is None
    finally:
        gc.enable()


def test_teardown_frees_ddp_and_its_process_group_while_python_runs() -> None:
    """Left to the interpreter's shutdown, DDP (in a reference cycle) and the gloo group it holds are freed after
    Python stopped running threads; a gloo thread that then needs the GIL aborts the finished run (exit -6, about
    one run in twenty in a stress loop before cleanup collected). ``cleanup`` frees them first."""
    assert spawn(_ddp_outlives_its_frame_until_cleanup, 2) == [(True, True), (True, True)]


def _a_tensor(rank: int, world_size: int) -> torch.Tensor:
    return torch.arange(6.0).view(2, 3) + rank


def test_a_rank_result_holding_tensors_is_read_after_the_rank_exited(tmp_path) -> None:
    """The parent of a loaded machine may read a rank's result after the rank exited (seen in CI: FileNotFoundError
    from torch's file-descriptor sharing). Here it always does: the rank is joined before its result is read."""
    import torch.multiprocessing as mp

    from engine.runtime.spawn import _entry

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    rank = ctx.Process(target=_entry, args=(0, 1, str(tmp_path / "pg_init"), 30.0, _a_tensor, (), results))
    rank.start()
    rank.join(timeout=60)
    assert rank.exitcode == 0
    _, ok, payload = results.get(timeout=10)
    assert ok and torch.equal(spawn(_a_tensor, 2)[1], _a_tensor(1, 2))
    assert torch.equal(pickle.loads(payload), _a_tensor(0, 1))


def _slow_fetch_then_a_collective(rank: int, world_size: int) -> float:
    import time

    import torch.distributed as dist

    from engine.comm import fetch_once

    fetch_once(lambda: time.sleep(4), local_rank=rank)  # rank 0 "downloads" for twice the process group's timeout
    value = torch.ones(1)
    dist.all_reduce(value)  # the default group still works afterwards
    return value.item()


def test_the_wait_for_rank_0s_download_is_not_bounded_by_the_collective_timeout() -> None:
    """dist.timeout_s bounds a training collective; a download longer than it is no hang (the other ranks wait in a
    group of their own with FETCH_WAIT_S)."""
    assert spawn(_slow_fetch_then_a_collective, 2, timeout_s=2) == [2.0, 2.0]
