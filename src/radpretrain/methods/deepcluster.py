"""DeepCluster: k-means pseudo-labels on the network's own features, re-computed every epoch.

Caron, Bojanowski, Joulin, Douze, "Deep Clustering for Unsupervised Learning of
Visual Features", ECCV 2018.  Every epoch: extract features of all training
images (no augmentation, eval mode), PCA-whiten them (256 dims in the paper),
L2-normalise, cluster with k-means (faiss), use the assignments as class labels,
re-initialise the classifier, sample images uniformly over the clusters, and
train the network with cross-entropy on augmented views.  Empty clusters are
avoided as in the paper: an empty cluster takes the centroid of a non-empty one
with a small perturbation and the points of that cluster are shared between the
two (see :func:`fix_empty_clusters`).

The Ewing sarcoma study, Hinterwimmer et al., *From Self-supervised Learning to
Transfer Learning with Musculoskeletal Radiographs* (CDBME 2022,
doi:10.1515/cdbme-2022-1003), pretrained an ImageNet-initialised ResNet50 on
42,608 musculoskeletal radiographs with 1,000 clusters, batch 512, learning rate
0.05 and 500 epochs (``configs/deepcluster_sarcoma.yaml``); it reported an NMI of
0.930 between consecutive assignments and cluster sizes 2..135 (quartiles 20, 46,
55).  The same statistics are logged here every epoch (Lightning logs
``deepcluster/*`` and ``RUN/clusters.jsonl``).

On a GPU (``deepcluster.cluster_on: auto``) the features stay on the device (extracted in bf16)
and PCA-whitening and k-means run there too: faiss' GPU k-means when faiss was built with GPU
support, else the torch k-means of :mod:`radpretrain.clustering` (the same initialisation and
empty-cluster handling as the faiss path).  On a CPU it is numpy + faiss-cpu, as before.

Differences from the paper's code: the input is already grey, so there is no Sobel
filter; the features are the backbone's pooled features (``num_classes=0``) rather
than the output of an extra MLP; PCA-whitening uses numpy (or torch on the device); the classifier is
re-initialised in place (its optimiser state is cleared) instead of being a new
module, so one optimiser covers the whole model.  Augmentation (random resized
crop and horizontal flip, :func:`radpretrain.transforms.random_resized_crop_flip`) runs in
torch on the batch, on the training device.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from threadpoolctl import threadpool_limits
from torch import nn

from radpretrain import clustering
from radpretrain.config import get
from radpretrain.data.geometry import finish_batch
from radpretrain.errors import UserError
from radpretrain.methods.base import Paper, PretrainMethod, Supervision, register
from radpretrain.settings import probability
from radpretrain.transforms import random_resized_crop_flip
from radpretrain.utils import get_logger

log = get_logger("methods.deepcluster")


# --------------------------------------------------------------------------- clustering
def pca_whiten_l2(features: np.ndarray, dim: int = 256, eps: float = 1e-5) -> np.ndarray:
    """PCA to ``dim`` components (fewer when there are fewer images), whitened, then L2-normalised rows.

    As the paper's ``faiss.PCAMatrix(d, dim, eigen_power=-0.5)``: project on the top
    eigenvectors of the feature covariance and divide by the square root of the
    eigenvalues (plus ``eps``).  Computed in numpy from the D x D covariance (N > D)
    or the SVD of the centred features (N <= D).
    """
    x = np.asarray(features, dtype=np.float64)
    n, d = x.shape
    k = int(max(1, min(dim, d, n - 1)))
    xc = x - x.mean(0, keepdims=True)
    # Multi-threaded LAPACK on small matrices is slow (and dreadful on a busy machine): one thread.
    with threadpool_limits(limits=1 if min(n, d) <= 4096 else None, user_api="blas"):
        if n > d:
            evals, evecs = np.linalg.eigh(xc.T @ xc / max(1, n - 1))
            order = np.argsort(evals)[::-1][:k]
            evals, evecs = np.clip(evals[order], 0, None), evecs[:, order]
        else:
            _, sv, vt = np.linalg.svd(xc, full_matrices=False)
            evals, evecs = sv[:k] ** 2 / max(1, n - 1), vt[:k].T
    y = (xc @ evecs) / np.sqrt(evals + eps)
    y /= np.linalg.norm(y, axis=1, keepdims=True).clip(min=1e-12)
    return np.ascontiguousarray(y, dtype=np.float32)


def fix_empty_clusters(x: np.ndarray, labels: np.ndarray, centroids: np.ndarray, rng: np.random.Generator,
                       eps: float = 1.0 / 1024) -> tuple[np.ndarray, np.ndarray, int]:
    """Give every empty cluster points by splitting a non-empty one (Caron et al. 2018, sec. 3.3).

    For an empty cluster ``e``, a cluster ``c`` with at least two points is drawn with
    probability proportional to ``size - 1``; ``e`` gets ``c``'s centroid scaled by
    ``1 + eps`` and ``c``'s is scaled by ``1 - eps`` (alternating per dimension, as
    faiss does); ``c``'s points go to the nearer of the two.  If the perturbation
    separates nothing (identical points) half of ``c``'s points, chosen at random,
    move to ``e``.  Returns ``(labels, centroids, n_fixed)``; needs ``N >= K``.
    """
    labels = np.asarray(labels, dtype=np.int64).copy()
    centroids = np.array(centroids, dtype=np.float32, copy=True)
    k = centroids.shape[0]
    if len(labels) < k:
        raise UserError(f"cannot make {k} non-empty clusters from {len(labels)} images; lower deepcluster.num_clusters")
    n_fixed = 0
    sizes = np.bincount(labels, minlength=k)
    sign = np.where(np.arange(centroids.shape[1]) % 2 == 0, 1.0, -1.0).astype(np.float32)
    for e in np.flatnonzero(sizes == 0):
        p = np.maximum(sizes - 1, 0).astype(np.float64)
        c = int(rng.choice(k, p=p / p.sum()))
        base = centroids[c].copy()
        centroids[e] = base * (1 + eps * sign)
        centroids[c] = base * (1 - eps * sign)
        members = np.flatnonzero(labels == c)
        de = ((x[members] - centroids[e]) ** 2).sum(1)
        dc = ((x[members] - centroids[c]) ** 2).sum(1)
        to_e = de < dc
        if to_e.all() or not to_e.any():
            to_e = np.zeros(len(members), dtype=bool)
            to_e[rng.permutation(len(members))[: len(members) // 2]] = True
        labels[members[to_e]] = e
        sizes[e], sizes[c] = int(to_e.sum()), int((~to_e).sum())
        n_fixed += 1
    return labels, centroids, n_fixed


def run_kmeans(x: np.ndarray, k: int, niter: int = 20, nredo: int = 1, seed: int = 0, gpu: bool = False) -> dict:
    """k-means with faiss (:func:`radpretrain.clustering.faiss_kmeans`; ``gpu``: faiss' GPU index), then
    :func:`fix_empty_clusters`.

    Returns ``{"labels": int64 [N], "centroids": [K, D], "objective": float, "n_empty_fixed": int}``.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = x.shape[0]
    if k < 2:
        raise UserError(f"deepcluster.num_clusters={k}: need at least 2 clusters")
    if n < k:
        raise UserError(f"deepcluster.num_clusters={k} is more than the {n} training images; lower it")
    km = clustering.faiss_kmeans(x, k, niter=niter, nredo=nredo, seed=seed, gpu=gpu)
    labels, centroids, n_fixed = fix_empty_clusters(x, km["labels"], km["centroids"], np.random.default_rng(seed))
    return {"labels": labels, "centroids": centroids, "objective": km["objective"], "n_empty_fixed": n_fixed}


def cluster_size_stats(labels: np.ndarray, k: int) -> dict:
    """Sizes of the ``k`` clusters: min / q1 / median / q3 / max and the number of empty clusters."""
    sizes = np.bincount(np.asarray(labels, dtype=np.int64), minlength=k)
    q = np.percentile(sizes, [0, 25, 50, 75, 100])
    return {"min": int(q[0]), "q1": float(q[1]), "median": float(q[2]), "q3": float(q[3]), "max": int(q[4]),
            "empty": int((sizes == 0).sum())}


def nmi(a: np.ndarray, b: np.ndarray) -> float:
    """Normalised mutual information between two assignments (scikit-learn, arithmetic mean)."""
    from sklearn.metrics import normalized_mutual_info_score  # heavy: more than a second to import

    return float(normalized_mutual_info_score(np.asarray(a), np.asarray(b)))


def uniform_cluster_weights(labels: np.ndarray, k: int | None = None) -> np.ndarray:
    """Per-image sampling weight ``1 / size(cluster)``: every non-empty cluster gets the same total weight."""
    labels = np.asarray(labels, dtype=np.int64)
    sizes = np.bincount(labels, minlength=k or 0).astype(np.float64)
    return 1.0 / sizes[labels]


class ClusterUniformSampler(torch.utils.data.Sampler):
    """Draws ``len(dataset)`` positions per epoch, uniformly over clusters (with replacement).

    Reads the current assignment from ``method`` when iterated, so it always uses the
    clustering of the epoch being run (the method clusters on demand if needed).
    """

    def __init__(self, method: "DeepCluster", n: int, seed: int = 0):
        self.method = method
        self.n = int(n)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        m = self.method
        fitting = m._trainer is not None and m.trainer.state.fn == "fit" and m.trainer.state.status == "running"
        labels = m.ensure_clusters() if (fitting or m.labels is None) else m.labels
        g = torch.Generator()
        g.manual_seed(self.seed * 1_000_003 + self.epoch)
        if labels is None or len(labels) != self.n:
            yield from torch.randperm(self.n, generator=g).tolist()
            return
        w = torch.as_tensor(uniform_cluster_weights(labels, self.method.num_clusters))
        yield from torch.multinomial(w, self.n, replacement=True, generator=g).tolist()


# --------------------------------------------------------------------------- the method
@dataclass
class DeepClusterSection:
    num_clusters: int = field(default=100, metadata={"ge": 2})
    pca_dim: int = field(default=256, metadata={"ge": 1})
    kmeans_iters: int = field(default=20, metadata={"ge": 1})
    kmeans_redo: int = field(default=1, metadata={"ge": 1})
    extract_batch_size: int = field(default=0, metadata={"ge": 0, "help": "a batch size, or 0 (data.batch_size)"})
    # where PCA + k-means run: auto = on the training GPU when there is one (faiss GPU if installed, else
    # torch k-means), cpu = numpy + faiss-cpu, device = torch / faiss GPU on the training device (also on a CPU)
    cluster_on: Literal["auto", "cpu", "device"] = "auto"
    crop_scale: tuple[float, float] = field(default=(0.4, 1.0), metadata={"gt": 0.0, "le": 1.0})
    hflip: float = field(default=0.5, metadata=probability())


@register("deepcluster")
class DeepCluster(PretrainMethod):
    """DeepCluster (Caron et al. 2018) on a timm backbone; keys under ``deepcluster.`` (see configs/deepcluster_cpu.yaml)."""

    display_name = "DeepCluster"
    paper = Paper("Deep Clustering for Unsupervised Learning of Visual Features",
                  ("Caron", "Bojanowski", "Joulin", "Douze"), 2018, "ECCV", "https://arxiv.org/abs/1807.05520")
    supervision = Supervision.CLUSTERING
    config_sections = {"deepcluster": DeepClusterSection}
    preview_name = "clusters"

    # The sampler reads the current assignment each time it is iterated, so the loader need not be
    # rebuilt every epoch (which would also restart its worker processes twice per epoch).
    reload_dataloaders_every_epoch = False

    def __init__(self, cfg: dict, store=None):
        super().__init__(cfg, store)
        if str(get(cfg, "data.resize", "letterbox")) == "bucket":
            raise UserError("deepcluster needs data.resize=letterbox: its sampler draws images uniformly over "
                            "clusters, which aspect-ratio buckets (data.resize=bucket) would override")
        self.build_encoder()
        self.num_clusters = int(get(cfg, "deepcluster.num_clusters", 100))
        self.pca_dim = int(get(cfg, "deepcluster.pca_dim", 256))
        self.kmeans_iters = int(get(cfg, "deepcluster.kmeans_iters", 20))
        self.kmeans_redo = int(get(cfg, "deepcluster.kmeans_redo", 1))
        self.crop_scale = tuple(float(s) for s in get(cfg, "deepcluster.crop_scale", [0.4, 1.0]))
        self.hflip = float(get(cfg, "deepcluster.hflip", 0.5))
        self.extract_batch_size = int(get(cfg, "deepcluster.extract_batch_size", 0) or get(cfg, "data.batch_size", 64))
        self.cluster_on = str(get(cfg, "deepcluster.cluster_on", "auto") or "auto")
        self.seed = int(get(cfg, "seed", 0) or 0)
        self.head = nn.Linear(self.encoder.num_features, self.num_clusters)
        self._reset_head()
        self.dataset = None  # the training StoreDataset, set by train_sampler()
        self.labels: np.ndarray | None = None  # cluster of each dataset position
        self.prev_labels: np.ndarray | None = None
        self.rows: np.ndarray | None = None  # store row of each dataset position
        # cluster of each store row; a plain attribute, not a buffer: DDP would re-send a buffer from
        # rank 0 every step (8 bytes per archive image), and every rank computes the same table anyway
        self.row_label = torch.full((0,), -1, dtype=torch.long)
        self._clustered_epoch: int | None = None
        self._pending_log: dict | None = None

    # -- data ----------------------------------------------------------------
    def train_sampler(self, dataset):
        if len(dataset) < self.num_clusters:
            raise UserError(f"deepcluster.num_clusters={self.num_clusters} is more than the {len(dataset)} training "
                            "images; lower it (Hinterwimmer et al. 2022 used about 43 images per cluster)")
        self.dataset = dataset
        return ClusterUniformSampler(self, len(dataset), seed=self.seed)

    def _training_dataset(self):
        if self.dataset is None and self._trainer is not None:
            dl = self.trainer.train_dataloader
            self.dataset = getattr(dl, "dataset", None)
        if self.dataset is None:
            raise RuntimeError("DeepCluster needs its training dataset: build the train DataLoader with "
                               "sampler=method.train_sampler(dataset)")
        return self.dataset

    def cluster_on_device(self) -> bool:
        """``deepcluster.cluster_on``: PCA + k-means on the training device (auto: when it is a GPU)."""
        if self.cluster_on == "auto":
            return self.device.type == "cuda"
        return self.cluster_on == "device"

    @torch.no_grad()
    def extract_features(self, dataset, as_tensor: bool = False) -> tuple[np.ndarray | torch.Tensor, np.ndarray]:
        """Pooled features of every dataset position (eval mode, no augmentation): ``(features, rows)``.

        bf16 autocast on a GPU.  ``as_tensor``: the features stay on the device (float32 [N, D]) for
        :mod:`radpretrain.clustering`; else a numpy array.  A dataset that defers its resize
        (``data.resize_on``) is letterboxed on the device, batch by batch.
        """
        nw = int(get(self.cfg, "data.num_workers", 0) or 0)
        if len(dataset) <= 4 * self.extract_batch_size:
            nw = 0  # a few batches: starting worker processes would cost more than reading
        dl = torch.utils.data.DataLoader(dataset, batch_size=self.extract_batch_size, shuffle=False,
                                         num_workers=nw, pin_memory=self.device.type == "cuda",
                                         collate_fn=getattr(dataset, "collate", None))
        bf16 = self.device.type == "cuda" and torch.cuda.is_bf16_supported()
        was_training = self.training
        self.eval()
        feats, rows = [], []
        try:
            for batch in dl:
                rows.append(np.asarray(batch["index"]).reshape(-1))
                if "pixels" in batch:  # stored pixels: letterboxed here, on the device
                    x = finish_batch({k: batch[k].to(self.device, non_blocking=True) for k in ("pixels", "geometry")})["image"]
                else:
                    x = batch["image"].to(self.device, non_blocking=True)
                with torch.autocast(self.device.type, enabled=bf16, dtype=torch.bfloat16):
                    f = self.encoder(self.normalize(x))
                feats.append(f.float() if as_tensor else f.float().cpu().numpy())
        finally:
            self.train(was_training)
        rows_np = np.concatenate(rows).astype(np.int64)
        if as_tensor:
            return torch.cat(feats), rows_np
        return np.concatenate(feats).astype(np.float32), rows_np

    def cluster(self, features: np.ndarray | torch.Tensor, epoch: int) -> dict:
        """PCA-whiten + L2, k-means, empty-cluster fix; returns the assignment and its statistics.

        numpy features: numpy PCA + faiss (CPU).  A tensor: PCA on its device, then faiss' GPU
        k-means when the tensor is on a GPU and faiss has GPUs, else the torch k-means.
        """
        t0 = time.time()
        seed = self.seed * 1009 + epoch
        if isinstance(features, torch.Tensor):
            x = clustering.pca_whiten_l2(features, self.pca_dim)
            if x.is_cuda and clustering.faiss_gpus() > 0:
                km = run_kmeans(x.cpu().numpy(), self.num_clusters, self.kmeans_iters, self.kmeans_redo, seed=seed,
                                gpu=True)
                backend = "faiss-gpu"
            else:
                km = clustering.kmeans(x, self.num_clusters, self.kmeans_iters, self.kmeans_redo, seed=seed)
                km["labels"] = km["labels"].cpu().numpy()
                backend = f"torch-{x.device.type}"
        else:
            x = pca_whiten_l2(features, self.pca_dim)
            km = run_kmeans(x, self.num_clusters, self.kmeans_iters, self.kmeans_redo, seed=seed)
            backend = "faiss-cpu"
        stats = cluster_size_stats(km["labels"], self.num_clusters)
        return {"labels": km["labels"], "objective": km["objective"], "n_empty_fixed": km["n_empty_fixed"],
                "sizes": stats, "pca_dim": int(x.shape[1]), "seconds": time.time() - t0, "backend": backend}

    def _current_epoch(self) -> int:
        return int(self.trainer.current_epoch) if self._trainer is not None else 0

    def ensure_clusters(self, epoch: int | None = None) -> np.ndarray:
        """The assignment for ``epoch`` (default: the current one), clustering only if not done yet.

        Called at the end of each epoch for the next one and at the start of fitting (so errors
        surface outside the data loader), and again, as a no-op, by the sampler and
        ``on_train_epoch_start``.
        """
        epoch = self._current_epoch() if epoch is None else int(epoch)
        if self._clustered_epoch == epoch and self.labels is not None:
            return self.labels
        t0 = time.time()
        dataset = self._training_dataset()
        feats, rows = self.extract_features(dataset, as_tensor=self.cluster_on_device())
        if self._trainer is not None and self.trainer.world_size > 1:
            # one k-means for all ranks: rank 0 decides, the others receive its labels
            res = self.cluster(feats, epoch) if self.global_rank == 0 else None
            res = self.trainer.strategy.broadcast(res, src=0)
        else:
            res = self.cluster(feats, epoch)
        labels = res["labels"]
        self.prev_labels, self.labels, self.rows = self.labels, labels, rows
        table = torch.full((int(rows.max()) + 1,), -1, dtype=torch.long)
        table[torch.from_numpy(rows)] = torch.from_numpy(labels)
        self.row_label = table.to(self.device)
        self._reset_head()
        record = {"epoch": epoch, "n_images": int(len(labels)), "k": self.num_clusters,
                  "nmi_prev": None if self.prev_labels is None or len(self.prev_labels) != len(labels)
                  else nmi(self.prev_labels, labels),
                  "sizes": res["sizes"], "n_empty_fixed": res["n_empty_fixed"], "kmeans_objective": res["objective"],
                  "pca_dim": res["pca_dim"], "seconds": round(time.time() - t0, 3)}
        self._clustered_epoch = epoch
        self._pending_log = record
        self._write_record(record)
        s = record["sizes"]
        log.info("epoch %d: %d clusters of %d images, sizes %d..%d (median %.0f), NMI vs previous %s, %.1f s "
                 "(PCA + k-means %.1f s, %s)",
                 epoch, self.num_clusters, len(labels), s["min"], s["max"], s["median"],
                 "n/a" if record["nmi_prev"] is None else f"{record['nmi_prev']:.3f}", record["seconds"],
                 res["seconds"], res.get("backend", "?"))
        return labels

    def _run_dir(self) -> Path | None:
        d = get(self.cfg, "run_dir", None)
        if d:
            return Path(d)
        if self._trainer is not None:
            return Path(self.trainer.default_root_dir)
        return None

    def _write_record(self, record: dict) -> None:
        d = self._run_dir()
        if d is None or (self._trainer is not None and self.global_rank != 0):
            return
        d.mkdir(parents=True, exist_ok=True)
        with open(d / "clusters.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def _reset_head(self) -> None:
        """Re-initialise the classifier (N(0, 0.01), zero bias, as the paper's code) and its optimiser state."""
        with torch.no_grad():
            self.head.weight.normal_(0.0, 0.01)
            self.head.bias.zero_()
        if self._trainer is not None:
            for opt in self.trainer.optimizers:
                for p in (self.head.weight, self.head.bias):
                    opt.state.pop(p, None)

    # -- checkpoints: a resumed run keeps the assignment of the interrupted epoch ---------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.labels is not None:
            checkpoint["deepcluster"] = {
                "epoch": self._clustered_epoch, "labels": torch.as_tensor(self.labels),
                "rows": torch.as_tensor(self.rows),
                "prev_labels": None if self.prev_labels is None else torch.as_tensor(self.prev_labels)}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("deepcluster")
        if not state:
            return
        self.labels = state["labels"].numpy()
        self.rows = state["rows"].numpy()
        self.prev_labels = None if state.get("prev_labels") is None else state["prev_labels"].numpy()
        self._clustered_epoch = state["epoch"]
        table = torch.full((int(self.rows.max()) + 1,), -1, dtype=torch.long)
        table[torch.from_numpy(self.rows)] = torch.from_numpy(self.labels)
        self.row_label = table

    def on_fit_start(self) -> None:
        if self.dataset is not None and self.trainer.ckpt_path is None:
            self.ensure_clusters()

    def on_train_epoch_end(self) -> None:
        t = self.trainer
        last = (t.should_stop or (t.max_steps not in (None, -1) and t.global_step >= t.max_steps)
                or (t.max_epochs not in (None, -1) and t.current_epoch + 1 >= t.max_epochs))
        if not last:
            self.ensure_clusters(t.current_epoch + 1)

    def on_train_epoch_start(self) -> None:
        self.ensure_clusters()
        rec = self._pending_log
        if rec is not None:
            s = rec["sizes"]
            vals = {f"deepcluster/size_{k}": float(s[k]) for k in ("min", "q1", "median", "q3", "max")}
            vals["deepcluster/empty_fixed"] = float(rec["n_empty_fixed"])
            if rec["nmi_prev"] is not None:
                vals["deepcluster/nmi"] = float(rec["nmi_prev"])
            # equal on every rank (rank 0 clusters for all): no all-reduce (rank_zero_only), no DDP warning (sync_dist)
            self.log_dict(vals, on_step=False, on_epoch=True, sync_dist=True, rank_zero_only=True)
            self._pending_log = None

    # -- training --------------------------------------------------------------
    def compute_loss(self, batch, batch_idx):
        if self.row_label.numel() == 0:
            self.ensure_clusters()
        if self.row_label.device != self.device:  # moved once, not every step
            self.row_label = self.row_label.to(self.device)
        table = self.row_label
        idx = torch.as_tensor(batch["index"], device=self.device).long()
        if int(idx.max()) >= table.numel() or bool((table[idx] < 0).any()):
            raise RuntimeError("DeepCluster: a training image has no cluster (was the dataset changed mid-epoch?)")
        target = table[idx]
        g = self.step_generator(batch_idx, device=batch["image"].device)
        x, _ = random_resized_crop_flip(batch["image"], None, self.crop_scale, hflip=self.hflip, generator=g)
        logits = self.head(self.encoder(self.normalize(x)))
        loss = F.cross_entropy(logits.float(), target)
        acc = (logits.argmax(1) == target).float().mean()
        return {"loss": loss, "acc": acc.detach()}

    def validation_step(self, batch, batch_idx):  # images outside the clustering have no pseudo-label
        return None

    @property
    def has_val_loss(self) -> bool:
        return False

    def encoder_meta(self) -> dict:
        meta = super().encoder_meta()
        meta["deepcluster"] = {"num_clusters": self.num_clusters, "pca_dim": self.pca_dim,
                               "kmeans_iters": self.kmeans_iters, "crop_scale": list(self.crop_scale)}
        return meta

    # -- previews ----------------------------------------------------------------
    def preview_rows(self, batch: dict, generator: torch.Generator) -> list[torch.Tensor]:
        """One row per cluster (``previews.n`` clusters, the largest first), ``previews.n`` random
        members each, from the training dataset (the batch is not used); none before the first clustering."""
        if self.labels is None or self.dataset is None:
            return []
        n = self.preview_count()
        sizes = np.bincount(self.labels, minlength=self.num_clusters)
        order = np.argsort(-sizes, kind="stable")[:n]
        rng = np.random.default_rng(self.seed)
        rows = []
        for c in order:
            members = np.flatnonzero(self.labels == c)
            if len(members) == 0:
                continue
            pick = rng.choice(members, size=min(n, len(members)), replace=False)
            items = [self.dataset[int(p)] for p in pick]
            collate = getattr(self.dataset, "collate", torch.utils.data.default_collate)
            imgs = finish_batch(collate(items))["image"]
            if imgs.shape[-1] > 64:
                imgs = F.interpolate(imgs, size=(64, 64), mode="bilinear", antialias=True, align_corners=False)
            rows.append(imgs)
        return rows
