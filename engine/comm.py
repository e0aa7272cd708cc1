"""What code running on every rank calls to work together: rank and world size, barriers, sums over ranks, objects
gathered from every rank, a decision taken on rank 0 for all, a cache filled once (detectron2's ``utils/comm.py``).
Each works in a single process too (no process group: the identity). A task's scorer, a dataset, a model may use
them; the process group itself is set up in ``engine/runtime/distributed.py``.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from engine.errors import PeerFailed, RankZeroError, UserError


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum in place over all ranks (identity in a single process) and return it."""
    if is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def start_all_reduce_sum(tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> Callable[[], torch.Tensor]:
    """Start summing ``tensor`` in place over all ranks (of ``group``); the returned function waits and returns it.

    For values known well before they are needed (computed after the forward, read after the backward): the
    collective then overlaps the work in between instead of adding its latency.
    """
    work = dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group, async_op=True) if is_initialized() else None

    def wait() -> torch.Tensor:
        if work is not None:
            work.wait()
        return tensor

    return wait


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)  # what every rank's loss says of every row, summed; this rank keeps its own rows
        rows = grad.shape[0] // get_world_size()
        return grad[get_rank() * rows : (get_rank() + 1) * rows]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Every rank's ``x`` (the same shape on each) concatenated in rank order, **with gradients**: a loss on the
    result sends each rank's share of its gradient back to the rank that computed those rows (contrastive
    negatives from every rank). ``dist.all_gather`` alone cuts the graph; torch's ``distributed.nn`` gather needs a
    reduce-scatter, which gloo lacks: here one all-reduce of the gathered gradient (W x the bytes, any backend)."""
    return _AllGatherWithGrad.apply(x) if is_initialized() and get_world_size() > 1 else x


def gather_objects(obj: Any, group: dist.ProcessGroup | None = None) -> list[Any]:
    """Every rank's object, on every rank (small things only: RNG states, flags)."""
    if not is_initialized():
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj, group=group)
    return out


def rank0_decides(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on rank 0 only and give its result to every rank; if it raises, every rank stops.

    For decisions that touch the filesystem (which checkpoint to resume, may we write here): one rank looks, all
    ranks act alike.
    """
    return _run_where(fn, get_rank() == 0)[0]


FETCH_WAIT_S = 4 * 3600.0  # how long the other ranks wait for a download (several GB on a slow link)


def fetch_once(fetch: Callable[[], None], local_rank: int) -> None:
    """Fill a cache once: ``fetch`` runs on rank 0, then on the first process of every other node (which finds the
    files there already when the cache is on a shared filesystem), while every other process waits. ``fetch`` must
    do nothing when the cache holds what it fetches; an error stops every rank. The wait is bounded by
    ``FETCH_WAIT_S``, not by ``dist.timeout_s`` (which bounds a collective of training: a slow download is no hang)."""
    group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=FETCH_WAIT_S)) if is_initialized() else None
    try:
        _run_where(fetch, get_rank() == 0, group)
        _run_where(fetch, local_rank == 0 and get_rank() != 0, group)
    finally:
        if group is not None:
            dist.destroy_process_group(group)


def _run_where(fn: Callable[[], Any], here: bool, group: dist.ProcessGroup | None = None) -> list[Any]:
    """Run ``fn`` on the ranks where ``here`` while the others wait; every rank gets every result (rank 0's first).

    A user error (or the filesystem's ``OSError``) stops every rank with its one-line message. Anything else is a
    bug: the rank that met it re-raises it with its traceback, the other ranks stop saying so in one line.
    """
    result, error, bug = None, None, None
    if here:
        try:
            result = fn()
        except (UserError, OSError) as exc:
            error = str(exc)
        except Exception as exc:  # every rank must hear of it, or the others wait in the collective
            bug = exc
    outcomes = gather_objects((get_rank(), result, error, type(bug).__name__ if bug else None), group)
    if bug is not None:
        raise bug
    failed = [(rank, name) for rank, _, _, name in outcomes if name is not None]
    if failed:
        rank, name = failed[0]
        raise PeerFailed(f"rank {rank} failed with {name} while deciding for every rank; its traceback is above")
    errors = [message for _, _, message, _ in outcomes if message is not None]
    if errors:
        raise RankZeroError(errors[0])
    return [value for _, value, _, _ in outcomes]
