"""Metrics, patient-level bootstrap confidence intervals and paired comparisons.

Conventions used across :mod:`radpretrain.evaluate`:

- ``task`` is ``"binary"``, ``"multiclass"`` or ``"regression"``.
- ``y_true``: class index (0..C-1) for classification, a float for regression.
- ``y_score``: binary -> probability of the positive class, shape [N];
  multiclass -> class probabilities, shape [N, C]; regression -> prediction [N].
- ``groups``: the patient id of every prediction.  Every interval and paired
  test resamples *patients* (with all their images), never single images, so
  correlated images of one patient do not make intervals look narrower than
  they are.

Metrics follow scikit-learn's definitions (NumPy implementations, checked against
scikit-learn in the tests); DeLong's test is implemented here (midrank algorithm
of Sun & Xu, 2014).  The bootstrap does not rebuild every resample: it evaluates
all replicates at once as weighted metrics of the original images (see the
comment above :func:`_group_index`), which gives the same replicates as the plain
resampling loop at a small fraction of the cost.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from scipy import stats

TASKS = ("binary", "multiclass", "regression")
# Metrics per task; the first one is the task's headline metric.
TASK_METRICS = {
    "binary": ("auc", "balanced_accuracy", "accuracy"),
    "multiclass": ("balanced_accuracy", "accuracy", "auc"),
    "regression": ("mae", "r2"),
}
HIGHER_IS_BETTER = {"auc": True, "balanced_accuracy": True, "accuracy": True, "mae": False, "r2": True}
METRIC_LABELS = {"auc": "AUC", "balanced_accuracy": "balanced accuracy", "accuracy": "accuracy",
                 "mae": "MAE", "r2": "R²"}


def primary_metric(task: str) -> str:
    return TASK_METRICS[task][0]


def predicted_labels(task: str, y_score: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Hard predictions from scores (binary: ``score >= threshold``; multiclass: argmax)."""
    y_score = np.asarray(y_score)
    if task == "binary":
        return (y_score >= threshold).astype(int)
    if task == "multiclass":
        return np.argmax(y_score, axis=1)
    return y_score


def binary_auc(y_true, score) -> float:
    """ROC AUC by the Mann-Whitney rank statistic (ties count one half); NaN with one class."""
    y = np.asarray(y_true).astype(bool)
    m = int(y.sum())
    n = len(y) - m
    if m == 0 or n == 0:
        return float("nan")
    r = stats.rankdata(np.asarray(score, dtype=float))
    return float((r[y].sum() - m * (m + 1) / 2) / (m * n))


def metric_value(name: str, task: str, y_true: np.ndarray, y_score: np.ndarray) -> float:
    """One metric; NaN when undefined (e.g. AUC with a single class present).

    The definitions are scikit-learn's (``roc_auc_score``, macro one-vs-rest for
    multiclass over the classes present; ``balanced_accuracy_score``; ``accuracy_score``;
    ``mean_absolute_error``; ``r2_score``), computed with NumPy because the patient
    bootstrap calls this thousands of times; the tests check both agree.
    """
    y_true = np.asarray(y_true)
    y_score = np.asarray(y_score)
    if len(y_true) == 0:
        return float("nan")
    if name == "auc":
        if task == "binary":
            return binary_auc(y_true, y_score)
        present = np.unique(y_true).astype(int)
        if len(present) < 2:
            return float("nan")
        p = y_score[:, present]
        p = p / np.clip(p.sum(axis=1, keepdims=True), 1e-12, None)
        if len(present) == 2:
            return binary_auc(y_true == present[1], p[:, 1])
        return float(np.mean([binary_auc(y_true == c, p[:, j]) for j, c in enumerate(present)]))
    if name == "accuracy":
        return float(np.mean(predicted_labels(task, y_score) == y_true))
    if name == "balanced_accuracy":
        pred = predicted_labels(task, y_score)
        present = np.unique(y_true)
        return float(np.mean([np.mean(pred[y_true == c] == c) for c in present]))
    if name == "mae":
        return float(np.mean(np.abs(y_true.astype(float) - y_score.astype(float))))
    if name == "r2":
        yt = y_true.astype(float)
        ss_tot = float(np.sum((yt - yt.mean()) ** 2))
        if len(yt) < 2 or ss_tot == 0:
            return float("nan")
        return float(1 - np.sum((yt - y_score.astype(float)) ** 2) / ss_tot)
    raise ValueError(f"unknown metric {name!r}")


def compute_metrics(task: str, y_true, y_score) -> dict[str, float]:
    """All metrics of ``task`` as ``{name: value}``."""
    return {m: metric_value(m, task, y_true, y_score) for m in TASK_METRICS[task]}


