"""Experiment trackers on rank 0 (``train.trackers``): TensorBoard, Weights & Biases, MLflow, behind one interface.

Each is imported only when named. A tracker that cannot start (its package missing, its server unreachable) or
that fails later is one warning, and the run goes on without it: a tracker never costs a run. The run's identity
in a tracker (W&B's run id, MLflow's) travels in every checkpoint (``TrainState.tracker_runs``), so a resumed run
continues the same tracker run instead of starting a new one.

Per-epoch values (``metrics.jsonl``'s) are logged against the epoch; per-step values (``step/loss``, ``step/lr``,
``step/samples_per_s``, every ``train.print_freq`` steps) against the optimizer step.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from engine.config import Config, config_to_dict
from engine.train_state import TrainState

TRACKERS = ("tensorboard", "wandb", "mlflow")


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of a metrics record, a per-class list (``val_iou``) spread as ``<key>/<class>`` (None: skipped)."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            out[key] = float(value)
        elif isinstance(value, list):
            out |= {f"{key}/{i}": float(v) for i, v in enumerate(value) if isinstance(v, (int, float))}
    return out


class TensorBoard:
    """``output_dir/tensorboard``: epoch values as ``train/*``, ``val/*``, ``misc/*`` at x = epoch, the resolved
    config as text (runs compare in TensorBoard without diffing config.yaml files)."""

    name = "tensorboard"

    def __init__(self, cfg: Config, run_id: str | None) -> None:
        import yaml
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=os.path.join(cfg.output_dir, "tensorboard"))
        text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
        self.writer.add_text("config", "".join(f"    {line}\n" for line in text.splitlines()))  # markdown code
        self.run_id = None

    def log_epoch(self, values: dict[str, float], epoch: int) -> None:
        for key, value in values.items():
            if key != "epoch":
                self.writer.add_scalar(_tensorboard_tag(key), value, epoch)
        self.writer.flush()

    def log_step(self, values: dict[str, float], step: int) -> None:
        for name, value in values.items():
            self.writer.add_scalar(f"step/{name}", value, step)

    def close(self, failed: bool) -> None:
        self.writer.close()


def _tensorboard_tag(key: str) -> str:
    base, _, index = key.partition("/")  # val_iou/3: one curve per class
    split, _, name = base.partition("_")
    tag = f"{split}/{name}" if split in ("train", "val") and name else f"misc/{base}"
    return f"{tag}/{index}" if index else tag


class WandB:
    """A W&B run named after ``output_dir``, in project ``train.tracker_project``, with the resolved config; epoch
    values against ``epoch``, step values (``step/*``) against ``optimizer_step``. ``WANDB_MODE=offline`` (or
    ``wandb offline``) keeps it on disk under ``output_dir/wandb`` for a later ``wandb sync``."""

    name = "wandb"

    def __init__(self, cfg: Config, run_id: str | None) -> None:
        import wandb

        name = os.path.basename(os.path.abspath(cfg.output_dir))
        self.run = wandb.init(project=cfg.train.tracker_project, name=name, dir=cfg.output_dir, config=config_to_dict(cfg),
                              id=run_id, resume="allow" if run_id else None)  # fmt: skip
        self.run.define_metric("epoch")
        self.run.define_metric("optimizer_step")
        self.run.define_metric("step/*", step_metric="optimizer_step")
        self.run.define_metric("*", step_metric="epoch")
        self.run_id = self.run.id

    def log_epoch(self, values: dict[str, float], epoch: int) -> None:
        self.run.log({**values, "epoch": epoch})

    def log_step(self, values: dict[str, float], step: int) -> None:
        self.run.log({**{f"step/{k}": v for k, v in values.items()}, "optimizer_step": step})

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class MLflow:
    """An MLflow run named after ``output_dir``, in experiment ``train.tracker_project``, at ``MLFLOW_TRACKING_URI``
    (MLflow's own setting), with the resolved config as parameters (``section.key``)."""

    name = "mlflow"

    def __init__(self, cfg: Config, run_id: str | None) -> None:
        import mlflow

        self.mlflow = mlflow
        if run_id is None:
            mlflow.set_experiment(cfg.train.tracker_project)
            run = mlflow.start_run(run_name=os.path.basename(os.path.abspath(cfg.output_dir)))
            mlflow.log_params(_flat(config_to_dict(cfg)))
        else:
            run = mlflow.start_run(run_id=run_id)
        self.run_id = run.info.run_id

    def log_epoch(self, values: dict[str, float], epoch: int) -> None:
        self.mlflow.log_metrics({k: v for k, v in values.items() if k != "epoch"}, step=epoch)

    def log_step(self, values: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics({f"step/{k}": v for k, v in values.items()}, step=step)

    def close(self, failed: bool) -> None:
        self.mlflow.end_run(status="FAILED" if failed else "FINISHED")


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = str(value)
    return out


BUILDERS: dict[str, Callable[[Config, str | None], Any]] = {"tensorboard": TensorBoard, "wandb": WandB, "mlflow": MLflow}


class Trackers:
    """The trackers ``train.trackers`` names, started on rank 0; each failure is one warning and that tracker is
    dropped. ``state``: the run being resumed: its tracker runs (name -> id) are continued, and updated with the
    ones started; its finished epochs are logged again to a continued run (a SIGKILL can take what a tracker had
    not yet written, as it can take ``metrics.jsonl``'s last line: the same values come back)."""

    def __init__(self, cfg: Config, state: TrainState, warn: Callable[[str], None]) -> None:
        self.warn, self.active = warn, []
        names = [n for n in cfg.train.trackers if n != "tensorboard" or cfg.train.tensorboard]
        for name in dict.fromkeys(names):
            run_id = state.tracker_runs.get(name)
            try:
                tracker = BUILDERS[name](cfg, run_id)
                for record in state.history if run_id is not None else []:
                    tracker.log_epoch(scalars(record), record["epoch"])
            except Exception as exc:  # an ImportError, a server that does not answer, a bad key: never the run's end
                self._dropped(name, "cannot start", exc)
                continue
            if tracker.run_id is not None:
                state.tracker_runs[name] = tracker.run_id
            self.active.append(tracker)

    def log_epoch(self, record: dict[str, Any], epoch: int) -> None:
        self._each("log_epoch", scalars(record), epoch)

    def log_step(self, values: dict[str, float], step: int) -> None:
        self._each("log_step", values, step)

    def close(self, failed: bool = False) -> None:
        self._each("close", failed)

    def _each(self, method: str, *args: Any) -> None:
        for tracker in list(self.active):
            try:
                getattr(tracker, method)(*args)
            except Exception as exc:
                self.active.remove(tracker)
                self._dropped(tracker.name, "failed", exc)

    def _dropped(self, name: str, what: str, exc: Exception) -> None:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        hint = " (pip install -r requirements-trackers.txt)" if isinstance(exc, ImportError) else ""
        self.warn(f"train.trackers: {name} {what}, the run goes on without it: {type(exc).__name__}: {reason}{hint}")
