"""Why a timm model may not learn on the default job: the rate, or the image size? ``timm/efficientnet_b0`` (made
for 224 px) on ``configs/default.yaml``'s generated 32 px images, 2 processes, side by side:

  32 px, the config's rate    what a user who only swaps model.name gets (the banner warns)
  32 px, a tenth of the rate  the rate as the suspect
  64 px, the config's rate    the size as the suspect (more than a quarter of 224: no warning)
  timm/resnet18 at 32 px      another 224 px model that does learn at 32 px (so the warning says "may")

    python benchmarks/bench_model_inputs.py            # the default job's 5 epochs of 4,096: ~14 min on 2 CPU cores
    python benchmarks/bench_model_inputs.py --epochs 3 --num-train 2048       # ~4 min
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_banner, print_table, train_job  # noqa: E402

ARMS = {
    "efficientnet_b0, 32 px, lr 0.2": ["model.name=timm/efficientnet_b0"],
    "efficientnet_b0, 32 px, lr 0.02": ["model.name=timm/efficientnet_b0", "train.lr=0.02"],
    "efficientnet_b0, 64 px, lr 0.2": ["model.name=timm/efficientnet_b0", "data.image_size=64"],
    "resnet18, 32 px, lr 0.2": ["model.name=timm/resnet18"],
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--num-train", type=int, default=4096)
    parser.add_argument("--out", default=None, help="where the runs go (default: a temporary folder)")
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="bench_model_inputs_"))
    print(machine_banner(f"default job, {args.num_train} training samples, 2 processes, {args.epochs} epochs"))
    rows = []
    for i, (name, overrides) in enumerate(ARMS.items()):
        records = train_job("default.yaml", out / str(i), [*overrides, f"train.epochs={args.epochs}",
                                                            f"data.num_train={args.num_train}", "data.num_val=512"])  # fmt: skip
        rows.append([name, " / ".join(f"{r['val_acc1']:.1f}" for r in records), f"{records[-1]['train_loss']:.2f}",
                     f"{statistics.median(r['samples_per_s'] for r in records):.0f}"])  # fmt: skip
        print(rows[-1], flush=True)
    print_table(["arm", "val_acc1 per epoch", "last train_loss", "samples/s"], rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
