"""What global BN does for contrastive pretraining, on real small images: scikit-learn's handwritten digits as an
image folder (1,797 8x8 scans, upscaled to 32 px PNGs, 80/20 split), SimCLR (configs/contrastive.yaml's recipe on
the folder) with BatchNorm local, ghost and synchronised, on 2 and 4 processes at the same global batch; each run's
k-NN accuracy and the linear probe of its backbone, against the same network trained supervised.

    python benchmarks/bench_contrastive_bn.py                     # needs scikit-learn (pip install scikit-learn)
    python benchmarks/bench_contrastive_bn.py --epochs 30 --nproc 2 4 --out runs/bench_contrastive

Modes at a global batch of 128 images (256 views): local = each process's images (128 / W), ghost = 8 images per
statistic, sync = all 128; BatchNorm in backbone and projection head alike (syncbn.norm_batch_size).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import digits_folder, machine_banner, print_table, train_job  # noqa: E402

GLOBAL_BATCH, GHOST = 128, 8


def linear_probe(checkpoint: Path) -> float:
    from scripts.linear_probe import probe

    return probe(["--checkpoint", str(checkpoint)])["val_acc1"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--nproc", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--out", default=None, help="where the runs go (default: a temporary folder)")
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="bench_contrastive_"))
    images = digits_folder(out / "digits")
    data = ["data.name=imagefolder", f"data.root={images}", "data.image_size=32", "data.val_batch_size=128",
            f"data.global_batch_size={GLOBAL_BATCH}", "data.view_crop_scale=[0.3, 1.0]", "data.num_workers=0",
            f"train.epochs={args.epochs}"]  # fmt: skip
    print(machine_banner(f"setup   : digits as 32 px PNGs (1,437 train / 360 val), small_cnn, global batch {GLOBAL_BATCH} "
                         f"images, {args.epochs} epochs, torchrun on {args.nproc} CPU processes of 1 thread"), flush=True)
    rows = []
    for nproc in args.nproc:
        per_process = GLOBAL_BATCH // nproc
        for mode, norm in (("local", per_process), ("ghost", GHOST), ("sync", GLOBAL_BATCH)):
            run = out / f"{mode}_{nproc}"
            overrides = [*data, f"data.batch_size={per_process}", f"syncbn.norm_batch_size={norm}"]
            records = train_job("contrastive.yaml", run, overrides, nproc)
            knn = [r["val_knn_acc1"] for r in records]
            probe = linear_probe(run / "checkpoints" / "last.pt")
            rows.append([f"{mode} ({2 * norm} views per statistic)", nproc, f"{knn[-1]:.1f}", f"{max(knn):.1f}", f"{probe:.1f}"])
            print(rows[-1], flush=True)
    supervised = out / "supervised"
    records = train_job("contrastive.yaml", supervised, [*data, f"data.batch_size={GLOBAL_BATCH // args.nproc[0]}",
                                                         "task=classification", "train.lr=0.2", "data.augment=true"],
                        args.nproc[0])  # fmt: skip
    probe = linear_probe(supervised / "checkpoints" / "last.pt")
    rows.append(["supervised (sync, cross-entropy)", args.nproc[0], "", "", f"{probe:.1f} (its own val_acc1 "
                 f"{records[-1]['val_acc1']:.1f})"])  # fmt: skip
    print_table(["BatchNorm", "processes", "val_knn_acc1 (last)", "(best)", "linear probe val_acc1"], rows,
                "SimCLR on scikit-learn's digits: BatchNorm local, ghost and synchronised")
    print(f"runs in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
