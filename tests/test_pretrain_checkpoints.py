"""Run folders that survive kills, damage and full disks: atomic checkpoints, resume fallback,
one-line disk-full errors, a small default of kept checkpoints."""

import errno
import io
import os
import shutil
from pathlib import Path

import lightning as L
import pandas as pd
import pytest
import torch

import radpretrain.pretrain.checkpoints as engine
from radpretrain.cli import main
from radpretrain.synthetic.toy import make_toy_store
from radpretrain.errors import UserError
from radpretrain.pretrain import find_resume_checkpoint, inspect_checkpoint, pretrain, read_checkpoint, write_checkpoint

TINY_MAE = ["trainer.enable_progress_bar=false", "data.num_workers=0", "trainer.cpu_threads=1",
            "previews.every_n_epochs=0", "model.kwargs={depth: 2}", "data.batch_size=8", "trainer.log_every_n_steps=1",
            "data.image_size=32", "model.patch_size=8", "mae.decoder_dim=32", "mae.decoder_depth=1",
            "mae.decoder_heads=2", "trainer.checkpoint_every_n_steps=1"]


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return make_toy_store(tmp_path_factory.mktemp("toy") / "ds", n_patients=24, images_per_patient=2)


@pytest.fixture(scope="module")
def five_steps(ds, tmp_path_factory):
    """A finished 5-step run, a checkpoint every step, with validation (best.ckpt) and default keep_checkpoints."""
    run = tmp_path_factory.mktemp("five") / "run"
    pretrain("mae", ds, run, overrides=TINY_MAE + ["trainer.max_steps=5", "data.val_fraction=0.25"])
    return run


