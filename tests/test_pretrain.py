"""The pretraining engine: CLI run folder, exact resume, DDP on CPU, samplers, config errors."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from radpretrain.cli import main
from radpretrain.synthetic.toy import make_toy_store
from radpretrain.errors import UserError
from radpretrain.models.weights import load_run_encoder
from radpretrain.pretrain import EpochBatchSampler, pretrain, resolve_config, select_images

FAST = ["trainer.enable_progress_bar=false", "data.num_workers=0", "trainer.cpu_threads=1",
        "previews.every_n_epochs=0", "model.kwargs={depth: 2}", "data.batch_size=8", "trainer.log_every_n_steps=1"]
TINY_MAE = FAST + ["data.image_size=32", "model.patch_size=8", "mae.decoder_dim=32", "mae.decoder_depth=1",
                   "mae.decoder_heads=2"]


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return make_toy_store(tmp_path_factory.mktemp("toy") / "ds", n_patients=24, images_per_patient=2)


def losses(run: Path) -> pd.Series:
    df = pd.read_csv(run / "logs" / "csv" / "metrics.csv")
    df = df.dropna(subset=["train/loss"]).drop_duplicates("step", keep="last")
    return df.set_index("step")["train/loss"]


def test_cli_mae_writes_a_complete_run(ds, tmp_path, capsys):
    run = tmp_path / "run"
    rc = main(["pretrain", "--method", "mae", "--data", str(ds), "--out", str(run),
               "trainer.max_steps=30", "data.image_size=64", *FAST])
    assert rc == 0
    for f in ("config.yaml", "versions.json", "encoder.safetensors", "encoder.json", "checkpoints/last.ckpt",
              "logs/csv/metrics.csv", "logs/pretrain.log"):
        assert (run / f).is_file(), f
    assert list((run / "logs" / "tensorboard").glob("events.out.tfevents.*"))
    assert list((run / "previews").glob("mae_reconstruction_*.png"))
    model, meta = load_run_encoder(run)  # plain timm rebuild
    assert meta["arch"] == "vit_tiny_patch16_224" and meta["image_size"] == 64 and meta["resize"] == "letterbox"
    pre = meta["preprocessing"]
    assert 0 < pre["mean"] < 1 and 0 < pre["std"] < 1 and pre["intensity"] == "radpretrain-ingest-v1"
    with torch.no_grad():
        assert model(torch.rand(1, 1, 64, 64)).shape == (1, 192)
    assert len(losses(run)) == 30
    cfg = (run / "config.yaml").read_text()
    assert "max_steps: 30" in cfg and "mean: " in cfg
    # a second start into the same folder is refused; --resume of a finished run is fine
    assert main(["pretrain", "--method", "mae", "--data", str(ds), "--out", str(run)]) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_resume_continues_exactly(ds, tmp_path):
    """A run killed after step 3 (mid-epoch) and resumed gives the same losses and weights."""
    common = TINY_MAE + ["trainer.max_steps=8", "trainer.checkpoint_every_n_steps=3", "data.val_fraction=0.25",
                         "export.weights=last"]
    full = tmp_path / "full"
    pretrain("mae", ds, full, overrides=common)
    # simulate the kill: a run folder holding only what existed at step 3
    cut = tmp_path / "cut"
    (cut / "checkpoints").mkdir(parents=True)
    shutil.copy(full / "config.yaml", cut / "config.yaml")
    shutil.copy(full / "checkpoints" / "step0000003.ckpt", cut / "checkpoints" / "last.ckpt")
    res = pretrain("mae", ds, cut, resume=True)
    assert res["global_step"] == 8
    a, b = losses(full), losses(cut)
    assert list(b.index) == [3, 4, 5, 6, 7]
    assert torch.allclose(torch.tensor(a.loc[3:].to_numpy()), torch.tensor(b.to_numpy()), atol=1e-5), (a, b)
    wa, wb = load_file(full / "encoder.safetensors"), load_file(cut / "encoder.safetensors")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


def _slurm_env(rank: int, port: int) -> dict:
    """What ``srun`` sets for task ``rank`` of a one-node, two-task job (``--ntasks-per-node=2``)."""
    return {"SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_NNODES": "1", "SLURM_NODEID": "0",
            "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank), "SLURM_JOB_NAME": "radpretrain-test",
            "SLURM_JOB_ID": "4242", "SLURM_NODELIST": "localhost", "MASTER_PORT": str(port)}


@pytest.mark.parametrize("launcher", ["torchrun", "slurm"])
def test_ddp_two_processes_match_one(ds, tmp_path, launcher, rel_err):
    """2 CPU processes (gloo), batch 4 each == 1 process, batch 8 (same global batches).

    Launched by torchrun, or as the two tasks of a SLURM job (the variables srun sets; devices
    and nodes come from them through ``trainer.devices/num_nodes: auto`` and Lightning's SLURM
    environment)."""
    common = FAST + ["data.image_size=32", "model.backbone=vit_tiny", "model.patch_size=8", "model.pretrained=none",
                     "augment.enabled=false", "metadata.dropout=0.0", "trainer.max_steps=3", "data.val_fraction=0.0",
                     "trainer.accelerator=cpu", "export.weights=last", "optim.name=sgd", "optim.lr=0.01",
              "optim.weight_decay=0.0"]  # SGD: Adam would amplify float noise in zero-gradient biases
    one = tmp_path / "one"
    pretrain("metadata", ds, one, overrides=common + ["data.batch_size=8"])
    two = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RADPRETRAIN_LOGLEVEL": "WARNING"}
    args = ["-m", "radpretrain.cli", "pretrain", "--method", "metadata", "--data", str(ds), "--out", str(two),
            *common, "data.batch_size=4"]
    if launcher == "torchrun":
        p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args],
                           env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        err = p.stderr
    else:
        import socket

        with socket.socket() as s:  # a free port for the rendezvous
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        procs = [subprocess.Popen([sys.executable, *args], env={**env, **_slurm_env(r, port)}, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for r in range(2)]
        try:
            outs = [pr.communicate(timeout=300)[0] for pr in procs]
        finally:
            for pr in procs:
                pr.kill()
        assert [pr.returncode for pr in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
        err = "".join(outs)
        assert "SLURM auto-requeueing enabled" in err, err[-2000:]  # Lightning took the SLURM environment
    assert "MEMBER: 2/2" in err and "distributed_backend=gloo" in err, err[-2000:]
    wa, wb = load_file(one / "encoder.safetensors"), load_file(two / "encoder.safetensors")
    # one process with batch 2b vs two with b: other reduction orders, so relative norms per tensor
    diffs = {k: rel_err(wa[k], wb[k]) for k in wa if wa[k].is_floating_point() and float(wb[k].norm()) > 0}
    assert max(diffs.values()) < 1e-4, sorted(diffs.items(), key=lambda kv: -kv[1])[:3]
    la, lb = losses(one), losses(two)
    assert len(la) == len(lb) == 3
    assert rel_err(la.to_numpy(), lb.to_numpy()) < 1e-4, (la, lb)
    assert la.iloc[-1] < la.iloc[0]  # it trained


def test_epoch_batch_sampler_shards_and_skips():
    one = EpochBatchSampler(20, 8, seed=3, world=1)
    r0 = EpochBatchSampler(20, 4, seed=3, rank=0, world=2)
    r1 = EpochBatchSampler(20, 4, seed=3, rank=1, world=2)
    for s in (one, r0, r1):
        s.set_epoch(2)
    b1, b0, b1r = list(one), list(r0), list(r1)
    assert len(b1) == len(b0) == len(b1r) == 2
    for g, x, y in zip(b1, b0, b1r):
        assert sorted(g) == sorted(x + y)          # same global batches
    one.set_epoch(3)
    assert list(one) != b1                       # reshuffled per epoch
    one.set_epoch(2)
    one.skip_batches(2, 1)
    assert list(one) == b1[1:] and list(one) == b1   # skip applies once
    w = EpochBatchSampler(20, 10, seed=0, weights=[1.0] * 10 + [0.0] * 10)
    assert all(i < 10 for b in w for i in b)


def test_select_images_patient_grouped_val_and_cap(ds):
    from radpretrain.data.store import Store

    store = Store(ds)
    cfg = resolve_config("mae", overrides=["data.val_fraction=0.25", "+data.max_per_patient=1"], data=str(ds))
    tr, va = select_images(store, cfg)
    pid = store.images["patient_id"].to_numpy()
    assert not set(pid[tr]) & set(pid[va])
    assert len(set(pid[tr])) == len(tr) and len(set(pid[va])) == len(va)  # at most one per patient
    assert len(va) == 6


def test_config_errors_are_user_errors(ds, tmp_path):
    with pytest.raises(UserError, match="unknown key"):
        resolve_config("mae", overrides=["trainer.max_stepz=3"])
    with pytest.raises(UserError, match="nothing to resume|no config"):
        pretrain("mae", ds, tmp_path / "none", resume=True)
    with pytest.raises(UserError, match="data.resize"):
        pretrain("mae", ds, tmp_path / "bad", overrides=["data.resize=crop"])
    for bad in ("two", 0, 1.5):
        with pytest.raises(UserError, match="trainer.cpu_threads"):
            pretrain("mae", ds, tmp_path / "bad", overrides=[f"trainer.cpu_threads={bad}"])


def test_bucket_batches_reach_mae_and_balance_weights(ds, tmp_path):
    import lightning as L
    import numpy as np

    from radpretrain.data.store import Store
    from radpretrain.pretrain import balance_weights

    shapes = set()

    class Shapes(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            shapes.add(tuple(batch["image"].shape[-2:]))

    res = pretrain("mae", ds, tmp_path / "bk", overrides=TINY_MAE + ["data.batch_size=4", "trainer.max_steps=10",
                                                                     "data.resize=bucket"], callbacks=[Shapes()])
    assert res["global_step"] == 10 and len(shapes) >= 2 and any(h != w for h, w in shapes)
    store = Store(ds)
    rows = np.arange(len(store.images))[:20]
    w = balance_weights(store.images, rows, "body_part")
    parts = store.images["body_part"].to_numpy()[rows]
    totals = {p: w[parts == p].sum() for p in set(parts)}
    assert np.allclose(list(totals.values()), 1.0)
    assert balance_weights(store.images, rows, "none") is None


def test_input_stats_follow_the_start_weights(ds, tmp_path):
    from radpretrain.data.store import Store
    from radpretrain.models.backbones import grey_stats
    from radpretrain.pretrain import input_stats

    store = Store(ds)
    rows = np.arange(len(store.images))
    # continuing from ImageNet weights keeps their own input statistics (lite0: 0.5 / 0.5) ...
    cfg = resolve_config("simclr", data=str(ds))
    m, s, src = input_stats(cfg, store, rows, 0)
    assert (m, s) == pytest.approx(grey_stats("tf_efficientnet_lite0")) and src.startswith("weights")
    assert (m, s) == pytest.approx((0.5, 0.5))
    # ... random init and data.stats=dataset measure the images instead
    measured = input_stats(resolve_config("simclr", overrides=["data.stats=dataset"], data=str(ds)), store, rows, 0)
    scratch = input_stats(resolve_config("simclr", overrides=["model.pretrained=none"], data=str(ds)), store, rows, 0)
    assert measured[2] == scratch[2] == "dataset" and measured[:2] == pytest.approx(scratch[:2])
    assert abs(measured[0] - 0.5) > 0.01 or abs(measured[1] - 0.5) > 0.01
    # a radpretrain encoder file as start: the statistics in the .json beside it
    (tmp_path / "enc.safetensors").write_bytes(b"")
    (tmp_path / "enc.json").write_text('{"preprocessing": {"mean": 0.31, "std": 0.27}}')
    cfg = resolve_config("simclr", overrides=[f"model.pretrained={tmp_path / 'enc.safetensors'}"], data=str(ds))
    assert input_stats(cfg, store, rows, 0)[:2] == (0.31, 0.27)
    with pytest.raises(UserError, match="data.stats=weights"):
        input_stats(resolve_config("simclr", overrides=["model.pretrained=none", "data.stats=weights"], data=str(ds)),
                    store, rows, 0)
    with pytest.raises(UserError, match="data.stats"):
        pretrain("simclr", ds, tmp_path / "bad", overrides=["data.stats=median"])


def test_every_packaged_preset_resolves():
    import yaml

    from radpretrain.config import preset_names, preset_text

    names = preset_names()
    assert {"simclr_cpu", "simclr_local", "mae_cpu", "deepcluster_cpu", "genesis_cpu", "metadata_cpu"} <= set(names)
    for name in names:
        method = yaml.safe_load(preset_text(name))["method"]
        cfg = resolve_config(method, config=name)  # unknown keys would raise
        assert resolve_config(None, config=name) == cfg  # the preset names its method
        assert cfg["method"] == method and cfg["data"]["image_size"] > 0, name


@pytest.mark.parametrize("freeze", [True, False])
def test_freeze_bn_stats_through_the_engine(ds, tmp_path, freeze):
    """A real Lightning run (with a validation pass in between): frozen statistics stay the start's."""
    run = tmp_path / "run"
    pretrain("metadata", ds, run, overrides=[*FAST, "model.backbone=resnet18", "model.pretrained=none",
                                             "model.kwargs={}", "data.image_size=32", "trainer.max_steps=6",
                                             "trainer.max_epochs=3", "data.val_fraction=0.2", "export.weights=last",
                                             f"model.freeze_bn_stats={str(freeze).lower()}"])
    state = load_file(str(run / "encoder.safetensors"))
    means = [v for k, v in state.items() if k.endswith("running_mean")]
    varis = [v for k, v in state.items() if k.endswith("running_var")]
    assert len(means) == 20
    start_like = all(torch.equal(m, torch.zeros_like(m)) for m in means) and all(torch.equal(v, torch.ones_like(v)) for v in varis)
    assert start_like is freeze  # random init starts at mean 0 / var 1
    assert int(state["bn1.num_batches_tracked"]) == (0 if freeze else 6)
    assert not torch.equal(state["bn1.weight"], torch.ones_like(state["bn1.weight"]))  # the affine part trained


