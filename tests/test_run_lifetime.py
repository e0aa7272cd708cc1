"""A run's life and its edges: workers die with their launcher, one live run per output_dir, exactly one metrics
line per finished epoch whatever a kill interrupted, and a rank stuck outside the collectives ends the job.

Real processes and real signals: the entry script is launched as a user would (torchrun, or plain python).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.jobs import (
    REPO_ROOT,
    TRAIN_SCRIPT,
    child_env,
    error_lines,
    is_alive,
    metric_records,
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

STEPS_PER_EPOCH = 16  # tiny_overrides on one process: 256 samples / batch 16


def _wait_until_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(is_alive(pid) for pid in pids):
        time.sleep(0.2)
    return [pid for pid in pids if is_alive(pid)]


def test_sigkill_of_the_launcher_leaves_no_worker_alive(tmp_path: Path) -> None:
    """``kill -9`` of torchrun's process group (workers live in sessions of their own): every worker exits."""
    run_dir = tmp_path / "run"
    proc = start_train(tiny_overrides(run_dir, train__epochs=200), nproc=2)
    try:
        workers = worker_pids(proc.pid, 2)
        wait_for_file(run_dir / "config.yaml", proc)  # training, with the process group and the lock
        os.killpg(proc.pid, signal.SIGKILL)
        left = _wait_until_gone(workers, timeout=15)
    finally:
        for pid in workers:  # never leave an orphan behind, whatever the verdict
            if is_alive(pid):
                os.kill(pid, signal.SIGKILL)
        wait_job(proc, timeout=30)
    assert left == [], f"workers {left} outlived their launcher by 15 s"


def test_a_plain_python_run_dies_with_its_shell(tmp_path: Path) -> None:
    """One process started by a shell: SIGKILL of the shell ends the run (dist.exit_with_launcher, the default)."""
    run_dir = tmp_path / "run"
    script = shlex.join([sys.executable, TRAIN_SCRIPT, *tiny_overrides(run_dir, train__epochs=200)])
    shell = subprocess.Popen(["/bin/sh", "-c", f"{script} & wait"], cwd=REPO_ROOT, env=child_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for_file(run_dir / "config.yaml", shell)
        run = _children(shell.pid)
        assert run, "the shell has no child"
        shell.kill()
        left = _wait_until_gone(run, timeout=15)
    finally:
        with contextlib.suppress(ProcessLookupError):  # the shell's session, should anything be left in it
            os.killpg(shell.pid, signal.SIGKILL)
        shell.wait(timeout=30)
    assert left == [], f"the run {left} outlived its shell by 15 s"


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(c) for c in f.read().split()]


