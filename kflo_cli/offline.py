"""Building models without the network, and refusing ``--pretrained`` quickly when its weights cannot be had.

Two rules (``docs/architecture.md``, "Offline and local weights"):

* **Building never downloads** unless ``pretrained`` asks for it. torchvision's segmentation and detection builders
  fetch an ImageNet backbone by default (``weights_backbone``); kflo builds them with ``weights_backbone=None``
  and gives the result the architecture of the model's published (pretrained) weights, so the same name and
  arguments always mean the same keys and shapes, online or not, pretrained or not
  (:func:`torchvision_build_kwargs`, :func:`match_pretrained_architecture`).
* **``pretrained`` fails fast offline.** Before a library asks its hub, :func:`pretrained_source` looks for the
  weights in the local caches (torch hub's ``checkpoints`` folder, the Hugging Face cache) and, when they are not
  there, sends one HEAD request to the weights' host (:data:`CONNECT_TIMEOUT` seconds). Cached weights load
  with the Hugging Face client in offline mode; unreachable ones are one :class:`KfloError` sentence naming the
  local alternatives, instead of a minute of the hub client's retries.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, Iterator
from urllib.parse import urlparse

import torch.nn as nn

from .errors import KfloError

#: Seconds one request to a weights host may take (name lookup included) before kflo calls it unreachable.
CONNECT_TIMEOUT = 3.0

#: torchvision builders that give their backbone ``FrozenBatchNorm2d`` when it starts from trained weights
#: (``norm_layer = FrozenBatchNorm2d if is_trained else BatchNorm2d`` in torchvision 0.20-0.29). Their published
#: weights have that architecture; built with ``weights_backbone=None`` they get plain ``BatchNorm2d`` (other
#: state-dict keys), so kflo turns those back into ``FrozenBatchNorm2d``. ``tests/test_detection_segmentation.py``
#: checks every builder that takes ``weights_backbone`` against the installed torchvision.
FROZEN_BN_BACKBONES = frozenset({
    "fasterrcnn_resnet50_fpn",
    "fasterrcnn_mobilenet_v3_large_fpn",
    "fasterrcnn_mobilenet_v3_large_320_fpn",
    "fcos_resnet50_fpn",
    "keypointrcnn_resnet50_fpn",
    "maskrcnn_resnet50_fpn",
    "retinanet_resnet50_fpn",
})


def torchvision_build_kwargs(bare: str, kw: dict[str, Any], pretrained: bool) -> dict[str, Any]:
    """The arguments kflo adds to a torchvision builder call so that it downloads nothing: ``weights_backbone=None``
    for builders that take it, unless pretrained or the caller passed it. Never recorded in the model's kwargs."""
    if pretrained or "weights_backbone" in kw:
        return {}
    import torchvision.models as tvm

    try:
        params = inspect.signature(tvm.get_model_builder(bare)).parameters
    except (ValueError, TypeError):  # pragma: no cover - a builder without a signature
        return {}
    return {"weights_backbone": None} if "weights_backbone" in params else {}


def match_pretrained_architecture(bare: str, model: nn.Module, call: dict[str, Any]) -> nn.Module:
    """Give a model built with ``weights_backbone=None`` (in ``call``, the builder's arguments) the architecture of
    its published weights: the backbone's ``BatchNorm2d`` become ``FrozenBatchNorm2d`` (same ``eps`` and values)
    for :data:`FROZEN_BN_BACKBONES`.

    The backbone stays trainable throughout: torchvision freezes its first blocks only when they start from
    trained weights, which a model built without ``pretrained`` does not (``--init-from`` loads them later).
    """
    if "weights_backbone" not in call or call["weights_backbone"] is not None or bare not in FROZEN_BN_BACKBONES:
        return model
    from torchvision.ops.misc import FrozenBatchNorm2d

    body = model.get_submodule("backbone.body")
    for name, module in list(body.named_modules()):
        if type(module) is not nn.BatchNorm2d:
            continue
        frozen = FrozenBatchNorm2d(module.num_features, eps=module.eps)
        for key in ("weight", "bias", "running_mean", "running_var"):
            value = getattr(module, key)
            if value is not None:
                getattr(frozen, key).copy_(value.detach())
        parent, _, child = name.rpartition(".")
        setattr(body.get_submodule(parent) if parent else body, child, frozen)
    return model


@dataclass
class WeightsSource:
    """Where a model's pretrained weights come from: ``host`` (the server a download would reach; ``None`` when
    the library names no remote file), the cache folders looked in, and whether a copy is there already."""

    host: str | None
    places: tuple[str, ...]
    cached: bool
    hf: bool = False


def _torch_cache(url: str) -> str:
    import torch.hub

    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(url).path))


