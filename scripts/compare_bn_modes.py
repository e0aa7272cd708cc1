"""Why SyncBN matters at one or two images per process: one config trained with BatchNorm local, ghost and
synchronised (and each of local and sync with PreciseBN), on the same processes, seeds and steps; then a table of
the final validation score and of how far each mode's BatchNorm running statistics are from the population
statistics, and a plot of the validation score per epoch.

    python scripts/compare_bn_modes.py                                  # configs/segmentation.yaml on 4 processes
    python scripts/compare_bn_modes.py --config configs/detection.yaml --modes local,ghost,sync --out runs/bn_det
    python scripts/compare_bn_modes.py --config configs/voc_deeplabv3_resnet50.yaml --nproc 8 --out runs/bn_voc

Modes (b = data.batch_size per process, N = --nproc), each set by the one knob syncbn.norm_batch_size:
  local          BatchNorm per process: statistics of b samples (norm_batch_size=b)
  ghost          ghost BatchNorm: statistics of 1 sample (norm_batch_size=1; segmentation and detection, b >= 2 only)
  sync           SyncBatchNorm over all N processes: statistics of N x b samples (norm_batch_size=N x b)
  local+precise  local, then PreciseBN before each evaluation (syncbn.precise_bn_samples)
  sync+precise   sync, then PreciseBN before each evaluation

Population statistics: each run's final weights, a fresh forward in training mode over the whole training split in
batches of --population-batch (one process), every BatchNorm's mean and variance pooled over all of it (PreciseBN on
the unconverted model). The distance: over every channel of every BatchNorm layer, the mean of
|running_mean - population mean| / population std, and of |log(running_var / population var)|.

Writes <out>/bn_modes.md (the table), <out>/bn_modes.png (the plot) and <out>/<mode>/ (each run).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from data import build_datasets, model_inputs, with_dataset_classes  # noqa: E402
from data.loaders import build_val_loader  # noqa: E402
from engine.bn import batchnorm_layers, recompute_bn_stats  # noqa: E402
from engine.checkpoint import load_checkpoint, strip_prefixes  # noqa: E402
from engine.config import Config, load_config  # noqa: E402
from engine.inputs import InputPrep  # noqa: E402
from engine.model_setup import precise_forward  # noqa: E402
from engine.runtime.spawn import child_env  # noqa: E402
from models import build_model  # noqa: E402
from tasks import build_task  # noqa: E402

MODES = ("local", "ghost", "sync", "local+precise", "sync+precise")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/segmentation.yaml")
    parser.add_argument("--nproc", type=int, default=4, help="processes per run (torchrun --nproc_per_node)")
    parser.add_argument("--out", default="runs/bn_modes", help="where the runs, table and plot go")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of: {', '.join(MODES)}")
    parser.add_argument("--precise-samples", type=int, default=512, help="PreciseBN's samples in the +precise modes")
    parser.add_argument("--population-batch", type=int, default=32, help="batch of the population statistics' pass")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides for every run")
    return parser.parse_args(argv)


def norm_batch(mode: str, batch: int, nproc: int) -> int:
    """Samples per BatchNorm statistic in ``mode``."""
    return {"local": batch, "ghost": 1, "sync": batch * nproc}[mode.split("+")[0]]


def train(args: argparse.Namespace, mode: str, batch: int) -> Path:
    """One run of the entry script under torchrun; a finished run in place is reused."""
    out = Path(args.out) / mode
    extra = [f"syncbn.norm_batch_size={norm_batch(mode, batch, args.nproc)}"]
    if mode.endswith("+precise"):
        extra.append(f"syncbn.precise_bn_samples={args.precise_samples}")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
               str(REPO_ROOT / "train_distributed.py"), "--config", args.config, f"output_dir={out}",
               "train.progress_bar=false", "train.tensorboard=false", *args.overrides, *extra]
    env = child_env(threads=int(os.environ.get("OMP_NUM_THREADS", "1")))
    start = time.perf_counter()
    print(f"[{mode}] {' '.join(extra)}", flush=True)
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"[{mode}] failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    print(f"[{mode}] done in {time.perf_counter() - start:.0f}s", flush=True)
    return out


def history(run: Path) -> list[dict]:
    with open(run / "metrics.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def bn_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [layer for _, layer in batchnorm_layers(model)]


def distance_to_population(cfg: Config, run: Path, population_batch: int) -> tuple[float, float]:
    """(mean error in population stds, mean |log variance ratio|) of the run's final BatchNorm running stats."""
    model = build_model(cfg.model, cfg.task)
    weights = strip_prefixes(load_checkpoint(str(run / "checkpoints" / "last.pt"))["model"])
    model.load_state_dict(weights)
    trained = [(m.running_mean.clone(), m.running_var.clone()) for m in bn_layers(model)]
    pair = build_datasets(cfg.data, cfg.model.num_classes, cfg.train.seed)
    # the training split with its training transforms, in order, each sample once, as the model takes it
    loader = build_val_loader(pair.train, _with_batch(cfg, population_batch).data, rank=0, world_size=1,
                              pin_memory=False)
    inputs = InputPrep(torch.device("cpu"), *pair.mean_std)
    batches = ((inputs(images), inputs.targets(targets)) for images, targets in loader)
    torch.manual_seed(cfg.train.seed)  # the training transforms' crops and flips
    with torch.no_grad():  # through the task's training forward: a detector's heads see its sampled proposals
        recompute_bn_stats(model, batches, len(pair.train), precise_forward(build_task(cfg, pair.ground_truth)))
    mean_errors, var_errors = [], []
    for layer, (mean, var) in zip(bn_layers(model), trained):
        std = (layer.running_var + layer.eps).sqrt()
        mean_errors.append(((mean - layer.running_mean).abs() / std).flatten())
        var_errors.append(((var + layer.eps) / (layer.running_var + layer.eps)).log().abs().flatten())
    return torch.cat(mean_errors).mean().item(), torch.cat(var_errors).mean().item()


