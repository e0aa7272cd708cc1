"""Do the small-folder recipe's knobs pay on real scans? scikit-learn's digits (1,437 training and 360 validation
8x8 scans, upscaled to 32 px PNGs) trained with ``configs/imagefolder_small.yaml`` on 2 processes, side by side:

  reference choices   the horizontal flip at 0.5 and ImageNet's mean and std: what torchvision's reference trainer
                      (references/classification/train.py) does whatever the data, since it has no flags for them;
  the recipe          no flip (a mirrored digit is no digit) and the folder's own mean and std
                      (scripts/image_stats.py), everything else the same;
  + policies          the recipe plus TrivialAugment, random erasing 0.1 and MixUp/CutMix (torchvision's ImageNet
                      regularisers) at this scale.

    python benchmarks/bench_recipes.py                 # needs scikit-learn; ~10 min on 2 CPU cores
    python benchmarks/bench_recipes.py --epochs 10 --seeds 0

Each arm runs once per seed; the table gives the final and best validation top-1 (mean over seeds) and the
training throughput of all processes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import digits_folder, machine_banner, print_table, train_job  # noqa: E402

from scripts.image_stats import channel_statistics  # noqa: E402

IMAGENET = ["data.mean=[0.485, 0.456, 0.406]", "data.std=[0.229, 0.224, 0.225]"]
POLICIES = ["data.auto_augment=trivialaugment_wide", "data.random_erase=0.1", "train.mixup_alpha=0.2",
            "train.cutmix_alpha=1.0"]  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--out", default=None, help="where the runs go (default: a temporary folder)")
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="bench_recipes_"))
    root = digits_folder(out / "digits")
    mean, std = channel_statistics(sorted(str(p) for p in (root / "train").rglob("*.png")))
    own = [f"data.root={root}", f"data.mean={mean}", f"data.std={std}"]
    arms = {
        "reference choices (flip 0.5, ImageNet mean/std)": [f"data.root={root}", "data.hflip_prob=0.5", *IMAGENET],
        f"the recipe (no flip, mean {mean} std {std})": own,
        "the recipe + TrivialAugment, erasing, MixUp/CutMix": [*own, *POLICIES],
    }
    print(machine_banner(f"digits 32 px, resnet18, 2 processes, {args.epochs} epochs, seeds {args.seeds}"))
    rows = []
    for name, overrides in arms.items():
        finals, bests, rates = [], [], []
        for seed in args.seeds:
            run = out / f"{len(rows)}_{seed}"
            records = train_job("imagefolder_small.yaml", run, [*overrides, f"train.epochs={args.epochs}", f"train.seed={seed}"])
            finals.append(records[-1]["val_acc1"])
            bests.append(max(r["val_acc1"] for r in records))
            rates.append(statistics.median(r["samples_per_s"] for r in records))
        rows.append([name, f"{statistics.mean(finals):.2f}", " / ".join(f"{f:.2f}" for f in finals),
                     f"{statistics.mean(bests):.2f}", f"{statistics.median(rates):.0f}"])  # fmt: skip
    print_table(["arm", "final top-1", "per seed", "best top-1", "samples/s"], rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
