"""No file a user did not create in this process is ever unpickled.

One live payload (``conftest.payload``) is planted where each loader reads, and each loader must
refuse it with a one-line :class:`UserError` naming the file, without running it.
"""

from pathlib import Path

import lightning as L
import pytest
import torch

from radpretrain.browse import embed_store
from radpretrain.cli import main
from radpretrain.errors import UserError
from radpretrain.evaluate.inits import build_init, parse_init
from radpretrain.encoder import load_encoder
from radpretrain.export import export_encoder
from radpretrain.models.backbones import WEIGHTS_ENV, create_backbone
from radpretrain.pretrain import pretrain

TINY_MAE = ["trainer.enable_progress_bar=false", "data.num_workers=0", "trainer.cpu_threads=1",
            "previews.every_n_epochs=0", "model.kwargs={depth: 2}", "data.batch_size=8", "trainer.log_every_n_steps=1",
            "data.image_size=32", "model.patch_size=8", "mae.decoder_dim=32", "mae.decoder_depth=1",
            "mae.decoder_heads=2"]


def test_the_payload_is_live(payload, tmp_path):
    """Loaded the unsafe way, the payload runs: a missing marker below means the loader refused it."""
    path = payload.as_weights(tmp_path / "w.pth")
    torch.load(path, weights_only=False)
    assert payload.marker.exists()


def _plant_run_folder(run, payload):
    """Every checkpoint and the encoder weights of a run folder carry the payload."""
    for ck in (run / "checkpoints").glob("*.ckpt"):
        payload.into_checkpoint(ck)
    payload.as_weights(run / "encoder.safetensors")  # a pickle under the safetensors name


# -- each path: (what to plant, what to run) -> must raise a UserError naming `names` ---------------
def _resume(run, toy, payload, tmp_path):
    payload.into_checkpoint(run / "checkpoints" / "last.ckpt")
    pretrain("mae", toy, run, resume=True)


def _resume_fallback(run, toy, payload, tmp_path):
    """last.ckpt is damaged: the fallback must not load the planted step checkpoint either."""
    last = run / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])
    payload.into_checkpoint(run / "checkpoints" / "step0000004.ckpt")
    pretrain("mae", toy, run, resume=True)


def _resume_best(run, toy, payload, tmp_path):
    """A planted best.ckpt is refused when the resume starts, not read at the end of the run."""
    payload.into_checkpoint(run / "checkpoints" / "best.ckpt")
    pretrain("mae", toy, run, resume=True, overrides=["trainer.max_steps=6"])


class _PlantBest(L.Callback):
    """Replaces best.ckpt with a payload at the end of training (another user on shared storage)."""

    def __init__(self, payload):
        self.payload = payload

    def on_train_end(self, trainer, pl_module):
        self.payload.into_checkpoint(Path(trainer.default_root_dir) / "checkpoints" / "best.ckpt")


def _export_best(run, toy, payload, tmp_path):
    """The engine's own export of best.ckpt (pretrain.export_encoder) at the end of a run."""
    pretrain("mae", toy, tmp_path / "fresh", callbacks=[_PlantBest(payload)],
             overrides=TINY_MAE + ["trainer.max_steps=5", "trainer.checkpoint_every_n_steps=2", "data.val_fraction=0.25"])


def _evaluate_init_run(run, toy, payload, tmp_path):
    _plant_run_folder(run, payload)
    build_init(parse_init(str(run)), "resnet18", 32, (0.5, 0.25))


def _evaluate_state_dict(run, toy, payload, tmp_path):
    path = payload.as_weights(tmp_path / "foreign.pth")
    build_init(parse_init(f"state_dict:{path}"), "resnet18", 32, (0.5, 0.25))


def _evaluate_state_dict_options(run, toy, payload, tmp_path):
    path = payload.as_weights(tmp_path / "foreign.pt")
    opts = {"state_dict.strip_prefix": "module.", "state_dict.rename": "fc=>head", "state_dict.strict": True,
            "state_dict.mean": 0.4, "state_dict.std": 0.2}
    build_init(parse_init(f"state_dict:{path}:resnet18"), "tf_efficientnet_lite0", 32, (0.5, 0.25), opts)


def _export(run, toy, payload, tmp_path):
    _plant_run_folder(run, payload)
    export_encoder(run, tmp_path / "export")


def _load_encoder(run, toy, payload, tmp_path):
    _plant_run_folder(run, payload)
    load_encoder(run)


def _embed(run, toy, payload, tmp_path):
    _plant_run_folder(run, payload)
    embed_store(toy, run, tmp_path / "emb.parquet", batch_size=8, device="cpu")


