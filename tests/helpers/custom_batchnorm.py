"""The entry script with the user's models of ``tests.helpers.custom_models`` registered:
``torchrun -m tests.helpers.custom_batchnorm --config ... model.name=net_with_custom_bn`` (tests/test_model_libraries.py)."""

import sys

import tests.helpers.custom_models  # noqa: F401  (registers net_with_custom_bn)
import train_distributed

if __name__ == "__main__":
    sys.exit(train_distributed.run())