# -- bootstrap over patients ---------------------------------------------------
#
# A bootstrap replicate draws k patients with replacement out of the k patients
# and keeps all images of every drawn patient.  Drawing patient i three times is
# the same as keeping each of its images three times, so a replicate is fully
# described by how often each patient was drawn (its multiplicity); every image
# gets the multiplicity of its patient as a weight.  The fast path below
# therefore never builds the resampled arrays: it draws many replicates at once
# as a matrix of multiplicities [replicates, patients] and evaluates each metric
# as a *weighted* metric of the original images, for all replicates together
# (matrix products, one sort per score column done in advance, running sums).
# With integer weights a weighted metric is exactly the metric of the images
# repeated that many times (tested), so replicates, CIs and p-values are the ones
# the plain resampling loop gives for the same draws.  The draws are made with the
# same random calls as that loop (one ``rng.integers(0, k, size=k)`` per
# replicate), so a seed gives the same replicates either way.

# Replicates are processed in chunks of at most this many image weights
# (replicates x images), which bounds memory to a few MB whatever n_boot is.
_CHUNK_WEIGHTS = 250_000


def _group_index(groups) -> tuple[list[np.ndarray], int]:
    """Row indices of every group (patient)."""
    groups = np.asarray(groups)
    _, inv = np.unique(groups, return_inverse=True)
    order = np.argsort(inv, kind="stable")
    counts = np.bincount(inv)
    split = np.split(order, np.cumsum(counts)[:-1])
    return split, len(split)


