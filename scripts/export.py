"""Export a trained checkpoint as a deployable program: ``torch.export`` (an ExportedProgram, ``.pt2``) always, ONNX
on request; BatchNorm as plain layers, the outputs checked against the eager model before anything is written, and
the preprocessing saved beside it.

    python scripts/export.py --checkpoint runs/x/checkpoints/best.pt --out exported/model      # model.pt2 + .json
    python scripts/export.py --checkpoint ... --out exported/model --onnx --ema                # + model.onnx

The program takes float images (N, 3, H, W), RGB, scaled to [0, 1] and normalised by the mean and std in
``<out>.json``, resized and cropped as it says (what ``scripts/predict.py`` does), and returns logits ((N, classes),
or (N, classes, H', W') for segmentation); a run on generated data takes tensors like its samples (``<out>.json``
says their shape). The batch size is dynamic. ONNX needs ``onnx``, ``onnxscript`` and
``onnxruntime`` (``pip install -r requirements-export.txt``); onnxruntime checks the file before it is kept.

Load it: ``program = torch.export.load("model.pt2"); logits = program.module()(images)``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # so `engine` imports when run as a script

import torch  # noqa: E402
from torch import nn  # noqa: E402

from engine.bn import revert_sync_batchnorm  # noqa: E402
from engine.errors import UserError  # noqa: E402
from engine.logging import exit_code  # noqa: E402
from scripts.trained_model import Logits, TrainedModel, load_trained_model  # noqa: E402
from tasks import task_class  # noqa: E402

ATOL, RTOL = 1e-4, 1e-4  # exported vs eager, float32 on the CPU (the same kernels, other fusion orders)


def example_input(trained: TrainedModel, batch: int = 2) -> torch.Tensor:
    """A batch of the size the model is fed at evaluation: the crop, or for segmentation the resize (or the
    training crop when images are evaluated as stored); a run on generated data: its samples' channels and side."""
    p, data = trained.preprocessing, trained.cfg.data
    side = (p.crop or p.resize if p is not None else 0) or data.image_size
    channels = 3 if p is not None else data.channels
    return torch.randn(batch, channels, side, side, generator=torch.Generator().manual_seed(0))


def export_program(model: nn.Module, example: torch.Tensor) -> torch.export.ExportedProgram:
    """``model`` (SyncBatchNorm or ghost layers turned back into plain BatchNorm first; eval mode) as an
    ExportedProgram with a dynamic batch, checked against the eager model on another batch."""
    module = Logits(revert_sync_batchnorm(model)).eval()
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(module, (example,), dynamic_shapes={"images": {0: batch}})
    check = torch.randn(example.shape[0] + 1, *example.shape[1:], generator=torch.Generator().manual_seed(1))
    _same_outputs(program.module()(check), module(check), "torch.export")
    return program


def export_onnx(model: nn.Module, example: torch.Tensor, path: str) -> None:
    """``model`` to ONNX at ``path`` (dynamo exporter, dynamic batch), checked with onnxruntime first."""
    try:
        import onnxruntime
        import onnxscript  # noqa: F401  (the dynamo exporter needs it)
    except ImportError as exc:
        raise UserError(f"--onnx needs onnx, onnxscript and onnxruntime ({exc.name} is missing): "
                        "pip install -r requirements-export.txt") from None  # fmt: skip
    module = Logits(revert_sync_batchnorm(model)).eval()
    batch = torch.export.Dim("batch", min=1, max=4096)
    torch.onnx.export(module, (example,), path, dynamo=True, external_data=False, input_names=["images"],
                      output_names=["logits"], dynamic_shapes={"images": {0: batch}})  # fmt: skip
    check = torch.randn(example.shape[0] + 1, *example.shape[1:], generator=torch.Generator().manual_seed(1))
    try:
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        (got,) = session.run(None, {"images": check.numpy()})
        with torch.no_grad():
            _same_outputs(torch.from_numpy(got), module(check), "ONNX (onnxruntime)")
    except BaseException:
        os.remove(path)  # nothing is kept that was not checked
        raise


def _same_outputs(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    if got.shape != want.shape or not torch.allclose(got, want, atol=ATOL, rtol=RTOL):
        error = (got - want).abs().max().item() if got.shape == want.shape else f"shape {tuple(got.shape)}"
        raise UserError(f"{what}: the exported model's outputs differ from the eager model's ({error}); "
                        "nothing written")


def export(argv: list[str] | None = None) -> list[str]:
    """Returns the files written."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a checkpoint of this template (e.g. .../best.pt)")
    parser.add_argument("--out", default="exported/model", help="the files' path without suffix")
    parser.add_argument("--onnx", action="store_true", help="also ONNX (requirements-export.txt)")
    parser.add_argument("--ema", action="store_true", help="the EMA's weights (a run with train.ema_decay)")
    args = parser.parse_args(argv)
    trained = load_trained_model(args.checkpoint, ema=args.ema)
    if task_class(trained.cfg.task).model_family == "detection":  # torchvision's box decoding and NMS keep data-dependent sizes
        raise UserError(f"{args.checkpoint}: a detection model does not export with torch.export (its non-maximum "
                        "suppression yields data-dependent shapes); use scripts/predict.py, or the checkpoint's "
                        "weights with torchvision")
    example = example_input(trained)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    written = [f"{args.out}.pt2", f"{args.out}.json"]
    program = export_program(trained.model, example)
    torch.export.save(program, written[0])
    p = trained.preprocessing
    if p is not None:
        feed = (f"float32 (N, 3, H, W), RGB scaled to [0, 1], minus mean, over std; short side resized to "
                f"{p.resize or 'as stored'}, center crop {p.crop or 'none'}")  # fmt: skip
    else:
        feed = (f"float32 (N, {example.shape[1]}, {example.shape[2]}, {example.shape[3]}) as the run's generated "
                f"samples (data.name={trained.cfg.data.name}: no image preprocessing)")  # fmt: skip
    with open(written[1], "w", encoding="utf-8") as f:
        json.dump({"task": trained.cfg.task, "model": trained.cfg.model.name, "class_names": trained.class_names,
                   "preprocessing": p.as_dict() if p is not None else None, "input": feed,
                   "weights": "EMA" if args.ema else "model", "checkpoint": os.path.abspath(args.checkpoint)},
                  f, indent=2)  # fmt: skip
    if args.onnx:
        written.append(f"{args.out}.onnx")
        export_onnx(trained.model, example, written[-1])
    print("wrote " + ", ".join(written) + " (outputs checked against the eager model)")
    return written


def main(argv: list[str] | None = None) -> int:
    return exit_code(partial(export, argv))


if __name__ == "__main__":
    sys.exit(main())
