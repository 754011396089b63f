"""DINO: multi-crop grey views, EMA teacher (no gradients, exported), lightly's DINO loss goes down."""

import math

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from radpretrain.data.dataset import StoreDataset
from radpretrain.synthetic.toy import make_toy_store
from radpretrain.methods.dino import DINO
from radpretrain.models.weights import load_run_encoder
from radpretrain.pretrain import pretrain

CFG = {"seed": 0, "data": {"image_size": 32, "mean": 0.3, "std": 0.2},
       "model": {"backbone": "resnet18", "pretrained": "none"},
       "dino": {"output_dim": 64, "hidden_dim": 64, "bottleneck_dim": 32, "n_local": 3, "local_size": 16}}


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_toy_store(tmp_path_factory.mktemp("toy") / "ds", n_patients=12, images_per_patient=2)


@pytest.fixture(scope="module")
def batch(toy):
    ds = StoreDataset(toy, image_size=32)
    return torch.utils.data.default_collate([ds[i] for i in range(16)])


def test_views_have_the_configured_sizes_and_follow_the_seed(batch):
    m = DINO(CFG)
    glob, loc = m.views(batch["image"], torch.Generator().manual_seed(0))
    assert [v.shape for v in glob] == [(16, 1, 32, 32)] * 2
    assert [v.shape for v in loc] == [(16, 1, 16, 16)] * 3
    again, loc2 = m.views(batch["image"], torch.Generator().manual_seed(0))
    other, _ = m.views(batch["image"], torch.Generator().manual_seed(1))
    assert all(torch.equal(a, b) for a, b in zip(glob + loc, again + loc2))   # resume-exact
    assert (glob[0] - other[0]).abs().mean() > 0.01 and (glob[0] - glob[1]).abs().mean() > 0.01
    assert all(v.min() >= 0 and v.max() <= 1 for v in glob + loc)


def test_loss_decreases_on_toy_store(batch, loss_before_after):
    torch.manual_seed(0)
    m = DINO(CFG)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)

    def eval_loss():  # fixed views and centre (restored: the loss updates it)
        centre = m.criterion.center.clone()
        with torch.no_grad():
            g = torch.Generator().manual_seed(99)
            glob, loc = m.views(batch["image"], g)
            t = m.teacher_head(m.teacher(m.normalize(torch.cat(glob))))
            s = m.head(torch.cat([m.encoder(m.normalize(torch.cat(glob))), m.encoder(m.normalize(torch.cat(loc)))]))
            loss = float(m.criterion(list(t.chunk(2)), list(s.split(16))))
        m.criterion.center.copy_(centre)
        return loss

    before, after = loss_before_after(m, opt, batch, eval_loss, 6)
    assert after < 0.9 * before, (before, after)


def test_teacher_gets_no_gradients_and_is_the_ema_of_the_student(batch):
    m = DINO({**CFG, "dino": {**CFG["dino"], "momentum_teacher": 0.5}})
    m.total_steps_hint = 100
    assert m.momentum(0) == pytest.approx(0.5) and m.momentum(99) == 1.0 and 0.5 < m.momentum(50) < 1.0
    assert not any(p.requires_grad for p in [*m.teacher.parameters(), *m.teacher_head.parameters()])
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
    m.compute_loss(batch, 0).backward()
    assert all(p.grad is None for p in [*m.teacher.parameters(), *m.teacher_head.parameters()])
    opt.step()
    old = {k: v.clone() for k, v in m.teacher.state_dict().items()}
    old_head = {k: v.clone() for k, v in m.teacher_head.state_dict().items()}
    m.update_teacher()  # global step 0 -> momentum 0.5
    student, teacher = dict(m.encoder.named_parameters()), dict(m.teacher.named_parameters())
    assert any(not torch.equal(old[k], student[k]) for k in student)  # the step moved the student away
    for k, p in teacher.items():
        assert torch.allclose(p, 0.5 * old[k] + 0.5 * student[k], atol=1e-6), k
    for k, p in m.teacher_head.named_parameters():
        assert torch.allclose(p, 0.5 * old_head[k] + 0.5 * dict(m.head.named_parameters())[k], atol=1e-6), k