def test_a_second_launch_into_a_live_run_is_refused_and_the_first_finishes(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    first = start_train(tiny_overrides(run_dir, train__epochs=40), nproc=1)
    try:
        wait_for_file(run_dir / "config.yaml", first)
        start = time.monotonic()
        rc, out, err = run_train(tiny_overrides(run_dir, train__epochs=40), nproc=2, timeout=90)
        refused_after = time.monotonic() - start
        assert first.poll() is None, "the first run ended before the second was refused: the test proves nothing"
    finally:
        rc_first, out_first, err_first = wait_job(first, timeout=240)
    assert rc != 0 and refused_after < 60
    lines = error_lines(err)  # every rank fails alike: rank 0 says it once, torchrun's summary names it as the cause
    assert len(lines) == 1 and f"output_dir {run_dir} is in use by a live run" in lines[0], err
    assert f"pid {first.pid}" in lines[0]  # names the holder: host and pid
    assert f"traceback : {lines[0]}" in err and "To enable traceback" not in err
    assert rc_first == 0, err_first[-3000:]
    epochs = [r["epoch"] for r in metric_records(run_dir)]
    assert epochs == list(range(1, 41))


@pytest.mark.parametrize(
    ("point", "step"),
    [
        ("before_checkpoint", STEPS_PER_EPOCH),  # epoch 1 evaluated, not yet saved: it runs again
        ("after_checkpoint", STEPS_PER_EPOCH),  # saved, its metrics line not yet written: restored from the checkpoint
        ("step", STEPS_PER_EPOCH),  # after the metrics line, before epoch 2's first step
        ("after_checkpoint", 2 * STEPS_PER_EPOCH),  # the last epoch: the run is complete, its line is not
    ],
    ids=["before-checkpoint", "after-checkpoint", "after-metrics", "last-epoch-after-checkpoint"],
)
def test_a_kill_around_an_epoch_end_leaves_one_metrics_line_per_epoch(point: str, step: int, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    fault = dict(debug__fault_kind="sigkill", debug__fault_point=point, debug__fault_step=step,
                 debug__fault_once=True)
    rc, out, err = run_train_preloaded(tiny_overrides(run_dir, **fault))
    assert rc == 128 + signal.SIGKILL, f"the fault did not fire: rc {rc}\n{err[-3000:]}"
    rc, out, err = run_train_preloaded(tiny_overrides(run_dir, **fault))  # the same command: resumes
    assert rc == 0, err[-3000:]
    records = metric_records(run_dir)
    assert [r["epoch"] for r in records] == [1, 2]


def test_a_rank_stuck_in_a_step_ends_the_job_naming_itself(tmp_path: Path) -> None:
    """Rank 1 hangs before step 3's forward while rank 0 waits in the collectives: the watchdog ends the job."""
    timeout_s = 10
    args = tiny_overrides(tmp_path / "run", train__epochs=50, dist__step_timeout_s=timeout_s, dist__timeout_s=300,
                          debug__fault_kind="hang", debug__fault_rank=1, debug__fault_step=3)
    start = time.monotonic()
    rc, out, err = run_train(args, nproc=2, timeout=180)
    elapsed = time.monotonic() - start
    assert rc != 0
    stuck = [line for line in error_lines(err) if "no training step finished" in line]
    assert stuck and stuck[0].startswith("error (rank 1):") and "rank 1 is stuck" in stuck[0], err[-3000:]
    assert "at step 3" in stuck[0]
    assert elapsed < timeout_s + 60, f"the job took {elapsed:.0f} s to end"
    # each rank's flight-recorder trace in the run directory, as the error line says: the stuck rank's from its
    # watchdog, the waiting rank's from its failed collective; the waiting rank is inside a collective of step 3
    traces = tmp_path / "run" / "flight_recorder"
    assert f"(its collectives: {traces})" in stuck[0], stuck[0]
    dumped = {path.name: pickle.loads(path.read_bytes()) for path in traces.glob("rank_*")}
    assert set(dumped) == {"rank_0", "rank_1"}, (sorted(dumped), err[-3000:])
    # gloo marks no entry completed; the sequence numbers show the collective rank 1 never reached
    last = {name: max(e["collective_seq_id"] for e in trace["entries"]) for name, trace in dumped.items()}
    assert last["rank_1"] > 0 and last["rank_0"] > last["rank_1"], last
    (first_missed,) = [e for e in dumped["rank_0"]["entries"] if e["collective_seq_id"] == last["rank_1"] + 1]
    assert "train_distributed.py" in str(first_missed["frames"]), first_missed  # with the Python stack that issued it


def test_a_rank_killed_by_a_native_abort_prints_its_python_stack(tmp_path: Path) -> None:
    """A C++ abort (a collective library, a kernel) prints no Python traceback by itself: faulthandler shows where
    each thread of the rank was, above torchrun's summary."""
    run_dir = tmp_path / "run"
    proc = start_train(tiny_overrides(run_dir, train__epochs=200), nproc=2)
    try:
        rank1 = next(pid for pid in worker_pids(proc.pid, 2) if worker_rank(pid) == 1)
        wait_for_file(run_dir / "config.yaml", proc)  # in the training loop
        os.kill(rank1, signal.SIGABRT)
    finally:
        rc, _, err = wait_job(proc, timeout=60)
    assert rc != 0 and "exitcode  : -6" in err, err[-3000:]
    assert "Fatal Python error: Aborted" in err and "Current thread" in err, err[-3000:]
    assert "train_distributed.py" in err.split("Current thread")[1], err[-3000:]  # the main thread's own frames
