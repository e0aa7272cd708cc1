"""How fast ``train_distributed.py --help`` answers, against importing torch (what it used to wait for).

    python benchmarks/bench_help.py [--repeats 7]

Both are launched as fresh interpreters, interleaved; the table gives the median [min-max] wall time and the ratio.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO_ROOT, fmt_stat, machine_banner, med, print_table, ratio_stat  # noqa: E402

COMMANDS = {
    "train_distributed.py --help": [sys.executable, str(REPO_ROOT / "train_distributed.py"), "--help"],
    "python -c 'import torch'": [sys.executable, "-c", "import torch"],
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(args.repeats):
        for name, command in COMMANDS.items():
            start = time.perf_counter()
            subprocess.run(command, cwd=REPO_ROOT, capture_output=True, check=True)
            times[name].append(time.perf_counter() - start)
    print(machine_banner(f"setup   : {args.repeats} interleaved launches of each"))
    help_s, torch_s = times["train_distributed.py --help"], times["python -c 'import torch'"]
    rows = [[name, fmt_stat(t, 1, 2)] for name, t in times.items()]
    rows.append(["--help / import torch", fmt_stat(ratio_stat(help_s, torch_s), 1, 3)])
    print_table(["command", "seconds (median [min-max])"], rows, "--help against importing torch")
    return 0 if med(help_s) < med(torch_s) else 1


if __name__ == "__main__":
    sys.exit(main())
