"""What a block of code communicates and reads back to the host, counted at the dispatcher.

Every c10d collective, the classic ones (``dist.all_reduce`` -> ``c10d::allreduce_``) and the functional ones
(``_c10d_functional::all_reduce``) alike, passes through the dispatcher, and so does every read of a device value on
the host (``aten::_local_scalar_dense``, behind ``.item()``, ``bool(t)``, ``int(t)``). ``with count_comm() as comm:``
records both, so a test or a benchmark can check a layer's communication budget and its host syncs without
touching the code under test.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

# dispatcher op -> what it does; ops not listed (waits, autograd wrappers) move no data of their own
_OPS = {
    "_c10d_functional::all_reduce": "all_reduce",
    "_c10d_functional::all_reduce_": "all_reduce",
    "_c10d_functional::all_gather_into_tensor": "all_gather",
    "_c10d_functional::broadcast": "broadcast",
    "c10d::allreduce_": "all_reduce",
    "c10d::allgather_": "all_gather",
    "c10d::_allgather_base_": "all_gather",
    "c10d::allgather_into_tensor_coalesced_": "all_gather",
    "c10d::broadcast_": "broadcast",
    "c10d::barrier": "barrier",
}


@dataclass(frozen=True)
class Collective:
    op: str  # all_reduce | all_gather | broadcast | barrier
    numel: int  # elements this rank contributes
    dtype: torch.dtype | None
    group_size: int

    @property
    def received_bytes(self) -> int:
        """Bytes of other ranks' data this rank ends up with: the all-gather's W-1 contributions, the all-reduce's
        or broadcast's one result (a ring all-reduce moves at most twice that over the wire, whatever W)."""
        size = self.numel * (self.dtype.itemsize if self.dtype is not None else 0)
        return size * (self.group_size - 1) if self.op == "all_gather" else size


@dataclass
class CommLog:
    collectives: list[Collective] = field(default_factory=list)
    host_reads: int = 0  # device values read on the host (each one a sync point on a GPU)


class _Counter(TorchDispatchMode):
    def __init__(self, log: CommLog) -> None:
        super().__init__()
        self.log = log

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        name = func._schema.name
        if name == "aten::_local_scalar_dense":
            self.log.host_reads += 1
        elif name in _OPS:
            self.log.collectives.append(_describe(_OPS[name], args))
        return func(*args, **(kwargs or {}))


def _describe(op: str, args: tuple) -> Collective:
    tensors = list(_tensors(args))
    if not tensors:
        return Collective(op, 0, None, _group_size(args))
    if op == "all_gather":  # its arguments hold the output (every rank's share) and the input (this rank's)
        sent = min(tensors, key=torch.Tensor.numel)
        whole = sum(t.numel() for t in tensors) - sent.numel()
        return Collective(op, sent.numel(), sent.dtype, whole // max(sent.numel(), 1))
    return Collective(op, tensors[0].numel(), tensors[0].dtype, _group_size(args))


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors(item)


def _group_size(args: tuple) -> int:
    for arg in args:
        if isinstance(arg, (dist.ProcessGroup, torch.ScriptObject)) and hasattr(arg, "size"):
            return arg.size()
        if isinstance(arg, str):  # functional collectives name their group
            try:
                return dist.distributed_c10d._resolve_process_group(arg).size()
            except (RuntimeError, ValueError, KeyError):
                continue
    return dist.get_world_size() if dist.is_initialized() else 1


@contextmanager
def count_comm() -> Iterator[CommLog]:
    """Record the collectives and host reads of the block (this process only)."""
    log = CommLog()
    with _Counter(log):
        yield log