def test_last_layer_frozen_in_the_first_epoch(batch):
    for epochs, frozen in ((1, True), (0, False)):
        m = DINO({**CFG, "dino": {**CFG["dino"], "freeze_last_layer": epochs}})
        m.compute_loss(batch, 0).backward()
        m.on_after_backward()  # current_epoch 0
        assert (m.head.last_layer.weight_v.grad is None) is frozen
        assert m.head.layers[0].weight.grad is not None


@pytest.mark.parametrize("freeze", [True, False])
def test_freeze_bn_stats_holds_the_teacher_too(batch, freeze):
    m = DINO({**CFG, "model": {**CFG["model"], "freeze_bn_stats": freeze}}).train()
    start = m.teacher.bn1.running_mean.clone()
    m.compute_loss(batch, 0)
    for net in (m.encoder, m.teacher):
        assert all(b.training is not freeze for b in net.modules() if isinstance(b, torch.nn.BatchNorm2d))
    assert torch.equal(m.teacher.bn1.running_mean, start) is freeze


def test_vit_student_takes_local_views_and_previews(batch, tmp_path):
    m = DINO({**CFG, "model": {"backbone": "vit_tiny", "pretrained": "none", "patch_size": 8, "kwargs": {"depth": 1}}})
    assert torch.isfinite(m.compute_loss(batch, 0))
    (p,) = m.save_previews(batch, tmp_path)
    from PIL import Image

    assert Image.open(p).size == (8 * 34, 3 * 34)  # rows: input, global view, local view (8 images, 2-px gaps)
    meta = m.encoder_meta()
    assert meta["dino"]["exported"] == "teacher" and meta["dino"]["local_size"] == 16
    with pytest.raises(Exception, match="multiple of model.patch_size"):
        DINO({**CFG, "model": {"backbone": "vit_tiny", "pretrained": "none", "patch_size": 8},
              "dino": {**CFG["dino"], "local_size": 12}})


class _CheckEMA(L.Callback):
    """After every optimiser step: teacher = m * old teacher + (1 - m) * student, no teacher grads."""

    def __init__(self):
        self.checked = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.old = {k: v.detach().clone() for k, v in pl_module.teacher.named_parameters()}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        assert all(p.grad is None for p in pl_module.teacher.parameters())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        s = trainer.global_step - 1  # max_steps 3: momentum 0.5 -> 1 on a cosine over steps 0..2
        m = 1 - 0.5 * (math.cos(math.pi * s / 2) + 1) / 2
        student = dict(pl_module.encoder.named_parameters())
        for k, p in pl_module.teacher.named_parameters():
            assert torch.allclose(p, m * self.old[k] + (1 - m) * student[k], atol=1e-6), (s, k)
        self.checked.append(m)


def test_engine_run_exports_the_teacher(toy, tmp_path):
    run = tmp_path / "run"
    check = _CheckEMA()
    res = pretrain("dino", toy, run, callbacks=[check], overrides=[
        "trainer.enable_progress_bar=false", "data.num_workers=0", "trainer.cpu_threads=1", "previews.every_n_epochs=0",
        "data.batch_size=8", "trainer.log_every_n_steps=1", "data.image_size=32", "model.backbone=resnet18",
        "model.pretrained=none", "dino.n_local=2", "dino.output_dim=64", "dino.hidden_dim=64",
        "dino.momentum_teacher=0.5", "trainer.max_steps=3"])
    assert res["global_step"] == 3 and check.checked == pytest.approx([0.5, 0.75, 1.0])
    assert (run / "encoder.safetensors").is_file() and (run / "encoder.json").is_file()
    exported = load_file(run / "encoder.safetensors")
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    assert all(torch.equal(v, state[f"teacher.{k}"]) for k, v in exported.items())
    assert any(not torch.equal(v, state[f"encoder.{k}"]) for k, v in exported.items() if v.is_floating_point())
    model, meta = load_run_encoder(run)  # a plain timm model
    assert meta["method"] == "dino" and meta["dino"]["exported"] == "teacher" and meta["training"]["weights"] == "last"
    with torch.no_grad():
        assert model(torch.rand(2, 1, 32, 32)).shape == (2, 512)
