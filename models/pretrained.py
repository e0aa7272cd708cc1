"""Pretrained weights: which files ``model.pretrained`` needs, fetched into the libraries' own caches before the model
is built, and a build that then reads the caches only.

torchvision, timm and segmentation_models_pytorch each download on their own when a model is built, on every
process that builds it. Here the files are named first (:func:`weight_files`, the same resolution the libraries
make), fetched by whichever process is asked to (:func:`fetch_weights`: the entry script asks one process per node,
see ``engine.runtime.distributed.fetch_once``), and every process then builds from the cache with downloads refused
(:func:`offline`). A file that cannot be fetched is one line naming it and where to put it.
"""

from __future__ import annotations

import contextlib
import os
import socket
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from urllib.parse import urlparse

from engine.config import ModelConfig
from engine.errors import ModelError
from tasks.registry import model_family


@dataclass(frozen=True)
class WeightFile:
    """A file a pretrained build reads: at ``url`` (a torch hub download into ``path``), or ``filename`` of the
    Hugging Face repository ``repo`` (at ``revision``) in the Hugging Face cache."""

    url: str = ""
    path: str = ""
    repo: str = ""
    filename: str = ""
    revision: str | None = None

    def cached(self) -> bool:
        if self.url:
            return os.path.isfile(self.path)
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(self.repo, self.filename, revision=self.revision), str)

    def where_to_put_it(self) -> str:
        if self.url:
            return f"put {self.url} at {self.path} (TORCH_HOME={_torch_home()})"
        from huggingface_hub.constants import HF_HUB_CACHE

        return (f"put {self.filename} of huggingface.co/{self.repo} in the Hugging Face cache {HF_HUB_CACHE} "
                f"(`hf download {self.repo} {self.filename}` where there is a network, then copy HF_HOME)")


def _torch_home() -> str:
    import torch.hub

    return os.path.dirname(torch.hub.get_dir())


def _hub_file(url: str) -> WeightFile:
    """``url`` as torch.hub (and timm) cache it: ``<hub dir>/checkpoints/<file name>``."""
    import torch.hub

    return WeightFile(url=url, path=os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(url).path)))


# --------------------------------------------------------------------------------------------- which files


def weight_files(cfg: ModelConfig, task: str) -> list[WeightFile]:
    """The files a build of ``cfg`` reads when ``cfg.pretrained`` (none otherwise)."""
    if not cfg.pretrained:
        return []
    library, _, name = cfg.name.rpartition("/")
    if library == "timm":
        return _timm_files(name)
    if library == "smp":
        return _smp_files(cfg.kwargs.get("encoder_name", "resnet34"), cfg.kwargs.get("encoder_weights", "imagenet"))
    return _torchvision_files(cfg, task)


def _torchvision_files(cfg: ModelConfig, task: str) -> list[WeightFile]:
    from torchvision import models as tvm

    builder = tvm.get_model_builder(cfg.name)
    hints = typing.get_type_hints(builder)
    # segmentation and detection heads are new (sized by num_classes): only the backbone's weights are fetched
    parameter = "weights_backbone" if model_family(task) in ("segmentation", "detection") else "weights"
    value = cfg.kwargs.get(parameter, "DEFAULT")
    if value is None:
        return []
    enum = next(a for a in typing.get_args(hints[parameter]) if a is not type(None))
    weights = value if isinstance(value, enum) else (enum.DEFAULT if value == "DEFAULT" else enum[str(value)])
    return [_hub_file(weights.url)]


def _timm_files(name: str) -> list[WeightFile]:
    import timm
    from timm.models._builder import _resolve_pretrained_source  # the source timm itself picks (timm is pinned)

    pretrained_cfg = timm.models.get_pretrained_cfg(name)
    if pretrained_cfg is None:
        raise ModelError(f"model.pretrained: timm has no pretrained weights for '{name}' (timm.list_pretrained())")
    source, location = _resolve_pretrained_source(pretrained_cfg.to_dict())
    if source == "url":
        return [_hub_file(location)]
    if source == "hf-hub":
        repo, filename = location if isinstance(location, tuple) else (location, "model.safetensors")
        repo, _, revision = repo.partition("@")
        return [WeightFile(repo=repo, filename=filename, revision=revision or None)]
    return []  # a local file or state_dict the user configured: nothing to fetch


