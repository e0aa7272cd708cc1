"""The train loader's promises: augmentation is a pure function of (seed, epoch, sample), the samples of a global
step do not depend on the world size, a resume skips exactly the samples already seen, and loading in the main
process leaves the training RNG alone."""

from __future__ import annotations

import os

import pytest
import torch

from data import build_datasets
from data.loaders import GlobalStepSampler, build_train_loader
from engine.config import DataConfig

SEED = 3


def _augmented_train_set():
    cfg = DataConfig(name="synthetic", image_size=8, num_train=48, num_val=8, augment=True)
    return build_datasets(cfg, 4, SEED).train


def _batches(dataset, batch_size: int, rank: int = 0, world: int = 1, workers: int = 0, epoch: int = 1,
             start_step: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    cfg = DataConfig(name="synthetic", batch_size=batch_size, num_workers=workers, drop_last=True)
    sampler = GlobalStepSampler(dataset, world, rank, SEED, batch_size=batch_size)
    loader = build_train_loader(dataset, cfg, sampler, SEED, pin_memory=False)
    loader.sampler.set_epoch(epoch, start_step)
    return list(loader)


def test_augmentation_depends_on_the_sample_not_on_workers_and_leaves_the_training_rng_alone():
    dataset = _augmented_train_set()
    torch.manual_seed(0)
    rng_before = torch.get_rng_state()
    in_main = _batches(dataset, 8, workers=0)
    assert torch.equal(torch.get_rng_state(), rng_before), "loading in the main process moved the training RNG"
    in_workers = _batches(dataset, 8, workers=2)
    assert len(in_main) == len(in_workers) == 6
    for (x0, y0), (x2, y2) in zip(in_main, in_workers):
        assert torch.equal(x0, x2) and torch.equal(y0, y2)
    # augmentation is really on and really per epoch: another epoch gives other images
    other_epoch = _batches(dataset, 8, workers=0, epoch=2)
    assert not torch.equal(torch.cat([x for x, _ in in_main]).sort(0).values,
                           torch.cat([x for x, _ in other_epoch]).sort(0).values)


def _rows(batch: torch.Tensor) -> set[bytes]:
    return {row.numpy().tobytes() for row in batch.flatten(1)}


def test_a_global_step_holds_the_same_augmented_samples_at_any_world_size_and_after_a_resume():
    dataset = _augmented_train_set()
    one_process = _batches(dataset, 8)
    two_ranks = [_batches(dataset, 4, rank=r, world=2) for r in range(2)]
    for step, (x, _) in enumerate(one_process):
        assert _rows(x) == _rows(two_ranks[0][step][0]) | _rows(two_ranks[1][step][0]), f"step {step} differs"
    resumed = [_batches(dataset, 4, rank=r, world=2, start_step=2) for r in range(2)]  # 2 steps done
    for r in range(2):
        assert len(resumed[r]) == len(two_ranks[r]) - 2
        for (x, y), (x_ref, y_ref) in zip(resumed[r], two_ranks[r][2:]):
            assert torch.equal(x, x_ref) and torch.equal(y, y_ref)


def test_auto_loader_workers_leave_each_process_one_cpu(tmp_path):
    from data.loaders import num_workers
    from engine.config import DataConfig
    from engine.runtime.distributed import cpus_per_process

    cpus = len(os.sched_getaffinity(0))
    assert cpus_per_process({}) == cpus
    assert cpus_per_process({"LOCAL_WORLD_SIZE": str(cpus)}) == 1
    assert cpus_per_process({"LOCAL_WORLD_SIZE": str(4 * cpus)}) == 1  # never less than one
    srun = {"SLURM_PROCID": "0", "SLURM_NTASKS_PER_NODE": str(4 * cpus)}
    assert cpus_per_process({**srun, "SLURM_CPUS_PER_TASK": str(cpus)}) == cpus  # bound to its share: not divided
    assert cpus_per_process({**srun, "SLURM_CPUS_PER_TASK": str(4 * cpus)}) == cpus  # never more than it may use
    assert cpus_per_process(srun) == 1  # no --cpus-per-task: the node's CPUs over its tasks
    quota = tmp_path / "cpu.max"  # a container's quota: 1.5 CPUs -> 2, "max" -> no cap
    quota.write_text("150000 100000\n")
    assert cpus_per_process({}, str(quota)) == min(cpus, 2)
    quota.write_text("max 100000\n")
    assert cpus_per_process({}, str(quota)) == cpus
    assert num_workers(DataConfig(num_workers=3)) == 3
    assert num_workers(DataConfig()) == min(8, cpus_per_process() - 1) >= 0


def test_data_kwargs_reach_a_custom_builder_and_a_wrong_one_is_named():
    from data.registry import DATASETS, DataError, DatasetPair, register_dataset

    seen = {}

    @register_dataset("kwargs_probe")
    def build(cfg: DataConfig, num_classes: int, seed: int, scale: float = 1.0) -> DatasetPair:
        seen["scale"] = scale
        data = [(torch.zeros(3, 4, 4), 0)] * 4
        return DatasetPair(data, data, num_classes)

    try:
        build_datasets(DataConfig(name="kwargs_probe", kwargs={"scale": 2.5}), 10, 0)
        assert seen["scale"] == 2.5
        with pytest.raises(DataError, match="data.kwargs: dataset 'kwargs_probe' rejected its arguments"):
            build_datasets(DataConfig(name="kwargs_probe", kwargs={"sclae": 2.5}), 10, 0)
    finally:
        DATASETS.pop("kwargs_probe")


def test_the_train_sampler_is_torchs_distributed_sampler_with_its_arguments() -> None:
    """A copier who knows DistributedSampler reads ours: the same class, constructor arguments and set_epoch."""
    from torch.utils.data.distributed import DistributedSampler

    from data.loaders import GlobalStepSampler

    sampler = GlobalStepSampler(range(40), num_replicas=2, rank=1, seed=3, drop_last=True, batch_size=4)
    assert isinstance(sampler, DistributedSampler)
    assert (sampler.num_replicas, sampler.rank, sampler.seed, sampler.drop_last, sampler.shuffle) == (2, 1, 3, True, True)
    sampler.set_epoch(2)
    first = [index for index, epoch in sampler]
    assert sampler.epoch == 2 and len(first) == len(sampler) == 20  # 5 global steps of 8, 4 per rank
    other = GlobalStepSampler(range(40), num_replicas=2, rank=0, seed=3, batch_size=4)
    other.set_epoch(2)
    assert sorted(first + [index for index, _ in other]) == list(range(40))  # the two ranks split the epoch
