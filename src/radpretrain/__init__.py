"""radpretrain: pretrain image encoders on your own unlabeled radiograph archive.

Public API (kept small on purpose):

- :func:`radpretrain.load_encoder` -- load an exported encoder and its preprocessing
  (:mod:`radpretrain.encoder`).
- :class:`radpretrain.data.store.Store` -- read a dataset store written by ``radpretrain ingest``.
- :class:`radpretrain.data.dataset.StoreDataset` -- a PyTorch ``Dataset`` over a store.
"""

__version__ = "0.1.0"

__all__ = ["__version__", "load_encoder"]


def load_encoder(path, device="cpu", image_size=None):
    """Load an exported encoder folder (or a run folder); returns ``(model, preprocess)``.

    See :func:`radpretrain.encoder.load_encoder`.
    """
    # imported on use: 'import radpretrain' (and 'radpretrain --help') stays free of torch
    from radpretrain.encoder import load_encoder as _load

    return _load(path, device=device, image_size=image_size)
