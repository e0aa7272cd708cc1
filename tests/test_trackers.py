"""Experiment trackers (``train.trackers``): W&B and MLflow log what ``metrics.jsonl`` holds, a killed and resumed run
stays one tracker run, and a tracker that cannot start costs one warning, never the run.

W&B runs offline (its own ``.wandb`` file read back here), MLflow against a local file store (read back through
MLflow's own client). The packages are optional (``requirements-trackers.txt``): without them the real-tracker test
is skipped, while the warning test runs everywhere (it hides whatever is installed behind modules that fail to
import).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers.jobs import error_lines, metric_records, run_train, tiny_overrides, torch_load

pytestmark = pytest.mark.slow


def test_a_tracker_that_cannot_start_is_one_warning_and_the_run_completes(tmp_path: Path) -> None:
    hidden = tmp_path / "hidden"
    for name in ("wandb", "mlflow"):
        (hidden / name).mkdir(parents=True)
        (hidden / name / "__init__.py").write_text(f"raise ImportError(\"No module named '{name}'\", name='{name}')\n")
    args = tiny_overrides(tmp_path / "run", train__epochs=1, train__trackers="[wandb, mlflow]")
    rc, out, err = run_train(args, nproc=2, env={"PYTHONPATH": f"{hidden}:{Path.cwd()}"}, timeout=180)
    assert rc == 0, err[-3000:]
    warnings = [line for line in out.splitlines() if line.startswith("train.trackers:")]
    assert warnings == [
        f"train.trackers: {name} cannot start, the run goes on without it: ImportError: No module named '{name}' "
        "(pip install -r requirements-trackers.txt)" for name in ("wandb", "mlflow")
    ], out[-2000:]
    assert len(metric_records(tmp_path / "run")) == 1 and error_lines(err) == []


def test_a_misspelled_tracker_is_one_line_naming_the_key(tmp_path: Path) -> None:
    rc, _, err = run_train(tiny_overrides(tmp_path / "run", train__trackers="[wandb, tensorbord]"), timeout=60)
    assert rc == 1 and error_lines(err) == [
        "error: train.trackers[1]: 'tensorbord' is not one of tensorboard, wandb, mlflow"
    ], err[-2000:]


def _wandb_records(path: Path) -> list:
    """The records of a ``.wandb`` file: a 7-byte header (``:W&B``, magic, version), then LevelDB's log format
    (32 KiB blocks of records, each a 7-byte header: CRC, length, type FULL 1 / FIRST 2 / MIDDLE 3 / LAST 4)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos, pending, records = path.read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        pending, pos = pending + data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def _wandb_epochs(run_dir: Path) -> tuple[set[str], dict[int, dict[str, float]]]:
    """The run ids of the offline runs under ``run_dir/wandb``, and the values they logged per epoch."""
    ids, epochs = set(), {}
    for path in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        for record in _wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                ids.add(record.run.run_id)
            elif kind == "history":
                values = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
                if "epoch" in values and "optimizer_step" not in values:  # W&B adds the last epoch to step rows
                    epochs[int(values["epoch"])] = values
    return ids, epochs


def test_wandb_and_mlflow_log_the_metrics_and_a_resumed_run_continues_the_same_runs(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("wandb")
    mlflow = pytest.importorskip("mlflow")
    store = f"file://{tmp_path / 'mlruns'}"
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "MLFLOW_TRACKING_URI": store, "MLFLOW_ALLOW_FILE_STORE": "true"}
    # 2 processes, 8 steps an epoch, 3 epochs; SIGKILLed at step 13 (after the step-12 checkpoint), then relaunched
    args = tiny_overrides(tmp_path / "run", train__epochs=3, train__trackers="[wandb, mlflow]", train__print_freq=2,
                          train__checkpoint_every_steps=4, debug__fault_kind="sigkill", debug__fault_step=13,
                          debug__fault_once=True)  # fmt: skip
    rc, _, err = run_train(args, nproc=2, env=env, timeout=240)
    assert rc != 0, "the fault did not fire"
    rc, out, err = run_train(args, nproc=2, env=env, timeout=240)
    assert rc == 0 and "resumed from" in out and "train.trackers" not in out, out[-3000:] + err[-3000:]
    records = metric_records(tmp_path / "run")
    runs = torch_load(tmp_path / "run" / "checkpoints" / "last.pt")["train_state"]["tracker_runs"]
    assert set(runs) == {"wandb", "mlflow"}

    # W&B: both attempts log to the run the checkpoint names; every epoch's values are metrics.jsonl's
    ids, epochs = _wandb_epochs(tmp_path / "run")
    assert ids == {runs["wandb"]}
    assert sorted(epochs) == [1, 2, 3]
    for record in records:
        logged = epochs[record["epoch"]]
        assert {key: logged[key] for key in ("train_loss", "val_loss", "val_acc1", "lr")} == pytest.approx(
            {key: record[key] for key in ("train_loss", "val_loss", "val_acc1", "lr")}, rel=1e-12)

    # MLflow: one run in the experiment, the checkpoint's, finished; its per-epoch history is metrics.jsonl's
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = mlflow.tracking.MlflowClient(store)
    experiment = client.get_experiment_by_name("ddp-syncbn")
    (found,) = client.search_runs([experiment.experiment_id])
    assert found.info.run_id == runs["mlflow"] and found.info.status == "FINISHED"
    history = {m.step: m.value for m in client.get_metric_history(found.info.run_id, "val_acc1")}
    assert history == {r["epoch"]: pytest.approx(r["val_acc1"], rel=1e-12) for r in records}
    assert found.data.params["train.epochs"] == "3" and found.data.params["model.name"] == "small_cnn"
    steps = [m.step for m in client.get_metric_history(found.info.run_id, "step/loss")]
    assert set(steps) == set(range(2, 25, 2)), steps  # every train.print_freq steps, across the resume
