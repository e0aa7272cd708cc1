"""Distributed loaders: a resumable, seed-stable train sampler and an exact (unpadded) eval sampler.

Two properties the rest of the template relies on:
- the samples of global step k, and of each of its micro-steps, are the same at any world size (contiguous
  blocks per rank), and a run can restart at any step of an epoch, on any number of processes;
- augmentation is a pure function of (seed, epoch, sample index), independent of
  world size, worker count and restarts, so resumed runs are bit-identical.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate, get_worker_info
from torch.utils.data.distributed import DistributedSampler

from engine.config import Config, DataConfig
from engine.errors import DataError
from engine.inputs import InputPrep
from engine.runtime.distributed import cpus_per_process
from tasks import IGNORE_INDEX


class GlobalStepSampler(DistributedSampler):
    """torch's DistributedSampler, cut into global steps: this rank's share of each step as contiguous blocks, each
    index tagged with its epoch (``(index, epoch)``, so augmentation is seeded per (seed, epoch, sample)).

    An epoch is a permutation of the dataset (seeded by ``seed + epoch``, as DistributedSampler's) cut into global
    steps of G = replicas x accumulation x batch samples. Within step k, micro-step m, rank r takes positions
    ``k G + m (W b) + r b ... + b - 1``. So a global step holds the same samples at any world size, and each micro-step
    the same block of W b samples: the normalisation groups (SyncBN over consecutive ranks, one rank's batch, ghost
    splits of it) cover the same samples at any world size too, and a run can change its number of processes
    between two steps and continue the same run. ``drop_last`` drops an incomplete last step; otherwise the
    permutation wraps around to fill it. ``set_epoch(epoch, start_step)`` resumes inside an epoch.

    ``groups`` (a group id per sample, as detection's aspect-ratio bins): the permutation is first regrouped so that
    each global step holds samples of one group where it can (:func:`grouped_order`), so every rank's batch pads
    little, every rank still gets the same number of batches, and a step is still the same at any world size.
    ``record``: a file this rank appends what it fetches to (``debug.record_samples``, for tests).
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int = 0, drop_last: bool = True, *,
                 batch_size: int, accumulate_steps: int = 1, groups: Sequence[int] | None = None,
                 record: str | None = None) -> None:  # fmt: skip
        super().__init__(dataset, num_replicas, rank, shuffle=True, seed=seed, drop_last=drop_last)
        self.batch, self.accumulate_steps, self.groups, self.record = batch_size, accumulate_steps, groups, record
        self.global_batch = num_replicas * accumulate_steps * batch_size
        size = len(dataset)
        self.steps = size // self.global_batch if drop_last else -(-size // self.global_batch)
        self.start_step = 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Select the epoch's permutation; the first ``start_step`` global steps are skipped (a resume)."""
        self.epoch, self.start_step = epoch, start_step

    def __iter__(self) -> Iterator[tuple[int, int]]:
        size = len(self.dataset)
        order = torch.randperm(size, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        if self.groups is not None:
            order = grouped_order(order, self.groups, self.global_batch)
        order = order.repeat(-(-self.steps * self.global_batch // size))  # wraps around when not drop_last
        span = self.num_replicas * self.batch  # one micro-step of every rank
        positions = [k * self.global_batch + m * span + self.rank * self.batch + j
                     for k in range(self.start_step, self.steps) for m in range(self.accumulate_steps)
                     for j in range(self.batch)]  # fmt: skip
        indices = order[positions].tolist()
        if self.record is not None:
            return self._recorded(positions, indices)
        return iter([(index, self.epoch) for index in indices])

    def _recorded(self, positions: list[int], indices: list[int]) -> Iterator[tuple[int, int]]:
        with open(self.record, "a", encoding="utf-8") as f:
            for position, index in zip(positions, indices):
                f.write(f"{self.epoch} {position} {index}\n")
                f.flush()
                yield index, self.epoch

    def __len__(self) -> int:
        return (self.steps - self.start_step) * self.accumulate_steps * self.batch


def samples_file(cfg: Config, rank: int) -> str | None:
    """``debug.record_samples`` (tests): the file rank ``rank`` appends the sample indices it trains on to."""
    return f"{cfg.output_dir}/samples_rank{rank}.txt" if cfg.debug.record_samples else None


def grouped_order(order: torch.Tensor, groups: Sequence[int], step: int) -> torch.Tensor:
    """``order`` rearranged into runs of ``step`` samples of one group, in the order the runs fill up while ``order``
    is walked (torchvision's GroupedBatchSampler, for whole global steps); what is left of each group at the end
    follows in ``order``'s order, mixing groups. A pure function of its inputs: every rank computes the same."""
    filling: dict[int, list[int]] = {}
    full, position = [], {}
    for at, index in enumerate(order.tolist()):
        position[index] = at
        run = filling.setdefault(groups[index], [])
        run.append(index)
        if len(run) == step:
            full.extend(run)
            run.clear()
    left = sorted((index for run in filling.values() for index in run), key=position.__getitem__)
    return torch.tensor(full + left, dtype=order.dtype)


def aspect_ratio_groups(dataset: Dataset, factor: int) -> list[int] | None:
    """Each sample's aspect-ratio bin (width / height against 2**linspace(-1, 1, 2 factor + 1), torchvision's
    bins), from the sizes a detection dataset knows without decoding (``image_sizes()``: (height, width) per
    sample); None when ``factor`` is 0 or the dataset knows no sizes (classification crops are all square)."""
    sizes = getattr(dataset, "image_sizes", None)
    if factor == 0 or sizes is None:
        return None
    bins = [2 ** (-1 + 2 * i / (2 * factor)) for i in range(2 * factor + 1)]
    return [bisect.bisect_right(bins, width / height) for height, width in sizes()]


class ShardedEvalSampler(Sampler[int]):
    """Every sample exactly once across ranks: rank r takes r, r+W, r+2W, ... with no padding."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int) -> None:
        self.size, self.num_replicas, self.rank = len(dataset), num_replicas, rank

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.size, self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, self.size, self.num_replicas))


class SeededAugmentation(Dataset):
    """Seeds torch's RNG from (seed, epoch, index) before each sample, so augmentation is reproducible."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: list[tuple[int, int]]) -> list:
        """The DataLoader fetches a whole batch here: one RNG fork per batch, one seed per sample."""
        if get_worker_info() is not None:  # a worker process owns its RNG
            return self._seeded_samples(keys)
        with torch.random.fork_rng(devices=[]):  # main process: leave the training RNG untouched
            return self._seeded_samples(keys)

    def _seeded_samples(self, keys: list[tuple[int, int]]) -> list:
        samples = []
        for index, epoch in keys:
            # only the CPU generator: torch.manual_seed would also seed every CUDA generator (~200x slower)
            torch.default_generator.manual_seed(hash((self.seed, epoch, index)) & 0x7FFF_FFFF_FFFF_FFFF)
            samples.append(self.dataset[index])  # (a tuple-of-int hash is stable across processes and runs)
        return samples


def _seed_worker(worker_id: int) -> None:
    # torch seeds each worker distinctly; give python's and numpy's RNGs (used by user transforms) the same seed
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass


def num_workers(cfg: DataConfig) -> int:
    """``data.num_workers``, with ``auto``: one CPU per process for the training loop, the rest (at most 8) for
    loading; 0 (load in the training process) when a process has a single CPU."""
    if cfg.num_workers != "auto":
        return cfg.num_workers
    return min(8, cpus_per_process() - 1)


def _loader_kwargs(cfg: DataConfig, pin_memory: bool) -> dict:
    workers = num_workers(cfg)
    return {
        "num_workers": workers,
        "pin_memory": pin_memory,
        "persistent_workers": workers > 0,
        "worker_init_fn": _seed_worker,
    }


def build_train_loader(dataset: Dataset, cfg: DataConfig, sampler: DistributedSampler, seed: int,
                       pin_memory: bool) -> DataLoader:  # fmt: skip
    """The training loader over ``sampler`` (a :class:`GlobalStepSampler`: call ``sampler.set_epoch(e)`` every
    epoch), augmentation seeded per (seed, epoch, sample)."""
    return DataLoader(
        SeededAugmentation(dataset, seed),
        batch_size=cfg.batch_size,
        sampler=sampler,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(seed + sampler.rank),
        **_loader_kwargs(cfg, pin_memory),
    )


class SameBatches:
    """A train loader read from its epoch 0 each time it is iterated: the same samples every time, made by
    ``inputs`` into what the model takes (on its device)."""

    def __init__(self, loader: DataLoader, inputs: InputPrep) -> None:
        self.loader, self.inputs = loader, inputs

    def __iter__(self) -> Iterator[Any]:
        self.loader.sampler.set_epoch(0)
        return ((self.inputs(images), self.inputs.targets(targets)) for images, targets in self.loader)


def build_precise_batches(dataset: Dataset, cfg: Config, rank: int, world_size: int, pin_memory: bool,
                          inputs: InputPrep) -> SameBatches:  # fmt: skip
    """PreciseBN's slice of the training data (for the model, the EMA, or a recalibration): a train loader with its
    own seed, always read from epoch 0, so a resumed run recomputes exactly what the uninterrupted one did."""
    seed = cfg.train.seed + 1
    sampler = GlobalStepSampler(dataset, world_size, rank, seed, cfg.data.drop_last, batch_size=cfg.data.batch_size,
                                groups=aspect_ratio_groups(dataset, cfg.data.aspect_ratio_group_factor))  # fmt: skip
    return SameBatches(build_train_loader(dataset, cfg.data, sampler, seed, pin_memory), inputs)


def build_val_loader(dataset: Dataset, cfg: DataConfig, rank: int, world_size: int, pin_memory: bool) -> DataLoader:
    """Each sample on exactly one rank; sums and counts are reduced by the evaluator."""
    return DataLoader(
        dataset,
        batch_size=cfg.val_batch_size or cfg.batch_size,
        sampler=ShardedEvalSampler(dataset, world_size, rank),
        collate_fn=collate,
        **_loader_kwargs(cfg, pin_memory),
    )


def collate(batch: list[tuple[Any, Any]]) -> Any:
    """torch's default collation, except: detection samples (a dict target each) stay a list of images and a list
    of targets, as detectors take them; images of different sizes (segmentation evaluation keeps each image's own)
    are padded at the bottom and right to the batch's largest: images with 0, masks with the ignore index, so
    padding is never scored. (A net sees the padding as context: ``data.val_batch_size: 1`` scores every image
    alone.)"""
    if isinstance(batch[0][1], dict):
        return [image for image, _ in batch], [target for _, target in batch]
    images = [image for image, _ in batch]
    if all(image.shape == images[0].shape for image in images):
        return default_collate(batch)
    height, width = max(i.shape[-2] for i in images), max(i.shape[-1] for i in images)

    def pad(t: torch.Tensor, value: int) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, width - t.shape[-1], 0, height - t.shape[-2]), value=value)

    return torch.stack([pad(i, 0) for i in images]), torch.stack([pad(m, IGNORE_INDEX) for _, m in batch])


def steps_per_epoch(loader: DataLoader, accumulate_steps: int) -> int:
    """Optimizer steps in one epoch of ``loader`` (a train loader); a data set too small for one is an error."""
    steps = len(loader) // accumulate_steps
    if steps == 0:
        raise DataError(
            f"data.batch_size: {len(loader.dataset)} training samples give no full step of {loader.batch_size} "
            f"per process x {loader.sampler.num_replicas} processes x {accumulate_steps} accumulation "
            f"(train.accumulate_steps); lower data.batch_size or use fewer processes"
        )
    return steps
