"""BatchNorm under activation checkpointing: the recompute in backward must give the first forward's output without
acting a second time.

``torch.utils.checkpoint`` runs a block's forward again inside backward, to rebuild the activations it did not keep.
A BatchNorm layer in that block would count the batch twice in ``num_batches_tracked``, move its running statistics
twice (torch's own BatchNorm does; PyTorch issue 96136), and, synchronised, run its collectives again. Here a layer
asks :func:`recomputing` whether this forward is such a replay: then it neither counts nor updates, and a
SyncBatchNorm takes back the global statistics its first forward kept with :func:`keep` (:func:`take`), so the
replay communicates nothing and cannot meet a mismatched collective.

torch names neither moment publicly, so this reads its checkpoint machinery (torch is pinned; the tests of
``tests/test_bn_autograd.py`` hold it to that):

- a replay is a forward run inside a backward pass (``torch._C._current_graph_task_id()`` is set);
- a first forward under a non-reentrant checkpoint runs under the checkpoint's saved-tensor hook, whose closure
  holds the checkpoint's frame object; the replay runs under a recomputation hook holding a weak reference to the
  same frame. Under a reentrant checkpoint, ``CheckpointFunction.forward`` and ``.backward`` are on the stack, both
  with the same ``ctx``.

That frame or ``ctx`` lives exactly as long as the block can be replayed, so each layer's statistics are kept on it,
in call order, and taken back in the same order (a replay repeats its block's calls in order).
"""

from __future__ import annotations

import sys
from collections import deque
from typing import Any

import torch
import torch.utils.checkpoint as checkpoint

_KEPT = "_engine_bn_kept"  # the attribute, on a checkpoint's frame or ctx, holding {layer: deque of statistics}
_REENTRANT_FORWARD = checkpoint.CheckpointFunction.forward.__code__
_REENTRANT_BACKWARD = checkpoint.CheckpointFunction.backward.__code__


def recomputing() -> bool:
    """Whether this forward is a checkpoint's replay inside backward (never while torch.compile traces)."""
    return not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1


def _hooked_frame(name: str) -> Any | None:
    """The checkpoint frame held by the innermost saved-tensor hook's pack function under closure name ``name``."""
    hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
    if hooks is None:
        return None
    pack = getattr(hooks[0], "__wrapped__", hooks[0])
    code = getattr(pack, "__code__", None)
    if code is None or name not in code.co_freevars:
        return None
    return pack.__closure__[code.co_freevars.index(name)].cell_contents


def _reentrant_ctx(code: Any) -> Any | None:
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is code:
            return frame.f_locals.get("ctx")
        frame = frame.f_back
    return None


def _scope(replay: bool) -> Any | None:
    """The object of the checkpoint this forward runs under (its first forward, or its replay), or None."""
    if torch.compiler.is_compiling():
        return None
    if replay:
        ref = _hooked_frame("target_frame_ref")
        return ref() if ref is not None else _reentrant_ctx(_REENTRANT_BACKWARD)
    frame = _hooked_frame("frame")
    if frame is None and not torch.is_grad_enabled():  # a reentrant checkpoint runs its block without grad
        return _reentrant_ctx(_REENTRANT_FORWARD)
    return frame


def keep(layer: torch.nn.Module, stats: tuple[torch.Tensor, ...]) -> None:
    """In a first forward under a checkpoint, keep ``layer``'s statistics for its replay (else nothing)."""
    scope = _scope(replay=False)
    if scope is None:
        return
    if not hasattr(scope, _KEPT):
        setattr(scope, _KEPT, {})
    getattr(scope, _KEPT).setdefault(layer, deque()).append(stats)


def take(layer: torch.nn.Module) -> tuple[torch.Tensor, ...] | None:
    """In a replay, the statistics ``layer``'s first forward kept for this call, or None where none were kept."""
    queue = getattr(_scope(replay=True), _KEPT, {}).get(layer)
    return queue.popleft() if queue else None
