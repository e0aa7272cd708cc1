"""Input pipeline: is the loader ever the bottleneck? And how long from launch to the first training step?

    python benchmarks/bench_input_pipeline.py
    python benchmarks/bench_input_pipeline.py --configs cifar --repeats 5

For configs/default.yaml (synthetic data, small_cnn) and configs/cifar10_resnet18.yaml (its workers and batch, on a
generated fake CIFAR-10 folder in torchvision's python-pickle format), it measures in one process, alternating:
  loader   samples/s of rank 0's train loader of a 2-rank job (build_train_loader: GlobalStepSampler,
           SeededAugmentation, the configured data.num_workers), one epoch per repeat, first batch excluded
           (worker start-up is counted in the launch figure instead);
  model    samples/s one rank's training step consumes (forward + backward + SGD, one thread, local BN, at least
           MODEL_SECONDS of steps on a fixed batch), i.e. the rate the loader must sustain.
Goal: loader / model >= 1 (the loader never starves a step).
Then it launches ``train_distributed.py`` with torchrun (2 ranks, gloo) and times launch -> the first training
step's log line ("[1/N]", printed when step 1 ends), and launch -> the banner (setup before data and training).
Caveat: on this 2-core machine the loader workers and the ranks share the cores; the isolated rates say whether
the loader's work per sample is small enough, not that it is free.
"""

from __future__ import annotations

import argparse
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import REPO_ROOT, fmt_stat, machine_banner, med, print_table, ratio_stat, torchrun_cmd, verdict  # noqa: E402

from data import build_datasets  # noqa: E402
from data.loaders import GlobalStepSampler, build_train_loader  # noqa: E402
from engine.config import load_config  # noqa: E402
from engine.runtime.spawn import child_env  # noqa: E402
from models import build_model  # noqa: E402

GOAL = 1.0
MODEL_SECONDS = 1.0


def make_fake_cifar10(root: str, per_batch: int = 1000, seed: int = 0) -> None:
    """cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta} with random uint8 images."""
    import numpy as np

    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)

    def batch(n: int) -> dict:
        return {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": rng.integers(0, 10, n).tolist()}

    for i in range(1, 6):
        with open(os.path.join(folder, f"data_batch_{i}"), "wb") as f:
            pickle.dump(batch(per_batch), f)
    with open(os.path.join(folder, "test_batch"), "wb") as f:
        pickle.dump(batch(per_batch), f)
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)


CONFIGS = {"default": "configs/default.yaml", "cifar": "configs/cifar10_resnet18.yaml"}


def config_overrides(name: str, cifar_root: str) -> list[str]:
    return [f"data.root={cifar_root}"] if name == "cifar" else []


def loader_vs_model(name: str, overrides: list[str], repeats: int) -> dict:
    cfg = load_config(str(REPO_ROOT / CONFIGS[name]), overrides)
    torch.set_num_threads(1)
    datasets = build_datasets(cfg.data, cfg.model.num_classes, cfg.train.seed)
    sampler = GlobalStepSampler(datasets.train, 2, 0, cfg.train.seed, batch_size=cfg.data.batch_size)
    loader = build_train_loader(datasets.train, cfg.data, sampler, cfg.train.seed, pin_memory=False)
    model = build_model(cfg.model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images, labels = next(iter(_epoch(loader, 0)))
    loader_rates, model_rates = [], []
    for r in range(repeats):
        # loader: one epoch of rank 0's shard, first batch excluded
        it = _epoch(loader, r)
        next(it)
        t0, n = time.perf_counter(), 0
        for imgs, _ in it:
            n += len(imgs)
        loader_rates.append(n / (time.perf_counter() - t0))
        # model: training steps on a fixed batch, for at least MODEL_SECONDS (a resnet18 step takes seconds here)
        t0, steps = time.perf_counter(), 0
        while steps < 2 or time.perf_counter() - t0 < MODEL_SECONDS:
            loss = F.cross_entropy(model(images), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
        model_rates.append(steps * len(images) / (time.perf_counter() - t0))
    return {"config": name, "workers": cfg.data.num_workers, "batch": cfg.data.batch_size, "model": cfg.model.name,
            "data": cfg.data.name, "loader": loader_rates, "model_rates": model_rates}


def _epoch(loader, epoch: int):
    loader.sampler.set_epoch(epoch)
    return iter(loader)


def time_to_first_step(name: str, overrides: list[str]) -> tuple[float, float]:
    """(seconds launch -> banner, seconds launch -> first step's log line) of a torchrun job of 2 ranks."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = torchrun_cmd(2, "train_distributed.py", "--config", CONFIGS[name], f"output_dir={tmp}/run",
                           "train.epochs=1", "train.tensorboard=false", "train.progress_bar=false",
                           "train.print_freq=1000", *overrides)
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=child_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        banner = first = None
        try:
            for line in proc.stdout:
                now = time.perf_counter() - t0
                if banner is None and line.startswith("== DDP"):
                    banner = now
                if "[1/" in line:
                    first = now
                    break
        finally:
            os.killpg(proc.pid, signal.SIGTERM)  # the job we started, and only it
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if first is None:
            raise RuntimeError(f"no first-step line from {' '.join(cmd)}")
        return banner or float("nan"), first


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", choices=["default", "cifar"], default=["default", "cifar"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--launch-repeats", type=int, default=3)
    args = parser.parse_args()
    print(machine_banner("setup   : loader = rank 0 of 2 (its shard), configured workers; model = 1 thread, local BN; "
                         "launch = torchrun 2 ranks, OMP_NUM_THREADS=1"), flush=True)
    with tempfile.TemporaryDirectory() as cifar_root:
        make_fake_cifar10(cifar_root)
        rows, launch_rows, ok_all = [], [], True
        for name in args.configs:
            overrides = config_overrides(name, cifar_root)
            res = loader_vs_model(name, overrides, args.repeats)
            rel = ratio_stat(res["loader"], res["model_rates"])
            ok = med(rel) >= GOAL
            ok_all &= ok
            rows.append([name, f"{res['data']} / {res['model']}", res["batch"], res["workers"],
                         fmt_stat(res["loader"], 1, 0), fmt_stat(res["model_rates"], 1, 0), fmt_stat(rel, 1, 2),
                         verdict(ok)])
            times = [time_to_first_step(name, overrides) for _ in range(args.launch_repeats)]
            launch_rows.append([name, fmt_stat([t[0] for t in times], 1, 1), fmt_stat([t[1] for t in times], 1, 1)])
            print(f"  {name}: done", flush=True)
    print_table(["config", "data / model", "batch/rank", "workers", "loader samples/s", "model samples/s (1 rank)",
                 "loader/model", "goal>=1"], rows, "Loader throughput vs model consumption (median [min-max])")
    print_table(["config", "launch -> banner s", "launch -> first step done s"], launch_rows,
                "Time to first training step (torchrun, 2 ranks)")
    print(f"\ngoal loader >= model consumption: {verdict(ok_all)}")
    return 0 if ok_all else 1


if __name__ == "__main__":
    sys.exit(main())
