"""``radpretrain pretrain``: the Lightning engine that turns a dataset store into an encoder.

::

    radpretrain pretrain [--method mae] [--config PRESET_OR_FILE] --data DATASET --out RUN [--resume] [key=value ...]

The config is the packaged preset ``<method>_cpu`` unless ``--config`` names another preset
(e.g. ``mae_pilot``, which names its method, so ``--method`` may be left out) or a YAML file;
:data:`DEFAULTS` fills every engine key a config leaves out, and ``key=value`` overrides any
key (``trainer.max_steps=30 data.image_size=64``).  Files and overrides are checked against
the schema in :mod:`radpretrain.pretrain.config` before anything is written.

The engine owns data loading (``StoreDataset``, a resumable epoch-seeded batch
sampler, optional class balancing, aspect-ratio buckets, patient-grouped
validation split), the Lightning ``Trainer`` (CPU, one GPU, DDP under torchrun
or SLURM), loggers (CSV, TensorBoard, a text log), checkpoints (periodic +
``last.ckpt`` + best on validation loss), early stopping, previews and the final
``encoder.safetensors`` + ``encoder.json``.  Methods plug in through the hooks of
:class:`radpretrain.methods.base.PretrainMethod` (``fields``, ``sample_transform``,
``train_sampler``, ``reload_dataloaders_every_epoch``, ``on_train_epoch_start``,
``preview_rows`` (the base class's ``save_previews`` writes them), ``encoder_meta``).

Run folder::

    RUN/config.yaml        resolved config (incl. measured data.mean / data.std)
    RUN/versions.json      package versions
    RUN/logs/              csv/metrics.csv, tensorboard/, pretrain.log
    RUN/checkpoints/       step*.ckpt (every trainer.checkpoint_every_n_steps, newest trainer.keep_checkpoints
                           kept), last.ckpt, best.ckpt: written atomically, read only after their pickle
                           was checked (see write_checkpoint / read_checkpoint)
    RUN/previews/          PNGs from the method (MAE reconstructions, SimCLR views, ...)
    RUN/data_summary.json  counts of the images trained on (by modality, body part, view; no ids)
    RUN/encoder.safetensors, RUN/encoder.json   at the end (see docs/architecture.md)
    RUN/compute.json       at the end: wall seconds, steps, images seen, device, threads
    RUN/report.html        at the end: the run report (radpretrain report RUN writes it again)

The package, one job per module:

- :mod:`~radpretrain.pretrain.config`: engine defaults <- preset <- overrides, checked;
- :mod:`~radpretrain.pretrain.data`: image selection, input statistics, samplers, the data module;
- :mod:`~radpretrain.pretrain.checkpoints`: atomic writes, vetted reads, the resume fallback;
- :mod:`~radpretrain.pretrain.trainer`: the Lightning Trainer (callbacks, loggers, precision,
  devices, channels_last, ``trainer.compile``);
- :mod:`~radpretrain.pretrain.runner`: :func:`pretrain`, the encoder export and the CLI;
- :mod:`~radpretrain.pretrain.report`: ``RUN/report.html`` and ``radpretrain report``.
"""

from radpretrain.pretrain.checkpoints import (
    CHECKPOINT_SAFE_GLOBALS,
    RunCheckpointIO,
    StepCheckpoint,
    checkpoint_candidates,
    existing_run,
    find_resume_checkpoint,
    inspect_checkpoint,
    read_checkpoint,
    write_checkpoint,
)
from radpretrain.pretrain.config import DEFAULTS, check_run_config, resolve_config, resume_config
from radpretrain.pretrain.data import (
    EpochBatchSampler,
    SkippingBatchSampler,
    StoreData,
    balance_weights,
    data_summary,
    input_stats,
    measure_stats,
    select_images,
    start_weight_stats,
)
from radpretrain.pretrain.report import write_run_report
from radpretrain.pretrain.runner import add_arguments, export_encoder, pretrain, run
from radpretrain.pretrain.trainer import ComputeMeter, Previews, build_trainer, compute_record, total_steps, use_channels_last

__all__ = [
    "CHECKPOINT_SAFE_GLOBALS", "ComputeMeter", "DEFAULTS", "EpochBatchSampler", "Previews", "RunCheckpointIO", "SkippingBatchSampler",
    "StepCheckpoint", "StoreData", "add_arguments", "balance_weights", "build_trainer", "check_run_config",
    "checkpoint_candidates", "compute_record", "data_summary", "existing_run", "export_encoder", "find_resume_checkpoint", "input_stats",
    "inspect_checkpoint", "measure_stats", "pretrain", "read_checkpoint", "resolve_config", "resume_config", "run",
    "select_images", "start_weight_stats", "total_steps", "use_channels_last", "write_checkpoint", "write_run_report",
]