def _hf_cached(repo: str, filenames: list[str]) -> bool:
    from huggingface_hub import try_to_load_from_cache

    repo_id, _, revision = repo.partition("@")
    for name in filenames:
        try:
            found = try_to_load_from_cache(repo_id, name, revision=revision or None)
        except Exception:  # noqa: BLE001  (a damaged cache is "not cached")
            found = None
        if isinstance(found, str) and os.path.isfile(found):
            return True
    return False


def _hf_cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _hf_host() -> str | None:
    from huggingface_hub import constants

    return urlparse(constants.ENDPOINT).hostname


def pretrained_source(source: str, bare: str) -> WeightsSource | None:
    """Where ``source:bare``'s default pretrained weights would come from, or ``None`` when kflo cannot tell (the
    library then reports the problem itself, e.g. timm's "no pretrained weights")."""
    if source == "torchvision":
        import torchvision.models as tvm

        try:
            url = tvm.get_model_weights(bare).DEFAULT.url
        except (ValueError, KeyError, AttributeError):
            return None
        path = _torch_cache(url)
        return WeightsSource(urlparse(url).hostname, (os.path.dirname(path),), os.path.isfile(path))
    try:
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(bare)
    except Exception:  # noqa: BLE001  (an unknown or plugin model: let timm answer)
        return None
    if cfg is None:
        return None
    if getattr(cfg, "file", None) or getattr(cfg, "state_dict", None):
        return WeightsSource(None, (), True)
    url, hub_id = getattr(cfg, "url", None), getattr(cfg, "hf_hub_id", None)
    if hub_id:  # timm prefers the Hugging Face hub whenever the config names a repository
        names = [cfg.hf_hub_filename] if getattr(cfg, "hf_hub_filename", None) else [
            "model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        return WeightsSource(_hf_host(), (_hf_cache_dir(),), _hf_cached(hub_id, names), hf=True)
    if url:
        path = _torch_cache(url)
        return WeightsSource(urlparse(url).hostname, (os.path.dirname(path),), os.path.isfile(path))
    return None


def reachable(host: str, timeout: float = CONNECT_TIMEOUT) -> bool:
    """Whether ``https://host/`` answers within ``timeout`` seconds: one HEAD request through the proxies the
    environment names, any HTTP status counting as an answer. A TCP connection alone is not proof (some networks
    accept every connection and fail at TLS), and name lookup has no timeout of its own, so the request runs in a
    thread that is given up after ``timeout``."""
    result: list[bool] = []

    def attempt() -> None:
        request = urllib.request.Request(f"https://{host}/", method="HEAD")
        try:
            with urllib.request.urlopen(request, timeout=timeout):
                result.append(True)
        except urllib.error.HTTPError:
            result.append(True)
        except (OSError, ValueError):  # URLError (no route, name lookup, TLS), timeouts, a malformed proxy
            result.append(False)

    thread = threading.Thread(target=attempt, daemon=True, name="kflo-reachable")
    thread.start()
    thread.join(timeout + 0.5)
    return bool(result and result[0])


@contextlib.contextmanager
def _hf_offline() -> Iterator[None]:
    """The Hugging Face client in offline mode: cached files only, no request and so no retries."""
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


@contextlib.contextmanager
def quiet_hub() -> Iterator[None]:
    """Silence the Hugging Face client's warnings (its "Retrying in 8s" lines) while a model loads; a failure
    still arrives as an exception, which kflo turns into one sentence."""
    logger = logging.getLogger("huggingface_hub")
    before = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(before)


def refusal(model_id: str, where: WeightsSource) -> str:
    """The one sentence for pretrained weights that are neither cached nor reachable."""
    looked = " and ".join(where.places) or "the local caches"
    cache = "that cache" if len(where.places) == 1 else "one of those caches"
    return (f"pretrained weights for '{model_id}' are not cached (looked in {looked}) and {where.host} is unreachable "
            f"(no network?); drop --pretrained and start from local weights with --init-from FILE.safetensors, a plain "
            "checkpoint of this architecture (`kflo convert` turns a .pth state dict into one), or put the weights "
            f"into {cache} on a machine with network")


@contextlib.contextmanager
def pretrained_guard(source: str, bare: str) -> Iterator[None]:
    """Around a pretrained build: refuse at once (:class:`KfloError`) when the weights are neither cached nor
    reachable; load cached Hugging Face weights offline when their host is unreachable; silence hub retries."""
    where = pretrained_source(source, bare)
    offline = False
    if where is not None and where.host is not None:
        if not where.cached and not reachable(where.host):
            raise KfloError(refusal(f"{source}:{bare}", where))
        offline = where.cached and where.hf and not reachable(where.host)
    with quiet_hub(), (_hf_offline() if offline else contextlib.nullcontext()):
        yield


__all__ = ["CONNECT_TIMEOUT", "FROZEN_BN_BACKBONES", "WeightsSource", "match_pretrained_architecture",
           "pretrained_guard", "pretrained_source", "quiet_hub", "reachable", "refusal", "torchvision_build_kwargs"]
