"""Evaluation protocols: linear probe, kNN and full fine-tuning, and their registry.

A protocol is a small class in :data:`PROTOCOLS` (``linear``, ``knn``, ``finetune``) whose
``run(data)`` takes ONE :class:`FoldData`: the train / val / test positions of a cell (init x
fold x label fraction), the labels, patient groups, task, class balance, seed, and the inputs
of the init (its frozen features, or its images, encoder factory and runtime).  Hyper-parameters
(``C``, ``k``, learning rate, epoch of early stopping) are chosen on *val only*; test predictions
are produced once, by the chosen model.

- :func:`linear_probe`: scikit-learn ``LogisticRegression`` (``Ridge`` for
  regression) on standardised frozen features.
- :func:`knn_probe`: cosine k-nearest neighbours on frozen features.
- :func:`finetune`: a plain PyTorch loop training encoder + linear head, with optional
  head-only warm-up, early stopping, learning-rate sweep, augmentation and class balancing.
  It runs on the runtime's device (:mod:`~radpretrain.evaluate.device`): on a GPU the images,
  encoder, head, augmentation and optimiser live there, with bf16 autocast and fused AdamW;
  on the CPU it computes exactly what it always did.

Frozen features come from :func:`radpretrain.evaluate.features.extract_features` (one pass per
init, reused for every fold and label fraction).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable, ClassVar, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from threadpoolctl import threadpool_limits
from torch import nn

from radpretrain.errors import UserError
from radpretrain.evaluate.device import ImageFeeder, Runtime
from radpretrain.evaluate.metrics import HIGHER_IS_BETTER, metric_value, primary_metric
from radpretrain.transforms import finetune_augment
from radpretrain.utils import get_logger

log = get_logger("evaluate")

DEFAULTS = {
    "linear": {"C": [1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0], "alpha": [0.01, 0.1, 1.0, 10.0, 100.0, 1000.0],
               "max_iter": 3000},
    "knn": {"k": [1, 3, 5, 10, 20, 50]},
    "finetune": {"epochs": 10, "lr": 1e-3, "lr_sweep": None, "weight_decay": 1e-4, "batch_size": 32,
                 "warmup_epochs": 0, "patience": 3, "flip": True, "rotate": 10.0, "crop": 0.1,
                 "brightness": 0.1, "contrast": 0.1, "augment": True},
}


# -- model selection helpers -----------------------------------------------------

def _val_score(task: str, y_val: np.ndarray, s_val: np.ndarray) -> float:
    """Higher is better; falls back to accuracy / -MAE when the headline metric is undefined on val."""
    m = primary_metric(task)
    v = metric_value(m, task, y_val, s_val)
    if not np.isfinite(v):
        m = "accuracy" if task != "regression" else "mae"
        v = metric_value(m, task, y_val, s_val)
    return v if HIGHER_IS_BETTER[m] else -v


def _full_proba(clf, X: np.ndarray, n_classes: int) -> np.ndarray:
    """``predict_proba`` laid out over all ``n_classes`` (classes absent from train get 0)."""
    p = clf.predict_proba(X)
    out = np.zeros((len(X), n_classes))
    out[:, np.asarray(clf.classes_, dtype=int)] = p
    return out


def _as_task_scores(task: str, proba: np.ndarray) -> np.ndarray:
    return proba[:, 1] if task == "binary" else proba


@dataclass
class ProbeResult:
    test_scores: np.ndarray
    val_scores: np.ndarray
    chosen: dict
    seconds: float


def _check_train(task: str, y_train: np.ndarray):
    if len(y_train) == 0:
        raise UserError("a training subset is empty; use a larger label fraction or fewer folds")
    if task != "regression" and len(np.unique(y_train)) < 2:
        raise UserError("a training subset holds a single class; use a larger label fraction")


def linear_probe(task: str, n_classes: int, Xtr, ytr, Xva, yva, Xte, opts: dict | None = None,
                 balance: str = "none", seed: int = 0) -> ProbeResult:
    """Logistic regression (Ridge for regression) with its regularisation chosen on val.

    The ``C`` grid is walked from strong to weak regularisation with warm starts (a
    regularisation path).  BLAS runs single-threaded here: these fits are small, and
    multi-threaded BLAS on a busy 2-core machine was measured 4x slower.
    """
    with threadpool_limits(limits=1, user_api="blas"):
        return _linear_probe(task, n_classes, Xtr, ytr, Xva, yva, Xte, opts, balance, seed)


def _linear_probe(task, n_classes, Xtr, ytr, Xva, yva, Xte, opts, balance, seed) -> ProbeResult:
    from sklearn.linear_model import LogisticRegression, Ridge  # heavy: more than a second to import
    from sklearn.preprocessing import StandardScaler  # heavy: more than a second to import

    o = {**DEFAULTS["linear"], **(opts or {})}
    t0 = time.time()
    _check_train(task, ytr)
    scaler = StandardScaler().fit(Xtr)
    Xtr, Xva, Xte = scaler.transform(Xtr), scaler.transform(Xva), scaler.transform(Xte)
    best = None
    if task == "regression":
        mu, sd = float(np.mean(ytr)), float(np.std(ytr) or 1.0)
        for a in _as_list(o["alpha"]):
            m = Ridge(alpha=float(a)).fit(Xtr, (ytr - mu) / sd)
            sv = m.predict(Xva) * sd + mu
            sc = _val_score(task, yva, sv) if len(yva) else 0.0
            if best is None or sc > best[0]:
                best = (sc, {"alpha": float(a)}, m)
        model = best[2]
        return ProbeResult(model.predict(Xte) * sd + mu, model.predict(Xva) * sd + mu, best[1], time.time() - t0)
    cw = "balanced" if balance in ("weights", "sampler") else None
    m = LogisticRegression(max_iter=int(o["max_iter"]), class_weight=cw, random_state=seed, warm_start=True)
    for c in sorted(float(c) for c in _as_list(o["C"])):
        m.set_params(C=c)
        m.fit(Xtr, ytr)
        sv = _as_task_scores(task, _full_proba(m, Xva, n_classes))
        sc = _val_score(task, yva, sv) if len(yva) else 0.0
        if best is None or sc > best[0]:
            best = (sc, {"C": c}, copy.deepcopy(m))
    model = best[2]
    return ProbeResult(_as_task_scores(task, _full_proba(model, Xte, n_classes)),
                       _as_task_scores(task, _full_proba(model, Xva, n_classes)), best[1], time.time() - t0)


def knn_probe(task: str, n_classes: int, Xtr, ytr, Xva, yva, Xte, opts: dict | None = None,
              balance: str = "none", seed: int = 0) -> ProbeResult:
    """Cosine kNN with ``k`` chosen on val (single-threaded BLAS, see :func:`linear_probe`)."""
    with threadpool_limits(limits=1, user_api="blas"):
        return _knn_probe(task, n_classes, Xtr, ytr, Xva, yva, Xte, opts, balance, seed)


def _knn_probe(task, n_classes, Xtr, ytr, Xva, yva, Xte, opts, balance, seed) -> ProbeResult:
    from sklearn.neighbors import KNeighborsClassifier, KNeighborsRegressor  # heavy: more than a second to import

    o = {**DEFAULTS["knn"], **(opts or {})}
    t0 = time.time()
    _check_train(task, ytr)
    ks = sorted({min(int(k), len(ytr)) for k in _as_list(o["k"])})
    best = None
    for k in ks:
        if task == "regression":
            m = KNeighborsRegressor(n_neighbors=k, metric="cosine").fit(Xtr, ytr)
            sv = m.predict(Xva)
        else:
            m = KNeighborsClassifier(n_neighbors=k, metric="cosine").fit(Xtr, ytr)
            sv = _as_task_scores(task, _full_proba(m, Xva, n_classes))
        sc = _val_score(task, yva, sv) if len(yva) else 0.0
        if best is None or sc > best[0]:
            best = (sc, {"k": k}, m)
    m = best[2]
    if task == "regression":
        return ProbeResult(m.predict(Xte), m.predict(Xva), best[1], time.time() - t0)
    return ProbeResult(_as_task_scores(task, _full_proba(m, Xte, n_classes)),
                       _as_task_scores(task, _full_proba(m, Xva, n_classes)), best[1], time.time() - t0)


def _as_list(v) -> list:
    if v is None:
        return []
    if isinstance(v, (list, tuple)):
        return list(v)
    if isinstance(v, str):
        return [float(x) for x in v.split(",") if x.strip()]
    return [v]


# -- fine-tuning ------------------------------------------------------------------

class Classifier(nn.Module):
    """Encoder (an :class:`~radpretrain.evaluate.inits.InitEncoder`) plus a linear head."""

    def __init__(self, encoder, n_out: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.num_features, n_out)

    def forward(self, img01):
        return self.head(self.encoder(img01))


def balanced_class_weights(ytr: np.ndarray, n_classes: int) -> np.ndarray:
    """``n / (n_classes * count)`` per class of the training labels (0 for a class absent from them)."""
    counts = np.bincount(ytr.astype(int), minlength=n_classes).astype(float)
    return np.where(counts > 0, len(ytr) / (n_classes * np.maximum(counts, 1)), 0.0)


def _loss_fn(task: str, ytr: np.ndarray, n_classes: int, balance: str, device: torch.device | str = "cpu"):
    if task == "binary":
        pw = None
        if balance == "weights":
            pos = max(1, int((ytr == 1).sum()))
            pw = torch.tensor([(len(ytr) - pos) / pos], dtype=torch.float32, device=device)
        return lambda out, y: F.binary_cross_entropy_with_logits(out[:, 0], y.float(), pos_weight=pw)
    if task == "multiclass":
        w = None
        if balance == "weights":
            w = torch.tensor(balanced_class_weights(ytr, n_classes), dtype=torch.float32, device=device)
        return lambda out, y: F.cross_entropy(out, y.long(), weight=w)
    return lambda out, y: F.mse_loss(out[:, 0], y.float())


def _scores(task: str, out: torch.Tensor, mu: float, sd: float) -> np.ndarray:
    out = out.float().cpu()
    if task == "binary":
        return torch.sigmoid(out[:, 0]).numpy()
    if task == "multiclass":
        return torch.softmax(out, dim=1).numpy()
    return out[:, 0].numpy() * sd + mu


@torch.no_grad()
def _predict(model, feeder: ImageFeeder, idx, batch_size, rt: Runtime) -> torch.Tensor:
    """Outputs (float32, on the runtime's device) for the images at ``idx``."""
    model.eval()
    outs = []
    for b in feeder.batches(idx, batch_size):
        with rt.autocast():
            outs.append(model(b.x).float())
    return torch.cat(outs) if outs else torch.zeros(0, model.head.out_features, device=rt.device)


def _n_batches(n: int, batch_size: int, min_size: int = 2) -> int:
    return n // batch_size + (1 if n % batch_size >= min_size else 0)


def _train_one(make_encoder: Callable, task, n_classes, feeder: ImageFeeder, y, tr, va, lr, o, balance, seed,
               rt: Runtime, progress=None):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)       # sampling order (and, on the CPU, augmentation)
    aug_gen = rt.generator(seed, gen)                # augmentation draws, made on the device
    enc = make_encoder()
    n_out = n_classes if task == "multiclass" else 1
    model = rt.place(Classifier(enc, n_out))
    ytr = y[tr]
    mu, sd = (float(np.mean(ytr)), float(np.std(ytr) or 1.0)) if task == "regression" else (0.0, 1.0)
    yt = torch.tensor(np.array((y - mu) / sd if task == "regression" else y)).to(rt.device)
    va_t = torch.as_tensor(np.asarray(va, dtype=np.int64), device=rt.device)
    loss_fn = _loss_fn(task, ytr, n_classes, balance, rt.device)
    bs = int(o["batch_size"])
    epochs, warm = int(o["epochs"]), int(o["warmup_epochs"])
    patience = int(o["patience"]) if o.get("patience") is not None else 0
    per_epoch = _n_batches(len(tr), bs)
    sample_w = None
    if balance == "sampler" and task != "regression":
        counts = np.bincount(ytr.astype(int), minlength=n_classes).astype(float)
        sample_w = torch.as_tensor(1.0 / counts[ytr.astype(int)], dtype=torch.float64)
    history, best = [], (math.inf, None, -1)
    bad = 0
    opt = None
    for ep in range(epochs):
        head_only = ep < warm
        if opt is None or ep == warm:
            for p in model.encoder.parameters():
                p.requires_grad_(not head_only)
            params = [p for p in model.parameters() if p.requires_grad]
            opt = rt.adamw(params, lr=lr, weight_decay=float(o["weight_decay"]))
        model.train()
        if head_only:
            model.encoder.eval()  # frozen encoder keeps its BatchNorm statistics
        if sample_w is not None:
            order = tr[torch.multinomial(sample_w, len(tr), replacement=True, generator=gen).numpy()]
        else:
            order = tr[torch.randperm(len(tr), generator=gen).numpy()]
        # the loss sum stays on the device (no synchronisation per batch); float64 adds exactly as
        # the Python float it replaces
        tot, n = torch.zeros((), dtype=torch.float64, device=rt.device), 0
        for b in feeder.batches(order, bs, min_size=2):  # BatchNorm cannot train on one sample
            x = b.x
            if o.get("augment", True):
                x = finetune_augment(x, o, aug_gen)
            with rt.autocast():
                out = model(x)
            loss = loss_fn(out.float(), yt[b.index_t])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot += loss.detach().double() * len(b.index)
            n += len(b.index)
            if progress is not None:
                progress.update(1)
        out_va = _predict(model, feeder, va, bs, rt)
        vloss = float(loss_fn(out_va, yt[va_t])) if len(va) else float("nan")
        vscore = _val_score(task, y[va], _scores(task, out_va, mu, sd)) if len(va) else float("nan")
        history.append({"epoch": ep + 1, "train_loss": float(tot) / max(n, 1), "val_loss": vloss, "val_score": vscore,
                        "head_only": head_only})
        if progress is not None:
            progress.set_postfix(lr=f"{lr:g}", epoch=ep + 1, val_loss=f"{vloss:.4g}", refresh=False)
        key = vloss if np.isfinite(vloss) else -ep  # no val set: keep the last epoch
        if key < best[0]:
            best, bad = (key, copy.deepcopy(model.state_dict()), ep + 1), 0
        else:
            bad += 1
            if patience and bad >= patience and ep + 1 > warm:
                if progress is not None:  # the epochs not run
                    progress.update(per_epoch * (epochs - ep - 1))
                break
    model.load_state_dict(best[1])
    return model, history, best[2], (mu, sd)


