"""Encoder weight files: save and load without pickles or key surgery.

An encoder is stored as two files side by side:

- ``<name>.safetensors``: the timm model's ``state_dict()`` with plain timm key names;
- ``<name>.json``: ``{"arch": <timm name>, "model_kwargs": {...}, ...}`` -- enough to
  rebuild the model with ``timm.create_model(arch, **model_kwargs)``.

A pretraining run folder holds ``encoder.safetensors`` + ``encoder.json``; an
exported folder holds ``model.safetensors`` + ``config.json`` (Hugging Face Hub
layout).  :func:`load_run_encoder` reads either.
"""

from __future__ import annotations

import io
import pickletools
import zipfile
from pathlib import Path

import safetensors.torch
import torch
from safetensors import SafetensorError
from torch import nn

from radpretrain.errors import UserError
from radpretrain.utils import read_json, write_json


def save_encoder(model: nn.Module, meta: dict, out_dir: str | Path, name: str = "encoder") -> Path:
    """Write ``<name>.safetensors`` and ``<name>.json`` into ``out_dir``; returns the weights path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if "arch" not in meta or "model_kwargs" not in meta:
        raise ValueError("encoder meta needs 'arch' and 'model_kwargs'")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    path = out_dir / f"{name}.safetensors"
    tmp = path.with_name(path.name + ".tmp")
    safetensors.torch.save_file(state, str(tmp), metadata={"format": "pt", "arch": str(meta["arch"])})
    tmp.replace(path)
    write_json(out_dir / f"{name}.json", meta)
    return path


# opcodes that push a string a later STACK_GLOBAL may take as module or name; opcodes that push nothing
_STRING_OPS = frozenset({"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING",
                         "SHORT_BINSTRING"})
_NO_PUSH_OPS = frozenset({"PROTO", "FRAME", "MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT", "STOP"})


def pickle_globals(data: bytes) -> set[str]:
    """``module.name`` of every global (class or function) a pickle references, read without unpickling.

    Walks the opcodes (:mod:`pickletools`) and follows the strings that ``STACK_GLOBAL`` takes from
    the stack and the memo.  A global whose name cannot be followed (or a copyreg extension code)
    is reported as ``"?"``, so a caller that allows only known names refuses it.  Raises
    ``ValueError`` for a malformed or truncated pickle.
    """
    found: set[str] = set()
    stack: list = []  # an approximation: strings where they were pushed, None for anything else
    memo: dict = {}
    for op, arg, _ in pickletools.genops(data):
        name = op.name
        if name in ("GLOBAL", "INST"):
            found.add(".".join(str(arg).split(" ", 1)))
        elif name == "STACK_GLOBAL":
            mod, attr = (stack[-2], stack[-1]) if len(stack) >= 2 else (None, None)
            found.add(f"{mod}.{attr}" if isinstance(mod, str) and isinstance(attr, str) else "?")
            del stack[-2:]
        elif name in ("EXT1", "EXT2", "EXT4"):
            found.add("?")
        if name in _STRING_OPS:
            stack.append(str(arg))
        elif name == "MEMOIZE":
            memo[len(memo)] = stack[-1] if stack else None
        elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[arg] = stack[-1] if stack else None
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            stack.append(memo.get(arg))
        elif name not in _NO_PUSH_OPS:
            stack.append(None)
    return found


def torch_file_globals(path: str | Path) -> set[str]:
    """The globals of a ``torch.save`` file's pickle (``*/data.pkl`` of the zip), read without unpickling.

    A bare pickle (the legacy format, ``.bin``) is scanned pickle by pickle.  Raises ``ValueError``,
    ``OSError`` or ``zipfile.BadZipFile`` when the file cannot be read that way.
    """
    path = Path(path)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            pkls = [n for n in z.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
            if len(pkls) != 1:
                raise ValueError(f"{len(pkls)} data.pkl records (a torch file has one)")
            return pickle_globals(z.read(pkls[0]))
    found: set[str] = set()
    with open(path, "rb") as f:  # legacy torch.save: a few pickles, then raw storage bytes
        data = f.read()
    if data[:4] == b"PK\x03\x04":
        raise ValueError("a zip file cut short (no central directory)")
    buf = io.BytesIO(data)
    while buf.tell() < len(data):
        start = buf.tell()
        try:
            for op, _, _ in pickletools.genops(buf):
                if op.name == "STOP":
                    break
        except ValueError:
            if start == 0:
                raise
            break  # the raw storage bytes after the pickles
        found |= pickle_globals(data[start:buf.tell()])
    return found


def _refusal_reason(path: Path, exc: Exception) -> str:
    """What a refused torch file holds, for the one-line error (the globals torch would not load)."""
    try:
        unsafe = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path)) if zipfile.is_zipfile(path) \
            else sorted(g for g in torch_file_globals(path) if not g.startswith(("torch.", "collections.OrderedDict")))
    except Exception:  # unreadable as well: report the loader's own first line
        unsafe = []
    if unsafe:
        return f"it would unpickle {', '.join(unsafe[:5])}{' ...' if len(unsafe) > 5 else ''}"
    msg = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {msg[:200]}"


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a torch file, never unpickling objects.

    Torch files are read with ``weights_only=True``; a file that needs anything
    else (arbitrary pickled objects) or is truncated is a :class:`UserError`.
    A checkpoint dict with a ``state_dict``/``model`` entry is unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: weight file not found")
    if path.suffix == ".safetensors":
        try:
            return safetensors.torch.load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise UserError(f"{path}: not a valid safetensors file ({e})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError, RuntimeError (truncated zip), EOFError ...
        raise UserError(f"{path}: refused or unreadable weight file ({_refusal_reason(path, e)}); "
                        "only plain tensors are loaded, never pickled objects") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{path}: expected a dict of tensors (a state dict)")
    return obj


def find_encoder_files(path: str | Path) -> tuple[Path, Path]:
    """(weights, meta) of a run folder, an export folder or a ``*.safetensors`` file with its json."""
    p = Path(path)
    candidates = [(p / "encoder.safetensors", p / "encoder.json"), (p / "model.safetensors", p / "config.json")]
    if p.is_file():
        candidates = [(p, p.with_suffix(".json"))]
    for w, m in candidates:
        if w.is_file() and m.is_file():
            return w, m
    if p.is_dir() and (p / "checkpoints").is_dir():
        raise UserError(f"{p}: this run has no encoder.safetensors yet (it did not finish); "
                        "resume it with 'radpretrain pretrain --resume' or use a finished run")
    raise UserError(f"{p}: no encoder found (expected encoder.safetensors + encoder.json, "
                    "or model.safetensors + config.json)")


def load_run_encoder(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the timm encoder of a run or export folder; returns ``(model, meta)``."""
    import timm  # heavy (3 s): only where a model is built

    weights, meta_path = find_encoder_files(path)
    meta = read_json(meta_path)
    if "arch" not in meta:
        raise UserError(f"{meta_path}: no 'arch' entry; not a radpretrain encoder description")
    kwargs = dict(meta.get("model_kwargs", {}))
    kwargs.setdefault("num_classes", 0)
    try:
        model = timm.create_model(meta["arch"], pretrained=False, **kwargs)
    except Exception as e:
        raise UserError(f"{meta_path}: cannot build timm model {meta['arch']!r} with {kwargs} ({e})") from None
    state = read_state_dict(weights)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"{weights}: weights do not match {meta['arch']} "
                        f"(missing {len(missing)} keys e.g. {missing[:3]}, unexpected {len(unexpected)} e.g. {unexpected[:3]})")
    return model.to(device).eval(), meta
