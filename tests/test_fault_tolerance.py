"""Never lose a run: exact resume after SIGKILL, preemption by signal, torchrun restarts, world-size change.

The run tests launch the real entry script on 2 gloo processes (synthetic data,
shuffling and augmentation on) and check what a user relies on: the exit code,
the checkpoint on disk, and that the continued run ends where an uninterrupted
one does, to the bit. The last test checks the agreement those stops rest on
(stop signal, non-finite loss) directly, over real collectives on 3 processes.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch

from engine.runtime.agreement import Agreement, start_agreement
from engine.runtime.preemption import EXIT_PREEMPTED
from engine.runtime.spawn import spawn
from tests.helpers.jobs import (
    REPO_ROOT,
    child_env,
    run_train,
    run_train_preloaded,
    start_train,
    tiny_overrides,
    wait_for_file,
    wait_job,
    worker_pids,
    worker_rank,
)

pytestmark = pytest.mark.slow

# 256 samples / (16 per process x 2) = 8 steps per epoch, 16 in all; checkpoints at steps 3, 6, 9, 12, 15 and epoch ends
STEPS = 16


def exact_args(output_dir: Path, **extra: object) -> list[str]:
    """One config for the reference and the interrupted runs: only ``debug.*`` differs."""
    return tiny_overrides(output_dir, data__num_workers=1, data__augment=True, train__checkpoint_every_steps=3,
                          train__keep_checkpoints=3, **extra)


def load_last(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"tensors differ after resume: {different[:5]}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """The uninterrupted 2-process run's final checkpoint."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    rc, out, err = run_train(exact_args(run_dir), nproc=2)
    assert rc == 0, err[-3000:]
    return load_last(run_dir)


def test_sigkill_mid_epoch_then_resume_is_bit_identical(reference: dict, tmp_path: Path) -> None:
    """SIGKILL of rank 0 at step 11 (epoch 2), resume from the step-9 checkpoint: the same weights, bit for bit."""
    run_dir = tmp_path / "run"
    fault = dict(debug__fault_kind="sigkill", debug__fault_rank=0, debug__fault_step=11, debug__fault_once=True)
    rc, out, err = run_train(exact_args(run_dir, **fault), nproc=2)
    assert rc != 0, "the killed job reported success"
    killed = load_last(run_dir)
    assert (killed["train_state"]["epoch"], killed["train_state"]["step"], killed["train_state"]["epoch_step"]) == (1, 9, 1)
    assert len(killed["rng"]) == 2 and killed["world_size"] == 2 and killed["global_batch"] == 32
    on_one_process = tmp_path / "one_process"
    shutil.copytree(run_dir, on_one_process)

    rc, out, err = run_train(exact_args(run_dir, **fault), nproc=2)  # the same command again
    assert rc == 0, err[-3000:]
    assert "resumed from" in out and "step 9" in out
    final = load_last(run_dir)
    assert final["train_state"]["step"] == STEPS
    assert_same_weights(final["model"], reference["model"])
    assert_same_weights(final["optimizer"]["state"][0], reference["optimizer"]["state"][0])

    # another world size with the same global batch (1 x 32 instead of 2 x 16): allowed, with a warning
    args = tiny_overrides(on_one_process, data__batch_size=32, train__checkpoint_every_steps=3)
    rc, out, err = run_train_preloaded(args)
    assert rc == 0, err[-3000:]
    assert "resumed a 2-process run on 1 process:" in out
    assert load_last(on_one_process)["train_state"]["step"] == STEPS  # continued at the same sample, not at the epoch start


