"""Recalibrate a trained checkpoint's BatchNorm statistics on the configured data (PreciseBN), on any number of
processes, and write the result as a new checkpoint beside it, with an evaluation before and after.

    python scripts/recalibrate_bn.py --config runs/default/config.yaml --checkpoint runs/default/checkpoints/best.pt
    torchrun --standalone --nproc_per_node=2 scripts/recalibrate_bn.py --config FILE --checkpoint PATH \\
        data.root=/new/domain syncbn.precise_bn_samples=20000

Use it for a new domain (the same weights, statistics of other images) or to give a model trained without
PreciseBN its population statistics. The samples come from the configured training split
(``syncbn.precise_bn_samples``, ``engine.bn.DEFAULT_SAMPLES`` = 4,096 when the config leaves it 0; the slice the
training run's PreciseBN uses); the new file is ``<checkpoint>_recalibrated.pt``, the same checkpoint with the new
running statistics, loadable and resumable like any other.
"""

from __future__ import annotations

import argparse
import os
import sys
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # so `engine` imports when run as a script


from data import build_datasets, model_inputs, with_dataset_classes  # noqa: E402
from data.loaders import build_precise_batches, build_val_loader  # noqa: E402
from engine.bn import DEFAULT_SAMPLES, RunningStatistics  # noqa: E402
from engine.checkpoint import atomic_torch_save, check_model_compatible, load_checkpoint, strip_prefixes  # noqa: E402
from engine.config import load_config  # noqa: E402
from engine.evaluation import evaluate  # noqa: E402
from engine.inputs import InputPrep  # noqa: E402
from engine.logging import exit_code, format_metrics, setup_logger  # noqa: E402
from engine.model_setup import precise_forward, prepare_model, settle_policy  # noqa: E402
from engine.runtime.distributed import cleanup, init_distributed, launch_world_size  # noqa: E402
from models import build_model  # noqa: E402
from tasks import build_task  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the run's YAML config (e.g. <output_dir>/config.yaml)")
    parser.add_argument("--checkpoint", required=True, help="the checkpoint to recalibrate")
    parser.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    return parser.parse_args(argv)


def recalibrate(argv: list[str] | None = None) -> str:
    """Returns the path written."""
    args = parse_args(argv)
    cfg = with_dataset_classes(load_config(args.config, args.overrides, launch_world_size(args.local_rank),
                                                  defaults=model_inputs))
    ctx = init_distributed(cfg.dist, args.local_rank, cfg.syncbn.group_size if cfg.syncbn.enabled else 0)
    log = setup_logger(ctx.rank)
    checkpoint = load_checkpoint(args.checkpoint)
    model = build_model(cfg.model, cfg.task)
    weights = strip_prefixes(checkpoint["model"])
    check_model_compatible(weights, model, args.checkpoint)
    model.load_state_dict(weights)
    model = prepare_model(model, cfg, ctx)  # the run's device, memory format and BatchNorm

    datasets = build_datasets(cfg.data, cfg.model.num_classes, cfg.train.seed)
    task = build_task(cfg, datasets.ground_truth)
    pin = ctx.device.type == "cuda"
    val_loader = build_val_loader(datasets.val, cfg.data, ctx.rank, ctx.world_size, pin)
    inputs = InputPrep(ctx.device, *datasets.mean_std, channels_last=cfg.train.channels_last)
    batches = build_precise_batches(task.training_split(datasets.train), cfg, ctx.rank, ctx.world_size, pin, inputs)
    policy = settle_policy(cfg, ctx.world_size)
    as_trained = RunningStatistics(policy)  # the checkpoint's statistics, made to agree across ranks
    as_trained.track(model)
    as_trained.before_evaluation(step=0)
    before = evaluate(model, val_loader, task, inputs, cfg.train)
    precise = RunningStatistics(policy, batches, log.info, precise_forward(task))
    precise.track(model, cfg.syncbn.precise_bn_samples or DEFAULT_SAMPLES)
    precise.before_evaluation(step=0)
    after = evaluate(model, val_loader, task, inputs, cfg.train)

    stem, _ = os.path.splitext(args.checkpoint)
    out = f"{stem}_recalibrated.pt"
    if ctx.is_main:
        checkpoint["model"] = model.state_dict()
        atomic_torch_save(checkpoint, out)
    log.info(f"recalibrated {args.checkpoint} on the training samples of '{cfg.data.name}' -> {out}")
    for name, metrics in (("before", before), ("after", after)):
        log.info(f"{name:<6}  {format_metrics(metrics)}")
    return out


def main(argv: list[str] | None = None) -> int:
    try:
        return exit_code(partial(recalibrate, argv))
    finally:
        cleanup()


if __name__ == "__main__":
    sys.exit(main())
