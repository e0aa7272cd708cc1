"""Every stop SLURM can send ends the same way: each rank exits 75 after rank 0's checkpoint is on disk, the job is
requeued, and the next start resumes. The shipped ``scripts/slurm.sbatch`` runs as sbatch would run it, with
stand-ins for ``srun`` and ``scontrol`` on PATH (``tests/helpers/slurm/``: the process tree and signals of a real
srun 22.05, measured on a one-node cluster; docs/fault_tolerance.md has the manual recipe with a real SLURM).
Also: a stop is acted on at the next step, not the next agreement, and a signal during set-up stops the run
before its first step."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from engine.runtime.preemption import EXIT_PREEMPTED
from engine.runtime.spawn import REPO_ROOT, child_env
from tests.helpers.jobs import run_train, tiny_overrides, torch_load, wait_for_file, wait_job, worker_pids

pytestmark = pytest.mark.slow

FAKE_SLURM = REPO_ROOT / "tests" / "helpers" / "slurm"
SBATCH = REPO_ROOT / "scripts" / "slurm.sbatch"


def _sbatch(submit_dir: Path, args: list[str]) -> subprocess.Popen:
    """``scripts/slurm.sbatch ARGS`` as a batch step runs it: from the submission folder (not the repository), 2
    tasks, with the stand-in srun and scontrol."""
    with socket.socket() as s:  # a free port: the script's default derives one from the job id, shared by every test run
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = child_env({"PATH": f"{FAKE_SLURM}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242", "SLURM_NTASKS": "2",
                     "MASTER_PORT": port,
                     "SLURM_SUBMIT_DIR": str(submit_dir), "SLURM_JOB_NODELIST": "localhost", "FAKE_KILL_WAIT": "5",
                     "FAKE_SBATCH_SCRIPT": str(SBATCH), "FAKE_SCONTROL_LOG": str(submit_dir / "scontrol.log")})
    return subprocess.Popen(["bash", str(SBATCH), *args], cwd=submit_dir, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip


def _requeues(submit_dir: Path) -> list[str]:
    log = submit_dir / "scontrol.log"
    return log.read_text().splitlines() if log.exists() else []


def test_the_batch_script_requeues_on_every_stop_and_not_on_a_failure(tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = ["--config", str(REPO_ROOT / "configs" / "default.yaml"),
            *tiny_overrides(run, data__num_train=2048, train__epochs=1, train__checkpoint_every_steps=8)]  # fmt: skip

    # 1. scancel --signal=USR1 reaching one task only; its peer exits after it (srun then ends the peer's step)
    job = _sbatch(tmp_path, args)
    try:
        rank1 = worker_pids(job.pid, 2)[1]
        wait_for_file(run / "checkpoints" / "last.pt", job)
        os.kill(rank1, signal.SIGUSR1)
    finally:
        rc, out, err = wait_job(job, timeout=120)
    assert rc == EXIT_PREEMPTED, f"{out[-2000:]}\n{err[-3000:]}"
    assert "requeueing job 4242" in out and _requeues(tmp_path) == ["requeue 4242"]
    stopped_at = torch_load(run / "checkpoints" / "last.pt")["train_state"]["step"]
    assert 0 < stopped_at < 64 and not (tmp_path / ".slurm_exit_codes" / "4242").exists()

    # 2. the requeued start resumes; a signal to the batch shell itself (#SBATCH --signal=B:USR1@N) reaches the
    #    ranks through srun; 3. the next start is cancelled (scancel: SIGTERM to the batch shell): saved, not requeued
    for number, (sent, requeues) in enumerate([(signal.SIGUSR1, 2), (signal.SIGTERM, 2)]):
        job = _sbatch(tmp_path, args)
        try:
            worker_pids(job.pid, 2)
            deadline = time.monotonic() + 60
            while torch_load(run / "checkpoints" / "last.pt")["train_state"]["step"] <= stopped_at:
                assert job.poll() is None and time.monotonic() < deadline, job.stderr.read()[-3000:]
                time.sleep(0.2)
            os.kill(job.pid, sent)
        finally:
            rc, out, err = wait_job(job, timeout=120)
        assert rc == EXIT_PREEMPTED and "resumed from" in out, f"{out[-2000:]}\n{err[-3000:]}"
        assert len(_requeues(tmp_path)) == requeues, (number, out[-2000:])
        stopped_at = torch_load(run / "checkpoints" / "last.pt")["train_state"]["step"]
    assert "is being ended by SLURM (scancel, time limit or preemption): not requeued here" in out

    # 4. submitted again, it finishes the run: exit 0, no requeue
    job = _sbatch(tmp_path, args)
    rc, out, err = wait_job(job, timeout=120)
    assert rc == 0 and "done: best val_acc1" in out, err[-3000:]
    assert len(_requeues(tmp_path)) == 2 and torch_load(run / "checkpoints" / "last.pt")["train_state"]["step"] == 64

    # 5. a real failure (one rank raises): not requeued, and the script fails
    failing = [*args[:2], *tiny_overrides(tmp_path / "failing", debug__fault_kind="raise", debug__fault_rank=1,
                                          debug__fault_step=3)]  # fmt: skip
    rc, out, err = wait_job(_sbatch(tmp_path, failing), timeout=120)
    assert rc not in (0, EXIT_PREEMPTED) and "not requeued" in out, f"{out[-2000:]}\n{err[-3000:]}"
    assert len(_requeues(tmp_path)) == 2


def test_a_stop_signal_between_agreements_is_acted_on_at_the_next_step(tmp_path: Path) -> None:
    """SIGUSR1 reaching rank 1 alone just before step 14 (agreements every 10 steps): both ranks stop after it, not
    at step 20; and one reaching a rank during set-up, before any step, stops the run there without a step."""
    run = tmp_path / "run"
    args = tiny_overrides(run, data__num_train=1024, train__epochs=1, train__agree_every_steps=10,
                          debug__fault_kind="signal", debug__fault_rank=1, debug__fault_step=13)  # fmt: skip
    rc, out, err = run_train(args, nproc=2)
    assert rc != 0 and "stop signal received: checkpoint saved at step 14;" in out, f"{out[-2000:]}\n{err[-3000:]}"
    assert torch_load(run / "checkpoints" / "last.pt")["train_state"]["step"] == 14


def test_a_stop_signal_during_set_up_exits_75_before_the_first_step(tmp_path: Path) -> None:
    """USR1 to the step 1 s after the ranks start (importing torch, building the model): no rank dies of it; the run
    stops before its first step, exit 75, and the job is requeued."""
    run = tmp_path / "run"
    args = ["--config", str(REPO_ROOT / "configs" / "default.yaml"), *tiny_overrides(run)]
    job = _sbatch(tmp_path, args)
    try:
        worker_pids(job.pid, 2)
        time.sleep(1)
        srun = next(pid for pid in _children(job.pid) if b"srun" in Path(f"/proc/{pid}/cmdline").read_bytes())
        os.kill(srun, signal.SIGUSR1)  # as scancel --signal=USR1: srun passes it to every task
    finally:
        rc, out, err = wait_job(job, timeout=120)
    assert rc == EXIT_PREEMPTED, f"{out[-2000:]}\n{err[-3000:]}"
    assert "stop signal received before the first step; exiting 75" in out, out[-2000:]
    assert _requeues(tmp_path) == ["requeue 4242"] and not (run / "checkpoints" / "last.pt").exists()


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(c) for c in f.read().split()]
