"""``radpretrain embed | neighbors | clusters``: look at what an archive contains through an encoder.

- ``embed DATASET --encoder DIR --out FILE.parquet``: one embedding per ingested
  image, columns ``image_id`` (string) and ``embedding`` (fixed-size list of
  float32).  Work is split into parts of ``--part-size`` images written to
  ``FILE.parquet.parts/`` (each part appears atomically); an interrupted run is
  resumed by running the same command again, which skips finished parts.  The
  final file holds every ingested image exactly once, in store order.
- ``neighbors --embeddings FILE --image IMAGE_ID``: the most similar images by
  cosine similarity (faiss inner product on L2-normalised vectors).
- ``clusters --embeddings FILE --data DATASET --k K --out DIR``: spherical
  k-means (faiss, :func:`radpretrain.clustering.faiss_kmeans`), ``clusters.parquet`` (image_id, cluster, centroid_similarity)
  and a self-contained ``index.html`` gallery (thumbnails embedded as base64 PNG).

Nothing identifying is written: outputs carry pseudonymous image ids, pixels
from the de-identified store and the manifest's normalised modality / body part /
view; never the ``source`` column, patient/study pseudonyms or paths.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from tqdm.auto import tqdm

from radpretrain.clustering import faiss_kmeans
from radpretrain.data.dataset import StoreDataset
from radpretrain.data.geometry import letterbox
from radpretrain.data.store import Store
from radpretrain.encoder import load_encoder, preprocess_from_meta
from radpretrain.errors import UserError
from radpretrain.models.weights import find_encoder_files
from radpretrain.utils import get_logger, read_json, write_json

log = get_logger("browse")

EMBED_FORMAT = "radpretrain-embeddings"
SHOW_FIELDS = ("modality", "body_part", "view")  # non-identifying manifest fields shown next to ids


# --------------------------------------------------------------------------- embed
def add_embed_arguments(p) -> None:
    p.add_argument("dataset", help="a dataset store written by 'radpretrain ingest'")
    p.add_argument("--encoder", required=True, help="an export folder (or a pretraining run folder)")
    p.add_argument("--out", required=True, help="output parquet file (image_id, embedding)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    p.add_argument("--image-size", type=int, default=None, help="input size (default: the encoder's)")
    p.add_argument("--part-size", type=int, default=2048,
                   help="images per resumable part (default 2048); a rerun skips finished parts")
    p.add_argument("--workers", type=int, default=0, help="data-loader worker processes (default 0)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda when available)")


def run_embed(args) -> int:
    out = embed_store(args.dataset, args.encoder, args.out, batch_size=args.batch_size,
                      image_size=args.image_size, part_size=args.part_size, workers=args.workers,
                      device=args.device)
    print(f"embeddings: {out}")
    return 0


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise UserError(f"--device {name!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA device is available here")
    return dev


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:32]


def _ids_digest(ids) -> str:
    h = hashlib.sha256()
    for i in ids:
        h.update(str(i).encode())
        h.update(b"\0")
    return h.hexdigest()[:32]


def embed_store(dataset, encoder, out, batch_size: int = 64, image_size: int | None = None,
                part_size: int = 2048, workers: int = 0, device: str = "auto",
                max_parts: int | None = None) -> Path:
    """Embed every ingested image of ``dataset`` with ``encoder`` into ``out`` (resumable).

    ``max_parts`` stops after computing that many new parts (used to test resuming);
    the final file is then not written yet.
    """
    out = Path(out)
    if out.suffix != ".parquet":
        raise UserError(f"{out}: the output must be a .parquet file")
    if batch_size < 1 or part_size < 1:
        raise UserError("--batch-size and --part-size must be positive")
    store = Store(dataset)
    ids = store.images["image_id"].astype(str).to_numpy()
    if len(ids) == 0:
        raise UserError(f"{store.root}: the store has no ingested images")
    dev = _device(device)
    weights, meta_path = find_encoder_files(encoder)
    pre = preprocess_from_meta(read_json(meta_path), image_size)
    size = pre.image_size
    resize = "stretch" if pre.resize == "stretch" else "letterbox"
    job = {
        "format": EMBED_FORMAT, "version": 1, "weights_sha256": _file_digest(weights),
        "image_size": size, "resize": resize, "mean": pre.mean, "std": pre.std,
        "images": int(len(ids)), "image_ids_sha256": _ids_digest(ids), "part_size": int(part_size),
    }
    if out.is_file():
        try:
            old = json.loads((pq.read_schema(out).metadata or {}).get(b"radpretrain", b"{}"))
        except Exception:
            old = {}
        if {k: old.get(k) for k in job if k != "part_size"} == {k: v for k, v in job.items() if k != "part_size"}:
            log.info("%s is up to date (same encoder, same images); nothing to do", out)
            return out
    model, pre = load_encoder(encoder, device=dev, image_size=image_size)
    parts_dir = out.with_name(out.name + ".parts")
    job_path = parts_dir / "job.json"
    if parts_dir.is_dir():
        old_job = read_json(job_path) if job_path.is_file() else None
        if old_job != job:
            log.warning("%s: left by a different embedding job (other encoder, images or settings); starting over",
                        parts_dir)
            shutil.rmtree(parts_dir)
    parts_dir.mkdir(parents=True, exist_ok=True)
    for stale in parts_dir.glob("*.tmp"):
        stale.unlink()
    write_json(job_path, job)

    n_parts = (len(ids) + part_size - 1) // part_size
    todo = [p for p in range(n_parts) if not _part_ok(parts_dir, p, ids, part_size)]
    if len(todo) < n_parts:
        log.info("resuming: %d of %d parts already done", n_parts - len(todo), n_parts)

    remaining = sum(min(part_size, len(ids) - p * part_size) for p in todo)
    done_new = 0
    with torch.inference_mode(), tqdm(total=remaining, unit="img", desc="embed", disable=None, file=sys.stderr) as bar:
        for p in todo:
            if max_parts is not None and done_new >= max_parts:
                return out
            lo, hi = p * part_size, min(len(ids), (p + 1) * part_size)
            ds = StoreDataset(store, indices=range(lo, hi), image_size=size, resize=resize)
            loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers)
            feats = []
            for batch in loader:
                x = ((batch["image"] - pre.mean) / pre.std).to(dev)
                f = model(x)
                if f.ndim != 2:
                    raise UserError(f"{encoder}: the encoder returned features of shape {tuple(f.shape)}, "
                                    "expected [batch, dim] (a timm model with num_classes=0)")
                feats.append(f.float().cpu().numpy())
                bar.update(len(x))
            _write_part(parts_dir, p, ids[lo:hi], np.concatenate(feats, 0))
            done_new += 1
    if max_parts is not None and done_new >= max_parts and len(todo) > done_new:
        return out
    _merge_parts(parts_dir, n_parts, ids, out, job, model, pre)
    shutil.rmtree(parts_dir)
    return out


def _part_path(parts_dir: Path, p: int) -> Path:
    return parts_dir / f"part-{p:05d}.parquet"


def _embedding_table(ids, X: np.ndarray, metadata: dict | None = None):
    X = np.ascontiguousarray(X, dtype=np.float32)
    vec = pa.FixedSizeListArray.from_arrays(pa.array(X.reshape(-1), type=pa.float32()), X.shape[1])
    table = pa.table({"image_id": pa.array([str(i) for i in ids], type=pa.string()), "embedding": vec})
    if metadata:
        table = table.replace_schema_metadata({"radpretrain": json.dumps(metadata)})
    return table


def _write_part(parts_dir: Path, p: int, ids, X: np.ndarray) -> None:
    path = _part_path(parts_dir, p)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(_embedding_table(ids, X), tmp)
    os.replace(tmp, path)


def _part_ok(parts_dir: Path, p: int, ids, part_size: int) -> bool:
    """A finished part holds exactly the expected image ids (anything else is recomputed)."""
    path = _part_path(parts_dir, p)
    if not path.is_file():
        return False

    lo, hi = p * part_size, min(len(ids), (p + 1) * part_size)
    try:
        got = pq.read_table(path, columns=["image_id"]).column("image_id").to_pylist()
    except Exception:
        log.warning("%s: unreadable part, recomputing it", path.name)
        return False
    return got == list(ids[lo:hi])


def _merge_parts(parts_dir: Path, n_parts: int, ids, out: Path, job: dict, model, pre) -> None:
    tables = [pq.read_table(_part_path(parts_dir, p)) for p in range(n_parts)]
    table = pa.concat_tables(tables)
    got = table.column("image_id").to_pylist()
    if got != list(ids):  # belt and braces: each image exactly once, in store order
        raise UserError(f"{parts_dir}: parts do not cover the store's images exactly once; delete it and rerun")
    dim = int(table.schema.field("embedding").type.list_size)
    meta = dict(job, dim=dim, arch=getattr(model, "default_cfg", {}).get("architecture", type(model).__name__))
    table = table.replace_schema_metadata({"radpretrain": json.dumps(meta)})
    tmp = out.with_name(f".{out.name}.tmp")
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, tmp)
    os.replace(tmp, out)
    log.info("wrote %d embeddings of dimension %d to %s", len(got), dim, out)


def read_embeddings(path) -> tuple[np.ndarray, np.ndarray]:
    """``(image_ids, X float32 [N, D])`` from an embeddings parquet file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: embeddings file not found (write one with 'radpretrain embed')")
    try:
        table = pq.read_table(path)
    except Exception as e:
        raise UserError(f"{path}: not a readable parquet file ({e})") from None
    if "image_id" not in table.column_names or "embedding" not in table.column_names:
        raise UserError(f"{path}: expected columns image_id and embedding, found {', '.join(table.column_names)}")
    ids = np.asarray(table.column("image_id").to_pylist(), dtype=object)
    col = table.column("embedding").combine_chunks()
    try:
        X = np.asarray(col.flatten().to_numpy(zero_copy_only=False), dtype=np.float32).reshape(len(ids), -1)
    except ValueError:
        raise UserError(f"{path}: embeddings have different lengths") from None
    if len(set(ids)) != len(ids):
        raise UserError(f"{path}: an image id appears more than once")
    if len(ids) == 0:
        raise UserError(f"{path}: no embeddings")
    return ids, X


