"""Models by name: ``build_model(cfg.model, cfg.task)``.

Local models register themselves with ``@register_model("name")``; any other name is
looked up among torchvision's classification models (resnet18, resnet50,
mobilenet_v3_small, ...) and, with ``task: segmentation``, its segmentation models (deeplabv3_resnet50, fcn_resnet50,
lraspp_mobilenet_v3_large, ...), with ``task: detection`` its detectors (fasterrcnn_resnet50_fpn_v2, retinanet_resnet50_fpn_v2,
fcos_resnet50_fpn, ...). Adding a model is one file plus its import below.
"""

from models.registry import MODELS, ModelError, build_model, register_model

# Each import registers its builders.
from models import cifar_resnet, small_cnn, small_detector, small_segnet  # noqa: E402, F401  isort: skip

__all__ = ["MODELS", "ModelError", "build_model", "register_model"]