class _KeepEncoderState(L.Callback):
    """A callback keeping a copy of the encoder's weights as they are in memory when fit ends."""

    def __init__(self):
        self.state = None

    def on_fit_end(self, trainer, module):
        self.state = {k: v.detach().clone() for k, v in module.export_encoder_module().state_dict().items()}


def test_channels_last_trains_the_same_and_exports_plain_weights(ds, tmp_path):
    """tf_efficientnet_lite0 on CPU switches to NHWC weights by default; the run must not change.

    SGD and frozen encoder BatchNorm statistics: with batch statistics the gradients of biases
    that a BatchNorm follows are rounding noise, which Adam would scale up to lr-sized steps.

    Tolerances: NHWC and NCHW convolutions add in different orders, and which kernels run
    depends on the CPU (oneDNN picks AVX2, AVX-512 or AMX code, which differ between Intel and
    AMD machines).  Three SGD steps carry that rounding into the weights (measured: ~2e-5
    relative on one Intel Xeon, ~1e-4 absolute on an AMD EPYC), and features of the two runs
    then differ by ~3e-4 of their norm (Intel).  So losses are compared with rtol 1e-3 and
    features by relative norm with 1e-2: still far below a real export fault (transposed or
    wrongly strided weights change the features by O(1) of their norm).  What does not depend on
    the CPU is checked exactly: the exported file holds exactly the weights in memory, as plain
    contiguous tensors."""
    common = [*FAST, "model.backbone=tf_efficientnet_lite0", "model.pretrained=imagenet", "model.kwargs={}",
              "data.image_size=32", "trainer.max_steps=3", "export.weights=last", "data.val_fraction=0",
              "model.freeze_bn_stats=true", "optim.name=sgd", "optim.lr=0.001"]
    runs, kept = {}, {}
    for v in ("auto", "false"):
        runs[v] = tmp_path / v
        kept[v] = _KeepEncoderState()
        pretrain("simclr", ds, runs[v], overrides=[*common, f"trainer.channels_last={v}"], callbacks=[kept[v]])
    assert "channels_last memory format on" in (runs["auto"] / "logs" / "pretrain.log").read_text()
    assert "channels_last memory format on" not in (runs["false"] / "logs" / "pretrain.log").read_text()
    for v in runs:  # the export is exactly what was in memory, as plain contiguous tensors
        saved = load_file(runs[v] / "encoder.safetensors")
        assert saved.keys() == kept[v].state.keys()
        for k, t in saved.items():
            assert t.is_contiguous() and torch.equal(t, kept[v].state[k]), (v, k)
    a, b = losses(runs["auto"]), losses(runs["false"])
    assert len(a) == 3 and np.allclose(a.to_numpy(), b.to_numpy(), rtol=1e-3, atol=0)
    assert abs(a.iloc[-1] - a.iloc[0]) > 1e-3  # it did train
    model, _ = load_run_encoder(runs["auto"])  # a plain timm rebuild loads the NHWC run's weights
    ref, _ = load_run_encoder(runs["false"])
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fa, fb = model(x), ref(x)
    assert float((fa - fb).norm() / fb.norm()) < 1e-2
    with pytest.raises(UserError, match="trainer.channels_last"):
        pretrain("simclr", ds, tmp_path / "bad", overrides=[*common, "trainer.channels_last=maybe"])


