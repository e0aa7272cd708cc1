"""The entry script with a bug in rank 0's decision about the output directory (a KeyError, not a user error):
``torchrun -m tests.helpers.buggy_decision --config ...`` (tests/test_house.py)."""

import sys

import train_distributed


def _broken_prepare_output_dir(cfg):
    raise KeyError("a bug, not a user error")


if __name__ == "__main__":
    train_distributed.prepare_output_dir = _broken_prepare_output_dir
    sys.exit(train_distributed.run())
