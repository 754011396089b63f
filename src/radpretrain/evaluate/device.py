"""Where ``evaluate`` computes: the device, its precision, and how images reach it.

- :func:`resolve_device` turns ``--device auto|cpu|cuda|cuda:N`` into a :class:`torch.device`
  (``auto``: the current CUDA device when one is visible, else the CPU; ``cuda`` without CUDA is
  a one-line :class:`~radpretrain.errors.UserError`).
- :class:`Runtime` holds what follows from the device: bf16 autocast where the GPU supports it,
  channels_last for CNNs by the pretraining engine's rule
  (:func:`radpretrain.models.backbones.prefers_channels_last`), and fused AdamW on CUDA (the
  engine's :func:`radpretrain.methods.base.make_optimizer` rule).  On the CPU it is float32 and
  the unfused AdamW that ``evaluate`` always used, so CPU numbers do not change (fused AdamW on a
  CPU rounds differently in the last bits).
- :class:`ImageFeeder` serves the labelled images (``uint8`` [N, 1, S, S], built once per task)
  as float batches in [0, 1] on the device: kept on the GPU as ``uint8`` when they fit
  (:func:`choose_feed`), else gathered into two pinned host buffers that alternate, so the copy
  of one batch overlaps the GPU's work on the previous one.  On the CPU it indexes the tensor.

Every path runs on CPU tensors as well (tests force ``bf16`` autocast, fused AdamW and the
pinned feeder on the CPU), so CI covers the logic without a GPU.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Iterator, NamedTuple

import numpy as np
import torch
from torch import nn

from radpretrain.errors import UserError
from radpretrain.models.backbones import prefers_channels_last
from radpretrain.utils import cpu_name

DEVICE_CHOICES = "auto | cpu | cuda | cuda:N"
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
# keep the images on the GPU when they take at most this share of its free memory
DEVICE_SHARE = 0.25
FEED_MODES = ("host", "device", "pinned")


def resolve_device(spec: str | torch.device | None) -> tuple[torch.device, str]:
    """``(device, note)`` for ``--device``; the note says what ``auto`` chose and why."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    text = str(spec or "auto").strip().lower()
    if not _DEVICE.match(text):
        raise UserError(f"--device {spec}: choose {DEVICE_CHOICES}")
    has_cuda = torch.cuda.is_available()
    if text == "auto":
        if has_cuda:
            dev = torch.device("cuda", torch.cuda.current_device())
            return dev, f"--device auto: using the GPU {dev} ({torch.cuda.get_device_name(dev)})"
        return torch.device("cpu"), "--device auto: no CUDA GPU is visible; running on the CPU"
    if text == "cpu":
        return torch.device("cpu"), "--device cpu: running on the CPU"
    if not has_cuda:
        why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise UserError(f"--device {spec}: CUDA is not available ({why}); use --device cpu or --device auto")
    n = torch.cuda.device_count()
    idx = int(text.split(":")[1]) if ":" in text else torch.cuda.current_device()
    if idx >= n:
        raise UserError(f"--device {spec}: only {n} CUDA device(s) visible (cuda:0 to cuda:{n - 1})")
    dev = torch.device("cuda", idx)
    return dev, f"--device {spec}: using the GPU {dev} ({torch.cuda.get_device_name(dev)})"


@dataclass(frozen=True)
class Runtime:
    """The device and the numerics that go with it (see the module docstring)."""

    device: torch.device
    amp_dtype: torch.dtype | None = None   # autocast dtype; None: float32
    fused_adamw: bool = False
    name: str = ""

    @classmethod
    def for_device(cls, device: torch.device | str) -> "Runtime":
        device = torch.device(device)
        if device.type == "cuda":
            amp = torch.bfloat16 if torch.cuda.is_bf16_supported() else None
            return cls(device, amp, True, torch.cuda.get_device_name(device))
        return cls(device, None, False, cpu_name())

    @classmethod
    def cpu(cls) -> "Runtime":
        return cls.for_device("cpu")

    @property
    def is_cpu(self) -> bool:
        return self.device.type == "cpu"

    @property
    def precision(self) -> str:
        return "float32" if self.amp_dtype is None else f"{str(self.amp_dtype).removeprefix('torch.')} autocast"

    def autocast(self):
        """Autocast to ``amp_dtype`` on this device, or nothing (float32)."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def place(self, module: nn.Module) -> nn.Module:
        """Move ``module`` to the device; NHWC weights when the engine's rule prefers them there."""
        module.to(self.device)
        if prefers_channels_last(module, self.device.type):
            module.to(memory_format=torch.channels_last)
        return module

    def adamw(self, params: list, lr: float, weight_decay: float) -> torch.optim.Optimizer:
        """AdamW with the fine-tuning defaults (betas 0.9, 0.999); one fused kernel when ``fused_adamw``."""
        fused = self.fused_adamw and bool(params) and all(
            p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True if fused else None)

    def generator(self, seed: int, cpu_generator: torch.Generator) -> torch.Generator:
        """The generator for random draws made on the device: on the CPU the CPU generator itself
        (the draws interleave with the sampling order exactly as before), else a device generator."""
        if self.is_cpu:
            return cpu_generator
        return torch.Generator(device=self.device).manual_seed(int(seed))

    def describe(self, feed: str | None = None) -> dict:
        """What summary.json records under ``device``."""
        out = {"type": self.device.type, "name": self.name or str(self.device), "precision": self.precision,
               "adamw": "fused" if self.fused_adamw else "unfused"}
        if self.device.index is not None:
            out["index"] = int(self.device.index)
        if feed is not None:
            out["images"] = feed
        return out


