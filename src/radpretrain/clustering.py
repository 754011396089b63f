"""k-means for DeepCluster and ``radpretrain clusters``: one faiss wrapper, and a torch twin for GPUs.

:func:`faiss_kmeans` is the one faiss k-means call of the package (DeepCluster's CPU path and
the embedding browser's spherical k-means both use it).  The rest of this module is the torch
version of DeepCluster's clustering, for features already on a GPU:

The CPU path of DeepCluster is numpy + faiss-cpu (:mod:`radpretrain.methods.deepcluster`); this
module is its device counterpart, written to behave the same:

- :func:`pca_whiten_l2`: project on the top ``dim`` eigenvectors of the feature covariance,
  divide by ``sqrt(eigenvalue + eps)``, L2-normalise the rows (as ``faiss.PCAMatrix(d, dim,
  eigen_power=-0.5)`` and the numpy version).  Covariance and eigendecomposition in float64.
- :func:`kmeans`: Lloyd's algorithm as ``faiss.Kmeans`` runs it: ``k`` distinct training points,
  drawn by a seeded permutation, start the centroids; every iteration assigns each point to its
  nearest centroid, recomputes the centroids and splits a non-empty cluster for every empty one
  (faiss' ``split_clusters``: a cluster drawn with probability proportional to ``size - 1``, its
  centroid copied and both scaled by ``1 +- 1/1024`` alternately per dimension); the best of
  ``nredo`` seeded runs (lowest objective) is kept; a final assignment follows, and
  :func:`fix_empty_clusters` (the torch twin of the numpy one) gives any cluster still empty
  points of a split one.
- Deterministic for a seed on a given device: random draws come from a seeded CPU generator;
  centroid sums are segment sums of the points sorted by label (a float64 cumulative sum), not
  atomics (``index_add_`` on a GPU adds in a varying order).

Distances are computed in row chunks (``chunk`` points at a time), so 10^6 x 1,000 fits in a few
hundred MB.  Matrix products run in float32: TF32 (``torch.backends.cuda.matmul.allow_tf32``)
would make the assignment of near-ties differ from faiss more often.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from radpretrain.errors import UserError

SPLIT_EPS = 1.0 / 1024  # faiss' EPS in split_clusters (Clustering.cpp) and fix_empty_clusters' eps


def pca_whiten_l2(features: torch.Tensor, dim: int = 256, eps: float = 1e-5) -> torch.Tensor:
    """PCA to ``dim`` components (fewer with fewer points), whitened, L2-normalised rows; float32, same device."""
    x = features.to(torch.float64)
    n, d = x.shape
    k = int(max(1, min(dim, d, n - 1)))
    xc = x - x.mean(0, keepdim=True)
    if n > d:
        evals, evecs = torch.linalg.eigh(xc.T @ xc / max(1, n - 1))
        order = torch.argsort(evals, descending=True)[:k]
        evals, evecs = evals[order].clamp(min=0), evecs[:, order]
    else:
        _, sv, vt = torch.linalg.svd(xc, full_matrices=False)
        evals, evecs = sv[:k] ** 2 / max(1, n - 1), vt[:k].T
    y = (xc @ evecs) / torch.sqrt(evals + eps)
    y = y / y.norm(dim=1, keepdim=True).clamp(min=1e-12)
    return y.to(torch.float32).contiguous()


def assign(x: torch.Tensor, centroids: torch.Tensor, chunk: int = 16384) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid of every row of ``x``: ``(labels int64 [N], squared distances float32 [N])``."""
    c2 = (centroids * centroids).sum(1)
    labels = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    dist = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    for s in range(0, x.shape[0], chunk):
        xb = x[s : s + chunk]
        d2 = (xb * xb).sum(1, keepdim=True) - 2.0 * (xb @ centroids.T) + c2[None, :]
        dmin, amin = d2.min(1)
        labels[s : s + chunk] = amin
        dist[s : s + chunk] = dmin.clamp_(min=0.0)
    return labels, dist