@pytest.mark.parametrize(
    ("kind", "rank", "says"),
    [
        ("raise", 1, "injected fault on rank 1 at step 11"),
        # rank 0 holds the run-dir lock: the restarted rank 0 takes over the dead holder's lock (its loader worker
        # may hold it a few seconds longer); torchrun reports the SIGKILL (-9) of local rank 0 before restarting
        ("sigkill", 0, "failed (exitcode: -9) local_rank: 0"),
    ],
    ids=["rank-1-raises", "rank-0-sigkilled"],
)
def test_max_restarts_resumes_after_a_crash(reference: dict, tmp_path: Path, kind: str, rank: int, says: str) -> None:
    """torchrun --max-restarts=1: a rank fails at step 11, all workers restart, resume from step 9, finish exact."""
    run_dir = tmp_path / "run"
    fault = dict(debug__fault_kind=kind, debug__fault_rank=rank, debug__fault_step=11, debug__fault_once=True)
    # torchrun shares its rendezvous TCPStore with the workers by default, and restarted gloo workers then read the
    # dead round's addresses ("Connection refused" in connectFullMesh; pytorch/pytorch#135712): opt out, as users must
    env = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    rc, out, err = run_train(exact_args(run_dir, **fault), nproc=2, env=env, launcher_args=["--max-restarts=1"])
    assert rc == 0, err[:3000] + "\n[...]\n" + err[-3000:]  # the first attempt's failure too, not only the last
    assert says in err
    assert "resumed from" in out
    final = load_last(run_dir)
    assert final["train_state"]["step"] == STEPS
    assert_same_weights(final["model"], reference["model"])


def test_sigterm_on_one_rank_preempts_all(tmp_path: Path) -> None:
    """SIGTERM to rank 1 only: both ranks stop at one step, rank 0 saves, both exit 75; the relaunch finishes."""
    run_dir = tmp_path / "run"
    # 1024 samples / 32 = 32 steps in one epoch: the signal lands well inside training
    args = tiny_overrides(run_dir, data__num_train=1024, train__epochs=1, train__checkpoint_every_steps=4)
    proc = start_train(args, nproc=2)
    try:
        workers = worker_pids(proc.pid, 2)
        wait_for_file(run_dir / "checkpoints" / "last.pt", proc)
        rank1 = next(pid for pid in workers if worker_rank(pid) == 1)
        os.kill(rank1, signal.SIGTERM)  # a real signal to one non-zero rank, not an injected fault
    finally:
        rc, out, err = wait_job(proc, timeout=90)
    assert rc != 0
    assert "stop signal received: checkpoint saved at step" in out, out[-3000:] + err[-3000:]
    stopped_at = int(out.split("checkpoint saved at step ")[1].split(";")[0])
    assert 0 < stopped_at < 32
    # torchrun's report: the first rank out exited 75; it then SIGTERMs any rank still tearing down (-15), never worse
    codes = [line.split(":")[1].split()[0] for line in err.splitlines() if line.strip().startswith("exitcode")]
    assert str(EXIT_PREEMPTED) in codes and set(codes) <= {str(EXIT_PREEMPTED), "-15"}, err[-3000:]
    saved = load_last(run_dir)
    assert saved["train_state"]["step"] == stopped_at

    rc, out, err = run_train(args, nproc=2)
    assert rc == 0, err[-3000:]
    assert f"step {stopped_at}" in out and "resumed from" in out
    assert load_last(run_dir)["train_state"]["step"] == 32


def test_sigusr1_single_process_exits_75(tmp_path: Path) -> None:
    """SIGUSR1 (SLURM's --signal) to a plain single-process run: checkpoint, exit code 75 for the scheduler."""
    run_dir = tmp_path / "run"
    args = tiny_overrides(run_dir, data__num_train=2048, train__checkpoint_every_steps=4)
    proc = start_train(args, nproc=1)
    try:
        wait_for_file(run_dir / "checkpoints" / "last.pt", proc)
        proc.send_signal(signal.SIGUSR1)
    finally:
        rc, out, err = wait_job(proc, timeout=90)
    assert rc == EXIT_PREEMPTED, err[-3000:]
    stopped_at = int(out.split("checkpoint saved at step ")[1].split(";")[0])
    assert load_last(run_dir)["train_state"]["step"] == stopped_at


