"""Encoder initialisations compared by ``radpretrain evaluate``.

An init is given on the command line as one of

- ``scratch``: random weights (timm's default init); input statistics of the evaluated store;
- ``imagenet``: the backbone's ImageNet weights (local files only); input statistics are the grey
  equivalent (mean of the three channels) of the weights' own ``pretrained_cfg``;
- ``RUN_OR_EXPORT``: a radpretrain pretraining run or export folder
  (:func:`radpretrain.models.weights.load_run_encoder`); statistics from its ``encoder.json``;
- ``NAME=RUN1,RUN2,...``: an init group, several runs of one recipe (pretraining seeds); each run
  is evaluated as its own init ``NAME-1``, ``NAME-2``, ... (:func:`parse_inits`);
- ``state_dict:PATH[:ARCH]``: a plain state dict from elsewhere (``.safetensors``, or a torch file
  read with ``weights_only=True``); ``ARCH`` defaults to ``--backbone``.  Key mapping options
  (``key=value`` arguments of ``evaluate``):

  ``state_dict.strip_prefix=module.,encoder.``  prefixes removed from every key (default: the
  common wrappers ``module.``, ``model.``, ``encoder.``, ``backbone.`` are removed when the keys
  then match the model); ``state_dict.rename=OLD=>NEW;OLD2=>NEW2`` regular-expression renames
  applied after prefix stripping; ``state_dict.strict=true`` (missing encoder keys are an error;
  classifier/head keys of the source are always dropped); ``state_dict.mean`` /
  ``state_dict.std``: the input statistics the weights were trained with (default: the store's).

Grey input: a 3-channel first convolution is reduced to one channel by summing over
the colour axis, as timm does (``grey=timm``, default), which equals feeding the grey
image three times.  ``grey=replicate`` instead keeps 3-channel weights and repeats the
grey image into three channels, each normalised with its own channel mean/std.

Every init is wrapped in :class:`InitEncoder`, which takes store images in [0, 1]
and applies the init's own normalisation, so protocols never see raw statistics.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from radpretrain.errors import UserError
from radpretrain.models.backbones import create_backbone, grey_stats, is_vit, prefers_channels_last, resolve_arch
from radpretrain.models.weights import load_run_encoder, read_state_dict
from radpretrain.utils import get_logger

log = get_logger("evaluate")

COMMON_PREFIXES = ("module.", "model.", "encoder.", "backbone.", "_orig_mod.")
HEAD_PATTERN = re.compile(r"^(classifier|head|fc|last_linear|head_drop)(\.|$)")
GROUP_PATTERN = re.compile(r"^([A-Za-z][A-Za-z0-9_.-]*)=(.+)$")  # --init NAME=RUN1,RUN2,...


@dataclass
class InitSpec:
    """A parsed ``--init`` argument."""

    kind: str            # scratch | imagenet | run | state_dict
    name: str            # short label used in tables and file names
    path: str | None = None
    arch: str | None = None
    group: str | None = None  # the init group (``--init NAME=RUN1,RUN2,...``) this run belongs to

    @property
    def label(self) -> str:
        return self.name


def parse_init(text: str) -> InitSpec:
    t = text.strip()
    if t in ("scratch", "random"):
        return InitSpec("scratch", "scratch")
    if t == "imagenet":
        return InitSpec("imagenet", "imagenet")
    if t.startswith("state_dict:"):
        rest = t[len("state_dict:"):]
        path, arch = rest, None
        # PATH:ARCH, where PATH may itself contain ':' only if it exists as a file
        if not Path(rest).exists() and ":" in rest:
            path, arch = rest.rsplit(":", 1)
        if not Path(path).is_file():
            raise UserError(f"--init {text}: {path}: weight file not found")
        return InitSpec("state_dict", _safe_name(Path(path).stem), path=path, arch=arch or None)
    p = Path(t)
    if not p.exists():
        raise UserError(f"--init {text}: not 'scratch', 'imagenet', 'state_dict:PATH[:ARCH]' "
                        "or an existing run/export folder")
    name = p.name if p.is_dir() else p.stem
    return InitSpec("run", _safe_name(name), path=str(p))


def parse_inits(items) -> list[InitSpec]:
    """Every ``--init`` (strings or :class:`InitSpec`), with init groups expanded into their runs.

    ``NAME=RUN1,RUN2,...`` is an init group: several pretraining runs of one recipe (different
    seeds).  Each run is evaluated as its own init, named ``NAME-1``, ``NAME-2``, ... in the
    order given, with ``group=NAME``; the report adds the group's seed mean and spread.  A text
    that is an existing path is always a single init, even when it holds ``=``.
    """
    specs: list[InitSpec] = []
    groups: list[str] = []
    for item in items:
        if isinstance(item, InitSpec):
            specs.append(item)
            continue
        m = GROUP_PATTERN.match(str(item).strip())
        if m is None or Path(str(item).strip()).exists():
            specs.append(parse_init(str(item)))
            continue
        name, members = m.group(1), [t.strip() for t in m.group(2).split(",") if t.strip()]
        if name in ("scratch", "random", "imagenet") or name in groups:
            raise UserError(f"--init {item}: the group name {name!r} is "
                            + ("given twice" if name in groups else "reserved; choose another"))
        if len(members) < 2:
            raise UserError(f"--init {item}: a group needs at least two runs, comma-separated (NAME=RUN1,RUN2)")
        groups.append(name)
        for i, text in enumerate(members, 1):
            spec = parse_init(text)
            if spec.kind not in ("run", "state_dict"):
                raise UserError(f"--init {item}: {text!r} is not a run, export or state_dict:PATH; a group holds "
                                "pretrained runs of one recipe (compare scratch/imagenet as their own --init)")
            spec.name, spec.group = f"{name}-{i}", name
            specs.append(spec)
    taken = {s.name for s in specs if s.group is None}
    clash = sorted(set(groups) & taken)
    if clash:
        raise UserError(f"--init: {clash[0]!r} names both a group and a single init; rename one")
    return specs


def init_groups(specs: list[InitSpec]) -> dict[str, list[str]]:
    """``{group: [its inits' names, in order]}`` of the parsed inits."""
    out: dict[str, list[str]] = {}
    for s in specs:
        if s.group is not None:
            out.setdefault(s.group, []).append(s.name)
    return out


def _safe_name(s: str) -> str:
    s = re.sub(r"[^A-Za-z0-9_.-]+", "-", s).strip("-.")
    return s or "init"


def unique_names(specs: list[InitSpec]) -> list[InitSpec]:
    """Make init names unique (``run``, ``run-2``, ...) and refuse duplicated scratch/imagenet."""
    seen: dict[str, int] = {}
    for s in specs:
        if s.name in seen:
            if s.kind in ("scratch", "imagenet"):
                raise UserError(f"--init {s.name} given twice")
            seen[s.name] += 1
            s.name = f"{s.name}-{seen[s.name]}"
        else:
            seen[s.name] = 1
    return specs


class InitEncoder(nn.Module):
    """Store image in [0, 1] -> normalised ``channels``-channel input -> pooled features."""

    def __init__(self, model: nn.Module, mean, std, channels: int = 1):
        super().__init__()

        if prefers_channels_last(model, "cpu"):  # same values, faster depthwise convolutions on CPU
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.channels = int(channels)
        m = torch.as_tensor(mean, dtype=torch.float32).reshape(-1)
        s = torch.as_tensor(std, dtype=torch.float32).reshape(-1)
        if len(m) == 1:
            m, s = m.repeat(self.channels), s.repeat(self.channels)
        self.register_buffer("mean", m.view(1, -1, 1, 1))
        self.register_buffer("std", s.view(1, -1, 1, 1))
        self.num_features = int(getattr(model, "num_features", 0) or 0)

    def normalize(self, img01: torch.Tensor) -> torch.Tensor:
        x = img01 if self.channels == 1 else img01.expand(-1, self.channels, -1, -1)
        return (x - self.mean) / self.std

    def forward(self, img01: torch.Tensor) -> torch.Tensor:
        return self.model(self.normalize(img01))

    def tokens(self, img01: torch.Tensor) -> torch.Tensor:
        """Unpooled features (``forward_features``): [B, T, D] for ViTs, [B, D, h, w] for CNNs."""
        return self.model.forward_features(self.normalize(img01))

    @property
    def is_vit(self) -> bool:
        return hasattr(self.model, "num_prefix_tokens") and hasattr(self.model, "patch_embed")


@dataclass
class BuiltInit:
    spec: InitSpec
    encoder: InitEncoder
    meta: dict = field(default_factory=dict)   # what the report records (no paths to patient data)


def _create(name: str, pretrained, in_chans: int, img_size: int | None) -> nn.Module:
    """The project's backbone factory (``img_size`` only reaches ViTs)."""
    return create_backbone(name, in_chans=in_chans, pretrained=pretrained, img_size=img_size)


def _needs_img_size(name: str) -> bool:
    return is_vit(resolve_arch(name))


def pretrained_grey_stats(model: nn.Module, channels: int = 1) -> tuple[list[float], list[float]]:
    """The weights' own mean/std from ``pretrained_cfg``; averaged to grey when ``channels == 1``."""
    if channels == 1:
        m, s = grey_stats(model)
        return [m], [s]
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean, std = cfg.get("mean"), cfg.get("std")
    if mean is None or std is None:
        raise UserError(f"{type(model).__name__}: its pretrained_cfg has no mean/std; cannot normalise ImageNet input")
    return [float(v) for v in mean], [float(v) for v in std]


def build_init(spec: InitSpec, backbone: str, image_size: int, store_stats: tuple[float, float],
               options: dict | None = None) -> BuiltInit:
    """Build the encoder of one init (fresh weights every call, so fine-tuning never leaks)."""
    opts = options or {}
    grey = str(opts.get("grey", "timm"))
    if grey not in ("timm", "replicate"):
        raise UserError(f"grey={grey!r}: choose 'timm' (sum the colour kernels) or 'replicate'")
    img_size = image_size if _needs_img_size(backbone) else None
    torch.manual_seed(int(opts.get("seed", 0)))
    if spec.kind == "scratch":
        model = _create(backbone, None, 1, img_size)
        return BuiltInit(spec, InitEncoder(model, [store_stats[0]], [store_stats[1]]),
                         {"arch": backbone, "mean": store_stats[0], "std": store_stats[1], "stats": "store"})
    if spec.kind == "imagenet":
        channels = 3 if grey == "replicate" else 1
        model = _create(backbone, "imagenet", channels, img_size)
        mean, std = pretrained_grey_stats(model, channels)
        return BuiltInit(spec, InitEncoder(model, mean, std, channels),
                         {"arch": backbone, "mean": mean, "std": std, "stats": "pretrained_cfg", "grey": grey})
    if spec.kind == "run":
        model, meta = load_run_encoder(spec.path)
        pre = meta.get("preprocessing") or {}
        if "mean" not in pre or "std" not in pre:
            raise UserError(f"{spec.path}: encoder.json has no preprocessing mean/std; cannot normalise its input")
        run_size = (meta.get("model_kwargs") or {}).get("img_size")
        if run_size is not None and int(run_size) != int(image_size):
            raise UserError(f"{spec.path}: this encoder was built for {run_size}-pixel images; "
                            f"pass --image-size {run_size} to evaluate it")
        trained = pre.get("image_size") or meta.get("image_size")  # evaluate warns once when it differs
        in_ch = int((meta.get("model_kwargs") or {}).get("in_chans", 1))
        mean, std = pre["mean"], pre["std"]
        return BuiltInit(spec, InitEncoder(model.train(), mean, std, in_ch),
                         {"arch": meta.get("arch"), "mean": mean, "std": std, "stats": "encoder.json",
                          "method": meta.get("method"), "pretrain_image_size": trained})
    if spec.kind == "state_dict":
        arch = spec.arch or backbone
        model = _create(arch, None, 1, img_size if _needs_img_size(arch) else None)

        state = read_state_dict(spec.path)
        report = load_mapped_state(model, state, opts, source=spec.path)
        mean = float(opts.get("state_dict.mean", store_stats[0]))
        std = float(opts.get("state_dict.std", store_stats[1]))
        return BuiltInit(spec, InitEncoder(model, [mean], [std]),
                         {"arch": arch, "mean": mean, "std": std,
                          "stats": "options" if "state_dict.mean" in opts else "store", **report})
    raise ValueError(spec.kind)


def map_keys(state: dict, model_keys: set[str], strip_prefix=None, rename=None) -> dict:
    """Apply prefix stripping and regex renames to a foreign state dict's keys."""
    if strip_prefix is None:
        prefixes = [p for p in COMMON_PREFIXES]
        auto = True
    else:
        prefixes = [p for p in (strip_prefix if isinstance(strip_prefix, (list, tuple)) else str(strip_prefix).split(",")) if p]
        auto = False
    out = dict(state)
    changed = True
    while changed:  # strip repeatedly (module.encoder.x -> x)
        changed = False
        for p in prefixes:
            keys = [k for k in out if k.startswith(p)]
            if not keys:
                continue
            cand = {(k[len(p):] if k.startswith(p) else k): v for k, v in out.items()}
            before = len(model_keys & set(out))
            after = len(model_keys & set(cand))
            if not auto or after > before:
                out, changed = cand, True
    rules = rename or []
    if isinstance(rules, str):
        rules = [r for r in rules.split(";") if r]
    for rule in rules:
        if "=>" not in rule:
            raise UserError(f"state_dict.rename rule {rule!r}: expected OLD=>NEW (regular expressions)")
        old, new = rule.split("=>", 1)
        out = {re.sub(old, new, k): v for k, v in out.items()}
    return out


def load_mapped_state(model: nn.Module, state: dict, opts: dict, source: str = "") -> dict:
    """Map keys, adapt a 3-channel stem to 1 channel, load, and report what happened."""
    target = model.state_dict()
    mapped = map_keys(state, set(target), opts.get("state_dict.strip_prefix"), opts.get("state_dict.rename"))
    loadable, adapted = {}, []
    for k, v in mapped.items():
        if k not in target:
            continue
        t = target[k]
        if v.shape != t.shape and v.ndim == 4 and v.shape[1] == 3 and t.shape[1] == 1 and v.shape[0] == t.shape[0]:
            v = v.sum(dim=1, keepdim=True)  # grey from RGB kernels, as timm's adapt_input_conv
            adapted.append(k)
        if v.shape != t.shape:
            raise UserError(f"{source}: key {k} has shape {tuple(v.shape)}, the model expects {tuple(t.shape)}")
        loadable[k] = v.to(t.dtype)
    unexpected = [k for k in mapped if k not in target]
    dropped_head = [k for k in unexpected if HEAD_PATTERN.match(k)]
    other = [k for k in unexpected if not HEAD_PATTERN.match(k)]
    missing = [k for k in target if k not in loadable and not k.endswith("num_batches_tracked")]
    strict = str(opts.get("state_dict.strict", "true")).lower() not in ("false", "0", "no")
    if not loadable:
        raise UserError(f"{source}: no key matches the model after mapping (e.g. {list(mapped)[:3]}); "
                        "use state_dict.strip_prefix=... or state_dict.rename=OLD=>NEW")
    if strict and (missing or other):
        raise UserError(f"{source}: weights do not match the model: {len(missing)} missing (e.g. {missing[:3]}), "
                        f"{len(other)} unexpected (e.g. {other[:3]}); fix with state_dict.strip_prefix / "
                        "state_dict.rename, or allow with state_dict.strict=false")
    model.load_state_dict(loadable, strict=False)
    return {"loaded_keys": len(loadable), "missing_keys": len(missing), "unexpected_keys": len(other),
            "dropped_head_keys": len(dropped_head), "adapted_stem": adapted}
