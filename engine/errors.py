"""The one-line user errors: one base class, so the entry script catches them all in one place.

A ``UserError`` means "the input is wrong" (a key, a file, the launcher's environment, the data), never a bug:
the entry prints ``error: <message>`` on one line, exits 1 on every rank, and shows no traceback. Anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

import re


class UserError(Exception):
    """A problem the user fixes by changing an input; the message names the key, file or rank."""

    # every rank meets it alike (a config, a shared file, an agreed decision): only rank 0 prints it
    same_on_every_rank = True

    def __str__(self) -> str:
        text = super().__str__()
        # raised in a DataLoader worker, it comes back wrapped in the worker's traceback: keep the message
        if text.startswith("Caught ") and "\nOriginal Traceback" in text:
            return text.rstrip().splitlines()[-1].split(": ", 1)[-1]
        return text


class ConfigError(UserError, ValueError):
    """A config problem, reported as one line naming the key or file."""


class LaunchError(UserError):
    """The launcher's environment (rank, world size, devices, ports) does not describe a runnable job."""

    same_on_every_rank = False  # e.g. one rank without a GPU: that rank says so


class DataError(UserError, ValueError):
    """A data problem (missing root, empty folder, class-count mismatch), reported as one line."""


class SampleError(DataError):
    """A bad sample (a file named in the message), met by the rank that loads it."""

    same_on_every_rank = False


class ModelError(UserError, ValueError):
    """An unknown model name or bad constructor arguments, reported as one line."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be read or does not fit this run, named by path."""


class NonFiniteLossError(UserError, RuntimeError):
    """The loss became NaN or infinite; training stops instead of producing silent garbage."""


class RankZeroError(UserError, RuntimeError):
    """An error a rank met while deciding for everyone (rank 0 mostly); every rank re-raises it."""


class PeerFailed(UserError, RuntimeError):
    """Another rank failed with a bug (its traceback is printed there); this rank stops, saying so in one line."""

    same_on_every_rank = False


def from_torch(exc: BaseException) -> UserError | None:
    """A torch error that means the input is wrong, as the one-line error naming the keys that fix it; else None."""
    text = str(exc)
    if isinstance(exc, ValueError) and "more than 1 value per channel" in text:
        # torch's BatchNorm refuses a training batch of one value per channel: one sample through a pooled
        # feature, as DeepLab's image pooling at one image per process
        shape = text.rpartition("input size ")[2]
        error = DataError(f"data.batch_size: a BatchNorm layer got one value per channel (input {shape}: one sample "
                          "through a pooled feature); use data.batch_size >= 2 per process or syncbn.enabled=true")
        error.same_on_every_rank = False  # met by the rank whose batch it was
        return error
    channels = re.search(r"expected input\[([\d, ]+)\] to have (\d+) channels, but got (\d+) channels", text)
    if isinstance(exc, RuntimeError) and channels:
        return DataError(f"data.channels: the images have {channels.group(3)} channels but the model's first layer "
                         f"takes {channels.group(2)}; make them agree (data.channels, or the model's input channels "
                         "in model.kwargs, e.g. in_channels or in_chans)")
    size = re.search(r"Wrong image height! Expected (\d+) but got (\d+)!", text)  # torchvision's ViT, fixed size
    if isinstance(exc, AssertionError) and size:
        return DataError(f"data.image_size: the model takes {size.group(1)} px images only but got {size.group(2)} px; "
                         f"set data.image_size={size.group(1)} (and no other crop sizes), or build the model for the "
                         f"data: model.kwargs={{image_size: {size.group(2)}}}")
    return None