@pytest.fixture
def run5(five_steps, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(five_steps, run)
    return run


def _truncate(path: Path, keep: int = 2000) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def test_keep_checkpoints_default_keeps_three_steps_last_and_best(five_steps):
    names = sorted(p.name for p in (five_steps / "checkpoints").iterdir())
    assert names == ["best.ckpt", "last.ckpt", "step0000003.ckpt", "step0000004.ckpt", "step0000005.ckpt"], names
    for name in names:  # every one complete and resumable (last.ckpt: the final full save of the engine)
        assert inspect_checkpoint(five_steps / "checkpoints" / name) is None, name
    ck = read_checkpoint(five_steps / "checkpoints" / "last.ckpt")
    assert ck["global_step"] == 5 and ck["optimizer_states"] and "loops" in ck


def test_resume_falls_back_to_the_newest_intact_checkpoint(run5, ds):
    ck = run5 / "checkpoints"
    _truncate(ck / "last.ckpt")                                       # cut short (a copy, a kill in older versions)
    (ck / "step0000005.ckpt").write_bytes(os.urandom(50_000))         # garbage
    data = bytearray((ck / "step0000004.ckpt").read_bytes())          # complete, but damaged inside
    data[len(data) // 2] ^= 0xFF
    (ck / "step0000004.ckpt").write_bytes(bytes(data))
    res = pretrain("mae", ds, run5, resume=True, overrides=["trainer.max_steps=6"])
    assert res["global_step"] == 6
    log = (run5 / "logs" / "pretrain.log").read_text()
    assert "last.ckpt: unreadable (ValueError: a zip file cut short" in log
    assert "step0000005.ckpt: unreadable" in log
    assert "step0000004.ckpt: damaged (record" in log and "fails its checksum" in log
    # best.ckpt (saved after the validation that followed step 4) is newer than step0000003.ckpt
    assert "resuming from best.ckpt (step 4), the newest intact checkpoint" in log
    df = pd.read_csv(run5 / "logs" / "csv" / "metrics.csv").dropna(subset=["train/loss"])
    assert df["step"].astype(int).tolist()[-2:] == [4, 5]  # the 5th and 6th steps, trained after the resume
    assert read_checkpoint(run5 / "checkpoints" / "last.ckpt")["global_step"] == 6
    # with best.ckpt damaged too, step0000003.ckpt is next
    _truncate(run5 / "checkpoints" / "best.ckpt")
    _truncate(run5 / "checkpoints" / "last.ckpt")
    for p in (run5 / "checkpoints").glob("step000000[56].ckpt"):
        _truncate(p)
    path, notes = find_resume_checkpoint(run5)
    assert path.name == "step0000003.ckpt" and notes[-1] == "resuming from step0000003.ckpt (step 3), the newest intact checkpoint"


def test_no_intact_checkpoint_says_how_to_start_over_and_a_new_start_may_use_the_folder(run5, ds, capsys):
    (run5 / "encoder.safetensors").unlink()
    for p in (run5 / "checkpoints").glob("*.ckpt"):
        _truncate(p)
    rc = main(["pretrain", "--method", "mae", "--data", str(ds), "--out", str(run5), "--resume"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and "Traceback" not in err
    assert "no intact checkpoint to resume from" in err and "without --resume" in err, err
    # nothing intact is left: a new start may use the folder; the damaged files are kept, renamed
    res = pretrain("mae", ds, run5, overrides=TINY_MAE + ["trainer.max_steps=2"])
    assert res["global_step"] == 2 and (run5 / "encoder.safetensors").is_file()
    kept = sorted(p.name for p in (run5 / "checkpoints").glob("*.damaged"))
    assert kept == ["best.ckpt.damaged", "last.ckpt.damaged", "step0000003.ckpt.damaged", "step0000004.ckpt.damaged",
                    "step0000005.ckpt.damaged"], kept
    assert "no intact checkpoint left, so a new run starts here" in (run5 / "logs" / "pretrain.log").read_text()


def test_a_folder_with_an_intact_checkpoint_still_holds_a_run(run5, ds):
    (run5 / "encoder.safetensors").unlink()
    _truncate(run5 / "checkpoints" / "last.ckpt")
    with pytest.raises(UserError, match=r"already holds a run \(checkpoints/step0000005.ckpt\)"):
        pretrain("mae", ds, run5, overrides=TINY_MAE + ["trainer.max_steps=2"])
    assert (run5 / "checkpoints" / "last.ckpt").is_file()  # nothing renamed or removed


def _enospc_on_call(monkeypatch, n: int, calls: list):
    """torch.save writes half of the ``n``-th checkpoint, then fails as a full disk does."""
    real = torch.save

    def save(obj, f, *args, **kwargs):
        calls.append(getattr(f, "name", f))
        if len(calls) != n:
            return real(obj, f, *args, **kwargs)
        buf = io.BytesIO()
        real(obj, buf, *args, **kwargs)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", save)


def test_disk_full_during_pretrain_is_one_line_and_the_run_resumes(ds, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    calls = []
    # saves: step1, last, step2, last, step3, last(<- fails: last.ckpt stays at step 2, step3 is complete)
    _enospc_on_call(monkeypatch, 6, calls)
    rc = main(["pretrain", "--method", "mae", "--data", str(ds), "--out", str(run), *TINY_MAE,
               "trainer.max_steps=5", "data.val_fraction=0"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and "Traceback" not in err, err
    assert "last.ckpt: disk full" in err and "MB free" in err and "--resume" in err, err
    monkeypatch.undo()
    ck = run / "checkpoints"
    assert not list(ck.glob("*.tmp")) and sorted(p.name for p in ck.iterdir()) == [
        "last.ckpt", "step0000001.ckpt", "step0000002.ckpt", "step0000003.ckpt"]
    assert read_checkpoint(ck / "last.ckpt")["global_step"] == 2  # the previous complete one, not a partial file
    res = pretrain("mae", ds, run, resume=True)
    assert res["global_step"] == 5 and (run / "encoder.safetensors").is_file()
    assert "resuming from step0000003.ckpt (step 3), the newest intact checkpoint" in (
        run / "logs" / "pretrain.log").read_text()


def test_disk_full_at_the_first_checkpoint_leaves_a_folder_a_new_start_can_use(ds, tmp_path, monkeypatch):
    run = tmp_path / "run"
    _enospc_on_call(monkeypatch, 1, [])
    with pytest.raises(UserError, match="step0000001.ckpt: disk full"):
        pretrain("mae", ds, run, overrides=TINY_MAE + ["trainer.max_steps=3", "data.val_fraction=0"])
    monkeypatch.undo()
    assert not list((run / "checkpoints").iterdir())
    assert pretrain("mae", ds, run, overrides=TINY_MAE + ["trainer.max_steps=3", "data.val_fraction=0"])["global_step"] == 3


def test_disk_full_outside_checkpoints_is_one_line_too(ds, tmp_path, monkeypatch):
    """The encoder file at the end of the run: one line with the path; --resume then finishes."""
    import safetensors.torch

    run = tmp_path / "run"
    real = safetensors.torch.save_file

    def full(state, filename, metadata=None):
        raise OSError(errno.ENOSPC, "No space left on device", str(filename))

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(UserError) as err:
        pretrain("mae", ds, run, overrides=TINY_MAE + ["trainer.max_steps=2", "data.val_fraction=0"])
    assert "encoder.safetensors.tmp: disk full" in str(err.value) and "\n" not in str(err.value)
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    assert pretrain("mae", ds, run, resume=True)["encoder"] == run / "encoder.safetensors"


def test_write_checkpoint_checks_free_space_and_catches_enospc_inside_torch(tmp_path, monkeypatch):
    ck = {"state_dict": {"w": torch.zeros(250_000)}, "global_step": 1}  # 1 MB of tensors
    path = tmp_path / "last.ckpt"
    write_checkpoint(ck, path)
    before = path.read_bytes()
    # a disk that reports too little room: refused before writing, the old file untouched
    monkeypatch.setattr(engine.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(UserError, match=r"last.ckpt: disk full: a checkpoint of about 1 MB does not fit \(0 MB free"):
        write_checkpoint({**ck, "global_step": 2}, path)
    monkeypatch.undo()
    # ENOSPC from the file while torch writes (torch wraps it in a RuntimeError)

    class Full(io.FileIO):
        def write(self, b):
            if self.tell() > 4000:
                raise OSError(errno.ENOSPC, "No space left on device")
            return super().write(b)

    monkeypatch.setattr(engine, "open", lambda p, mode: Full(p, mode.replace("b", "")), raising=False)
    with pytest.raises(UserError, match="last.ckpt: disk full"):
        write_checkpoint({**ck, "global_step": 3}, path)
    assert path.read_bytes() == before and not list(tmp_path.glob("*.tmp"))


def test_a_stale_partial_write_is_removed_on_resume(run5, ds):
    (run5 / "checkpoints" / "last.ckpt.tmp").write_bytes(b"PK\x03\x04 half a checkpoint")
    pretrain("mae", ds, run5, resume=True, overrides=["trainer.max_steps=6"])
    assert not (run5 / "checkpoints" / "last.ckpt.tmp").exists()
    assert "removed last.ckpt.tmp" in (run5 / "logs" / "pretrain.log").read_text()


class _DamageBest(L.Callback):
    def on_train_end(self, trainer, pl_module):
        _truncate(Path(trainer.default_root_dir) / "checkpoints" / "best.ckpt")


def test_a_damaged_best_checkpoint_does_not_stop_the_export(ds, tmp_path):
    run = tmp_path / "run"
    res = pretrain("mae", ds, run, callbacks=[_DamageBest()],
                   overrides=TINY_MAE + ["trainer.max_steps=5", "data.val_fraction=0.25"])
    import json

    meta = json.loads((run / "encoder.json").read_text())
    assert res["encoder"].is_file() and meta["training"]["weights"] == "last"
    assert "best.ckpt: unreadable (ValueError: a zip file cut short" in (run / "logs" / "pretrain.log").read_text()


def test_a_lower_keep_checkpoints_on_resume_prunes_and_does_not_crash(ds, tmp_path):
    """Lightning restores the kept-file list of the old setting (KeyError '' or no pruning without the fix)."""
    run = tmp_path / "run"
    pretrain("mae", ds, run, overrides=TINY_MAE + ["trainer.max_steps=1", "data.val_fraction=0"])
    pretrain("mae", ds, run, resume=True, overrides=["trainer.max_steps=3", "trainer.keep_checkpoints=1"])
    assert sorted(p.name for p in (run / "checkpoints").glob("step*.ckpt")) == ["step0000003.ckpt"]
    run2 = tmp_path / "run2"
    pretrain("mae", ds, run2, overrides=TINY_MAE + ["trainer.max_steps=3", "data.val_fraction=0"])
    pretrain("mae", ds, run2, resume=True, overrides=["trainer.max_steps=4", "trainer.keep_checkpoints=1"])
    assert sorted(p.name for p in (run2 / "checkpoints").glob("step*.ckpt")) == ["step0000004.ckpt"]
    assert "removed step0000001.ckpt (trainer.keep_checkpoints=1)" in (run2 / "logs" / "pretrain.log").read_text()
