"""Conversion of a model's BatchNorm layers (to synchronised, to ghost, and back), through one registry keyed by
exact class: every BatchNorm class is converted faithfully or refused by name, never silently changed.

``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` (and the converters of mmengine and Lightning) replace any
``_BatchNorm`` subclass by a plain SyncBatchNorm: a subclass with its own ``forward`` loses it without a word. timm's
``BatchNormAct2d`` (BatchNorm, dropout and activation in one layer, in hundreds of timm architectures) then trains
with no activation. Here each class names its *family*: the local, synchronised and ghost layers that compute what
it computes. A ``_BatchNorm`` subclass nobody registered is converted like BatchNorm only when it cannot differ from
it (no ``forward`` of its own, no child modules); otherwise it is refused with its module path and how to register
it. Library classes are registered by qualified name, so their library is never imported here.

A converted layer remembers the module it replaced, so :func:`revert_sync_batchnorm` gives back the very original
(class, children, attributes) holding the current tensors.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from engine.bn import layers
from engine.bn.functional import choose_collective

_VALID_IMPLS = ("auto", "torch", "ours")
_ORIGINAL = "_original_batchnorm"  # where a converted layer keeps the module it replaced (no submodule: hidden)


class UnsupportedBatchNorm(TypeError):
    """A BatchNorm layer that no converter can synchronise faithfully; the message names its class and path."""


@dataclass(frozen=True)
class BatchNormFamily:
    """The layers that compute what one kind of BatchNorm computes: locally, synchronised over ranks (ours, and
    torch's on CUDA), or in ghost batches. ``modules`` names the child modules a conversion hands over (e.g. the
    ``drop`` and ``act`` of a BatchNorm + activation layer); each layer class takes them as keyword arguments."""

    local: type[_BatchNorm]
    sync: type[_BatchNorm]
    torch_sync: type[_BatchNorm]
    ghost: type[_BatchNorm]
    modules: tuple[str, ...] = ()

    def converted(self) -> tuple[type[_BatchNorm], ...]:
        return self.sync, self.torch_sync, self.ghost


PLAIN = BatchNormFamily(layers.AnyDimBatchNorm, layers.SyncBatchNorm, nn.SyncBatchNorm, layers.GhostBatchNorm)
THEN_DROP_ACT = BatchNormFamily(layers.BatchNormAct, layers.SyncBatchNormAct, layers.TorchSyncBatchNormAct,
                                layers.GhostBatchNormAct, ("drop", "act"))

# exact class (or "module.QualName" of a library class, so the library need not be imported) -> its family;
# None: left alone (frozen statistics: nothing to synchronise)
_REGISTRY: dict[type | str, BatchNormFamily | None] = {
    **{cls: PLAIN for cls in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, *PLAIN.converted(), PLAIN.local)},
    **{cls: THEN_DROP_ACT for cls in (*THEN_DROP_ACT.converted(), THEN_DROP_ACT.local)},
    "timm.layers.norm_act.BatchNormAct2d": THEN_DROP_ACT,  # BatchNorm2d, then drop, then act
    "timm.layers.norm_act.SyncBatchNormAct": THEN_DROP_ACT,  # timm's own converter's output
}
_TORCH_BASES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, _BatchNorm, nn.modules.batchnorm._NormBase)


def register_batchnorm(cls: type[_BatchNorm] | str, family: BatchNormFamily | None) -> None:
    """Tell every converter how to treat BatchNorm class ``cls`` (a class, or ``"module.QualName"``):
    ``PLAIN`` (computes what BatchNorm computes), ``THEN_DROP_ACT`` (BatchNorm, then its ``drop`` and ``act``
    children), a :class:`BatchNormFamily` of your own layers, or None to leave it alone (frozen statistics)."""
    _REGISTRY[cls] = family


def family_of(layer: _BatchNorm, path: str = "") -> BatchNormFamily | None:
    """The registered family of ``layer``'s exact class; an unregistered subclass that computes plain BatchNorm is
    ``PLAIN``; anything else raises :class:`UnsupportedBatchNorm` naming the class and ``path``."""
    cls = type(layer)
    for key in (cls, f"{cls.__module__}.{cls.__qualname__}"):
        if key in _REGISTRY:
            return _REGISTRY[key]
    if isinstance(layer, nn.modules.lazy.LazyModuleMixin) and layer.has_uninitialized_params():
        raise UnsupportedBatchNorm(
            f"{_where(layer, path)} is an uninitialised {cls.__name__}: run one forward pass (or build the model "
            "with BatchNorm{1,2,3}d) before converting it"
        )
    own_forward = any("forward" in vars(base) for base in cls.__mro__ if base not in _TORCH_BASES
                      and issubclass(base, nn.Module) and base is not nn.Module)  # fmt: skip
    if own_forward or next(layer.children(), None) is not None:
        what = "its own forward" if own_forward else f"child modules ({', '.join(n for n, _ in layer.named_children())})"
        raise UnsupportedBatchNorm(
            f"{_where(layer, path)} is a BatchNorm subclass with {what}, which a synchronised layer would drop; "
            f"register how to convert it: engine.bn.register_batchnorm({cls.__module__}.{cls.__qualname__}, family) "
            "(README: BatchNorm layers of your own)"
        )
    return PLAIN


def _where(layer: nn.Module, path: str) -> str:
    cls = type(layer)
    return f"BatchNorm layer '{path or '(root)'}' ({cls.__module__}.{cls.__qualname__})"


def batchnorm_layers(module: nn.Module) -> Iterator[tuple[str, _BatchNorm]]:
    """Every BatchNorm layer with running statistics, by name, each checked against the registry: what PreciseBN,
    buffer agreement and the EMA walk, so they follow exactly the layers the converters know."""
    for name, layer in module.named_modules():
        if isinstance(layer, _BatchNorm):
            family_of(layer, name)
            if layer.running_mean is not None:
                yield name, layer


# --------------------------------------------------------------------------------------------- the walk


def _replace(module: nn.Module, build: Callable[[_BatchNorm, BatchNormFamily, str], nn.Module | None],
             path: str = "") -> nn.Module:
    """Rebuild every registered BatchNorm for which ``build`` returns a module (None: keep it); also the root.
    Non-BatchNorm modules that keep running statistics stay as they are, with a warning naming them."""
    out = None
    if isinstance(module, _BatchNorm):
        family = family_of(module, path)
        out = build(module, family, path) if family is not None else None
    elif _keeps_running_stats(module):
        cls = type(module)
        warnings.warn(f"{path or '(root)'} ({cls.__module__}.{cls.__qualname__}) keeps running statistics but is not "
                      "a BatchNorm layer: it stays per-process (not synchronised)", stacklevel=3)
    out = module if out is None else out
    for name, child in module.named_children():
        new_child = _replace(child, build, f"{path}.{name}" if path else name)
        if new_child is not child or out is not module:
            out.add_module(name, new_child)
    return out


def _keeps_running_stats(module: nn.Module) -> bool:
    names = {name for name, _ in module.named_buffers(recurse=False)}
    return {"running_mean", "running_var"} <= names


def _rebuild(bn: _BatchNorm, cls: type[_BatchNorm], family: BatchNormFamily, **extra: Any) -> _BatchNorm:
    """A ``cls`` layer with ``bn``'s very tensors, flags and handed-over children."""
    bias = {"bias": False} if bn.affine and bn.bias is None else {}
    children = {name: getattr(bn, name) for name in family.modules if name in bn._modules}
    new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, device="meta", **bias,
              **children, **extra)  # fmt: skip  (meta: every tensor is replaced right away)
    return _hand_over(bn, new)