def test_cpu_threads_auto_sets_one_thread_per_idle_core(ds, tmp_path):
    before = torch.get_num_threads()
    run = tmp_path / "run"
    try:
        pretrain("mae", ds, run, overrides=[o for o in TINY_MAE if not o.startswith("trainer.cpu_threads")]
                 + ["trainer.cpu_threads=auto", "trainer.max_steps=1"])
        usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        assert 1 <= torch.get_num_threads() <= usable
        log = (run / "logs" / "pretrain.log").read_text()
        assert f"cpu threads: {torch.get_num_threads()} (trainer.cpu_threads=auto;" in log
        assert f"cpu_threads: {torch.get_num_threads()}\n" in (run / "config.yaml").read_text()  # what ran
    finally:
        torch.set_num_threads(before)


def test_resize_on_the_device_trains_like_the_loader_path(ds, tmp_path, rel_err):
    """data.resize_on=device (the GPU path, run here on CPU tensors): workers send stored pixels, the
    engine letterboxes each batch after the transfer; the loss curve is the loader path's to within the
    1/255 pixel tolerance of the two kernels (tests/data/test_geometry.py)."""
    common = TINY_MAE + ["trainer.max_steps=4", "data.val_fraction=0.25", "export.weights=last"]
    runs = {}
    for where in ("loader", "device"):
        runs[where] = tmp_path / where
        pretrain("mae", ds, runs[where], overrides=common + [f"data.resize_on={where}"])
    log = (runs["device"] / "logs" / "pretrain.log").read_text()
    assert "images resized to 32 px on the device, in batches (data.resize_on=device)" in log
    assert "in the loader workers (data.resize_on=loader)" in (runs["loader"] / "logs" / "pretrain.log").read_text()
    a, b = losses(runs["loader"]), losses(runs["device"])
    assert len(a) == len(b) == 4 and rel_err(b.to_numpy(), a.to_numpy()) < 2e-3, (a, b)
    val = [pd.read_csv(r / "logs" / "csv" / "metrics.csv")["val/loss"].dropna().to_numpy() for r in runs.values()]
    assert len(val[0]) and rel_err(val[1], val[0]) < 2e-3
    # a method that transforms samples in the workers (the sample_transform hook; no packaged method
    # does since the Genesis corruptions moved to the device) needs resized images there
    from radpretrain.pretrain.data import resize_on_device

    class PerSample:
        method_name = "per_sample"

        def sample_transform(self):
            return lambda item: item

    cfg = {"data": {"resize_on": "device"}}
    with pytest.raises(UserError, match="data.resize_on=device: method 'per_sample'"):
        resize_on_device(cfg, PerSample(), "cuda")
    assert not resize_on_device({"data": {"resize_on": "auto"}}, PerSample(), "cuda")


