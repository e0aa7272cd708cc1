"""Datasets by name: ``build_datasets(cfg.data, num_classes, seed)``; loaders and samplers beside them.

Adding a dataset is one file with a ``@register_dataset("name")`` builder plus its import below.
"""

from data.model_inputs import model_inputs
from data.registry import DATASETS, DataError, DatasetPair, build_datasets, register_dataset, with_dataset_classes

# Each import registers its builders.
from data import cifar, detection, fake, imagefolder, segmentation, synthetic, synthetic_segmentation  # noqa: E402, F401  isort: skip

__all__ = ["DATASETS", "DataError", "DatasetPair", "build_datasets", "model_inputs", "register_dataset",
           "with_dataset_classes"]
