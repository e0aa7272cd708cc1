"""Memory of a training step: our SyncBatchNorm against local BatchNorm.

    python benchmarks/bench_memory.py            # CPU, 2 spawned gloo ranks
    torchrun --nproc_per_node=2 benchmarks/bench_memory.py --gpu   # + torch.nn.SyncBatchNorm, CUDA peak memory

Two measures, both on the same model, input and step, per BatchNorm kind:
  saved   bytes of the tensors autograd keeps for backward (torch.autograd.graph.saved_tensors_hooks, distinct
          storages counted once): deterministic, and what a SyncBN layer controls (goal: ours within 5% of BN);
  peak    the allocator's high-water mark over forward + backward, relative to the start of the step: on CPU by a
          TorchDispatchMode that adds every storage an op creates and subtracts it when its last tensor dies
          (collective buffers and allocator slack are not seen), on GPU
          torch.cuda.max_memory_allocated. It includes transient temporaries (e.g. full-size intermediates of the
          backward formula), which saved bytes do not.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import init_from_torchrun, machine_banner, print_table, run_ranks, under_torchrun, verdict  # noqa: E402

from engine.bn import convert_sync_batchnorm  # noqa: E402
from engine.config import ModelConfig  # noqa: E402
from engine.runtime.distributed import cleanup  # noqa: E402
from models import build_model  # noqa: E402

GOAL = 1.05
CASES = [("small_cnn", 32, 32), ("cifar_resnet20", 32, 32), ("resnet18", 64, 16)]  # model, image size, batch/rank


def _saved_bytes(model, x, y) -> int:
    seen: dict[tuple, int] = {}

    def pack(t: torch.Tensor):
        try:
            storage = t.untyped_storage()
            seen[(storage.data_ptr(), t.device)] = storage.nbytes()
        except (RuntimeError, NotImplementedError):
            seen[(id(t), t.device)] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    return sum(seen.values())


class _PeakTracker:
    """Live bytes of the storages ops create (each once, freed with its last tensor): a CPU high-water mark.
    Storages alive before the step (``existing``: weights, their pre-allocated grads, buffers, the batch) are not
    the step's, even when an op returns them (an in-place ``add_`` into a grad, a ``detach`` of a weight)."""

    def __new__(cls, existing: set[int]):
        import weakref

        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        class Tracker(TorchDispatchMode):
            def __init__(self):
                super().__init__()
                self.cur = self.peak = 0
                self.refs: dict[int, int] = {}

            def _drop(self, key: int, nbytes: int) -> None:
                self.refs[key] -= 1
                if not self.refs[key]:
                    del self.refs[key]
                    self.cur -= nbytes

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in tree_flatten(out)[0]:
                    if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                        storage = t.untyped_storage()
                        key, nbytes = storage.data_ptr(), storage.nbytes()
                        if key in existing:
                            continue
                        if key not in self.refs:
                            self.refs[key] = 0
                            self.cur += nbytes
                            self.peak = max(self.peak, self.cur)
                        self.refs[key] += 1
                        weakref.finalize(t, self._drop, key, nbytes)
                return out

        return Tracker()


def peak_cpu(model, x, y) -> int:
    """High-water mark of the bytes allocated by the step's ops (forward + backward), counted per storage."""
    before = [*model.parameters(), *(p.grad for p in model.parameters() if p.grad is not None), *model.buffers(), x, y]
    with _PeakTracker({t.untyped_storage().data_ptr() for t in before}) as tracker:
        loss = F.cross_entropy(model(x), y)
        loss.backward()
    return tracker.peak


def _peak_cuda(model, x, y, device) -> int:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def measure_rank(rank: int, world: int, cases: list, device: torch.device | None = None) -> list[dict]:
    device = device or torch.device("cpu")
    kinds = ["bn", "ours"] + (["torch"] if device.type == "cuda" else [])
    out = []
    for name, size, batch in cases:
        torch.manual_seed(0)
        base = build_model(ModelConfig(name=name, num_classes=10))
        x = torch.randn(batch, 3, size, size, device=device)
        y = torch.randint(0, 10, (batch,), device=device)
        row = {"case": f"{name} {size}px b{batch}"}
        for kind in kinds:
            model = build_model(ModelConfig(name=name, num_classes=10))
            model.load_state_dict(base.state_dict())
            model = model.to(device)
            if kind != "bn":
                model = convert_sync_batchnorm(model, impl=kind)
            model.train()
            for _ in range(2):  # warm-up: lazy inits, first-call allocations
                F.cross_entropy(model(x), y).backward()
            model.zero_grad(set_to_none=False)  # grads stay allocated: the step's steady state
            row[f"{kind}_saved"] = _saved_bytes(model, x, y)
            row[f"{kind}_peak"] = _peak_cuda(model, x, y, device) if device.type == "cuda" else peak_cpu(model, x, y)
        out.append(row)
    return out


def _report(rows: list[dict], kinds: list[str]) -> bool:
    print(machine_banner("setup   : 2 ranks, one training step (forward + backward, grads pre-allocated), "
                         "deterministic input; rank 0 shown"))
    table, ok_all = [], True
    mib = 2**20
    for r in rows:
        saved_ratio = r["ours_saved"] / r["bn_saved"]
        peak_ratio = r["ours_peak"] / r["bn_peak"]
        ok = saved_ratio <= GOAL
        ok_all &= ok
        line = [r["case"], f"{r['bn_saved'] / mib:.2f}", f"{r['ours_saved'] / mib:.2f}", f"{saved_ratio:.3f}", verdict(ok),
                f"{r['bn_peak'] / mib:.2f}", f"{r['ours_peak'] / mib:.2f}", f"{peak_ratio:.3f}",
                verdict(peak_ratio <= GOAL)]
        if "torch" in kinds:
            line += [f"{r['torch_saved'] / mib:.2f}", f"{r['torch_peak'] / mib:.2f}"]
        table.append(line)
    headers = ["model", "BN saved MiB", "ours saved MiB", "ours/BN saved", "goal<=1.05", "BN peak MiB",
               "ours peak MiB", "ours/BN peak", "peak<=1.05"]
    if "torch" in kinds:
        headers += ["torch saved MiB", "torch peak MiB"]
    print_table(headers, table, "Training-step memory (deterministic: one measurement each)")
    print(f"\ngoal saved-for-backward bytes of ours within 5% of BatchNorm: {verdict(ok_all)}")
    return ok_all


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpu", action="store_true", help="under torchrun with NCCL; adds torch.nn.SyncBatchNorm")
    args = parser.parse_args()
    if args.gpu or under_torchrun():
        rank, world, device = init_from_torchrun("nccl" if args.gpu else "auto")
        rows = measure_rank(rank, world, CASES + [("resnet50", 224, 32)], device)
        ok = _report(rows, ["bn", "ours", "torch"] if device.type == "cuda" else ["bn", "ours"]) if rank == 0 else True
        cleanup()
        return 0 if ok else 1
    rows = run_ranks(measure_rank, 2, CASES)[0]
    return 0 if _report(rows, ["bn", "ours"]) else 1


if __name__ == "__main__":
    sys.exit(main())