def free_device_memory(device: torch.device) -> int | None:
    """Free bytes on a CUDA device (None on the CPU)."""
    if device.type != "cuda":
        return None
    return int(torch.cuda.mem_get_info(device)[0])


def choose_feed(nbytes: int, device: torch.device, free_bytes: int | None = None, share: float = DEVICE_SHARE) -> str:
    """``host`` on the CPU; on a GPU ``device`` when ``nbytes`` fit in ``share`` of its free memory, else ``pinned``."""
    if device.type == "cpu":
        return "host"
    free = free_device_memory(device) if free_bytes is None else free_bytes
    return "device" if free is not None and nbytes <= share * free else "pinned"


def to_float(images_u8: torch.Tensor) -> torch.Tensor:
    """``uint8`` pixels -> float32 in [0, 1] (on the tensor's device)."""
    return images_u8.to(torch.float32).mul_(1 / 255)


class Batch(NamedTuple):
    index: np.ndarray        # positions into the images (host)
    index_t: torch.Tensor    # the same positions on the compute device (to gather labels there)
    x: torch.Tensor          # float32 [B, 1, S, S] in [0, 1] on the compute device


class ImageFeeder:
    """``uint8`` images [N, 1, S, S] -> float batches in [0, 1] on ``device`` (see the module docstring).

    ``mode``: ``host`` (index the tensor where it is; the CPU path), ``device`` (one copy of the
    ``uint8`` images on the device, batches gathered there) or ``pinned`` (batches gathered into
    two alternating page-locked host buffers and copied asynchronously).  ``pin`` (default: when
    CUDA is available) page-locks the buffers; without it the pinned mode runs on any machine.
    """

    def __init__(self, images_u8: torch.Tensor, device: torch.device | str = "cpu", mode: str | None = None,
                 pin: bool | None = None):
        if images_u8.dtype != torch.uint8 or images_u8.ndim != 4:
            raise ValueError(f"ImageFeeder needs uint8 [N, C, H, W] images, got {images_u8.dtype} {tuple(images_u8.shape)}")
        self.device = torch.device(device)
        self.mode = mode or choose_feed(images_u8.numel(), self.device)
        if self.mode not in FEED_MODES:
            raise ValueError(f"feed mode {self.mode!r}: one of {FEED_MODES}")
        self.pin = torch.cuda.is_available() if pin is None else bool(pin)
        self.images = images_u8.to(self.device) if self.mode == "device" else images_u8
        self._slots: list[torch.Tensor] = []  # the pinned mode's two staging buffers (made on first use)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape[1:])

    def describe(self) -> str:
        where = {"host": "indexed in host memory", "device": "uint8 on the device",
                 "pinned": "pinned host buffers, asynchronous copies"}[self.mode]
        return f"{self.mode} ({where})"

    def batches(self, idx: np.ndarray | None, batch_size: int, min_size: int = 1) -> Iterator[Batch]:
        """Consecutive batches of ``idx`` (all images in order when None); batches smaller than
        ``min_size`` are skipped without being read."""
        idx = np.arange(len(self)) if idx is None else np.asarray(idx, dtype=np.int64)
        idx_t = torch.as_tensor(idx, device=self.device)  # one host-to-device copy per call
        if self.mode == "pinned":
            yield from self._pinned(idx, idx_t, batch_size, min_size)
            return
        for s in range(0, len(idx), batch_size):
            bi = idx[s : s + batch_size]
            if len(bi) < min_size:
                continue
            it = idx_t[s : s + batch_size]
            raw = self.images[bi] if self.mode == "host" else self.images.index_select(0, it)
            yield Batch(bi, it, to_float(raw))

    def _staging(self, batch_size: int) -> list[torch.Tensor]:
        if not self._slots or self._slots[0].shape[0] < batch_size:
            bufs = [torch.empty((batch_size, *self.image_shape), dtype=torch.uint8) for _ in range(2)]
            self._slots = [b.pin_memory() for b in bufs] if self.pin else bufs
        return self._slots

    def _pinned(self, idx, idx_t, batch_size, min_size) -> Iterator[Batch]:
        slots = self._staging(batch_size)
        events: list = [None, None]
        cuda = self.device.type == "cuda"
        k = 0
        for s in range(0, len(idx), batch_size):
            bi = idx[s : s + batch_size]
            if len(bi) < min_size:
                continue
            j = k % 2
            k += 1
            if events[j] is not None:  # the copy that last read this buffer has finished
                events[j].synchronize()
            buf = slots[j][: len(bi)]
            torch.index_select(self.images, 0, torch.from_numpy(bi), out=buf)
            x = buf.to(self.device, non_blocking=self.pin)
            if cuda:
                events[j] = torch.cuda.Event()
                events[j].record()
            # to_float makes a new tensor, so the buffer is free again once the copy is done
            yield Batch(bi, idx_t[s : s + batch_size], to_float(x))