COMPILE_RUN = FAST + ["data.image_size=32", "model.backbone=vit_tiny", "model.patch_size=8", "model.pretrained=none",
                      "model.kwargs={depth: 1}", "augment.enabled=false", "metadata.dropout=0.0", "trainer.max_steps=3",
                      "data.val_fraction=0.0", "export.weights=last", "trainer.checkpoint_every_n_steps=0",
                      "optim.name=sgd", "optim.lr=0.01", "optim.weight_decay=0.0"]  # SGD: Adam amplifies float noise


def test_compiled_run_gives_the_eager_loss_curve(ds, tmp_path, rel_err):
    """trainer.compile=default on CPU (inductor, gcc): the same losses and weights as eager, to a relative
    tolerance that holds for any x86 CPU (fused kernels reorder float sums).  The smallest encoder (a
    one-block ViT) and 3 steps: about 60-70 s on the 2-core machine with a cold inductor cache (3-5 s warm)."""
    import torch._dynamo

    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    pretrain("metadata", ds, eager, overrides=COMPILE_RUN)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    pretrain("metadata", ds, compiled, overrides=COMPILE_RUN + ["trainer.compile=default"])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # something was really compiled
    log = (compiled / "logs" / "pretrain.log").read_text()
    assert "trainer.compile=default: torch.compile of encoder" in log and "runs eagerly" not in log
    la, lb = losses(eager), losses(compiled)
    assert len(la) == len(lb) == 3 and rel_err(lb.to_numpy(), la.to_numpy()) < 1e-4, (la, lb)
    wa, wb = load_file(eager / "encoder.safetensors"), load_file(compiled / "encoder.safetensors")
    assert set(wa) == set(wb)  # plain timm keys, no _orig_mod. prefix
    diffs = {k: rel_err(wb[k], wa[k]) for k in wa if float(wa[k].norm()) > 0}
    assert max(diffs.values()) < 1e-4, sorted(diffs.items(), key=lambda kv: -kv[1])[:3]
    assert "compile: default" in (compiled / "config.yaml").read_text()


