"""Pretraining checkpoints: atomic writes, vetted reads, the resume fallback, the step-checkpoint callback.

Checkpoints are written through a temporary file and a rename (never partial); they are read only
after the pickle's globals were checked against :data:`CHECKPOINT_SAFE_GLOBALS`, with torch's
weights-only unpickler; a damaged file is skipped by ``--resume`` in favour of the newest intact
one.  Lightning reads and writes them through :class:`RunCheckpointIO`.  Nothing outside the
engine reads these files (other stages load encoders from safetensors only).
"""

from __future__ import annotations

import collections
import errno
import os
import re
import shutil
import zipfile
from pathlib import Path

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import CheckpointIO

from radpretrain.errors import UserError
from radpretrain.models.weights import torch_file_globals
from radpretrain.utils import get_logger

log = get_logger("pretrain")

# Everything a pretraining checkpoint's pickle references (measured: every method, with validation,
# early stopping and DeepCluster's assignment, at every precision): ordered dicts, and tensors of
# the dtypes a run can hold.  Lightning's own entries (loops, callbacks, optimizer and scheduler
# states) are plain dicts, lists, numbers and strings.  A checkpoint that references anything else
# was not written by radpretrain and is refused without being unpickled (see read_checkpoint).
CHECKPOINT_SAFE_GLOBALS: tuple = (
    collections.OrderedDict, torch._utils._rebuild_tensor_v2,
    torch.FloatStorage, torch.DoubleStorage, torch.HalfStorage, torch.BFloat16Storage, torch.LongStorage,
    torch.IntStorage, torch.ShortStorage, torch.CharStorage, torch.ByteStorage, torch.BoolStorage,
)
_CHECKPOINT_GLOBAL_NAMES = frozenset(f"{g.__module__}.{g.__qualname__}" for g in CHECKPOINT_SAFE_GLOBALS)
# what a checkpoint needs to continue a run (a weights-only checkpoint has only state_dict)
_RESUME_KEYS = ("state_dict", "optimizer_states", "loops", "global_step")
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)

_STEP_CKPT = re.compile(r"^step(\d+)(-v\d+)?\.ckpt$")


def _short(e: BaseException) -> str:
    first = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def _mb(n: int | None) -> str:
    return "an unknown amount" if n is None else f"{n / 1e6:,.0f} MB"


def free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def disk_full_error(e: BaseException | None) -> OSError | None:
    """The ENOSPC / EDQUOT ``OSError`` that ``e`` is or was raised from (torch.save wraps it), else None."""
    for _ in range(8):
        if e is None:
            return None
        if isinstance(e, OSError) and e.errno in _DISK_FULL:
            return e
        e = e.__cause__ or e.__context__
    return None


def _checkpoint_nbytes(checkpoint) -> int:
    """Bytes of tensor storage in a checkpoint dict: a lower bound of its file size (the pickle is small)."""
    storages: dict = {}
    todo = [checkpoint]
    while todo:
        o = todo.pop()
        if isinstance(o, torch.Tensor):
            st = o.untyped_storage()
            storages[(st.data_ptr(), str(o.device))] = st.nbytes()
        elif isinstance(o, dict):
            todo.extend(o.values())
        elif isinstance(o, (list, tuple)):
            todo.extend(o)
    return int(sum(storages.values()))


def disk_full_message(path: Path, need: int | None, free: int | None) -> str:
    what = f"a checkpoint of about {_mb(need)} does not fit" if need else "the disk is full"
    return (f"{path}: disk full: {what} ({_mb(free)} free on that disk); free some space "
            "(or lower trainer.keep_checkpoints), then continue the run with --resume")


