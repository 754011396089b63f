"""The ``radpretrain`` command.

Each subcommand lives in the module of its stage; that module defines
``add_arguments(parser)`` and ``run(args) -> int``.  Only the chosen module is
imported, so ``radpretrain --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from radpretrain import __version__
from radpretrain.errors import UserError

# name -> (module, one-line help).  Order is the pipeline's order.
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("radpretrain.synthetic.cli", "write a synthetic PACS-like archive (DICOM with fake PHI, broken files, labels)"),
    "pull": ("radpretrain.data.pull", "pull studies from a PACS over DICOMweb (QIDO-RS/WADO-RS)"),
    "ingest": ("radpretrain.data.ingest", "turn DICOM/PNG/JPEG/TIFF/NIfTI/NPZ files into a de-identified dataset store"),
    "patches": ("radpretrain.data.patches", "cut labelled 2-D patches around candidate points of CT volumes (LUNA16-style)"),
    "split": ("radpretrain.data.splits", "patient-grouped train/val/test split, folds and nested label fractions"),
    "info": ("radpretrain.data.info", "summarise a dataset store (counts, QC, splits) and draw a sample grid"),
    "verify": ("radpretrain.data.verify", "check a dataset store's shards and pixel hashes against its manifest"),
    "pretrain": ("radpretrain.pretrain", "pretrain an encoder on a dataset store (MAE, DeepCluster, Genesis, ...)"),
    "report": ("radpretrain.pretrain.report", "write a pretraining run's report.html again (curves, previews, data)"),
    "evaluate": ("radpretrain.evaluate.cli", "compare inits (scratch, ImageNet, yours) on a labelled task with CIs"),
    "compare": ("radpretrain.evaluate.compare", "label efficiency vs pretraining compute over several evaluate outputs"),
    "export": ("radpretrain.export", "export a run's encoder as a shareable model folder (safetensors + card)"),
    "embed": ("radpretrain.browse", "compute one embedding per image of a dataset store"),
    "neighbors": ("radpretrain.browse", "find the most similar images to one image"),
    "clusters": ("radpretrain.browse", "k-means over embeddings and an HTML gallery per cluster"),
    "demo": ("radpretrain.demo", "run the whole pipeline end to end (synthetic data or your folder)"),
}


def _top_parser() -> argparse.ArgumentParser:
    lines = "\n".join(f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items())
    p = argparse.ArgumentParser(
        prog="radpretrain",
        description="Pretrain image encoders on your own radiograph archive.",
        epilog=f"commands:\n{lines}\n\nRun 'radpretrain COMMAND --help' for a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"radpretrain {__version__}")
    p.add_argument("command", nargs="?", help="one of the commands below")
    return p


def build_parser(name: str) -> tuple[argparse.ArgumentParser, object]:
    module_name, help_ = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"radpretrain {name}", description=help_[0].upper() + help_[1:] + ".")
    adder = getattr(module, f"add_{name}_arguments", None) or module.add_arguments
    runner = getattr(module, f"run_{name}", None) or module.run
    adder(parser)
    return parser, runner


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-"):
        _top_parser().parse_args(argv or ["--help"])
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        _top_parser().error(f"unknown command {name!r} (choose from {', '.join(COMMANDS)})")
    try:
        parser, runner = build_parser(name)
        args = parser.parse_intermixed_args(rest)  # key=value overrides may come before or after options
        return int(runner(args) or 0)
    except UserError as e:
        print(f"radpretrain {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"radpretrain {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
