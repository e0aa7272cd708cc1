"""Where training stands (``TrainState``): saved in every checkpoint, so a resume continues at the same sample."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class TrainState:
    """Where training stands. It changes only through its methods: one optimizer step done, one epoch done."""

    epoch: int = 0  # the epoch in progress (0-based)
    step: int = 0  # optimizer steps done since the start of training
    epoch_step: int = 0  # optimizer steps done within ``epoch``
    best_metric: str = ""  # the metric that picks best.pt (train.best_metric), once an epoch has been scored
    best_value: float = -1.0  # its best value so far
    loss_sum: float = 0.0  # global (all ranks) train-loss sum of ``epoch`` so far
    loss_count: int = 0
    epoch_train_time_s: float = 0.0  # training seconds of ``epoch`` so far, over every start that trained part of it
    history: list[dict[str, Any]] = field(default_factory=list)  # one record per finished epoch (metrics.jsonl)
    tracker_runs: dict[str, str] = field(default_factory=dict)  # tracker -> its run id (W&B, MLflow): a resume continues it

    def finish_step(self, loss_sums: list[float] = (), counts: list[int] = ()) -> None:
        """One optimizer step done, with the global loss sums and counts the ranks agreed on in it (if they did)."""
        self.step += 1
        self.epoch_step += 1
        self.loss_sum += sum(loss_sums)
        self.loss_count += sum(counts)

    def add_train_time(self, seconds: float) -> None:
        """This start trained ``epoch`` for ``seconds`` (an epoch that spans a restart adds both parts)."""
        self.epoch_train_time_s += seconds

    def finish_epoch(self, record: dict[str, Any], best_metric: str) -> bool:
        """The epoch in progress is done and evaluated (``record``: its metrics line); returns whether it is the
        best so far by ``best_metric``. The record travels in every later checkpoint, so a resume can restore
        ``metrics.jsonl``."""
        is_best = record[best_metric] > self.best_value
        self.best_metric, self.best_value = best_metric, max(self.best_value, record[best_metric])
        self.epoch, self.epoch_step, self.loss_sum, self.loss_count = self.epoch + 1, 0, 0.0, 0
        self.epoch_train_time_s = 0.0
        self.history.append(record)
        return is_best

    @property
    def train_loss(self) -> float:
        """Mean training loss of the epoch so far, over every sample of every rank."""
        return self.loss_sum / max(self.loss_count, 1)

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = dict(state)
        if "best_acc1" in state:  # checkpoints up to 16b4a0d: the best value under its old name
            state["best_value"] = state.pop("best_acc1")
        for key, value in state.items():  # keys a checkpoint lacks (older ones) keep their defaults
            setattr(self, key, value)