def finetune(make_encoder: Callable, task: str, n_classes: int, images, y: np.ndarray,
             tr: np.ndarray, va: np.ndarray, te: np.ndarray, opts: dict | None = None,
             balance: str = "none", seed: int = 0, runtime: Runtime | None = None, progress=None) -> ProbeResult:
    """Fine-tune all layers (after ``warmup_epochs`` head-only epochs); pick lr and epoch on val.

    ``make_encoder()`` must return a fresh encoder each call (one per learning rate).
    ``images``: ``uint8`` [N, 1, S, S] or an :class:`~radpretrain.evaluate.device.ImageFeeder`.
    ``runtime`` (default: the CPU, float32): where it trains.  ``progress``: a tqdm-like bar
    advanced once per training batch (total: :func:`finetune_steps`).
    ``chosen`` holds the chosen lr, the best epoch and the loss history of every lr tried.
    """
    o = {**DEFAULTS["finetune"], **(opts or {})}
    rt = runtime or Runtime.cpu()
    feeder = images if isinstance(images, ImageFeeder) else ImageFeeder(images, rt.device)
    t0 = time.time()
    _check_train(task, y[tr])
    lrs = _as_list(o["lr_sweep"]) or [float(o["lr"])]
    best = None
    tried = []
    for lr in lrs:
        model, hist, best_ep, (mu, sd) = _train_one(make_encoder, task, n_classes, feeder, y, tr, va,
                                                   float(lr), o, balance, seed, rt, progress)
        sv = _scores(task, _predict(model, feeder, va, int(o["batch_size"]), rt), mu, sd)
        sc = _val_score(task, y[va], sv) if len(va) else 0.0
        tried.append({"lr": float(lr), "val_score": float(sc), "best_epoch": best_ep, "history": hist})
        if best is None or sc > best[0]:
            best = (sc, model, float(lr), best_ep, (mu, sd), sv)
        log.debug("finetune lr=%g val=%.4f best_epoch=%d", lr, sc, best_ep)
    _, model, lr, best_ep, (mu, sd), sv = best
    st = _scores(task, _predict(model, feeder, te, int(o["batch_size"]), rt), mu, sd)
    return ProbeResult(st, sv, {"lr": lr, "best_epoch": best_ep, "tried": tried}, time.time() - t0)


