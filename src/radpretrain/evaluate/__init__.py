"""``radpretrain evaluate``: does pretraining on our own radiographs help, and by how much?

:func:`evaluate` runs the whole comparison from Python (the command calls it).  Modules:
:mod:`~radpretrain.evaluate.api` (:func:`evaluate`), :mod:`~.cli` (the command's flags),
:mod:`~.target` (the labelled target and task), :mod:`~.inits` (scratch, ImageNet, runs/exports,
foreign state dicts), :mod:`~.folds` (patient-grouped CV plan, leakage check), :mod:`~.device`
(device, precision, image feeding), :mod:`~.features` (images and frozen features, cached),
:mod:`~.protocols` (linear probe, kNN, fine-tuning and their registry), :mod:`~.progress`
(bars and per-cell log lines), :mod:`~.metrics` (metrics, patient bootstrap, paired tests,
DeLong), :mod:`~.results` (tidy tables) and :mod:`~.report` (report.html / report.md).
"""

from radpretrain.evaluate.api import evaluate

__all__ = ["evaluate"]