def test_compile_falls_back_to_eager_with_one_line(ds, tmp_path, monkeypatch, caplog):
    from radpretrain.pretrain import trainer as engine_trainer

    # no C compiler: not compiled, said once, and the run is the eager run
    monkeypatch.setattr(engine_trainer.shutil, "which", lambda name: None)
    res = pretrain("metadata", ds, tmp_path / "nocc", overrides=COMPILE_RUN + ["trainer.compile=max-autotune"])
    assert res["global_step"] == 3
    log = (tmp_path / "nocc" / "logs" / "pretrain.log").read_text()
    assert "trainer.compile=max-autotune: not compiled, no C/C++ compiler found" in log
    monkeypatch.undo()
    # a compile that fails at the first call (an unsupported op, a broken backend): eager from then on

    class Boom(torch.nn.Module):
        def forward(self, x):
            return x * 2

    m = Boom()
    w = engine_trainer.CompiledForward(m, "default", "boom")
    w.compiled = lambda x: (_ for _ in ()).throw(RuntimeError("backend failed\nlong trace"))
    m.forward = w
    x = torch.ones(2)
    assert torch.equal(m(x), x * 2) and torch.equal(m(x), x * 2)
    assert w.failed == "RuntimeError: backend failed" and w.calls == 0
    assert sum("boom not compiled (RuntimeError: backend failed); it runs eagerly" in r.message
               for r in caplog.records) == 1
    with pytest.raises(UserError, match="trainer.compile"):
        resolve_config("metadata", None, ["trainer.compile=fast"])
