"""Tasks by name: ``build_task(cfg, ground_truth)``; ``task:`` in the config picks one.

Adding a task is one file with a ``@register_task("name")`` class plus its import below (README: Your own task).
"""

from tasks.registry import TASKS, Scorer, Task, build_task, main_output, register_task, task_class

# Each import registers its task.
from tasks.classification import ClassificationScorer, ClassificationTask  # noqa: E402  isort: skip
from tasks.detection import DetectionScorer, DetectionTask  # noqa: E402  isort: skip
from tasks.segmentation import IGNORE_INDEX, SegmentationScorer, SegmentationTask, to_mask_size  # noqa: E402  isort: skip
from tasks.contrastive import ContrastiveTask, KnnScorer  # noqa: E402  isort: skip

__all__ = [
    "IGNORE_INDEX",
    "KnnScorer",
    "TASKS",
    "ClassificationScorer",
    "ClassificationTask",
    "ContrastiveTask",
    "DetectionScorer",
    "DetectionTask",
    "Scorer",
    "SegmentationScorer",
    "SegmentationTask",
    "Task",
    "build_task",
    "main_output",
    "register_task",
    "task_class",
    "to_mask_size",
]