def test_nan_loss_between_agreements_stops_before_the_next_checkpoint(tmp_path: Path) -> None:
    """NaN on rank 1 at step 3, ranks agreeing only before checkpoints (every 3 steps): both ranks stop at the
    agreement before the step-6 checkpoint, name step 3, and the last checkpoint on disk is the clean one of step 3."""
    run_dir = tmp_path / "run"
    args = tiny_overrides(run_dir, train__checkpoint_every_steps=3, train__agree_every_steps=100,
                          debug__fault_kind="nan", debug__fault_rank=1, debug__fault_step=3)
    rc, out, err = run_train(args, nproc=2)
    assert rc != 0
    assert "loss is NaN or infinite at step 3" in err, err[-3000:]
    saved = load_last(run_dir)
    assert saved["train_state"]["step"] == 3
    assert all(t.isfinite().all() for t in saved["model"].values() if t.is_floating_point())


# per step, each rank's loss sum; rank 2 receives a stop signal between the two agreements
AGREEMENT_LOSSES = [[1.0, 2.0, 3.0], [1.0, float("inf"), 3.0], [float("nan"), 2.0, 3.0],
                    [1.0, float("inf"), float("-inf")]]


def _agreement_worker(rank: int, world_size: int) -> list[Agreement]:
    """Agree on step 0 alone, then on a window of steps 0-3, as the trainer does between its agreements."""
    losses = [torch.tensor(step[rank]) for step in AGREEMENT_LOSSES]
    first = start_agreement(False, losses[:1], [10 + rank])()
    return [first, start_agreement(rank == 2, losses, [10 + rank, 20, 30 + rank, 5])()]


def test_every_rank_agrees_on_stop_and_non_finite_loss_whichever_rank_saw_it() -> None:
    per_rank = spawn(_agreement_worker, 3)
    assert repr(per_rank[0]) == repr(per_rank[1]) == repr(per_rank[2])  # repr: NaN != NaN
    first, rest = per_rank[0]
    assert first == Agreement(stop=False, loss_sums=[6.0], counts=[33])
    assert first.first_nonfinite() is None
    assert rest.stop and rest.counts == [33, 60, 93, 15]
    # inf, NaN, and inf + -inf on different ranks: each of those steps' sum is non-finite; the first is reported
    assert [math.isfinite(total) for total in rest.loss_sums] == [True, False, False, False]
    assert rest.first_nonfinite() == 1


def test_the_launch_script_returns_the_workers_75_when_signalled(tmp_path: Path) -> None:
    """torchrun exits 1 when signalled; scripts/launch_single_node.sh returns what its workers said (75: a checkpoint
    was saved), so a requeue loop (`[ $? -eq 75 ]`) works; a normal end is 0."""
    import subprocess

    run_dir = tmp_path / "run"
    args = tiny_overrides(run_dir, data__num_train=1024, train__epochs=1, train__checkpoint_every_steps=4)
    script = [str(REPO_ROOT / "scripts" / "launch_single_node.sh"), "2", "--config", str(REPO_ROOT / "configs" /
              "default.yaml"), *args]  # fmt: skip
    proc = subprocess.Popen(["bash", *script], env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)  # fmt: skip
    try:
        wait_for_file(run_dir / "checkpoints" / "last.pt", proc)
        os.kill(proc.pid, signal.SIGTERM)  # the script only, as a scheduler signals the batch step's process
    finally:
        rc, out, err = wait_job(proc, timeout=90)
    assert rc == EXIT_PREEMPTED, f"rc {rc}\n{out[-2000:]}\n{err[-3000:]}"
    assert "stop signal received: checkpoint saved at step" in out
    proc = subprocess.Popen(["bash", *script], env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)  # fmt: skip
    rc, out, err = wait_job(proc, timeout=90)
    assert rc == 0 and "resumed from" in out, err[-3000:]
