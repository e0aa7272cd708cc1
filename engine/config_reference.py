"""What every config key means: ``--help`` and the README's config table are generated from here and the schema's
defaults (docs/config.md's table is tested against :func:`reference_table`), so they cannot disagree."""

from __future__ import annotations

from typing import Any

import yaml

from engine.config import Config, config_to_dict

# One line per key: what it means.
HELP: dict[str, str] = {
    "output_dir": "everything the run writes (one run, one global batch per directory)",
    "task": "classification, segmentation, detection or your own (tasks/): decides targets, loss, metrics "
            "(docs/tasks.md)",
    "model.name": "registry name: a local model, a torchvision model, timm/<name> or smp/<Architecture>",
    "model.num_classes": "number of outputs; 0: the dataset's count (an image folder's class folders, CIFAR's, VOC's, "
                         "COCO's), as the shipped image-folder configs set",
    "model.pretrained": "the library's weights, fetched once per node into its cache (docs/models.md)",
    "model.kwargs": "extra keyword arguments for the model's builder",
    "model.projection_dim": "contrastive: the projection head's output size (SimCLR's 128)",
    "model.aux_loss_weight": "segmentation: > 0 builds the model's auxiliary head and adds this weight x its loss",
    "model.unfreeze_bn": "detection: the backbone's FrozenBatchNorm2d (torchvision's, with pretrained weights) made "
                         "trainable BatchNorm2d, so SyncBN synchronises it",
    "data.name": "registry name: synthetic, cifar10, cifar100, imagefolder, fake; synthetic_segmentation, voc, "
                 "segmentation_folder; synthetic_detection, coco; or your own",
    "data.root": "where the dataset's files are",
    "data.batch_size": "samples per step **per process**",
    "data.global_batch_size": "samples per optimizer step over all processes; > 0 derives data.batch_size for each "
                              "world size (a run continues on another number of processes); 0 = off",
    "data.val_batch_size": "evaluation batch per process; 0 = data.batch_size (detection: 1, exact at any world size)",
    "data.num_workers": "loader workers per process; auto: the CPUs each process of the node gets, minus one, at most 8",
    "data.image_size": "training and evaluation image side, in pixels; segmentation: the training crop. Image "
                       "folders with a timm model: unset takes the model's input size (so do mean, std, "
                       "interpolation and val_resize_size: docs/models.md)",
    "data.base_size": "segmentation: short side before the random scale, and at evaluation; 0 = as stored",
    "data.scale_range": "segmentation training: the random rescale factor's range (x data.base_size)",
    "data.augment": "training augmentation (seeded per seed, epoch and sample)",
    "data.mean": "per-channel mean of uint8 images scaled to [0, 1] (one value: every channel); []: the dataset's "
                 "(ImageNet's, CIFAR's; an image folder with a timm model: the model's); used on the device, by "
                 "predict and by export's notes",
    "data.std": "per-channel standard deviation, as data.mean",
    "data.hflip_prob": "training's horizontal flip probability (0: never mirror: digits, text, some medical images)",
    "data.crop_scale": "classification training: random-resized crop's area fraction [low, high] (image folders)",
    "data.crop_ratio": "classification training: random-resized crop's aspect ratio range [low, high]",
    "data.train_crop_size": "classification: the training crop's side; 0 = data.image_size (torchvision's "
                            "--train-crop-size)",
    "data.val_resize_size": "classification: evaluation's short-side resize; 0 = val_crop_size / 0.875 (CIFAR: the "
                            "crop; unset with a timm model on an image folder: / its crop_pct) (torchvision's "
                            "--val-resize-size)",
    "data.val_crop_size": "classification: evaluation's center crop; 0 = data.image_size (torchvision's --val-crop-size)",
    "data.interpolation": "classification: bilinear, bicubic or nearest, for every resize (training and evaluation)",
    "data.auto_augment": "classification training, on uint8: none, trivialaugment_wide, randaugment, augmix, "
                         "autoaugment_imagenet, autoaugment_cifar10, autoaugment_svhn (torchvision v2's)",
    "data.auto_augment_kwargs": "the policy's parameters, e.g. {num_ops: 2, magnitude: 9} for randaugment, "
                                "{severity: 3} for augmix",
    "data.random_erase": "classification training: probability of erasing a random rectangle to the mean colour "
                         "(torchvision's recipes: 0.1)",
    "data.decoder": "image files: torchvision (libjpeg-turbo, into tensors), pil, or auto (the fastest that reads the "
                    "file; PIL's reduced-size JPEG decode at evaluation where it covers the resize)",
    "data.aspect_ratio_group_factor": "detection: each step's images from one of 2k+2 aspect-ratio bins, as "
                                      "torchvision's reference (3); 0 = off",
    "data.drop_last": "drop the last incomplete training batch",
    "data.view_crop_scale": "contrastive: each view's random crop, as a fraction of the image's area [low, high]",
    "data.view_color_jitter": "contrastive: colour strength s on uint8 images (brightness, contrast, saturation 0.8s, hue "
                              "0.2s, with p 0.8); 0 = off",
    "data.view_grayscale": "contrastive: probability of a grayscale view (uint8 images)",
    "data.view_blur": "contrastive: probability of a Gaussian blur (uint8 images; SimCLR: 0.5 on ImageNet)",
    "data.download": "cifar: let torchvision fetch the archive into data.root",
    "data.num_train": "synthetic and fake data: training samples",
    "data.num_val": "synthetic and fake data: validation samples",
    "data.channels": "synthetic and fake data: image channels",
    "data.kwargs": "extra keyword arguments for the dataset's builder",
    "train.epochs": "epochs to train (a finished run trains on when this grows)",
    "train.lr": "learning rate at train.base_batch_size global samples (with train.lr_scaling none: the rate as "
                "written, as torchvision's --lr); the banner prints the rate in use",
    "train.lr_scaling": "lr = train.lr x f(global batch / base): none, linear or sqrt",
    "train.base_batch_size": "the global batch train.lr is given for",
    "train.optimizer": "sgd or adamw",
    "train.momentum": "SGD momentum",
    "train.nesterov": "SGD with Nesterov momentum",
    "train.weight_decay": "weight decay (not on BatchNorm parameters and biases); auto: 5e-4 for sgd, 0.05 for adamw",
    "train.schedule": "cosine, poly (power 0.9), step or constant; stepped per optimizer step",
    "train.warmup_epochs": "linear warmup before the schedule, in epochs",
    "train.step_milestones": "step schedule: epochs at which the lr is multiplied by train.step_gamma",
    "train.step_gamma": "step schedule: the factor at each milestone",
    "train.min_lr": "the floor of the cosine schedule",
    "train.label_smoothing": "cross-entropy label smoothing",
    "train.mixup_alpha": "classification: MixUp of each batch's images and labels, mixing weight ~ Beta(a, a) (soft "
                          "targets); 0 = off; seeded per step, so a resume mixes the same",
    "train.cutmix_alpha": "classification: CutMix, as train.mixup_alpha; both > 0: one of the two per batch, at random",
    "train.temperature": "contrastive: NT-Xent's temperature",
    "train.knn_k": "contrastive: neighbours in the k-NN monitor (val_knn_acc1)",
    "train.knn_temperature": "contrastive: the k-NN monitor's vote temperature (votes weighted exp(cosine / t))",
    "train.accumulate_steps": "gradient accumulation (no gradient all-reduce on the other micro-steps)",
    "train.clip_grad_norm": "max gradient norm (unscaled first under fp16); 0 = off",
    "train.amp": "autocast: off, bf16, or fp16 (with a GradScaler)",
    "train.channels_last": "channels_last memory format",
    "train.grad_checkpointing": "activation checkpointing of the model's blocks (timm's switch, ResNet stages, the local "
                                "models): one more forward of those blocks for less activation memory; BatchNorm stays exact",
    "train.compile": "torch.compile the whole model (our SyncBN traces with it)",
    "train.seed": "seed of the data order, augmentation and initialisation",
    "train.resume": "auto: continue the run in output_dir; none: a fresh run only; or a checkpoint path",
    "train.eval_only": "evaluate a checkpoint and exit, writing nothing",
    "train.eval_checkpoint": "eval_only with resume auto: the run's last or best checkpoint",
    "train.checkpoint_every_steps": "mid-epoch checkpoints every N optimizer steps; 0 = at epoch ends only",
    "train.keep_checkpoints": "history checkpoints kept for fallback",
    "train.agree_every_steps": "steps between the ranks' agreements (global loss, NaN check; stop signals are polled every step)",
    "train.ema_decay": "EMA of the weights with this decay, evaluated and saved beside the model; 0 = off",
    "train.ema_warmup": "EMA decay warmup: min(decay, (1 + u) / (10 + u)) after u updates",
    "train.ema_every": "optimizer steps between EMA updates",
    "train.ema_buffers": "the EMA's BatchNorm buffers: average (like the weights), copy (the model's), or precise",
    "train.best_metric": "the metric that picks best.pt, one of the task's (or its EMA's: <name>_ema); auto: "
                         "its first (val_acc1, val_miou, val_map)",
    "train.print_freq": "steps between console lines and per-step TensorBoard points",
    "train.progress_bar": "a tqdm bar on rank 0 when attached to a terminal",
    "train.tensorboard": "TensorBoard logs in output_dir/tensorboard (false: none, whatever train.trackers says)",
    "train.trackers": "where metrics go besides metrics.jsonl, on rank 0: tensorboard, wandb, mlflow (each imported "
                      "only when named; one failing is a warning; docs/trackers.md)",
    "train.tracker_project": "the W&B project and the MLflow experiment the run logs to",
    "syncbn.enabled": "convert every BatchNorm to SyncBatchNorm before DDP",
    "syncbn.impl": "auto (torch's on CUDA, ours elsewhere; ours with train.grad_checkpointing), torch or ours",
    "syncbn.collective": "ours: the forward collective, all_gather or all_reduce (O(C)); auto: all_reduce from 4 ranks",
    "syncbn.group_size": "0 = synchronise over the whole world; k = groups of k consecutive ranks",
    "syncbn.virtual_splits": "with syncbn.enabled false: ghost BatchNorm, k statistics groups per process",
    "syncbn.buffer_policy": "with SyncBN off: running stats agree by broadcast from rank 0, or reduce (pooled)",
    "syncbn.precise_bn_samples": "PreciseBN before each evaluation: exact population stats over N training samples",
    "syncbn.norm_batch_size": "samples per BatchNorm statistic; sets enabled, group_size and virtual_splits; 0 = off",
    "syncbn.check_calls": "each SyncBN call first checks that every rank is in the same layer (a model that skips "
                          "layers by the data stops with one line instead of mixing statistics or waiting)",
    "dist.backend": "auto (nccl on GPUs, gloo on CPUs), nccl or gloo",
    "dist.timeout_s": "a collective waiting on a dead peer fails after this long",
    "dist.find_unused_parameters": "DDP's find_unused_parameters",
    "dist.step_timeout_s": "no step finished for this long: the stuck rank ends the job naming itself; 0 = off",
    "dist.exit_with_launcher": "a worker exits when its launcher (or shell) dies; false to detach from a shell",
    "debug.fault_step": "test-only fault injection: the step; -1 = off",
    "debug.fault_rank": "test-only fault injection: the rank",
    "debug.fault_kind": "test-only fault injection: raise, exit, nan, sigkill, hang, or signal (SIGUSR1 to itself)",
    "debug.fault_point": "test-only fault injection: step, before_checkpoint or after_checkpoint",
    "debug.fault_once": "test-only fault injection: not again after a restart",
    "debug.record_samples": "test-only: each rank appends the sample indices it trains on to output_dir/samples_rank<r>.txt",
}


