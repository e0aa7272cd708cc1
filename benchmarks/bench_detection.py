"""What detection's BatchNorm costs at 2 images per process, and what its exact evaluation costs, side by side in the
same processes.

    python benchmarks/bench_detection.py [--repeats 8] [--steps 6]

In 2 spawned gloo ranks (1 thread each): ``small_detector`` on ``synthetic_detection`` (the CPU default: 96-128 px
images, 2 per process), three DDP copies of the same initial model, each trained on the same fixed batch, in
interleaved rounds (ABBA order, the ranks lined up by a barrier before each block, the slowest rank's time):

  local        BatchNorm per process (syncbn.enabled false)
  sync         SyncBN over both ranks: one collective forward and one backward per BatchNorm layer (the default)
  sync+check   SyncBN with syncbn.check_calls: one more small all-gather per layer, before its forward collective

Then the exact evaluation of the 101 validation images, split into its two parts: the predictions (each image alone,
on its rank) and the scoring (every rank's detections gathered, pycocotools on rank 0, the scores sent back).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from common import REPO_ROOT, fmt_stat, interleaved_times, machine_banner, print_table, ratio_stat, run_ranks  # noqa: E402

VARIANTS = ("local", "sync", "sync+check")


def _worker(rank: int, world_size: int, repeats: int, steps: int) -> dict:
    sys.path.insert(0, str(REPO_ROOT))
    from torch.nn.parallel import DistributedDataParallel as DDP

    from data import build_datasets
    from engine.bn import check_layer_calls, convert_sync_batchnorm
    from engine.config import load_config
    from engine.inputs import InputPrep
    from models import build_model
    from tasks import DetectionTask

    torch.set_num_threads(1)
    cfg = load_config(str(REPO_ROOT / "configs" / "detection.yaml"), ["data.num_train=8"])
    pair = build_datasets(cfg.data, cfg.model.num_classes, cfg.train.seed)
    prep, task = InputPrep(torch.device("cpu"), *pair.mean_std), DetectionTask(pair.ground_truth)
    samples = [pair.val[i] for i in range(2 * rank, 2 * rank + 2)]
    images, targets = prep([s[0] for s in samples]), [s[1] for s in samples]
    torch.manual_seed(0)
    base = build_model(cfg.model, cfg.task)
    models = {"local": DDP(copy.deepcopy(base))}
    for name in ("sync", "sync+check"):
        synced = convert_sync_batchnorm(copy.deepcopy(base))
        if name == "sync+check":
            check_layer_calls(synced)
        models[name] = DDP(synced, forward_sync_buffers=False)
    optimizers = {name: torch.optim.SGD(m.parameters(), lr=0.001, momentum=0.9) for name, m in models.items()}

    def step(name: str) -> None:
        models[name].train()
        task.training_loss(models[name], images, targets).backward()
        optimizers[name].step()
        optimizers[name].zero_grad(set_to_none=True)

    times = interleaved_times({name: (lambda n=name: step(n)) for name in VARIANTS}, repeats, steps,
                              torch.device("cpu"), barrier=dist.barrier)  # fmt: skip

    model = models["sync"].module.eval()
    shard = range(rank, len(pair.val), world_size)
    dist.barrier()
    start = time.perf_counter()
    scorer = task.scorer(torch.device("cpu"))
    with torch.no_grad():
        for i in shard:
            image, target = pair.val[i]
            scorer.update(model(prep([image])), [target])
    predicted = time.perf_counter()
    dist.barrier()
    scored_from = time.perf_counter()
    scores = scorer.result()
    done = time.perf_counter()
    return {"times": times, "predict_s": predicted - start, "score_s": done - scored_from, "val_map": scores["val_map"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6, help="training steps per timed block")
    args = parser.parse_args(argv)
    print(machine_banner("2 gloo ranks x 1 thread, small_detector, 2 images per process"))
    ranks = run_ranks(_worker, 2, args.repeats, args.steps)
    slowest = {name: [max(r["times"][name][i] for r in ranks) for i in range(args.repeats)] for name in VARIANTS}
    rows = [[name, fmt_stat(slowest[name], 1e3, 1), fmt_stat(ratio_stat(slowest[name], slowest["sync"]), digits=3)]
            for name in VARIANTS]  # fmt: skip
    print_table(["variant", "ms per training step", "ratio to sync"], rows,
                f"training steps ({args.repeats} rounds of {args.steps})")
    predict_s, score_s = max(r["predict_s"] for r in ranks), max(r["score_s"] for r in ranks)
    print_table(["part", "seconds", "share"],
                [["predictions (slowest rank)", f"{predict_s:.2f}", f"{predict_s / (predict_s + score_s):.0%}"],
                 ["scoring (gather + pycocotools)", f"{score_s:.2f}", f"{score_s / (predict_s + score_s):.0%}"]],
                f"exact evaluation of 101 images (val_map {ranks[0]['val_map']:.2f}, untrained weights)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
