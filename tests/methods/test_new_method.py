"""A new method is one module plus one preset: nothing else is edited.

The test copies the package into a temporary folder, writes a toy method module into its
``methods/`` and the method's preset into its ``configs/`` (the only two new files), and runs the
copy in a fresh interpreter: ``radpretrain pretrain --method toyae`` (the name comes from the
same discovery as every shipped method), ``radpretrain export`` and ``radpretrain.load_encoder``.
Two more copies show that discovery refuses, with a one-line error, a module that registers no
method and a method without its preset.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import radpretrain
from radpretrain.synthetic.toy import make_toy_store

TOY_MODULE = '''
"""Toy autoencoder: restore a small thumbnail of the image from the encoder's pooled features.

Hinton, Salakhutdinov, "Reducing the Dimensionality of Data with Neural Networks", Science 2006.
"""

from dataclasses import dataclass, field

import torch.nn.functional as F
from torch import nn

from radpretrain.config import get
from radpretrain.methods.base import Paper, PretrainMethod, Supervision, register


@dataclass
class ToyAESection:
    thumb: int = field(default=4, metadata={"ge": 1})


@register("toyae")
class ToyAE(PretrainMethod):
    display_name = "Toy autoencoder"
    paper = Paper("Reducing the Dimensionality of Data with Neural Networks", ("Hinton", "Salakhutdinov"), 2006,
                  "Science", "https://doi.org/10.1126/science.1127647")
    supervision = Supervision.RESTORATION
    config_sections = {"toyae": ToyAESection}

    def __init__(self, cfg, store=None):
        super().__init__(cfg, store)
        self.build_encoder()
        self.thumb = int(get(cfg, "toyae.thumb", 4))
        self.decoder = nn.Linear(self.encoder.num_features, self.thumb * self.thumb)

    def compute_loss(self, batch, batch_idx):
        x = batch["image"]
        target = F.adaptive_avg_pool2d(x, self.thumb).flatten(1)
        return F.mse_loss(self.decoder(self.encoder(self.normalize(x))), target)
'''

TOY_PRESET = '''
method: toyae
seed: 0
data: {image_size: 32, batch_size: 8, num_workers: 0, val_fraction: 0.2}
model: {backbone: resnet18, pretrained: none}
toyae: {thumb: 4}
trainer: {max_steps: 3, max_epochs: 10, enable_progress_bar: false, cpu_threads: 1, log_every_n_steps: 1}
previews: {n: 3}
'''

# runs inside the copy: the CLI as a user types it, then the public loader
SCRIPT = '''
import json, sys
from pathlib import Path
import torch
import radpretrain
from radpretrain.cli import main
from radpretrain.methods import discover

store, run, export = sys.argv[1:4]
rc_pretrain = main(["pretrain", "--method", "toyae", "--data", store, "--out", run])
rc_export = main(["export", run, "--out", export])
model, preprocess = radpretrain.load_encoder(export)
run_model, _ = radpretrain.load_encoder(run)
x = preprocess(torch.rand(40, 30))
with torch.no_grad():
    f, g = model(x), run_model(x)
print(json.dumps({"package": radpretrain.__file__, "methods": list(discover()), "rc": [rc_pretrain, rc_export],
                  "shape": list(f.shape), "same_as_run": bool(torch.equal(f, g))}))
'''


def _copy_package(tmp: Path, files: dict[str, str]) -> Path:
    """A copy of the installed package under ``tmp/pkg`` with ``files`` (relative path -> text) added."""
    root = tmp / "pkg"
    shutil.copytree(Path(radpretrain.__file__).parent, root / "radpretrain",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for rel, text in files.items():
        path = root / "radpretrain" / rel
        assert not path.exists(), f"{rel} would replace a file of the package"
        path.write_text(textwrap.dedent(text).lstrip())
    return root


def _python(root: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=500)


def test_a_toy_method_module_and_its_preset_pretrain_export_and_load(tmp_path):
    root = _copy_package(tmp_path, {"methods/toyae.py": TOY_MODULE, "configs/toyae_cpu.yaml": TOY_PRESET})
    store = make_toy_store(tmp_path / "store", n_patients=8, images_per_patient=2)
    run, export = tmp_path / "run", tmp_path / "export"
    proc = _python(root, "-c", SCRIPT, str(store), str(run), str(export), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["package"] == str(root / "radpretrain" / "__init__.py")  # the copy ran, not the source tree
    assert "toyae" in out["methods"] and "mae" in out["methods"] and out["rc"] == [0, 0]
    assert out["shape"] == [1, 512] and out["same_as_run"]
    meta = json.loads((run / "encoder.json").read_text())
    assert meta["method"] == "toyae" and meta["arch"] == "resnet18" and meta["training"]["global_step"] == 3
    previews = sorted((run / "previews").glob("toyae_inputs_step*.png"))  # the base class' default preview
    assert previews
    card = (export / "README.md").read_text()
    assert "- Method: Toy autoencoder (`toyae`)" in card
    assert ("- Reference: Hinton and Salakhutdinov, Reducing the Dimensionality of Data with Neural Networks, "
            "Science 2006 (https://doi.org/10.1126/science.1127647)") in card
    assert "- self-supervised-learning" in card and json.loads((export / "config.json").read_text())["method"] == "toyae"


def test_discovery_refuses_a_module_without_a_method_and_a_method_without_its_preset(tmp_path):
    no_method = _copy_package(tmp_path / "a", {"methods/helpers.py": "SIZE = 3\n",
                                                "methods/_private_helpers.py": "SIZE = 4\n"})
    proc = _python(no_method, "-m", "radpretrain.cli", "pretrain", "--help", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "radpretrain pretrain: error: radpretrain.methods.helpers: registers no method (decorate its "
        "PretrainMethod subclass with @register(NAME), or start a helper module's name with '_')"]
    no_preset = _copy_package(tmp_path / "b", {"methods/toyae.py": TOY_MODULE})
    proc = _python(no_preset, "-m", "radpretrain.cli", "pretrain", "--help", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "radpretrain pretrain: error: method 'toyae' (radpretrain.methods.toyae) has no packaged preset "
        "configs/toyae_cpu.yaml: a method is its module plus that preset"]
