"""The torch PCA + k-means (DeepCluster on a GPU), run here on CPU tensors, against the numpy/faiss path."""

import numpy as np
import pytest
import torch

from radpretrain import clustering as C
from radpretrain.errors import UserError
from radpretrain.methods.deepcluster import nmi, pca_whiten_l2, run_kmeans


def blobs(n_per=40, k=8, d=64, seed=0, spread=0.3):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, d)) * 3
    x = np.concatenate([c + spread * rng.normal(size=(n_per, d)) for c in centers]).astype(np.float32)
    return x, np.repeat(np.arange(k), n_per)


def test_pca_whitening_matches_the_numpy_version(rel_err):
    for n, d in ((200, 32), (20, 64)):  # covariance (N > D) and SVD (N <= D) branches
        x, _ = blobs(n_per=n // 4, k=4, d=d)
        ref = pca_whiten_l2(x, dim=8)
        got = C.pca_whiten_l2(torch.from_numpy(x), dim=8)
        assert got.dtype == torch.float32 and got.shape == ref.shape
        # eigenvectors are defined up to sign: compare the Gram matrices (sign-free)
        assert rel_err(got.numpy() @ got.numpy().T, ref @ ref.T) < 1e-4


def test_kmeans_recovers_separated_clusters_and_agrees_with_faiss():
    x, truth = blobs()
    y = pca_whiten_l2(x, dim=16)
    res = C.kmeans(torch.from_numpy(y), 8, niter=20, nredo=3, seed=0)
    labels = res["labels"].numpy()
    assert res["labels"].dtype == torch.int64 and res["centroids"].shape == (8, 16)
    assert nmi(truth, labels) > 0.99
    faiss_res = run_kmeans(y, 8, niter=20, nredo=3, seed=0)
    assert nmi(faiss_res["labels"], labels) > 0.99
    assert res["objective"] <= faiss_res["objective"] * 1.01  # as good a local optimum on easy data
    # the objective is the sum of squared distances to the assigned centroids
    d = ((y - res["centroids"].numpy()[labels]) ** 2).sum()
    assert abs(d - res["objective"]) / d < 1e-3


def test_kmeans_is_deterministic_for_a_seed():
    x, _ = blobs(n_per=30, k=6, d=16, spread=1.5, seed=3)  # overlapping: the start matters
    a = C.kmeans(torch.from_numpy(x), 10, niter=10, seed=7)
    b = C.kmeans(torch.from_numpy(x), 10, niter=10, seed=7)
    assert torch.equal(a["labels"], b["labels"]) and torch.equal(a["centroids"], b["centroids"])
    c = C.kmeans(torch.from_numpy(x), 10, niter=10, seed=8)
    assert not torch.equal(a["centroids"], c["centroids"])


def test_empty_clusters_are_split_as_faiss_and_fixed_at_the_end():
    # 3 distinct points, 30 images, 10 clusters: empty clusters at every iteration
    x, _ = blobs(n_per=10, k=3, d=8, spread=0.0)
    res = C.kmeans(torch.from_numpy(x), 10, seed=0)
    sizes = np.bincount(res["labels"].numpy(), minlength=10)
    assert sizes.min() >= 1 and sizes.sum() == 30 and res["n_empty_fixed"] > 0
    assert sizes.max() <= 28
    # the split rule between iterations: a perturbed copy (1 +- 1/1024, alternating per dimension), counts halved
    cents = torch.tensor([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0], [9.0, 9.0, 9.0]])
    counts = torch.tensor([7, 0, 1])
    new = cents.clone()
    assert C.split_empty(new, counts, torch.Generator().manual_seed(0)) == 1
    eps = C.SPLIT_EPS
    torch.testing.assert_close(new[1], cents[0] * torch.tensor([1 + eps, 1 - eps, 1 + eps]))
    torch.testing.assert_close(new[0], cents[0] * torch.tensor([1 - eps, 1 + eps, 1 - eps]))
    assert torch.equal(new[2], cents[2])  # a cluster of one point is never split


def test_fix_empty_clusters_like_the_numpy_version():
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(size=(30, 4)).astype(np.float32))
    labels = torch.zeros(30, dtype=torch.long)
    labels[20:] = 1  # clusters 2..5 empty
    cents = torch.stack([x[:20].mean(0), x[20:].mean(0)] + [torch.full((4,), 100.0)] * 4)
    new, _, n_fixed = C.fix_empty_clusters(x, labels, cents, torch.Generator().manual_seed(0))
    sizes = torch.bincount(new, minlength=6)
    assert n_fixed == 4 and int(sizes.min()) >= 1 and int(sizes.sum()) == 30
    same = torch.ones(6, 3)  # identical points cannot be split by a perturbation: shared at random
    new, _, _ = C.fix_empty_clusters(same, torch.zeros(6, dtype=torch.long), torch.ones(3, 3),
                                     torch.Generator().manual_seed(0))
    assert int(torch.bincount(new, minlength=3).min()) >= 1
    with pytest.raises(UserError, match="num_clusters"):
        C.kmeans(x[:3], 5)


def test_cluster_sums_are_segment_sums():
    x = torch.arange(12.0).reshape(6, 2)
    labels = torch.tensor([2, 0, 2, 2, 0, 3])
    sums, counts = C.cluster_sums(x, labels, 5)
    assert counts.tolist() == [2, 0, 3, 1, 0]
    ref = torch.zeros(5, 2, dtype=torch.float64).index_add_(0, labels, x.double())
    assert torch.equal(sums, ref)