def _with_batch(cfg: Config, batch: int) -> Config:
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, val_batch_size=batch, num_workers=0))


def write_plot(results: dict[str, list[dict]], metric: str, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for mode, records in results.items():
        ax.plot([r["epoch"] for r in records], [r[metric] for r in records], marker="o", markersize=3, label=mode)
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.chdir(REPO_ROOT)
    cfg = with_dataset_classes(load_config(args.config, args.overrides, args.nproc, defaults=model_inputs))
    batch, metric = cfg.data.batch_size, cfg.train.best_metric
    modes = [m for m in args.modes.split(",") if m and not (m.startswith("ghost") and batch < 2)]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        sys.exit(f"--modes: unknown {', '.join(unknown)}; known: {', '.join(MODES)}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    runs = {mode: train(args, mode, batch) for mode in modes}

    results = {mode: history(run) for mode, run in runs.items()}
    rows = [f"| BatchNorm | normalisation batch | final {metric} | best {metric} | BN mean error (std) | "
            "BN var error (abs log ratio) |", "|---|---|---|---|---|---|"]
    for mode, run in runs.items():
        run_cfg = load_config(str(run / "config.yaml"), world_size=args.nproc)
        mean_err, var_err = distance_to_population(run_cfg, run, args.population_batch)
        scores = [r[metric] for r in results[mode]]
        rows.append(f"| {mode} | {norm_batch(mode, batch, args.nproc)} | {scores[-1]:.2f} | {max(scores):.2f} | "
                    f"{mean_err:.3f} | {var_err:.3f} |")
    title = (f"{cfg.model.name} on {cfg.data.name}: {args.nproc} processes x {batch} per process, "
             f"{cfg.train.epochs} epochs")
    table = "\n".join([f"{title}\n", *rows]) + "\n"
    (Path(args.out) / "bn_modes.md").write_text(table, encoding="utf-8")
    write_plot(results, metric, Path(args.out) / "bn_modes.png", title)
    print(table)
    print(f"wrote {args.out}/bn_modes.md and {args.out}/bn_modes.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
