"""Launch the real ``train_distributed.py`` as a job of subprocesses, with a hard deadline.

End-to-end tests use it to run the entry script exactly as a user would:

    rc, out, err = run_train(tiny_overrides(tmp_path / "run"), nproc=2)

``nproc == 1`` runs ``python train_distributed.py``; ``nproc > 1`` runs
``python -m torch.distributed.run --standalone --nproc_per_node=N`` (torchrun).
Every job starts in its own session, so on timeout the whole process group
(launcher and workers) is killed and the test fails instead of hanging CI.
``start_train`` returns the live ``Popen`` for tests that signal a running job.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from engine.runtime.spawn import REPO_ROOT, child_env

TRAIN_SCRIPT = str(REPO_ROOT / "train_distributed.py")
DEFAULT_TIMEOUT_S = 120.0


def tiny_overrides(output_dir: str | os.PathLike, **extra: object) -> list[str]:
    """Overrides for a run of a few seconds: small synthetic data, a 4-wide small_cnn, no workers, no TensorBoard.

    ``extra`` adds or replaces keys, with ``__`` for the dot: ``train__epochs=3`` gives ``train.epochs=3``; None
    drops a key.
    """
    values: dict[str, object] = {
        "output_dir": str(output_dir),
        "model.kwargs": "{width: 4}",
        "data.num_train": 256,
        "data.num_val": 128,
        "data.batch_size": 16,
        "data.num_workers": 0,
        "train.epochs": 2,
        "train.print_freq": 1000,
        "train.progress_bar": "false",
        "train.tensorboard": "false",
        "dist.timeout_s": 30,
    }
    for key, value in extra.items():
        values[key.replace("__", ".")] = value
    return [f"{key}={_yaml_text(value)}" for key, value in values.items() if value is not None]


def _yaml_text(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def train_command(
    args: Sequence[str],
    nproc: int = 1,
    launcher_args: Sequence[str] = (),
    config: str | None = None,
    repo: Path = REPO_ROOT,
) -> list[str]:
    """The command line: plain python for one process, torchrun (``--standalone`` unless given) for more.

    ``launcher_args`` go to torchrun (e.g. ``--max-restarts=2``); with them or ``nproc > 1`` torchrun is used.
    ``config`` (default: the repo's ``configs/default.yaml``) becomes ``--config``; pass ``args`` only to omit it.
    ``repo``: the repository whose ``train_distributed.py`` runs (a copy a test changed, as a user would).
    """
    script = [str(repo / "train_distributed.py"), "--config", config or str(repo / "configs" / "default.yaml"), *args]
    if nproc == 1 and not launcher_args:
        return [sys.executable, *script]
    explicit = any(a.startswith(("--rdzv", "--master", "--nnodes")) for a in launcher_args)
    rendezvous = [] if explicit else ["--standalone"]
    return [sys.executable, "-m", "torch.distributed.run", *rendezvous, f"--nproc_per_node={nproc}",
            *launcher_args, *script]


def start_train(
    args: Sequence[str],
    nproc: int = 1,
    env: dict[str, str] | None = None,
    launcher_args: Sequence[str] = (),
    config: str | None = None,
    cwd: str | os.PathLike | None = None,
) -> subprocess.Popen:
    """Start a job in a new session (its own process group) and return it; stdout/stderr are pipes. A ``cwd``
    holding a copy of the repository (:func:`copy_repository`) runs that copy's code."""
    repo = Path(cwd) if cwd is not None and (Path(cwd) / "train_distributed.py").exists() else REPO_ROOT
    return subprocess.Popen(
        train_command(args, nproc, launcher_args, config, repo),
        cwd=str(cwd or REPO_ROOT),
        env=child_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def copy_repository(root: Path) -> Path:
    """The repository's code and configs copied to ``root`` (no git, no runs): where a test changes files as a user
    would (their own task, the README's commands writing ``runs/``)."""
    import shutil

    root.mkdir(parents=True)
    for name in ("train_distributed.py", "configs", "engine", "data", "models", "tasks", "scripts"):
        source = REPO_ROOT / name
        if source.is_dir():
            shutil.copytree(source, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, root / name)
    return root


def kill_job(proc: subprocess.Popen) -> None:
    """SIGKILL the job's whole process group (launcher and every worker)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def wait_job(proc: subprocess.Popen, timeout: float = DEFAULT_TIMEOUT_S) -> tuple[int, str, str]:
    """Wait for ``proc``; past ``timeout`` kill its process group and fail with the output so far."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_job(proc)
        out, err = proc.communicate()
        raise AssertionError(
            f"job did not finish within {timeout:.0f}s (killed)\n"
            f"--- stdout ---\n{out[-4000:]}\n--- stderr ---\n{err[-4000:]}"
        ) from None
    finally:
        # workers orphaned by a dying launcher must not outlive the test
        if proc.poll() is not None:
            kill_job(proc)
    return proc.returncode, out, err


def run_train(
    args: Sequence[str],
    nproc: int = 1,
    env: dict[str, str] | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
    launcher_args: Sequence[str] = (),
    config: str | None = None,
    cwd: str | os.PathLike | None = None,
) -> tuple[int, str, str]:
    """Run ``train_distributed.py`` with ``args`` in ``nproc`` processes; (returncode, stdout, stderr).

    Raises ``AssertionError`` (after killing every process of the job) if it runs past ``timeout`` seconds.
    """
    proc = start_train(args, nproc, env, launcher_args, config, cwd)
    return wait_job(proc, timeout)


def killed_and_resumed(tmp: Path, config: str | None = None, **overrides: object) -> tuple[dict, dict, str]:
    """``last.pt`` of an uninterrupted one-process run (``tmp/reference``) and of the same run SIGKILLed before step
    20 (after the step-18 checkpoint) then relaunched (``tmp/run``), and the reference's stdout; ``config`` (default
    ``configs/default.yaml``) with ``overrides`` as for :func:`tiny_overrides`."""
    base = dict(train__checkpoint_every_steps=3, data__augment=True, **overrides)
    rc, reference_out, err = run_train_preloaded(tiny_overrides(tmp / "reference", **base), config=config)
    assert rc == 0, err[-3000:]
    killed = tiny_overrides(tmp / "run", debug__fault_kind="sigkill", debug__fault_step=20, debug__fault_once=True,
                            **base)
    rc, _, err = run_train_preloaded(killed, config=config)
    assert rc != 0, "the fault did not fire"
    rc, out, err = run_train_preloaded(killed, config=config)  # the same command again
    assert rc == 0 and "resumed from" in out, err[-3000:]
    reference, resumed = (torch_load(tmp / name / "checkpoints" / "last.pt") for name in ("reference", "run"))
    return reference, resumed, reference_out


def metric_records(run_dir: Path) -> list[dict]:
    """The run's ``metrics.jsonl``: one record per finished epoch."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def torch_load(path: Path) -> dict:
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def error_lines(stderr: str) -> list[str]:
    """The one-line ``error: ...`` / ``error (rank r): ...`` messages a job printed."""
    return [line for line in stderr.splitlines() if line.startswith("error")]


def wait_for_file(path: Path, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    """Wait until the running job ``proc`` has written ``path``; fail if the job ends first or time runs out."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"job ended early with {proc.returncode}: {proc.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout:.0f}s"
        time.sleep(0.05)


def is_alive(pid: int) -> bool:
    """Whether ``pid`` is a running process (a zombie waiting for its parent counts as dead)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def worker_pids(launcher_pid: int, count: int, timeout: float = 60.0) -> list[int]:
    """PIDs of the ``count`` worker processes torchrun started, found via /proc children; waits for them."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [pid for pid in _descendants(launcher_pid) if _is_worker(pid)]
        if len(found) >= count:
            return sorted(found)[:count]
        time.sleep(0.2)
    raise AssertionError(f"torchrun (pid {launcher_pid}) did not start {count} workers within {timeout:.0f}s")


def worker_rank(pid: int) -> int | None:
    """The ``RANK`` a worker process was started with (from /proc/PID/environ), or None."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            for item in f.read().split(b"\0"):
                if item.startswith(b"RANK="):
                    return int(item[5:])
    except OSError:
        pass
    return None


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:
            with open(f"/proc/{parent}/task/{parent}/children") as f:
                children = [int(c) for c in f.read().split()]
        except OSError:
            children = []
        out.extend(children)
        todo.extend(children)
    return out


def _is_worker(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read().split(b"\0")
    except OSError:
        return False
    return any(part.endswith(b"train_distributed.py") for part in cmdline) and b"torch.distributed.run" not in cmdline


# --------------------------------------------------------------------------- preloaded single-process runs

_PRELOADED = None


def _preloaded_context():
    """A forkserver that has imported ``train_distributed`` (and torch) once; each run forks from it."""
    global _PRELOADED
    if _PRELOADED is None:
        import multiprocessing

        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["train_distributed", "torchvision"])
        _PRELOADED = ctx
    return _PRELOADED


def _preloaded_entry(argv: list[str], out_path: str, err_path: str, cwd: str) -> None:
    os.chdir(cwd)
    for fd, path in ((1, out_path), (2, err_path)):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
    import torch

    import train_distributed

    torch.set_num_threads(1)
    code = train_distributed.run(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_train_preloaded(
    args: Sequence[str],
    timeout: float = DEFAULT_TIMEOUT_S,
    config: str | None = None,
    cwd: str | os.PathLike | None = None,
) -> tuple[int, str, str]:
    """One process of ``train_distributed.run(argv)``, forked from a server that imported it already.

    The same code path and exit code as ``python train_distributed.py``, without its ~3 s of
    torch import: for tables of single-process cases (bad configs, bad data, bad checkpoints).
    The environment is the one of the first call; use :func:`run_train` where it matters.
    """
    import tempfile

    argv = ["--config", config or str(REPO_ROOT / "configs" / "default.yaml"), *args]
    with tempfile.TemporaryDirectory(prefix="preloaded_") as tmp:
        out_path, err_path = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
        proc = _preloaded_context().Process(
            target=_preloaded_entry, args=(argv, out_path, err_path, str(cwd or REPO_ROOT)), daemon=True
        )
        proc.start()
        proc.join(timeout)
        timed_out = proc.exitcode is None
        if timed_out:
            proc.kill()
            proc.join()
        out, err = (_read(p) for p in (out_path, err_path))
    if timed_out:
        raise AssertionError(
            f"run did not finish within {timeout:.0f}s (killed)\n"
            f"--- stdout ---\n{out[-4000:]}\n--- stderr ---\n{err[-4000:]}"
        )
    code = proc.exitcode
    return (code if code >= 0 else 128 - code), out, err


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""