def _model_pretrained(run, toy, payload, tmp_path):
    path = payload.as_weights(tmp_path / "start.pth")
    pretrain("simclr", toy, tmp_path / "new", overrides=TINY_MAE[:7] + [
        "model.backbone=resnet18", "model.kwargs={}", f"model.pretrained={path}", "trainer.max_steps=2"])


def _imagenet_weights_dir(run, toy, payload, tmp_path):
    """$RADPRETRAIN_WEIGHTS_DIR (set to tmp_path by the test) holds a planted resnet18.pth."""
    payload.as_weights(tmp_path / "resnet18.pth")
    create_backbone("resnet18", pretrained="imagenet")


PATHS = {
    # a torch file: the message names the file and what its pickle would have run
    "resume": (_resume, ["last.ckpt", "posix.system"]),
    "resume_fallback": (_resume_fallback, ["step0000004.ckpt", "posix.system"]),
    "resume_best": (_resume_best, ["best.ckpt", "posix.system"]),
    "export_best": (_export_best, ["best.ckpt", "posix.system"]),
    "evaluate_state_dict": (_evaluate_state_dict, ["foreign.pth", "posix.system"]),
    "evaluate_state_dict_options": (_evaluate_state_dict_options, ["foreign.pt", "posix.system"]),
    "model_pretrained": (_model_pretrained, ["start.pth", "posix.system"]),
    "imagenet_weights_dir": (_imagenet_weights_dir, ["resnet18.pth", "posix.system"]),
    # a run / export folder: weights are read from safetensors only, so a pickle there is not a valid file
    "evaluate_init_run": (_evaluate_init_run, ["encoder.safetensors", "not a valid safetensors file"]),
    "export": (_export, ["encoder.safetensors", "not a valid safetensors file"]),
    "load_encoder": (_load_encoder, ["encoder.safetensors", "not a valid safetensors file"]),
    "embed": (_embed, ["encoder.safetensors", "not a valid safetensors file"]),
}


@pytest.mark.parametrize("path", list(PATHS))
def test_every_loader_refuses_the_payload(path, tiny_run, toy, payload, tmp_path, monkeypatch):
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path))
    action, names = PATHS[path]
    with pytest.raises(UserError) as err:
        action(tiny_run, toy, payload, tmp_path)
    msg = str(err.value)
    assert not payload.marker.exists(), f"{path}: the payload ran"
    assert "\n" not in msg and all(n in msg for n in names), msg


def test_resume_refusal_is_one_line_on_the_command_line(tiny_run, toy, payload, capsys):
    payload.into_checkpoint(tiny_run / "checkpoints" / "last.ckpt")
    rc = main(["pretrain", "--method", "mae", "--data", str(toy), "--out", str(tiny_run), "--resume"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and not payload.marker.exists()
    assert err.count("\n") == 0 and "Traceback" not in err and "last.ckpt" in err and "posix.system" in err, err


def test_fresh_start_into_a_planted_folder_is_refused(tiny_run, toy, payload):
    """A folder whose checkpoints carry a payload is never taken over by a new run (nor read)."""
    (tiny_run / "encoder.safetensors").unlink()
    for ck in (tiny_run / "checkpoints").glob("*.ckpt"):
        payload.into_checkpoint(ck)
    with pytest.raises(UserError, match="posix.system") as err:
        pretrain("mae", toy, tiny_run, overrides=TINY_MAE + ["trainer.max_steps=2"])
    assert not payload.marker.exists() and "\n" not in str(err.value)


def test_a_planted_features_cache_is_recomputed_not_unpickled(toy, payload, tmp_path, caplog):
    """evaluate's features/*.npy cache (in its --out folder): an object array carrying the payload."""
    import numpy as np

    from radpretrain.evaluate.features import cached_features as _cached_features, load_images
    from radpretrain.data.store import Store

    store = Store(toy)
    table = store.images[["image_id"]].head(6).reset_index(drop=True)
    imgs = load_images(store, np.arange(6), 32)
    enc = build_init(parse_init("scratch"), "resnet18", 32, (0.5, 0.25)).encoder
    first = _cached_features(tmp_path / "features", "scratch", "default", enc, imgs, table, 32, 8)
    np.save(tmp_path / "features" / "scratch-default.npy", np.array([payload.obj] * 6, dtype=object), allow_pickle=True)
    again = _cached_features(tmp_path / "features", "scratch", "default", enc, imgs, table, 32, 8)
    assert not payload.marker.exists()
    assert np.allclose(first, again, rtol=1e-5, atol=1e-6) and "unreadable features cache" in caplog.text
