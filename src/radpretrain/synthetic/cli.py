"""``radpretrain synth``: write a synthetic archive (``--kind pacs``, :mod:`.archive`) or a LUNA16-like
set of CT volumes and candidates (``--kind luna16``, :mod:`.ct`)."""

from __future__ import annotations

from pathlib import Path

from radpretrain.errors import UserError
from radpretrain.synthetic.archive import generate_archive
from radpretrain.synthetic.ct import CT_FORMATS, write_luna_like


def add_arguments(parser) -> None:
    parser.add_argument("out", help="output folder (created; must be empty unless --overwrite)")
    parser.add_argument("--kind", choices=("pacs", "luna16"), default="pacs",
                        help="pacs: a PACS-like archive of radiographs (default); luna16: CT volumes with planted "
                             "nodules and a candidates.csv, for 'radpretrain patches' (docs/ct_patches.md)")
    parser.add_argument("--patients", type=int, default=None,
                        help="number of fake patients (default 200; with --kind luna16: scans, default 3)")
    parser.add_argument("--ct-format", choices=CT_FORMATS, default="mhd",
                        help="--kind luna16: volume format (mhd as LUNA16, nifti, dicom series, or mixed)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed -> identical files")
    parser.add_argument("--workers", type=int, default=None,
                        help="processes drawing images (default: up to 2); output does not depend on it")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace OUT if it is an earlier synthetic archive")


def run(args) -> int:
    if args.kind == "luna16":
        if args.seed < 0:
            raise UserError(f"--seed must be >= 0 (got {args.seed})")
        s = write_luna_like(args.out, n_scans=3 if args.patients is None else args.patients, seed=args.seed,
                            fmt=args.ct_format, overwrite=args.overwrite)
        print(f"synth: wrote {s['n_scans']} CT volumes ({s['format']}) and {s['candidates']} candidates "
              f"({s['positives']} nodules, {s['negatives']} negatives) to {s['out']}")
        print(f"synth: candidates in {Path(s['out']) / 'candidates.csv'}; ground truth in {Path(s['out']) / '.synth'}")
        return 0
    s = generate_archive(args.out, n_patients=200 if args.patients is None else args.patients, seed=args.seed,
                         overwrite=args.overwrite, workers=args.workers)
    kinds = ", ".join(f"{k} {v}" for k, v in s["by_kind"].items() if v)
    print(f"synth: wrote {s['n_files']} files for {s['n_patients']} patients "
          f"({s['n_lesion_patients']} with lesion) in {s['seconds']:.1f} s to {s['out']}")
    print(f"synth: by kind: {kinds}")
    print(f"synth: labels in {Path(s['out']) / 'labels.csv'}; ground truth in {Path(s['out']) / '.synth'}")
    return 0
