"""``radpretrain evaluate``: does pretraining on our own radiographs help, and by how much?

Modules: :mod:`~radpretrain.evaluate.cli` (the command), :mod:`~.inits` (scratch, ImageNet,
runs/exports, foreign state dicts), :mod:`~.folds` (patient-grouped CV plan, leakage check),
:mod:`~.protocols` (linear probe, kNN, fine-tuning), :mod:`~.metrics` (metrics, patient
bootstrap, paired tests, DeLong), :mod:`~.results` (tidy tables) and :mod:`~.report`
(report.html / report.md).
"""
