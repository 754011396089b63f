"""The checkpoint allowlist is what the engine's checkpoints really hold, for every method, and
every method resumes through the vetted loader; the pickle scanner sees every way to name a global."""

import os
import pickle

import pytest
import torch

from radpretrain.models.weights import pickle_globals, torch_file_globals
from radpretrain.pretrain import CHECKPOINT_SAFE_GLOBALS, pretrain, read_checkpoint

FAST = ["trainer.enable_progress_bar=false", "data.num_workers=0", "trainer.cpu_threads=1", "previews.every_n_epochs=0",
        "data.batch_size=8", "trainer.log_every_n_steps=1", "data.image_size=32", "trainer.max_steps=2",
        "trainer.checkpoint_every_n_steps=1", "data.val_fraction=0.25", "trainer.val_check_interval=1",
        "trainer.limit_val_batches=1",
        "early_stopping.patience=5"]
CNN = ["model.backbone=resnet10t", "model.pretrained=none", "model.kwargs={}"]
METHODS = {
    "mae": ["model.kwargs={depth: 2}", "model.patch_size=8", "mae.decoder_dim=32", "mae.decoder_depth=1",
            "mae.decoder_heads=2"],
    "simclr": CNN, "metadata": CNN, "genesis": CNN,
    "dino": CNN + ["dino.n_local=2", "dino.output_dim=64", "dino.hidden_dim=64"],
    "deepcluster": CNN + ["deepcluster.num_clusters=4", "deepcluster.pca_dim=8"],
}
NAMES = {f"{g.__module__}.{g.__qualname__}" for g in CHECKPOINT_SAFE_GLOBALS}


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_checkpoints_only_allowlisted_globals_and_resumes(method, toy, tmp_path):
    run = tmp_path / "run"
    pretrain(method, toy, run, overrides=FAST + METHODS[method])
    files = sorted((run / "checkpoints").glob("*.ckpt"))
    assert {"last.ckpt", "step0000001.ckpt", "step0000002.ckpt"} <= {p.name for p in files}
    for p in files:
        found = torch_file_globals(p)
        assert found <= NAMES and "torch._utils._rebuild_tensor_v2" in found, (p.name, found - NAMES)
    if method == "deepcluster":  # its pseudo-label assignment travels in the checkpoint
        assert "deepcluster" in read_checkpoint(run / "checkpoints" / "last.ckpt")
    res = pretrain(method, toy, run, resume=True, overrides=["trainer.max_steps=3"])
    assert res["global_step"] == 3


class _Reduce:
    def __reduce__(self):
        return (os.system, ("true",))


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_pickle_globals_sees_every_protocol(protocol):
    data = pickle.dumps({"a": _Reduce(), "b": [torch.nn.Linear]}, protocol=protocol)
    assert pickle_globals(data) == {"posix.system", "torch.nn.modules.linear.Linear"}


def test_torch_file_globals_reads_zip_and_legacy_files(tmp_path):
    torch.save({"w": torch.zeros(2, dtype=torch.bfloat16), "x": _Reduce()}, tmp_path / "new.pt")
    torch.save({"w": torch.zeros(2), "x": _Reduce()}, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    assert torch_file_globals(tmp_path / "new.pt") == {
        "collections.OrderedDict", "torch._utils._rebuild_tensor_v2", "torch.BFloat16Storage", "posix.system"}
    assert "posix.system" in torch_file_globals(tmp_path / "old.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "new.pt").read_bytes()[:300])
    with pytest.raises(ValueError, match="cut short"):
        torch_file_globals(tmp_path / "cut.pt")