def cluster_sums(x: torch.Tensor, labels: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-cluster sums of ``x`` (float64 [K, D]) and counts (int64 [K]); deterministic on every device."""
    order = torch.sort(labels, stable=True).indices
    counts = torch.bincount(labels, minlength=k)
    cs = torch.cumsum(x[order].to(torch.float64), dim=0)
    cs = torch.cat([torch.zeros(1, x.shape[1], dtype=torch.float64, device=x.device), cs])
    ends = torch.cumsum(counts, 0)
    starts = ends - counts
    sums = cs[ends] - cs[starts]
    return sums, counts


def _draw_split(sizes: torch.Tensor, gen: torch.Generator) -> int:
    """A cluster to split: probability proportional to ``size - 1`` (clusters of one point are never split)."""
    p = (sizes.to(torch.float64) - 1).clamp(min=0).cpu()
    return int(torch.multinomial(p / p.sum(), 1, generator=gen))


def _perturb(centroids: torch.Tensor, e: int, c: int, eps: float = SPLIT_EPS) -> None:
    sign = torch.ones(centroids.shape[1], dtype=centroids.dtype, device=centroids.device)
    sign[1::2] = -1.0
    base = centroids[c].clone()
    centroids[e] = base * (1 + eps * sign)
    centroids[c] = base * (1 - eps * sign)


def split_empty(centroids: torch.Tensor, counts: torch.Tensor, gen: torch.Generator) -> int:
    """faiss' ``split_clusters`` between iterations: every empty centroid becomes a perturbed copy of a
    drawn non-empty one, whose count is shared half and half.  In place; returns the number split."""
    counts = counts.clone().cpu()
    n = 0
    for e in torch.nonzero(counts == 0).flatten().tolist():
        c = _draw_split(counts, gen)
        _perturb(centroids, e, c)
        counts[e] = counts[c] // 2
        counts[c] -= counts[e]
        n += 1
    return n


def fix_empty_clusters(x: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor, gen: torch.Generator,
                       eps: float = SPLIT_EPS) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Give every empty cluster points by splitting a non-empty one (the numpy version's rule, in torch).

    For an empty cluster ``e`` a cluster ``c`` with at least two points is drawn with probability
    proportional to ``size - 1``; ``e`` gets ``c``'s centroid scaled by ``1 + eps`` and ``c``'s is
    scaled by ``1 - eps`` (alternating per dimension); ``c``'s points go to the nearer of the two,
    or, when that separates nothing (identical points), half of them chosen at random go to ``e``.
    Returns ``(labels, centroids, n_fixed)``.
    """
    labels = labels.clone()
    centroids = centroids.clone()
    k = centroids.shape[0]
    if labels.numel() < k:
        raise UserError(f"cannot make {k} non-empty clusters from {labels.numel()} images; lower deepcluster.num_clusters")
    sizes = torch.bincount(labels, minlength=k).cpu()
    n_fixed = 0
    for e in torch.nonzero(sizes == 0).flatten().tolist():
        c = _draw_split(sizes, gen)
        _perturb(centroids, e, c, eps)
        members = torch.nonzero(labels == c).flatten()
        xm = x[members]
        to_e = ((xm - centroids[e]) ** 2).sum(1) < ((xm - centroids[c]) ** 2).sum(1)
        if bool(to_e.all()) or not bool(to_e.any()):
            perm = torch.randperm(len(members), generator=gen).to(members.device)
            to_e = torch.zeros(len(members), dtype=torch.bool, device=members.device)
            to_e[perm[: len(members) // 2]] = True
        labels[members[to_e]] = e
        sizes[e], sizes[c] = int(to_e.sum()), int((~to_e).sum())
        n_fixed += 1
    return labels, centroids, n_fixed


def _lloyd(x: torch.Tensor, k: int, niter: int, gen: torch.Generator, chunk: int) -> tuple[torch.Tensor, float]:
    n = x.shape[0]
    centroids = x[torch.randperm(n, generator=gen)[:k].to(x.device)].clone()
    obj = float("nan")
    for _ in range(int(niter)):
        labels, dist = assign(x, centroids, chunk)
        obj = float(dist.to(torch.float64).sum())
        sums, counts = cluster_sums(x, labels, k)
        nonempty = counts > 0
        new = centroids.clone()
        new[nonempty] = (sums[nonempty] / counts[nonempty, None].to(torch.float64)).to(x.dtype)
        split_empty(new, counts, gen)
        centroids = new
    return centroids, obj


def kmeans(x: torch.Tensor, k: int, niter: int = 20, nredo: int = 1, seed: int = 0, chunk: int = 16384) -> dict:
    """k-means on ``x`` [N, D] on its device (see the module docstring), then :func:`fix_empty_clusters`.

    Returns ``{"labels": int64 tensor [N], "centroids": [K, D], "objective": float, "n_empty_fixed": int,
    "seconds": float}`` on ``x``'s device.
    """
    t0 = time.perf_counter()
    x = x.to(torch.float32).contiguous()
    n = x.shape[0]
    if k < 2:
        raise UserError(f"deepcluster.num_clusters={k}: need at least 2 clusters")
    if n < k:
        raise UserError(f"deepcluster.num_clusters={k} is more than the {n} training images; lower it")
    gen = torch.Generator()
    gen.manual_seed(int(seed))
    best = None
    for _ in range(max(1, int(nredo))):
        cents, obj = _lloyd(x, int(k), niter, gen, chunk)
        if best is None or obj < best[1]:
            best = (cents, obj)
    centroids, obj = best
    labels, _ = assign(x, centroids, chunk)
    labels, centroids, n_fixed = fix_empty_clusters(x, labels, centroids, gen)
    if x.is_cuda:
        torch.cuda.synchronize(x.device)
    return {"labels": labels, "centroids": centroids, "objective": obj, "n_empty_fixed": n_fixed,
            "seconds": time.perf_counter() - t0}


__all__ = ["assign", "cluster_sums", "fix_empty_clusters", "kmeans", "pca_whiten_l2", "split_empty"]


# --------------------------------------------------------------------------- faiss
def faiss_gpus() -> int:
    """GPUs faiss can use (0 for faiss-cpu, which has no ``get_num_gpus`` or reports none)."""
    import faiss  # native (CPU or GPU build): loaded only when clustering

    try:
        return int(faiss.get_num_gpus())
    except AttributeError:
        return 0


def faiss_kmeans(x: np.ndarray, k: int, niter: int = 20, nredo: int = 1, seed: int = 0, spherical: bool = False,
                 gpu: bool = False, max_points_per_centroid: int = 10_000_000) -> dict:
    """``faiss.Kmeans`` (best of ``nredo`` seeded runs) and each row's nearest centroid.

    ``spherical``: centroids renormalised to unit length (rows should be L2-normalised; the
    search then gives cosine similarities).  Returns ``{"labels": int64 [N], "scores": float32 [N]
    (squared distance, or similarity when spherical), "centroids": [K, D], "objective": float}``.
    Empty clusters are left to the caller.
    """
    import faiss  # native (CPU or GPU build): loaded only when clustering

    x = np.ascontiguousarray(x, dtype=np.float32)
    km = faiss.Kmeans(x.shape[1], int(k), niter=int(niter), nredo=max(1, int(nredo)), seed=int(seed), verbose=False,
                      spherical=bool(spherical), min_points_per_centroid=1,
                      max_points_per_centroid=int(max_points_per_centroid), **({"gpu": True} if gpu else {}))
    km.train(x)
    scores, idx = km.index.search(x, 1)
    obj = float(km.obj[-1]) if len(km.obj) else float("nan")
    return {"labels": idx[:, 0].astype(np.int64), "scores": scores[:, 0].astype(np.float32),
            "centroids": km.centroids, "objective": obj}