def _resample(members: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    pick = rng.integers(0, len(members), size=len(members))
    return np.concatenate([members[i] for i in pick])


def _group_codes(groups, n: int) -> tuple[np.ndarray, int]:
    """Patient number (0..k-1, same numbering as :func:`_group_index`) of every row, and k.

    ``groups=None`` makes every row its own patient.
    """
    if groups is None:
        return np.arange(n), n
    _, inv = np.unique(np.asarray(groups), return_inverse=True)
    inv = inv.reshape(-1)
    if len(inv) != n:
        raise ValueError(f"groups has {len(inv)} entries for {n} predictions")
    return inv, int(inv.max()) + 1


def _patient_counts(k: int, n_boot: int, seed: int, chunk: int):
    """Yield ``[b, k]`` arrays: how often each patient is drawn in each replicate.

    Each replicate is drawn by the same call the resampling loop makes
    (``rng.integers(0, k, size=k)`` on a generator seeded with ``seed``), so
    replicate r here is replicate r of :func:`bootstrap_ci` with the same seed.
    """
    rng = np.random.default_rng(seed)
    done = 0
    while done < n_boot:
        b = min(chunk, n_boot - done)
        counts = np.empty((b, k), dtype=float)
        for i in range(b):
            counts[i] = np.bincount(rng.integers(0, k, size=k), minlength=k)
        yield counts
        done += b


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``num / den`` with NaN where ``den`` is not positive."""
    out = np.full(np.shape(num), np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _group_sums(values: np.ndarray, codes: np.ndarray, k: int) -> np.ndarray:
    """Per-patient column sums of ``values`` [N, m] -> [k, m]."""
    out = np.zeros((k,) + values.shape[1:])
    np.add.at(out, codes, values)
    return out


class _WeightedBinaryAUC:
    """Weighted ROC AUC of fixed labels and scores, for many weightings at once.

    The AUC is the Mann-Whitney statistic: over all (positive, negative) pairs, the
    share where the positive scores higher, a tie counting one half.  With weights,
    each pair counts ``w_pos * w_neg``, so

        AUC = sum_pos w_pos * (Wneg(score < s_pos) + 0.5 * Wneg(score == s_pos)) / (Wpos * Wneg)

    The negatives are sorted by score once, and for every positive we look up once
    how many negatives score strictly lower (``lo``) and lower-or-equal (``hi``).
    Per weighting, a running sum ``C`` of the sorted negatives' weights then gives
    ``Wneg(<) = C[lo]`` and ``Wneg(<=) = C[hi]``, so the bracket above is
    ``(C[lo] + C[hi]) / 2``.  With integer weights this equals the rank formula of
    :func:`binary_auc` on the repeated images (mid-ranks give ties the 0.5 credit).

    Weights are given per patient (``counts`` [B, k]); ``codes`` says which column
    belongs to each image.  Integer weights with small totals are summed in float32,
    which is exact there and about twice as fast; other weights use float64.
    """

    def __init__(self, positive: np.ndarray, score: np.ndarray, codes: np.ndarray, k: int):
        positive = np.asarray(positive, dtype=bool)
        score = np.asarray(score, dtype=float)
        neg = np.flatnonzero(~positive)
        neg = neg[np.argsort(score[neg], kind="stable")]
        pos = np.flatnonzero(positive)
        self.lo = np.searchsorted(score[neg], score[pos], side="left")
        self.hi = np.searchsorted(score[neg], score[pos], side="right")
        self.neg_codes = codes[neg]
        self.pos_codes = codes[pos]
        self.group_size = np.bincount(codes, minlength=k).astype(float)  # images per patient

    def __call__(self, counts: np.ndarray) -> np.ndarray:
        # float32 holds integers exactly up to 2**24; the running sums stay below
        # 2 * (total weight), so integer weights with a total <= 2**22 are safe.
        exact32 = np.all(counts == np.round(counts)) and (counts @ self.group_size).max(initial=0) <= 2 ** 22
        dtype = np.float32 if exact32 else np.float64
        c = counts.astype(dtype)
        wneg = c[:, self.neg_codes]
        below = np.zeros((len(c), wneg.shape[1] + 1), dtype=dtype)
        np.cumsum(wneg, axis=1, out=below[:, 1:])  # below[:, j] = weight of the j lowest negatives
        wpos = c[:, self.pos_codes]
        twice_credit = below[:, self.lo]
        twice_credit += below[:, self.hi]
        pairs = 0.5 * np.einsum("ij,ij->i", wpos, twice_credit, dtype=np.float64)
        return _ratio(pairs, wpos.sum(axis=1, dtype=np.float64) * below[:, -1].astype(np.float64))


class _WeightedMulticlassAUC:
    """Weighted macro one-vs-rest AUC, as :func:`metric_value` computes it.

    :func:`metric_value` averages over the classes *present in the sample* and first
    renormalises the probabilities of those classes to sum to one, so the scores
    (and their order) depend on which classes a replicate contains.  Replicates are
    therefore grouped by their set of present classes (nearly always one set: all
    classes) and each set gets its own renormalised, sorted scores (cached).
    """

    def __init__(self, y_true: np.ndarray, y_score: np.ndarray, codes: np.ndarray, k: int):
        self.y_true = y_true
        self.y_score = y_score
        self.codes = codes
        self.k = k
        self.classes = np.unique(y_true)
        self.class_weight = _group_sums((y_true[:, None] == self.classes[None, :]).astype(float), codes, k)
        self._cache: dict[bytes, list[_WeightedBinaryAUC]] = {}

    def _aucs(self, present_mask: np.ndarray) -> list[_WeightedBinaryAUC]:
        key = present_mask.tobytes()
        if key not in self._cache:
            present = self.classes[present_mask].astype(int)
            p = self.y_score[:, present]
            p = p / np.clip(p.sum(axis=1, keepdims=True), 1e-12, None)
            if len(present) == 2:
                aucs = [_WeightedBinaryAUC(self.y_true == present[1], p[:, 1], self.codes, self.k)]
            else:
                aucs = [_WeightedBinaryAUC(self.y_true == c, p[:, j], self.codes, self.k) for j, c in enumerate(present)]
            self._cache[key] = aucs
        return self._cache[key]

    def __call__(self, counts: np.ndarray) -> np.ndarray:
        present = (counts @ self.class_weight) > 0
        out = np.full(len(counts), np.nan)
        patterns, which = np.unique(present, axis=0, return_inverse=True)
        which = which.reshape(-1)
        for i, pattern in enumerate(patterns):
            if pattern.sum() < 2:
                continue  # one class only: AUC undefined
            if len(patterns) == 1:
                rows, c = slice(None), counts
            else:
                rows = np.flatnonzero(which == i)
                c = counts[rows]
            out[rows] = np.mean([auc(c) for auc in self._aucs(pattern)], axis=0)
        return out


def _weighted_metric_fn(name: str, task: str, y_true, y_score, codes: np.ndarray | None = None,
                        k: int | None = None) -> Callable[[np.ndarray], np.ndarray] | None:
    """``f(counts) -> values``: metric ``name`` of the images weighted by each row of ``counts``.

    ``counts`` is [B, k]: one weight per patient and weighting; image i gets the
    weight of column ``codes[i]`` (default: every image its own column).
    Everything that does not depend on the weights (predicted labels, per-patient
    sums, sort orders) is computed once here.  Returns ``None`` for a combination
    the weighted path does not cover, or for inputs with NaN/inf (then the caller
    resamples replicate by replicate, which reproduces :func:`metric_value` on such
    data exactly).
    """
    y_true = np.asarray(y_true)
    y_score = np.asarray(y_score)
    n = len(y_true)
    if codes is None:
        codes, k = np.arange(n), n
    if n == 0 or len(y_score) != n or task not in TASKS:
        return None
    if y_score.ndim != (2 if task == "multiclass" else 1) or y_true.ndim != 1:
        return None
    if not (np.issubdtype(y_true.dtype, np.number) or y_true.dtype == bool):
        return None
    if not np.issubdtype(y_score.dtype, np.number) or not np.all(np.isfinite(y_score)):
        return None
    if not np.all(np.isfinite(y_true.astype(float))):
        return None

    if name == "auc" and task == "binary":
        return _WeightedBinaryAUC(y_true.astype(bool), y_score, codes, k)
    if name == "auc" and task == "multiclass":
        return _WeightedMulticlassAUC(y_true, y_score.astype(float), codes, k)

    if name in ("accuracy", "balanced_accuracy") and task in ("binary", "multiclass"):
        # Accuracy: weighted share of correct images.  Balanced accuracy: per class
        # present (positive weight), the weighted share of its images predicted as
        # that class; then the plain mean over the present classes.  All sums are
        # linear in the weights, so they are per-patient sums times the counts.
        correct = (predicted_labels(task, y_score) == y_true).astype(float)
        if name == "accuracy":
            m = _group_sums(np.stack([correct, np.ones(n)], axis=1), codes, k)
            return lambda counts: _ratio(*(counts @ m).T)
        onehot = (y_true[:, None] == np.unique(y_true)[None, :]).astype(float)
        c = onehot.shape[1]
        m = _group_sums(np.hstack([onehot, onehot * correct[:, None]]), codes, k)

        def balanced_accuracy(counts):
            s = counts @ m
            total, hits = s[:, :c], s[:, c:]
            present = total > 0
            rate = np.zeros_like(hits)
            np.divide(hits, total, out=rate, where=present)
            return _ratio(rate.sum(axis=1), present.sum(axis=1).astype(float))
        return balanced_accuracy

    if name in ("mae", "r2") and task == "regression":
        yt = y_true.astype(float)
        pred = y_score.astype(float)
        if name == "mae":
            m = _group_sums(np.stack([np.abs(yt - pred), np.ones(n)], axis=1), codes, k)
            return lambda counts: _ratio(*(counts @ m).T)
        # R² = 1 - SS_res / SS_tot from weighted sums; SS_tot from the weighted
        # moments of y centred on its overall mean (keeps the subtraction well
        # conditioned).  metric_value gives NaN for fewer than 2 images or a constant
        # y; a constant y is detected exactly from per-patient minima and maxima
        # (the moment formula would leave rounding noise instead of 0).
        yc = yt - yt.mean()
        m = _group_sums(np.stack([np.ones(n), yc, yc ** 2, (yt - pred) ** 2], axis=1), codes, k)
        y_min = np.full(k, np.inf)
        np.minimum.at(y_min, codes, yt)
        y_max = np.full(k, -np.inf)
        np.maximum.at(y_max, codes, yt)

        def r2(counts):
            total, s1, s2, ss_res = (counts @ m).T
            ss_tot = s2 - s1 * _ratio(s1, total)
            drawn = counts > 0
            lo = np.where(drawn, y_min, np.inf).min(axis=1)
            hi = np.where(drawn, y_max, -np.inf).max(axis=1)
            ok = (total >= 2) & (hi > lo)
            out = np.full(len(counts), np.nan)
            out[ok] = 1 - ss_res[ok] / ss_tot[ok]
            return out
        return r2
    return None


def weighted_metric_values(name: str, task: str, y_true, y_score, weights):
    """Metric ``name`` with every image weighted, for one or many weight vectors.

    ``weights``: shape [N] or [B, N] (one row per weighting); returns a float or
    an array [B].  With non-negative integer weights the result is
    ``metric_value`` on the images repeated ``weight`` times (zero = left out);
    NaN where that is undefined.  This is how the patient bootstrap evaluates its
    replicates without building them.
    """
    fn = _weighted_metric_fn(name, task, y_true, y_score)
    if fn is None:
        if name not in HIGHER_IS_BETTER:
            raise ValueError(f"unknown metric {name!r}")
        raise ValueError(f"no weighted form of {name!r} for task {task!r} with these inputs")
    w = np.asarray(weights, dtype=float)
    if w.ndim == 1:
        return float(fn(w[None, :])[0])
    return fn(w)


def _weighted_replicates(make_fns: Callable[[np.ndarray, int], list], n: int, groups, n_boot: int,
                         seed: int) -> list[np.ndarray] | None:
    """Values of every weighted metric on the same ``n_boot`` patient-bootstrap replicates.

    ``make_fns(codes, k)`` builds the weighted metrics (see :func:`_weighted_metric_fn`)
    for the patient numbering; returns ``None`` if one of them has no weighted form.
    All replicates are kept (NaN where undefined).
    """
    codes, k = _group_codes(groups, n)
    fns = make_fns(codes, k)
    if any(fn is None for fn in fns):
        return None
    chunk = max(1, _CHUNK_WEIGHTS // max(n, 1))
    out: list[list[np.ndarray]] = [[] for _ in fns]
    for counts in _patient_counts(k, int(n_boot), seed, chunk):
        for values, fn in zip(out, fns):
            values.append(fn(counts))
    return [np.concatenate(v) if v else np.empty(0) for v in out]


def _percentile_ci(reps: np.ndarray, alpha: float = 0.05) -> tuple[float, float]:
    if len(reps) == 0:
        return float("nan"), float("nan")
    lo, hi = np.quantile(reps, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def bootstrap_ci(
    metric: Callable[[np.ndarray], float],
    n: int,
    groups,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float, np.ndarray]:
    """Percentile CI of ``metric(rows)`` resampling groups (patients) with replacement.

    ``metric`` takes an index array into the ``n`` predictions.  Returns
    ``(low, high, replicates)``; replicates where the metric is undefined
    (NaN, e.g. one class only) are dropped.  This is the general (slow) form,
    one call of ``metric`` per replicate; :func:`metric_with_ci` gets the same
    replicates for the built-in metrics without the loop.
    """
    members, k = _group_index(groups if groups is not None else np.arange(n))
    rng = np.random.default_rng(seed)
    reps = np.array([metric(_resample(members, rng)) for _ in range(int(n_boot))], dtype=float)
    reps = reps[np.isfinite(reps)]
    lo, hi = _percentile_ci(reps, alpha)
    return lo, hi, reps


def metric_with_ci(name: str, task: str, y_true, y_score, groups, n_boot: int = 1000,
                   seed: int = 0) -> tuple[float, float, float]:
    """``(value, ci_low, ci_high)`` of one metric with a patient bootstrap.

    The value is :func:`metric_value` on all images; the CI is the 2.5-97.5
    percentile range of the metric over ``n_boot`` replicates that each draw the
    patients with replacement (all images of a drawn patient, as often as it is
    drawn), undefined replicates dropped.  The replicates are evaluated as
    weighted metrics (see :func:`weighted_metric_values`), many at a time.
    """
    y_true = np.asarray(y_true)
    y_score = np.asarray(y_score)
    value = metric_value(name, task, y_true, y_score)
    if not np.isfinite(value) or n_boot <= 0:
        return value, float("nan"), float("nan")
    reps = _weighted_replicates(lambda codes, k: [_weighted_metric_fn(name, task, y_true, y_score, codes, k)],
                                len(y_true), groups, n_boot, seed)
    if reps is None:  # no weighted form: resample replicate by replicate
        lo, hi, _ = bootstrap_ci(lambda r: metric_value(name, task, y_true[r], y_score[r]), len(y_true), groups,
                                 n_boot=n_boot, seed=seed)
        return value, lo, hi
    lo, hi = _percentile_ci(reps[0][np.isfinite(reps[0])])
    return value, lo, hi


def paired_bootstrap(
    name: str,
    task: str,
    y_true,
    score_a,
    score_b,
    groups,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict:
    """Compare two inits predicting the same images: ``delta = metric(a) - metric(b)``.

    Patients are resampled once per replicate and both inits are scored on the
    same resample (paired): both are evaluated with the same replicate weights.
    Replicates where the difference is undefined are dropped.  The CI is the
    2.5-97.5 percentile range of the replicate differences; the two-sided p-value
    is the bootstrap estimate of ``2 * min(P(delta* <= 0), P(delta* >= 0))`` with
    the +1 correction, i.e. never exactly 0.  ``better`` says whether a positive
    delta means ``a`` is better.
    """
    y_true = np.asarray(y_true)
    score_a = np.asarray(score_a)
    score_b = np.asarray(score_b)
    a = metric_value(name, task, y_true, score_a)
    b = metric_value(name, task, y_true, score_b)
    reps = None
    if len(y_true):
        reps = _weighted_replicates(
            lambda codes, k: [_weighted_metric_fn(name, task, y_true, s, codes, k) for s in (score_a, score_b)],
            len(y_true), groups, n_boot, seed)
    if reps is not None:
        deltas = reps[0] - reps[1]
        deltas = deltas[np.isfinite(deltas)]
    else:  # no weighted form: resample replicate by replicate
        members, _ = _group_index(groups if groups is not None else np.arange(len(y_true)))
        rng = np.random.default_rng(seed)
        deltas = []
        for _ in range(int(n_boot)):
            r = _resample(members, rng)
            d = metric_value(name, task, y_true[r], score_a[r]) - metric_value(name, task, y_true[r], score_b[r])
            if np.isfinite(d):
                deltas.append(d)
        deltas = np.asarray(deltas, dtype=float)
    lo, hi = _percentile_ci(deltas)
    p = _bootstrap_p(deltas)
    return {"metric": name, "a": a, "b": b, "delta": a - b, "ci_low": lo, "ci_high": hi, "p": p,
            "n_boot": int(len(deltas)), "higher_is_better": HIGHER_IS_BETTER[name]}



def _bootstrap_p(deltas: np.ndarray) -> float:
    """Two-sided bootstrap p-value of replicate differences, ``2 * min(P(d* <= 0), P(d* >= 0))`` (+1 corrected)."""
    if len(deltas) == 0:
        return float("nan")
    m = len(deltas)
    return float(min(1.0, 2 * min((np.sum(deltas <= 0) + 1) / (m + 1), (np.sum(deltas >= 0) + 1) / (m + 1))))


def paired_bootstrap_mean(
    name: str,
    task: str,
    y_true,
    scores: list,
    score_ref,
    groups,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict:
    """Seed-mean difference of several runs of one recipe against a reference init on the same images.

    ``scores``: one score array per seed run (all predicting the images of ``y_true``);
    ``delta = mean_s(metric(s) - metric(ref))``.  Every replicate draws the patients once and
    scores every seed and the reference on that same resample (the replicates of
    :func:`paired_bootstrap` with the same ``seed``), so the replicate's seed-mean difference is
    the average of the seeds' paired differences on it.  CI: 2.5-97.5 percentiles of those
    averages; p as in :func:`paired_bootstrap`.  Also returns the seeds' own differences.
    """
    y_true = np.asarray(y_true)
    scores = [np.asarray(s) for s in scores]
    score_ref = np.asarray(score_ref)
    if not scores:
        raise ValueError("paired_bootstrap_mean needs at least one score array")
    values = [metric_value(name, task, y_true, s) for s in scores]
    ref = metric_value(name, task, y_true, score_ref)
    per_seed = [v - ref for v in values]
    reps = None
    if len(y_true):
        reps = _weighted_replicates(
            lambda codes, k: [_weighted_metric_fn(name, task, y_true, s, codes, k) for s in (*scores, score_ref)],
            len(y_true), groups, n_boot, seed)
    if reps is not None:
        deltas = np.mean(np.stack(reps[:-1]) - reps[-1][None, :], axis=0)
        deltas = deltas[np.isfinite(deltas)]
    else:  # no weighted form: resample replicate by replicate (the same draws)
        members, _ = _group_index(groups if groups is not None else np.arange(len(y_true)))
        rng = np.random.default_rng(seed)
        out = []
        for _ in range(int(n_boot)):
            r = _resample(members, rng)
            b = metric_value(name, task, y_true[r], score_ref[r])
            d = np.mean([metric_value(name, task, y_true[r], s[r]) - b for s in scores])
            if np.isfinite(d):
                out.append(d)
        deltas = np.asarray(out, dtype=float)
    lo, hi = _percentile_ci(deltas)
    return {"metric": name, "values": values, "reference": ref, "per_seed_delta": per_seed,
            "delta": float(np.mean(per_seed)), "ci_low": lo, "ci_high": hi, "p": _bootstrap_p(deltas),
            "n_boot": int(len(deltas)), "higher_is_better": HIGHER_IS_BETTER[name]}

# -- DeLong --------------------------------------------------------------------

def _midrank(x: np.ndarray) -> np.ndarray:
    """Mid-ranks (1-based, ties get the mean rank)."""
    return stats.rankdata(x, method="average")


def delong_test(y_true, score_a, score_b) -> dict:
    """DeLong's test for two correlated ROC AUCs on the same cases (binary).

    Returns ``{"auc_a", "auc_b", "delta", "se", "z", "p", "ci_low", "ci_high"}``
    (95 % CI of the difference from the DeLong variance).  Uses the structural
    components (placements) of DeLong et al. (1988), computed with mid-ranks.
    Note: it treats images as independent; with several images per patient the
    patient bootstrap (:func:`paired_bootstrap`) is the more honest test.
    """
    y = np.asarray(y_true).astype(bool)
    scores = np.vstack([np.asarray(score_a, float), np.asarray(score_b, float)])
    pos, neg = scores[:, y], scores[:, ~y]
    m, n = pos.shape[1], neg.shape[1]
    if m < 2 or n < 2:
        nan = float("nan")
        return {"auc_a": nan, "auc_b": nan, "delta": nan, "se": nan, "z": nan, "p": nan, "ci_low": nan, "ci_high": nan}
    aucs, v10, v01 = [], [], []
    for k in range(2):
        tx, ty = _midrank(pos[k]), _midrank(neg[k])
        tz = _midrank(np.concatenate([pos[k], neg[k]]))
        auc = (tz[:m].sum() - m * (m + 1) / 2) / (m * n)
        aucs.append(auc)
        v10.append((tz[:m] - tx) / n)          # placement of each positive
        v01.append(1.0 - (tz[m:] - ty) / m)    # placement of each negative
    s10 = np.cov(np.vstack(v10))
    s01 = np.cov(np.vstack(v01))
    cov = s10 / m + s01 / n
    var = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    delta = aucs[0] - aucs[1]
    se = float(np.sqrt(max(var, 0.0)))
    if se == 0:
        z = 0.0 if delta == 0 else np.sign(delta) * np.inf
        p = 1.0 if delta == 0 else 0.0
    else:
        z = delta / se
        p = float(2 * stats.norm.sf(abs(z)))
    return {"auc_a": float(aucs[0]), "auc_b": float(aucs[1]), "delta": float(delta), "se": se, "z": float(z),
            "p": p, "ci_low": float(delta - 1.959963985 * se), "ci_high": float(delta + 1.959963985 * se)}


def delong_variance(y_true, score) -> tuple[float, float]:
    """``(auc, variance)`` of a single AUC by DeLong (used by tests and the report)."""
    y = np.asarray(y_true).astype(bool)
    s = np.asarray(score, float)
    pos, neg = s[y], s[~y]
    m, n = len(pos), len(neg)
    tx, ty = _midrank(pos), _midrank(neg)
    tz = _midrank(np.concatenate([pos, neg]))
    auc = (tz[:m].sum() - m * (m + 1) / 2) / (m * n)
    v10 = (tz[:m] - tx) / n
    v01 = 1.0 - (tz[m:] - ty) / m
    return float(auc), float(np.var(v10, ddof=1) / m + np.var(v01, ddof=1) / n)


# -- FROC: sensitivity at fixed false positives per scan ---------------------------
#
# LUNA16's false-positive-reduction score.  Candidates (one score each) are accepted from the
# highest score down; at every distinct score the operating point is
#
#     FPs per scan = fp_weight * (negatives accepted) / (scans),   sensitivity = positives accepted / positives
#
# (candidates with equal scores enter together).  Between operating points the curve is a
# straight line, as in LUNA16's evaluation script (np.interp over the ROC points): a tie group
# of positives and negatives enters along the line, which is the expected operating point of a
# random order among the tied candidates.  Where several points share one FP rate (positives
# accepted without new false positives), the highest sensitivity counts.  Beyond the last point
# (everything accepted) the sensitivity stays at its end value (1 with any positive).  The CPM
# is the mean sensitivity at 1/8, 1/4, 1/2, 1, 2, 4 and 8 FPs per scan.
#
# The bootstrap draws patients (with all their scans and candidates) like the other metrics: a
# patient drawn twice counts its scans twice in the denominator.

FROC_FPS = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


class _WeightedFROC:
    """Sensitivities at ``points`` FPs/scan for many weightings of the candidates at once.

    ``counts`` [B, k] weights per patient; ``codes`` the patient column of every candidate;
    ``scans_per_patient`` [k] the number of scans of each patient (the denominator's share).
    Candidates are sorted once; each weighting gets running sums of its weighted positives and
    negatives at the ends of the tie groups, then every point is read off by interpolation.
    """

    def __init__(self, positive, score, codes, k: int, scans_per_patient, points=FROC_FPS, fp_weight: float = 1.0):
        positive = np.asarray(positive, dtype=bool)
        score = np.asarray(score, dtype=float)
        order = np.argsort(-score, kind="stable")
        s = score[order]
        self.ends = np.flatnonzero(np.r_[s[1:] != s[:-1], True])  # last candidate of each tie group
        self.codes = np.asarray(codes)[order]
        self.pos = positive[order]
        self.scans = np.asarray(scans_per_patient, dtype=float)
        self.points = np.asarray(points, dtype=float)
        self.fp_weight = float(fp_weight)

    def curve(self, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(FPs per scan, sensitivity), each [B, groups + 1], starting at (0, 0)."""
        w = np.asarray(counts, dtype=float)[:, self.codes]
        b = len(w)
        tp = np.zeros((b, len(self.ends) + 1))
        fp = np.zeros((b, len(self.ends) + 1))
        if len(self.ends):
            tp[:, 1:] = np.cumsum(w * self.pos, axis=1)[:, self.ends]
            fp[:, 1:] = np.cumsum(w * ~self.pos, axis=1)[:, self.ends]
        n_scans = np.asarray(counts, dtype=float) @ self.scans
        fps = np.full(fp.shape, np.nan)
        np.divide(fp * self.fp_weight, n_scans[:, None], out=fps, where=n_scans[:, None] > 0)
        sens = np.full(tp.shape, np.nan)
        np.divide(tp, tp[:, -1:], out=sens, where=tp[:, -1:] > 0)
        return fps, sens

    def __call__(self, counts: np.ndarray) -> np.ndarray:
        fps, sens = self.curve(counts)
        b, g = fps.shape
        out = np.full((b, len(self.points)), np.nan)
        ok = np.isfinite(sens[:, -1]) & np.isfinite(fps[:, -1])
        if not ok.any():
            return out
        fps, sens = fps[ok], sens[ok]
        rows = np.arange(len(fps))
        for j, r in enumerate(self.points):
            i = (fps <= r).sum(axis=1) - 1  # last point at or below r (fps[:, 0] == 0)
            nxt = np.minimum(i + 1, g - 1)
            f0, f1 = fps[rows, i], fps[rows, nxt]
            s0, s1 = sens[rows, i], sens[rows, nxt]
            step = np.divide(r - f0, f1 - f0, out=np.zeros(len(rows)), where=f1 > f0)
            out[ok, j] = s0 + (s1 - s0) * step
        return out


def _froc_setup(y_true, score, scans, groups):
    """Patient codes of the candidates, the number of patients and each patient's number of scans.

    ``groups`` None: every scan is its own patient.  A scan must belong to one patient.
    """
    scans = np.asarray(scans)
    n = len(scans)
    if len(np.asarray(y_true)) != n or len(np.asarray(score)) != n:
        raise ValueError("y_true, score and scans must have one entry per candidate")
    codes, k = _group_codes(scans if groups is None else groups, n)
    _, scan_codes = np.unique(scans, return_inverse=True)
    pairs = np.unique(np.stack([codes, scan_codes.reshape(-1)], axis=1), axis=0)
    if len(np.unique(pairs[:, 1])) != len(pairs):
        raise ValueError("a scan belongs to more than one patient")
    scans_per_patient = np.bincount(pairs[:, 0], minlength=k).astype(float)
    return codes, k, scans_per_patient


def froc_curve(y_true, score, scans, fp_weight: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """The FROC operating points ``(FPs per scan, sensitivity)`` from (0, 0) to all candidates accepted.

    ``y_true``: 1 for a positive candidate; ``scans``: the scan of every candidate (the number of
    distinct scans is the denominator); ``fp_weight``: how many false positives one accepted
    negative counts for (see docs/ct_patches.md on subsampled negatives).
    """
    codes, k, spp = _froc_setup(y_true, score, scans, None)
    fn = _WeightedFROC(np.asarray(y_true).astype(bool), score, codes, k, spp, fp_weight=fp_weight)
    fps, sens = fn.curve(np.ones((1, k)))
    return fps[0], sens[0]


def froc_sensitivities(y_true, score, scans, points=FROC_FPS, fp_weight: float = 1.0) -> np.ndarray:
    """Sensitivity at each of ``points`` false positives per scan (NaN without a positive candidate)."""
    codes, k, spp = _froc_setup(y_true, score, scans, None)
    fn = _WeightedFROC(np.asarray(y_true).astype(bool), score, codes, k, spp, points, fp_weight)
    return fn(np.ones((1, k)))[0]


def froc_with_ci(y_true, score, scans, groups, points=FROC_FPS, fp_weight: float = 1.0, n_boot: int = 1000,
                 seed: int = 0) -> dict:
    """FROC sensitivities and their mean (CPM) with 95 % CIs from the patient bootstrap.

    Replicates draw the patients (``groups``) with replacement, all their scans and candidates
    with them, with the same random draws as :func:`metric_with_ci` for the same seed; replicates
    without a positive are dropped.  Returns ``{"points", "sensitivity", "ci_low", "ci_high",
    "cpm", "cpm_ci_low", "cpm_ci_high", "n_candidates", "n_positives", "n_scans", "n_patients",
    "n_boot"}`` (lists per point).
    """
    y = np.asarray(y_true).astype(bool)
    codes, k, spp = _froc_setup(y, score, scans, groups)
    fn = _WeightedFROC(y, score, codes, k, spp, points, fp_weight)
    value = fn(np.ones((1, k)))[0]
    reps = []
    if n_boot > 0 and np.all(np.isfinite(value)):
        chunk = max(1, _CHUNK_WEIGHTS // max(len(y), 1))
        reps = [fn(c) for c in _patient_counts(k, int(n_boot), seed, chunk)]
    reps = np.concatenate(reps) if len(reps) else np.empty((0, len(value)))
    reps = reps[np.all(np.isfinite(reps), axis=1)]
    lo_hi = [_percentile_ci(reps[:, j]) for j in range(len(value))]
    cpm_lo, cpm_hi = _percentile_ci(reps.mean(axis=1)) if len(reps) else (float("nan"), float("nan"))
    return {"points": [float(p) for p in points], "sensitivity": [float(v) for v in value],
            "ci_low": [lo for lo, _ in lo_hi], "ci_high": [hi for _, hi in lo_hi],
            "cpm": float(np.mean(value)), "cpm_ci_low": cpm_lo, "cpm_ci_high": cpm_hi,
            "n_candidates": int(len(y)), "n_positives": int(y.sum()), "n_scans": int(len(np.unique(np.asarray(scans)))),
            "n_patients": int(k), "n_boot": int(len(reps))}
