"""Activation checkpointing (``train.grad_checkpointing``) on segmentation models: peak memory saved, time paid.

    python benchmarks/bench_grad_checkpointing.py        # CPU, 2 spawned gloo ranks, SyncBN as the template runs it

Per model, the same weights and input, with and without checkpointing, in one process: the high-water mark of the
bytes a training step's ops allocate (forward + backward; bench_memory.py's counter, deterministic), and the step
time, interleaved (ABBA rounds). BatchNorm is SyncBN over both ranks; its statistics are exact either way
(tests/test_bn_autograd.py), so the trade is memory against compute only.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from bench_memory import peak_cpu  # noqa: E402
from common import fmt_stat, interleaved_times, machine_banner, med, print_table, ratio_stat, run_ranks  # noqa: E402
from torch import nn  # noqa: E402

from engine.bn import convert_sync_batchnorm  # noqa: E402
from engine.config import ModelConfig  # noqa: E402
from engine.grad_checkpointing import enable_grad_checkpointing  # noqa: E402
from models import build_model  # noqa: E402
from tasks import main_output  # noqa: E402

CASES = [("small_segnet", 128, 4), ("deeplabv3_resnet50", 128, 2)]  # model, image side, images per rank
CLASSES = 7


class _Logits(nn.Module):
    """torchvision's segmentation models return {"out": logits, ...}: the logits, for one loss over all models."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return main_output(self.model(x))


def _model(name: str, checkpointed: bool, state: dict | None) -> nn.Module:
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name, num_classes=CLASSES, aux_loss_weight=0.0), "segmentation")
    if state is not None:
        model.load_state_dict(state)
    if checkpointed:
        enable_grad_checkpointing(model)
    return _Logits(convert_sync_batchnorm(model, impl="ours")).train()


def _step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    F.cross_entropy(model(x), y).backward()


def measure_rank(rank: int, world: int) -> list[dict]:
    rows = []
    for name, side, batch in CASES:
        g = torch.Generator().manual_seed(rank)
        x = torch.randn(batch, 3, side, side, generator=g)
        y = torch.randint(0, CLASSES, (batch, side, side), generator=g)
        plain = _model(name, False, None)
        models = {"plain": plain, "checkpointed": _model(name, True, plain.model.state_dict())}

        for model in models.values():
            _step(model, x, y)  # grads allocated: the step's steady state
        row = {"case": f"{name} {side}px b{batch}/rank"}
        row |= {f"{kind}_peak": peak_cpu(model, x, y) for kind, model in models.items()}
        times = interleaved_times({kind: functools.partial(_step, model, x, y) for kind, model in models.items()}, repeats=4,
                                  iters=2, device=torch.device("cpu"), barrier=torch.distributed.barrier)  # fmt: skip
        row |= {f"{kind}_s": t for kind, t in times.items()}
        rows.append(row)
    return rows


def main() -> int:
    rows = run_ranks(measure_rank, 2)[0]
    print(machine_banner("setup   : 2 ranks, SyncBN over both, one training step (forward + backward, grads "
                         "pre-allocated); rank 0 shown; times: 4 ABBA rounds of 2 steps"))
    mib = 2**20
    table = [[r["case"], f"{r['plain_peak'] / mib:.1f}", f"{r['checkpointed_peak'] / mib:.1f}",
              f"{r['checkpointed_peak'] / r['plain_peak']:.3f}", fmt_stat(r["plain_s"]), fmt_stat(r["checkpointed_s"]),
              f"{med(ratio_stat(r['checkpointed_s'], r['plain_s'])):.3f}"] for r in rows]  # fmt: skip
    print_table(["model", "peak MiB", "checkpointed peak MiB", "peak ratio", "step s", "checkpointed step s",
                 "time ratio"], table, "train.grad_checkpointing: memory saved, time paid")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