def finetune_steps(n_train: int, opts: dict | None = None) -> int:
    """Training batches of a :func:`finetune` call that runs every epoch (the bar's total)."""
    o = {**DEFAULTS["finetune"], **(opts or {})}
    lrs = _as_list(o["lr_sweep"]) or [float(o["lr"])]
    return len(lrs) * int(o["epochs"]) * _n_batches(n_train, int(o["batch_size"]))


# -- the registry: one FoldData in, one ProbeResult out ------------------------------------------

@dataclass(frozen=True)
class FoldData:
    """Everything a protocol needs for one cell (init x fold x label fraction).

    ``train`` / ``val`` / ``test`` are positions into the labelled images (``y``, ``groups``,
    ``features``, ``images``).  Feature protocols read ``features``; fine-tuning reads ``images``
    (``uint8`` tensor or :class:`~radpretrain.evaluate.device.ImageFeeder`), ``make_encoder`` (a
    fresh encoder per call) and ``runtime``.  ``progress`` is a tqdm-like bar or None.
    """

    fold: int
    fraction: float
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    y: np.ndarray
    task: str
    n_classes: int
    groups: np.ndarray | None = None     # patient pseudonyms of the labelled images
    balance: str = "none"
    seed: int = 0
    features: np.ndarray | None = None
    images: object = None
    make_encoder: Callable | None = None
    runtime: Runtime | None = None
    progress: object = None

    @property
    def y_train(self) -> np.ndarray:
        return self.y[self.train]

    @property
    def class_weights(self) -> np.ndarray | None:
        """Balanced class weights of the training labels (None for regression)."""
        if self.task == "regression":
            return None
        return balanced_class_weights(self.y_train, self.n_classes)

    @property
    def single_class(self) -> bool:
        """A classification cell whose training subset holds one class (it cannot be fitted)."""
        return self.task != "regression" and len(np.unique(self.y_train)) < 2