def _normalise(X: np.ndarray) -> np.ndarray:
    X = np.ascontiguousarray(X, dtype=np.float32).copy()
    n = np.linalg.norm(X, axis=1, keepdims=True)
    X /= np.maximum(n, 1e-12)
    return X


# --------------------------------------------------------------------------- neighbors
def add_neighbors_arguments(p) -> None:
    p.add_argument("--embeddings", required=True, help="parquet file written by 'radpretrain embed'")
    p.add_argument("--image", required=True, help="the image_id to find neighbours of")
    p.add_argument("-k", type=int, default=10, help="number of neighbours (default 10)")
    p.add_argument("--data", default=None, help="the dataset store, to show modality / body part / view")


def run_neighbors(args) -> int:
    df = nearest(args.embeddings, args.image, k=args.k, data=args.data)
    print(f"nearest {len(df)} images to {args.image} (cosine similarity):")
    print(df.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    return 0


def nearest(embeddings, image_id: str, k: int = 10, data=None) -> pd.DataFrame:
    """The ``k`` most similar images to ``image_id`` (itself excluded), best first."""
    import faiss  # native (CPU or GPU build): loaded only for neighbours and clusters

    if k < 1:
        raise UserError("-k must be at least 1")
    ids, X = read_embeddings(embeddings)
    hits = np.flatnonzero(ids == image_id)
    if len(hits) == 0:
        raise UserError(f"{embeddings}: no embedding for image id {image_id!r}")
    q = int(hits[0])
    Xn = _normalise(X)
    index = faiss.IndexFlatIP(Xn.shape[1])
    index.add(Xn)
    kk = min(len(ids), k + 1)
    sims, idx = index.search(Xn[q : q + 1], kk)
    rows = [(str(ids[j]), float(s)) for j, s in zip(idx[0], sims[0]) if j >= 0 and j != q][:k]
    df = pd.DataFrame(rows, columns=["image_id", "similarity"])
    df.insert(0, "rank", np.arange(1, len(df) + 1))
    if data is not None:
        df = _with_fields(df, data)
    return df


def _manifest_fields(data) -> pd.DataFrame:
    images = Store(data).images
    cols = ["image_id"] + [c for c in SHOW_FIELDS if c in images.columns]
    return images[cols].astype({"image_id": str})


def _with_fields(df: pd.DataFrame, data) -> pd.DataFrame:
    return df.merge(_manifest_fields(data), on="image_id", how="left")


# --------------------------------------------------------------------------- clusters
def add_clusters_arguments(p) -> None:
    p.add_argument("--embeddings", required=True, help="parquet file written by 'radpretrain embed'")
    p.add_argument("--data", required=True, help="the dataset store the embeddings were computed on")
    p.add_argument("--k", type=int, required=True, help="number of clusters")
    p.add_argument("--out", required=True, help="output folder (clusters.parquet, index.html)")
    p.add_argument("--per-cluster", type=int, default=32, help="thumbnails per cluster in the gallery (default 32)")
    p.add_argument("--thumb-size", type=int, default=96, help="thumbnail side in pixels (default 96)")
    p.add_argument("--seed", type=int, default=0, help="k-means seed (default 0)")
    p.add_argument("--niter", type=int, default=25, help="k-means iterations (default 25)")


def run_clusters(args) -> int:
    out = cluster_embeddings(args.embeddings, args.data, args.k, args.out, per_cluster=args.per_cluster,
                             thumb_size=args.thumb_size, seed=args.seed, niter=args.niter)
    print(f"clusters: {out / 'clusters.parquet'}")
    print(f"gallery:  {out / 'index.html'}")
    return 0


def kmeans(X: np.ndarray, k: int, seed: int = 0, niter: int = 25, nredo: int = 5
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Spherical k-means on L2-normalised rows; returns ``(labels, centroid_similarity, centroids)``.

    ``nredo`` restarts from different random centroids and keeps the best
    objective (one run often splits a big group and merges two small ones).
    Clusters are renumbered by size, largest first.
    """
    Xn = _normalise(X)
    n = Xn.shape[0]
    if not 1 <= k <= n:
        raise UserError(f"--k {k}: must be between 1 and the number of images ({n})")
    km = faiss_kmeans(Xn, k, niter=niter, nredo=nredo, seed=seed, spherical=True,
                      max_points_per_centroid=max(256, n // k + 1))
    lab, sims = km["labels"], km["scores"]
    order = np.argsort(-np.bincount(lab, minlength=k), kind="stable")
    remap = np.empty(k, dtype=np.int64)
    remap[order] = np.arange(k)
    return remap[lab].astype(np.int32), sims.astype(np.float32), km["centroids"][order]


def cluster_embeddings(embeddings, data, k: int, out, per_cluster: int = 32, thumb_size: int = 96,
                       seed: int = 0, niter: int = 25) -> Path:
    """k-means over ``embeddings``; writes ``clusters.parquet`` and ``index.html`` into ``out``."""
    ids, X = read_embeddings(embeddings)
    store = Store(data)
    labels, sims, _ = kmeans(X, k, seed=seed, niter=niter)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    df = pd.DataFrame({"image_id": ids.astype(str), "cluster": labels, "centroid_similarity": sims})
    tmp = out / ".clusters.parquet.tmp"
    df.to_parquet(tmp, index=False)
    os.replace(tmp, out / "clusters.parquet")

    images = store.images.reset_index(drop=True)
    pos = pd.Series(np.arange(len(images)), index=images["image_id"].astype(str).to_numpy())
    known = df["image_id"].isin(pos.index)
    if not known.any():
        raise UserError(f"{embeddings}: none of its image ids are in {store.root}; "
                        "were the embeddings computed on another store?")
    if not known.all():
        log.warning("%d embedded images are not in %s; they have no thumbnail", int((~known).sum()), store.root)
    fields = [c for c in SHOW_FIELDS if c in images.columns]
    info = df.merge(images[["image_id"] + fields].astype({"image_id": str}), on="image_id", how="left")
    page = _gallery_html(info, store, pos, k, fields, per_cluster, thumb_size)
    tmp = out / ".index.html.tmp"
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, out / "index.html")
    return out


def _thumb(img: np.ndarray, size: int) -> np.ndarray:
    return (letterbox(img, size)[0] * 255 + 0.5).astype(np.uint8)


def _mosaic_png(store, rows: list[int], size: int, cols: int = 8) -> str:
    """Base64 PNG of a grid of thumbnails of store rows ``rows``."""
    n = len(rows)
    cols = max(1, min(cols, n))
    nrows = (n + cols - 1) // cols
    gap = 2
    canvas = np.full((nrows * (size + gap) - gap, cols * (size + gap) - gap), 40, dtype=np.uint8)
    for j, r in enumerate(rows):
        y, x = divmod(j, cols)
        canvas[y * (size + gap): y * (size + gap) + size, x * (size + gap): x * (size + gap) + size] = _thumb(store.read(r), size)
    buf = io.BytesIO()
    Image.fromarray(canvas, mode="L").save(buf, format="PNG", optimize=True)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _share(counts: pd.Series, total: int, top: int = 3) -> str:
    parts = [f"{html.escape(str(v))} {100 * c / total:.0f}%" for v, c in counts.head(top).items()]
    return ", ".join(parts) if parts else "-"


def _composition_png(info: pd.DataFrame, k: int, field: str) -> str | None:
    """Stacked bar chart: share of each ``field`` value per cluster (matplotlib, no pyplot state)."""
    if field not in info.columns or info[field].nunique(dropna=False) < 2:
        return None  # one value everywhere: the table says it all
    from matplotlib.figure import Figure

    tab = pd.crosstab(info["cluster"], info[field].fillna("unknown").astype(str)).reindex(range(k), fill_value=0)
    tab = tab[tab.sum().sort_values(ascending=False).index[:12]]
    fig = Figure(figsize=(min(14, 2 + 0.45 * k), 3.2), dpi=100)
    ax = fig.subplots()
    bottom = np.zeros(k)
    for name in tab.columns:
        vals = tab[name].to_numpy(dtype=float)
        ax.bar(np.arange(k), vals, bottom=bottom, label=str(name))
        bottom += vals
    ax.set_xlabel("cluster")
    ax.set_ylabel("images")
    ax.set_title(f"cluster size by {field.replace('_', ' ')}")
    ax.set_xticks(np.arange(k))
    ax.tick_params(axis="x", labelsize=7)
    ax.legend(fontsize=7, ncol=2, loc="upper right", frameon=False)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _gallery_html(info: pd.DataFrame, store, pos: pd.Series, k: int, fields: list[str],
                  per_cluster: int, thumb_size: int) -> str:
    n = len(info)
    esc = html.escape
    head = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>radpretrain clusters (k={k})</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em; background: #fafafa; color: #222; }}
table {{ border-collapse: collapse; font-size: 0.9em; }}
td, th {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }}
section {{ margin: 1.5em 0; padding-top: 0.5em; border-top: 1px solid #ddd; }}
img.mosaic {{ image-rendering: auto; max-width: 100%; }}
.meta {{ color: #555; font-size: 0.9em; }}
</style></head><body>
<h1>What the archive contains: {k} clusters of {n} images</h1>
<p class="meta">Spherical k-means (faiss) on the encoder's embeddings. Clusters are numbered by size,
largest first; each mosaic shows the images closest to the cluster centre (most typical first).</p>
"""
    parts = [head]
    for field in ("body_part", "modality"):
        png = _composition_png(info, k, field)
        if png:
            parts.append(f'<img alt="composition by {esc(field)}" src="data:image/png;base64,{png}">')
    rows = ["<table><tr><th>cluster</th><th>images</th><th>share</th>"
            + "".join(f"<th>{esc(f.replace('_', ' '))}</th>" for f in fields) + "</tr>"]
    groups = {c: g for c, g in info.groupby("cluster")}
    for c in range(k):
        g = groups.get(c)
        size = 0 if g is None else len(g)
        cells = "".join(f"<td>{_share(g[f].fillna('unknown').value_counts(), size) if size else '-'}</td>" for f in fields)
        rows.append(f'<tr><td><a href="#c{c}">{c}</a></td><td>{size}</td><td>{100 * size / n:.1f}%</td>{cells}</tr>')
    rows.append("</table>")
    parts.append("\n".join(rows))
    for c in range(k):
        g = groups.get(c)
        if g is None or not len(g):
            continue
        g = g.sort_values("centroid_similarity", ascending=False)
        rows_ = [int(pos[i]) for i in g["image_id"] if i in pos.index][:per_cluster]
        desc = "; ".join(f"{esc(f.replace('_', ' '))}: {_share(g[f].fillna('unknown').value_counts(), len(g))}"
                         for f in fields)
        mosaic = (f'<img class="mosaic" alt="cluster {c}" src="data:image/png;base64,{_mosaic_png(store, rows_, thumb_size)}">'
                  if rows_ else "<p>(no thumbnails: images not in the store)</p>")
        parts.append(f'<section id="c{c}"><h2>Cluster {c}: {len(g)} images ({100 * len(g) / n:.1f}%)</h2>'
                     f'<p class="meta">{desc}</p>{mosaic}</section>')
    parts.append("</body></html>\n")
    return "\n".join(parts)
