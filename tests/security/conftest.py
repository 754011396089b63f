"""A live pickle payload and a real (tiny) pretraining run to plant it in.

``payload.obj`` pickles to ``os.system("touch MARKER")``: anything that unpickles it creates
``payload.marker``.  :func:`test_payloads.test_the_payload_is_live` proves it fires when loaded
the unsafe way, so a test that finds no marker means the loader refused it.
"""

import os
import shlex
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from radpretrain.synthetic.toy import make_toy_store
from radpretrain.pretrain import pretrain

TINY_MAE = ["trainer.enable_progress_bar=false", "data.num_workers=0", "trainer.cpu_threads=1",
            "previews.every_n_epochs=0", "model.kwargs={depth: 2}", "data.batch_size=8", "trainer.log_every_n_steps=1",
            "data.image_size=32", "model.patch_size=8", "mae.decoder_dim=32", "mae.decoder_depth=1",
            "mae.decoder_heads=2"]


class _Payload:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(self.marker)}",))


@pytest.fixture
def payload(tmp_path):
    marker = tmp_path / "PAYLOAD_RAN"
    obj = _Payload(marker)

    def into_checkpoint(path: Path) -> Path:
        """Load a real checkpoint, add the payload, save it back (what an attacker on shared storage does)."""
        ck = torch.load(path, map_location="cpu", weights_only=True)
        ck["callbacks"]["planted"] = obj
        torch.save(ck, path)
        return path

    def as_weights(path: Path) -> Path:
        """A state dict file (any name) whose pickle carries the payload next to real tensors."""
        torch.save({"conv1.weight": torch.zeros(64, 1, 7, 7), "fc.bias": torch.zeros(2), "evil": obj}, path)
        return path

    return SimpleNamespace(marker=marker, obj=obj, into_checkpoint=into_checkpoint, as_weights=as_weights)


@pytest.fixture(scope="session")
def toy(tmp_path_factory):
    return make_toy_store(tmp_path_factory.mktemp("sec_toy") / "ds", n_patients=24, images_per_patient=2)


@pytest.fixture(scope="session")
def tiny_run_src(toy, tmp_path_factory):
    """A finished 5-step MAE run: step0000002/step0000004/last/best.ckpt, encoder.safetensors + .json."""
    run = tmp_path_factory.mktemp("sec_run") / "run"
    pretrain("mae", toy, run, overrides=TINY_MAE + ["trainer.max_steps=5", "trainer.checkpoint_every_n_steps=2",
                                                    "data.val_fraction=0.25"])
    return run


@pytest.fixture
def tiny_run(tiny_run_src, tmp_path):
    """A private copy of the tiny run (tests damage it)."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run_src, run)
    return run