class Protocol:
    """One evaluation protocol: ``Protocol(options).run(FoldData) -> ProbeResult``.

    ``uses_features``: it reads frozen features (and so takes ``pool``, a token aggregation for
    ViTs, computed once per init); otherwise it trains on the images.
    """

    name: ClassVar[str] = ""
    uses_features: ClassVar[bool] = True

    def __init__(self, options: dict | None = None):
        self.options = {k: v for k, v in (options or {}).items() if k != "pool"}

    def steps(self, data: FoldData) -> int:
        """Units of work of one cell (the inner progress bar's total; 0: no inner bar)."""
        return 0

    def run(self, data: FoldData) -> ProbeResult:
        raise NotImplementedError


def _need_features(data: FoldData, name: str) -> np.ndarray:
    if data.features is None:
        raise ValueError(f"protocol {name}: FoldData.features is missing")
    return data.features


class LinearProbe(Protocol):
    name = "linear"

    def run(self, data: FoldData) -> ProbeResult:
        X, y = _need_features(data, self.name), data.y
        return linear_probe(data.task, data.n_classes, X[data.train], y[data.train], X[data.val], y[data.val],
                            X[data.test], self.options, data.balance, data.seed)


class KnnProbe(Protocol):
    name = "knn"

    def run(self, data: FoldData) -> ProbeResult:
        X, y = _need_features(data, self.name), data.y
        return knn_probe(data.task, data.n_classes, X[data.train], y[data.train], X[data.val], y[data.val],
                         X[data.test], self.options, data.balance, data.seed)


class FineTune(Protocol):
    name = "finetune"
    uses_features = False

    def steps(self, data: FoldData) -> int:
        return finetune_steps(len(data.train), self.options)

    def run(self, data: FoldData) -> ProbeResult:
        if data.make_encoder is None or data.images is None:
            raise ValueError("protocol finetune: FoldData needs images and make_encoder")
        return finetune(data.make_encoder, data.task, data.n_classes, data.images, data.y, data.train, data.val,
                        data.test, self.options, data.balance, data.seed, runtime=data.runtime,
                        progress=data.progress)


# name -> protocol class; a new protocol is one class above and one entry here
PROTOCOLS: Mapping[str, type[Protocol]] = MappingProxyType({p.name: p for p in (LinearProbe, KnnProbe, FineTune)})


def get_protocol(name: str) -> type[Protocol]:
    if name not in PROTOCOLS:
        raise UserError(f"--protocol {name}: choose one of {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]
