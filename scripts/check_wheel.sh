#!/usr/bin/env bash
# Packaging check (run by .ci/run after the test suite): build the wheel as a user would, install it
# outside the source tree (reusing the dependencies of the project's .venv), and from that install
# look up every packaged preset and run a 3-step `pretrain` with a GPU preset.  Catches a preset or
# other package file that a wheel would not ship, before a user finds it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

"$PY" -m pip wheel -q --no-deps --wheel-dir "$work/dist" .
wheel=$(ls "$work"/dist/radpretrain-*.whl)
echo "check_wheel: built $(basename "$wheel")"
"$PY" -c "import sys, zipfile; sys.exit('radpretrain/configs/mae_pilot.yaml' not in zipfile.ZipFile(sys.argv[1]).namelist())" "$wheel" \
    || { echo "check_wheel: the wheel ships no presets" >&2; exit 1; }
"$PY" -m pip install -q --no-deps --target "$work/site" "$wheel"

# Run from outside the checkout with the wheel's copy first on the path (not src/).
export PYTHONPATH="$work/site" RADPRETRAIN_DEID_KEY=wheel-check OMP_NUM_THREADS=1
repo=$(pwd)
cd "$work"
"$repo/$PY" - "$work/site" <<'PY'
import sys
from pathlib import Path

import radpretrain
from radpretrain.config import preset_names, preset_text
from radpretrain.pretrain.config import resolve_config

site = Path(sys.argv[1]).resolve()
assert Path(radpretrain.__file__).resolve().is_relative_to(site), f"imported {radpretrain.__file__}, not the wheel"
names = preset_names()
assert len(names) >= 10, names
for name in names:
    assert preset_text(name), name
    cfg = resolve_config(None, name)
    print(f"check_wheel: preset {name}: method {cfg['method']}")
PY
"$repo/$PY" -m radpretrain.cli synth archive --patients 6 --seed 0 >/dev/null
"$repo/$PY" -m radpretrain.cli ingest archive --out ds >/dev/null 2>&1
"$repo/$PY" -m radpretrain.cli pretrain --config mae_pilot --data ds --out run \
    trainer.max_steps=3 data.image_size=32 data.batch_size=4 data.num_workers=0 model.backbone=vit_tiny \
    model.patch_size=8 model.pretrained=none mae.decoder_dim=32 mae.decoder_depth=1 mae.decoder_heads=2 \
    trainer.enable_progress_bar=false previews.every_n_epochs=0 >/dev/null 2>"$work/pretrain.log" \
    || { tail -20 "$work/pretrain.log" >&2; exit 1; }
grep -q "method: mae" run/config.yaml && grep -q "val_fraction: 0.2" run/config.yaml  # mae_pilot's own values
test -s run/encoder.safetensors
echo "check_wheel: ok (presets found in the installed wheel; 3-step pretrain with --config mae_pilot)"