TEST_SECTIONS = ("debug",)  # keys for the test suite's hooks: valid in a config, not listed for users (docs/testing.md)


def reference(sections: tuple[str, ...] | None = None) -> list[tuple[str, Any, str]]:
    """(dotted key, default, meaning) of every key a user sets (or of ``sections``' keys), in schema order."""
    rows = []
    for section, value in config_to_dict(Config()).items():
        if (section in TEST_SECTIONS) if sections is None else (section not in sections):
            continue
        items = value.items() if isinstance(value, dict) else [(None, value)]
        for key, default in items:
            dotted = section if key is None else f"{section}.{key}"
            rows.append((dotted, default, HELP[dotted]))
    return rows


def _yaml_value(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def reference_table(sections: tuple[str, ...] | None = None) -> str:
    """The config table of docs/config.md (markdown); ``sections``: the test hooks' of docs/testing.md."""
    lines = ["| key | default | meaning |", "|---|---|---|"]
    lines += [f"| `{key}` | `{_yaml_value(default)}` | {meaning} |" for key, default, meaning in reference(sections)]
    return "\n".join(lines)


def reference_text() -> str:
    """The config keys for ``--help``: one line each, grouped by section."""
    lines, section = [], None
    for key, default, meaning in reference():
        head = key.split(".", 1)[0]
        if head != section:
            lines.append("")
            section = head
        lines.append(f"  {key + '=' + _yaml_value(default):<38} {meaning.replace('**', '')}")
    return "\n".join(lines)
