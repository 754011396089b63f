"""radpretrain: pretrain image encoders on your own unlabeled radiograph archive.

Public API (kept small on purpose):

- :func:`radpretrain.load_encoder` -- load an exported encoder and its preprocessing.
- :class:`radpretrain.data.store.Store` -- read a dataset store written by ``radpretrain ingest``.
- :class:`radpretrain.data.dataset.StoreDataset` -- a PyTorch ``Dataset`` over a store.
"""

__version__ = "0.1.0"

__all__ = ["__version__", "load_encoder"]


def load_encoder(path, **kwargs):
    """Load an exported encoder folder; returns ``(model, preprocess)``.

    See :func:`radpretrain.export.load_encoder`.
    """
    from radpretrain.export import load_encoder as _load

    return _load(path, **kwargs)