def _smp_files(encoder: str, weights: object) -> list[WeightFile]:
    if encoder.startswith("tu-"):
        return _timm_files(encoder[3:])
    from segmentation_models_pytorch.encoders import encoders

    if encoder not in encoders or weights not in encoders[encoder]["pretrained_settings"]:
        return []  # smp names the problem itself when it builds
    settings = encoders[encoder]["pretrained_settings"][weights]
    return [WeightFile(repo=settings["repo_id"], filename=name, revision=settings["revision"])
            for name in ("config.json", "model.safetensors")]  # fmt: skip


# --------------------------------------------------------------------------------------------- fetching


def fetch_weights(cfg: ModelConfig, task: str, report: Callable[[str], None] | None = None) -> None:
    """Download the files of :func:`weight_files` that are not cached yet; one that cannot be fetched is a
    one-line error naming it and where to put it."""
    for file in weight_files(cfg, task):
        if file.cached():
            continue
        if report is not None:
            report(f"downloading {file.url or f'{file.repo}/{file.filename}'} (model.pretrained)")
        try:
            _download(file)
        except Exception as exc:  # no network, a proxy, a 404: all mean "not fetched"
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
            raise ModelError(f"model.pretrained: cannot fetch the weights of {cfg.name} ({reason}); "
                             f"{file.where_to_put_it()}") from None


def _download(file: WeightFile) -> None:
    if file.url:
        import torch.hub

        os.makedirs(os.path.dirname(file.path), exist_ok=True)
        match = torch.hub.HASH_REGEX.search(os.path.basename(file.path))  # torchvision's files carry a hash prefix
        torch.hub.download_url_to_file(file.url, file.path, match.group(1) if match else None, progress=False)
    else:
        from huggingface_hub import constants, hf_hub_download

        if not constants.is_offline_mode():
            socket.getaddrinfo("huggingface.co", 443)  # no network: fail now, not after the hub's five retries
        hf_hub_download(file.repo, file.filename, revision=file.revision)


def from_the_cache(cfg: ModelConfig, task: str) -> contextlib.AbstractContextManager:
    """With ``cfg.pretrained``: the weights fetched into the cache (a no-op when some process fetched them already),
    then a context in which the build reads the cache only. Without: nothing."""
    if not cfg.pretrained:
        return contextlib.nullcontext()
    fetch_weights(cfg, task)
    return offline()


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """Within: no library downloads anything. torch.hub's downloads (torchvision's, timm's) are refused naming the
    file, the Hugging Face hub reads its cache without a request (``HF_HUB_OFFLINE``)."""
    import sys

    import torch.hub

    def refuse(url: str, dst: str, *args: object, **kwargs: object) -> None:
        raise ModelError(f"model.pretrained: {os.path.basename(dst)} is not in the cache; put {url} at {dst}")

    patched = [(torch.hub, "download_url_to_file")]
    if "timm.models._hub" in sys.modules:  # timm imported torch.hub's function under its own name
        patched.append((sys.modules["timm.models._hub"], "download_url_to_file"))
    saved = [(module, name, getattr(module, name)) for module, name in patched]
    hub_constants = sys.modules.get("huggingface_hub.constants")
    was_offline = getattr(hub_constants, "HF_HUB_OFFLINE", None)
    try:
        for module, name in patched:
            setattr(module, name, refuse)
        if hub_constants is not None:
            hub_constants.HF_HUB_OFFLINE = True
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)
        if hub_constants is not None:
            hub_constants.HF_HUB_OFFLINE = was_offline
