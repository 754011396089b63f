"""Wall time and peak memory of ``radpretrain demo`` (the ``make demo`` job).

Budget (issue "the main job end to end"): <= 10 minutes wall and <= 4 GB on 2 cores.
Runs the demo from scratch into a temporary folder (or ``--out``), then a second time to
check that finished stages are reused.  Peak memory is the summed RSS of the demo process
and all its children (data-loader workers), sampled every 0.25 s from /proc.

    .venv/bin/python benchmarks/demo.py [--out DIR] [--keep]

Prints one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _proc import run_measured  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="demo output folder (default: a temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the output folder")
    ap.add_argument("extra", nargs="*", help="extra arguments for 'radpretrain demo'")
    args = ap.parse_args()
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="radpretrain-demo-"))
    if out.exists() and any(out.iterdir()):
        shutil.rmtree(out)
    exe = Path(sys.executable).with_name("radpretrain")
    cmd = [str(exe), "demo", "--out", str(out), *args.extra]
    first = run_measured(cmd)
    second = run_measured(cmd, stdout=subprocess_devnull(), stderr=subprocess_devnull())
    result = {
        "benchmark": "demo",
        "first_run": first,
        "second_run_reuse": second,
        "budget_wall_s": 600,
        "budget_rss_gb": 4.0,
        "within_budget": first["returncode"] == 0 and first["wall_s"] <= 600 and first["peak_rss_gb"] <= 4.0,
        "out": str(out),
    }
    if not args.keep and not args.out:
        shutil.rmtree(out, ignore_errors=True)
    print(json.dumps(result))
    return 0 if result["within_budget"] else 1


def subprocess_devnull():
    import subprocess

    return subprocess.DEVNULL


if __name__ == "__main__":
    sys.exit(main())
