"""Old run folders and exports still load, with the same features, and export to the same files.

``tests/fixtures/old_export`` was made by the code before issue 16 moved ``load_encoder`` to
``radpretrain.encoder`` and the model card to ``radpretrain.export.card`` (``make.py`` there says
how): a 2-step MAE run through the engine (a 1-block ViT with 8-dim tokens at 16 px; its
``encoder.safetensors``, ``encoder.json`` and ``config.yaml``), its export folder, a PNG, and the
features that code computed for the PNG, for the same pixels as a uint8 array and as a float
array (the percentile-window path), from both folders.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import radpretrain
from radpretrain.export import export_encoder

FIXTURE = Path(__file__).parent / "fixtures" / "old_export"


def _inputs() -> dict:
    png = FIXTURE / "image.png"
    arr = np.asarray(Image.open(png))
    return {"array": arr, "png": str(png), "float": arr.astype(np.float32) * 3.7 - 100}


@pytest.mark.parametrize("folder", ["export", "run"])
def test_an_old_folder_loads_and_gives_the_features_the_old_code_gave(folder):
    expected = np.load(FIXTURE / "expected_features.npz")  # plain arrays (allow_pickle stays off)
    model, preprocess = radpretrain.load_encoder(FIXTURE / folder)
    assert not model.training and preprocess.image_size == 16
    for name, x in _inputs().items():
        with torch.no_grad():
            got = model(preprocess(x)).numpy()[0]
        want = expected[f"{folder}_{name}"]
        assert got.shape == want.shape == (8,)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=f"{folder}: {name}")


def test_an_old_run_exports_to_the_files_the_old_code_wrote(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(FIXTURE / "run", run)  # its store (config.yaml's data.root) is gone, as when it was exported
    out = export_encoder(run, tmp_path / "export")
    old = FIXTURE / "export"
    new_cfg, old_cfg = (json.loads((d / "config.json").read_text()) for d in (out, old))
    assert new_cfg.pop("radpretrain_version") and old_cfg.pop("radpretrain_version")
    assert new_cfg == old_cfg
    assert (out / "README.md").read_text() == (old / "README.md").read_text()  # the card, paper included
    new_w, old_w = load_file(out / "model.safetensors"), load_file(old / "model.safetensors")
    assert new_w.keys() == old_w.keys() and all(torch.equal(new_w[k], old_w[k]) for k in new_w)