def write_checkpoint(checkpoint: dict, path: Path) -> None:
    """``torch.save`` to ``NAME.tmp`` beside ``path``, flushed to disk, then renamed over ``path``.

    ``path`` is therefore either the previous complete checkpoint or the new one, never a partial
    file (a kill or a full disk mid-write leaves at most the ``.tmp``, which is removed).  A disk
    without room for the checkpoint (its tensor bytes) is a :class:`UserError` before anything is
    written; ENOSPC / EDQUOT while writing is the same one-line error.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    need = _checkpoint_nbytes(checkpoint)
    free = free_bytes(path.parent)
    if free is not None and free < need:
        raise UserError(disk_full_message(path, need, free))
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if disk_full_error(e) is not None:
            raise UserError(disk_full_message(path, need, free_bytes(path.parent))) from None
        raise


def _refuse_foreign(path: Path, found: set[str]) -> None:
    foreign = sorted(found - _CHECKPOINT_GLOBAL_NAMES)
    if foreign:
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        raise UserError(f"{path}: refused, not loaded: its pickle references {', '.join(foreign[:3])}{more}, which no "
                        "radpretrain checkpoint holds (planted, or written by other code); "
                        "use a run folder you trust, or delete this file")


def _load_checkpoint(path: Path, map_location, mmap: bool = False) -> dict:
    """Unpickle a checkpoint whose globals were checked: weights-only, with the scoped allowlist."""
    with torch.serialization.safe_globals(list(CHECKPOINT_SAFE_GLOBALS)):
        ck = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    if not isinstance(ck, dict):
        raise ValueError(f"holds a {type(ck).__name__}, not a checkpoint dict")
    return ck


def read_checkpoint(path: Path, map_location="cpu") -> dict:
    """A pretraining checkpoint, never unpickling anything but tensors and plain values.

    The pickle's globals are read first without unpickling (``torch_file_globals``); anything
    outside :data:`CHECKPOINT_SAFE_GLOBALS` is a one-line :class:`UserError` naming what was found.
    Then ``torch.load(weights_only=True)`` with that allowlist (scoped, not process-wide).  A
    damaged file is a one-line :class:`UserError` too.
    """
    path = Path(path)
    try:
        found = torch_file_globals(path)
    except Exception as e:  # OSError, BadZipFile, ValueError (truncated pickle) ...
        raise UserError(f"{path}: damaged checkpoint ({_short(e)})") from None
    _refuse_foreign(path, found)
    try:
        return _load_checkpoint(path, map_location)
    except Exception as e:
        raise UserError(f"{path}: unreadable checkpoint ({_short(e)})") from None


def _peek_checkpoint(path: Path) -> tuple[int, str | None]:
    """``(global_step, None)`` for a checkpoint that loads (memory-mapped: tensor bytes are not read)
    and holds a training state; ``(-1, why)`` otherwise.  Foreign content: :class:`UserError`."""
    try:
        found = torch_file_globals(path)
    except Exception as e:
        return -1, f"unreadable ({_short(e)})"
    _refuse_foreign(path, found)
    try:
        if not zipfile.is_zipfile(path):
            return -1, "not a complete checkpoint (truncated or overwritten)"
        ck = _load_checkpoint(path, "cpu", mmap=True)
    except Exception as e:
        return -1, f"damaged ({_short(e)})"
    missing = [k for k in _RESUME_KEYS if k not in ck]
    if missing:
        return -1, f"holds no training state (no {', '.join(missing)})"
    return int(ck["global_step"]), None


def _checksum_problem(path: Path) -> str | None:
    """Why the zip records of ``path`` fail their CRC-32 checks (a file damaged inside), or None."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except Exception as e:
        return f"damaged ({_short(e)})"
    return None if bad is None else f"damaged (record {bad} fails its checksum)"


def inspect_checkpoint(path: Path) -> str | None:
    """Why ``path`` cannot continue a run (damaged, truncated, no training state), or None when intact.

    Intact: it loads (weights only, see :func:`read_checkpoint`), holds a training state and every
    zip record passes its CRC-32 check.  Foreign content is not a "damage" to skip: it is a
    :class:`UserError`.
    """
    _, problem = _peek_checkpoint(path)
    return problem or _checksum_problem(path)


def checkpoint_candidates(ck_dir: Path) -> list[Path]:
    """Checkpoints a run can continue from, in the order preferred among equal steps: last.ckpt,
    step*.ckpt newest first, best.ckpt."""
    if not ck_dir.is_dir():
        return []
    steps = [(int(m.group(1)), p.name, p) for p in ck_dir.glob("step*.ckpt") if (m := _STEP_CKPT.match(p.name))]
    ordered = [ck_dir / "last.ckpt", *(p for _, _, p in sorted(steps, reverse=True)), ck_dir / "best.ckpt"]
    return [p for p in ordered if p.is_file()]


def clear_partial_writes(ck_dir: Path) -> list[str]:
    """Remove ``*.ckpt.tmp`` left by a write that was killed (never a complete checkpoint)."""
    notes = []
    for tmp in sorted(ck_dir.glob("*.ckpt.tmp")) if ck_dir.is_dir() else []:
        tmp.unlink(missing_ok=True)
        notes.append(f"removed {tmp.name}, a checkpoint write that did not finish")
    return notes


def _set_aside(path: Path) -> Path:
    """Rename a damaged file to ``NAME.damaged`` (``.damaged1``, ... if taken); nothing is deleted."""
    for i in range(1000):
        target = path.with_name(f"{path.name}.damaged{i or ''}")
        if not target.exists():
            path.rename(target)
            return target
    raise UserError(f"{path}: damaged, and too many .damaged copies beside it; remove them")