def _convert(bn: _BatchNorm, cls: type[_BatchNorm], family: BatchNormFamily, **extra: Any) -> _BatchNorm:
    """:func:`_rebuild`, remembering the module the new layer stands for (for :func:`revert_sync_batchnorm`)."""
    new = _rebuild(bn, cls, family, **extra)
    object.__setattr__(new, _ORIGINAL, getattr(bn, _ORIGINAL, bn))
    return new


def _hand_over(src: _BatchNorm, dst: _BatchNorm) -> _BatchNorm:
    """Give ``dst`` the very tensors of ``src``, so optimizers, DDP and requires_grad keep pointing at them."""
    if src.affine:
        dst.weight = src.weight
        dst.bias = src.bias
    dst.running_mean = src.running_mean
    dst.running_var = src.running_var
    dst.num_batches_tracked = src.num_batches_tracked
    dst.training = src.training
    if hasattr(src, "qconfig"):
        dst.qconfig = src.qconfig
    return dst


def _device_of(bn: _BatchNorm) -> torch.device:
    tensor = next(itertools.chain(bn.parameters(recurse=False), bn.buffers(recurse=False)), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def _reject_data_parallel(module: nn.Module) -> None:
    if any(isinstance(m, nn.DataParallel) for m in module.modules()):
        raise ValueError(
            "convert_sync_batchnorm: the model is wrapped in torch.nn.DataParallel, whose replicas are threads of "
            "one process with no process group to synchronise over. Use DistributedDataParallel (one process per "
            "device) and convert the model before or after wrapping it."
        )


# --------------------------------------------------------------------------------------------- the converters


def convert_sync_batchnorm(
    module: nn.Module, process_group: Any | None = None, impl: str = "auto", collective: str = "auto"
) -> nn.Module:
    """Replace every BatchNorm (root included, also inside DDP) by its synchronised family member, keeping its
    tensors and children; unknown subclasses are refused by name (:func:`family_of`).

    ``impl``: "auto" uses torch.nn.SyncBatchNorm's kernels for layers on CUDA and ours elsewhere, "torch" always
    torch's, "ours" always ours. ``collective`` (ours only): the forward collective, see :class:`SyncBatchNorm`.
    A layer synchronised already (a model built with ``torch.nn.SyncBatchNorm``, as mmseg/mmdet configs do, or
    converted by torch's converter) becomes the implementation ``impl`` picks, as any BatchNorm does (torch's
    refuses CPU tensors), keeping its own ``process_group`` when it has one.
    """
    if impl not in _VALID_IMPLS:
        raise ValueError(f"convert_sync_batchnorm: impl must be one of {', '.join(_VALID_IMPLS)}; got {impl!r}")
    choose_collective(collective, 1)
    _reject_data_parallel(module)

    def build(bn: _BatchNorm, family: BatchNormFamily, path: str) -> nn.Module | None:
        device = _device_of(bn)
        torch_kernels = impl == "torch" or (impl == "auto" and device.type == "cuda")
        target = family.torch_sync if torch_kernels else family.sync
        if type(bn) is target:
            return None
        own = getattr(bn, "process_group", None)  # a synchronised layer's own group stays
        group = own if own is not None else process_group
        if torch_kernels:
            new = _convert(bn, target, family, process_group=group)
            new.register_forward_hook(layers.refuse_second_derivative)
            return new
        new = _convert(bn, target, family, process_group=group, collective=collective)
        new.single_value_batches = torch.zeros((), dtype=torch.int64, device=device)
        return new

    return _replace(module, build)


def convert_ghost_batchnorm(module: nn.Module, virtual_splits: int) -> nn.Module:
    """Replace every BatchNorm (root included) by its ghost family member, keeping its tensors; ghosts stay."""

    def build(bn: _BatchNorm, family: BatchNormFamily, path: str) -> nn.Module | None:
        if type(bn) is family.ghost:
            return None
        return _convert(bn, family.ghost, family, virtual_splits=virtual_splits)

    return _replace(module, build)


def convert_local_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm (synchronised and ghost ones too) by its family's local layer: the template's own,
    whose replay under activation checkpointing counts nothing twice (torch's BatchNorm counts it: PyTorch issue
    96136). Revert gives the originals back."""

    def build(bn: _BatchNorm, family: BatchNormFamily, path: str) -> nn.Module | None:
        return None if type(bn) is family.local else _convert(bn, family.local, family)

    return _replace(module, build)


def revert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Turn synchronised, ghost and converted local layers back into local BatchNorm, for inference and export: the
    module each one replaced (same class, children and attributes; e.g. timm's ``BatchNormAct2d``), else its
    family's local layer (:class:`AnyDimBatchNorm` for a layer torch converted). The same Parameter and buffer
    objects are kept."""

    def build(bn: _BatchNorm, family: BatchNormFamily, path: str) -> nn.Module | None:
        original = getattr(bn, _ORIGINAL, None)
        if type(bn) not in family.converted() and original is None:
            return None
        if original is None:
            return _rebuild(bn, family.local, family)
        for name in family.modules:
            if name in bn._modules:
                setattr(original, name, getattr(bn, name))
        return _hand_over(bn, original)

    return _replace(module, build)