def existing_run(run_dir: Path) -> tuple[str | None, list[str]]:
    """What in ``run_dir`` a new start would overwrite (a finished encoder, an intact checkpoint), or None.

    A folder left by a start that failed before training, or by a run that never completed a
    checkpoint (a full disk; a copy cut short), holds no run: its damaged checkpoints are renamed to
    ``NAME.damaged`` (kept, never deleted) and the notes say so.  A checkpoint with foreign content
    is a :class:`UserError`: such a folder is not taken over.  Returns ``(what, notes)``.
    """
    if (run_dir / "encoder.safetensors").exists():
        return "encoder.safetensors", []
    ck_dir = run_dir / "checkpoints"
    if not ck_dir.is_dir():
        return None, []
    notes = []
    cands = checkpoint_candidates(ck_dir)
    files = cands + sorted(p for p in ck_dir.glob("*.ckpt") if p not in cands)
    problems = {}
    for p in files:
        problem = inspect_checkpoint(p)
        if problem is None:
            return f"checkpoints/{p.name}", notes
        problems[p] = problem
    for p, problem in problems.items():
        aside = _set_aside(p)
        notes.append(f"{p}: {problem}; no intact checkpoint left, so a new run starts here (kept as {aside.name})")
    return None, notes


class StepCheckpoint(ModelCheckpoint):
    """The periodic ``step*.ckpt`` callback; on resume its bookkeeping follows the folder and the
    current ``trainer.keep_checkpoints``.

    Lightning restores the list of kept files as it was saved: files removed since (by hand, or
    after a full disk) stay in it, and a lower ``keep_checkpoints`` than the run started with
    makes its next comparison fail (KeyError) or never prune.  Here missing files are dropped,
    the newest ``keep_checkpoints`` are kept and the older ones removed when training starts.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._surplus: list[str] = []

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        kept = {p: v for p, v in self.best_k_models.items() if os.path.isfile(p)}
        order = sorted(kept, key=lambda p: float(kept[p]), reverse=self.mode == "max")  # best first
        if self.save_top_k >= 0:
            self._surplus = order[self.save_top_k:]
            order = order[: self.save_top_k]
        self.best_k_models = {p: kept[p] for p in order}
        if order and len(order) == self.save_top_k:  # full: the next save replaces the worst
            self.kth_best_model_path, self.kth_value = order[-1], kept[order[-1]]
        else:
            self.kth_best_model_path = ""

    def on_train_start(self, trainer, pl_module):
        super().on_train_start(trainer, pl_module)
        for p in self._surplus:
            trainer.strategy.remove_checkpoint(p)
            log.info("removed %s (trainer.keep_checkpoints=%s)", Path(p).name, self.save_top_k)
        self._surplus = []


class RunCheckpointIO(CheckpointIO):
    """The Lightning ``CheckpointIO`` plugin of the engine: :func:`write_checkpoint` / :func:`read_checkpoint`."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        if storage_options is not None:
            raise TypeError("storage_options are not supported by radpretrain's checkpoint writer")
        write_checkpoint(checkpoint, Path(path))

    def load_checkpoint(self, path, map_location=None, weights_only=None):
        return read_checkpoint(Path(path), map_location="cpu" if map_location is None else map_location)

    def remove_checkpoint(self, path):
        Path(path).unlink(missing_ok=True)


def find_resume_checkpoint(run: Path) -> tuple[Path, list[str]]:
    """The newest intact checkpoint of ``run`` to continue from, and notes for the log on what was skipped.

    Candidates: ``last.ckpt``, ``step*.ckpt`` and ``best.ckpt``, by the global step they hold (read
    memory-mapped), ``last.ckpt`` first among equals; a full disk can leave ``last.ckpt`` one save
    behind the step file written just before it.  A damaged one (truncated, garbage, failing its
    checksums) is skipped with a note.  Every checkpoint in the folder is first checked for foreign
    content (a :class:`UserError`; nothing is unpickled); none intact is a :class:`UserError`
    saying how to start over.
    """
    ck_dir = run / "checkpoints"
    for p in sorted(ck_dir.glob("*.ckpt")) if ck_dir.is_dir() else []:
        try:
            found = torch_file_globals(p)
        except Exception:  # damaged: the candidates loop below says so if it matters
            continue
        _refuse_foreign(p, found)
    cands = checkpoint_candidates(ck_dir)
    if not cands:
        raise UserError(f"{run}: nothing to resume (no checkpoints/last.ckpt); start the run without --resume")
    notes, loadable = [], []
    for i, p in enumerate(cands):
        step, problem = _peek_checkpoint(p)
        if problem is None:
            loadable.append((-step, i, p))
        else:
            notes.append(f"{p}: {problem}; skipped")
    for neg_step, _, p in sorted(loadable):  # newest step first; last.ckpt first among equals
        problem = _checksum_problem(p)
        if problem is None:
            if p != cands[0] or notes:
                notes.append(f"resuming from {p.name} (step {-neg_step}), the newest intact checkpoint")
            return p, notes
        notes.append(f"{p}: {problem}; skipped")
    first = notes[0].removesuffix("; skipped")
    raise UserError(f"{ck_dir}: no intact checkpoint to resume from ({len(cands)} damaged; {first}); start over: "
                    "run the same command without --resume (the damaged files are kept as *.damaged) or choose a new --out")

