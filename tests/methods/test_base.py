"""The shared method plumbing: optimiser choice and learning-rate schedule."""

import pytest
import torch

from radpretrain.errors import UserError
from radpretrain.methods.base import make_optimizer, warmup_cosine


def test_adamw_is_fused_on_cpu_and_steps_like_the_plain_one():
    torch.manual_seed(0)
    a = torch.nn.Linear(8, 4)
    b = torch.nn.Linear(8, 4)
    b.load_state_dict(a.state_dict())
    cfg = {"name": "adamw", "lr": 1e-2, "weight_decay": 0.05, "betas": [0.9, 0.95]}
    fused = make_optimizer(list(a.parameters()), cfg)
    plain = torch.optim.AdamW(b.parameters(), lr=1e-2, weight_decay=0.05, betas=(0.9, 0.95))
    assert fused.defaults["fused"] is True and plain.defaults["fused"] is not True
    x = torch.randn(16, 8)
    for _ in range(5):
        for m, opt in ((a, fused), (b, plain)):
            opt.zero_grad()
            m(x).pow(2).mean().backward()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


def test_sgd_and_unknown_optimiser():
    p = [torch.nn.Parameter(torch.zeros(3))]
    assert isinstance(make_optimizer(p, {"name": "sgd", "lr": 0.1}), torch.optim.SGD)
    with pytest.raises(UserError, match="optim.name"):
        make_optimizer(p, {"name": "lamb"})


def test_warmup_then_cosine():
    assert warmup_cosine(0, 10, 100) == pytest.approx(0.0, abs=0.11)
    assert warmup_cosine(10, 10, 100) == pytest.approx(1.0)
    assert warmup_cosine(100, 10, 100) == pytest.approx(0.01, abs=1e-6)
    assert warmup_cosine(55, 10, 100) < warmup_cosine(30, 10, 100)


class _TinyMethod:
    """A PretrainMethod with a small BatchNorm encoder, built lazily (Lightning import inside)."""

    @staticmethod
    def make(freeze: bool):
        from radpretrain.methods.base import PretrainMethod

        class Tiny(PretrainMethod):
            def __init__(self, cfg):
                super().__init__(cfg)
                self.encoder = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                                   torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
                self.head = torch.nn.Linear(4, 2)
                self.head_bn = torch.nn.BatchNorm1d(2)  # outside the encoder: always trains normally

        torch.manual_seed(0)
        return Tiny({"data": {"mean": 0.5, "std": 0.5}, "model": {"freeze_bn_stats": freeze}})


@pytest.mark.parametrize("freeze", [False, True])
def test_freeze_bn_stats_keeps_the_encoder_statistics_but_trains_its_weights(freeze):
    m = _TinyMethod.make(freeze)
    bn = m.encoder[1]
    bn.running_mean.fill_(0.3)
    bn.running_var.fill_(2.0)
    w0 = bn.weight.detach().clone()
    m.train()  # what Lightning calls at the start of fit and after each validation
    assert m.training and bn.training is (not freeze) and m.head_bn.training
    opt = make_optimizer(list(m.parameters()), {"lr": 1e-1})
    x = torch.rand(8, 1, 10, 10) * 3 + 1
    for _ in range(3):
        opt.zero_grad()
        m.head_bn(m.head(m.encoder(x))).pow(3).mean().backward()
        opt.step()
    assert not torch.equal(bn.weight, w0)  # scale and shift learn either way
    assert int(m.head_bn.num_batches_tracked) == 3
    if freeze:
        assert torch.allclose(bn.running_mean, torch.full((4,), 0.3)) and torch.allclose(bn.running_var, torch.full((4,), 2.0))
        assert int(bn.num_batches_tracked) == 0
    else:
        assert not torch.allclose(bn.running_mean, torch.full((4,), 0.3))
    m.eval()
    assert not bn.training and not m.head_bn.training


# -- methods describe themselves -------------------------------------------------------------
def test_every_discovered_method_describes_itself_and_has_its_preset():
    from radpretrain.config import is_preset
    from radpretrain.methods import METHODS, discover, get_method, method_modules
    from radpretrain.methods.base import Paper, Supervision

    names = discover()
    assert set(names) >= {"mae", "simclr", "dino", "deepcluster", "genesis", "metadata"}
    assert "radpretrain.methods.base" not in method_modules()
    for name in names:
        cls = get_method(name)
        assert cls is METHODS[name] and cls.method_name == name
        assert cls.display_name and isinstance(cls.paper, Paper) and isinstance(cls.supervision, Supervision)
        assert cls.paper.title in cls.paper.reference() and is_preset(f"{name}_cpu")
    assert get_method("mae").paper.reference() == (
        "He et al., Masked Autoencoders Are Scalable Vision Learners, CVPR 2022 (arXiv:2111.06377)")
    assert get_method("metadata").supervision.hub_tag == "weakly-supervised-learning"
    assert get_method("simclr").supervision.hub_tag == "self-supervised-learning"
    with pytest.raises(UserError, match=r"unknown method 'nope' \(choose from .*mae"):
        get_method("nope")


def test_register_refuses_a_method_that_does_not_say_what_it_is_or_has_no_preset():
    from radpretrain.methods import discover
    from radpretrain.methods.base import METHODS, Paper, PretrainMethod, Supervision, register

    paper = Paper("A title", ("Doe",), 2024, "Venue", "https://example.org/paper")

    class Unnamed(PretrainMethod):
        paper = None
        supervision = Supervision.CONTRASTIVE

    with pytest.raises(TypeError, match="display_name"):
        register("simclr")(Unnamed)

    class NoPaper(PretrainMethod):
        display_name = "No paper"
        supervision = Supervision.CONTRASTIVE

    with pytest.raises(TypeError, match="paper"):
        register("simclr")(NoPaper)

    class NoPreset(PretrainMethod):
        display_name = "No preset"
        paper = Paper("A title", ("Doe",), 2024, "Venue", "https://example.org/paper")
        supervision = Supervision.RESTORATION

    with pytest.raises(UserError, match=r"'nopreset' .* has no packaged preset configs/nopreset_cpu.yaml"):
        register("nopreset")(NoPreset)
    assert "nopreset" not in METHODS

    class Impostor(PretrainMethod):
        display_name = "Impostor"
        paper = Paper("A title", ("Doe",), 2024, "Venue", "https://example.org/paper")
        supervision = Supervision.CONTRASTIVE

    discover()  # every shipped method registered
    with pytest.raises(TypeError, match="'simclr' is already registered by radpretrain.methods.simclr"):
        register("simclr")(Impostor)
    assert METHODS["simclr"].__module__ == "radpretrain.methods.simclr"
    assert paper.reference() == "Doe, A title, Venue 2024 (https://example.org/paper)"


def _grid_columns(path) -> int:
    import numpy as np
    from PIL import Image

    grid = np.asarray(Image.open(path))
    return grid.shape[1]


@pytest.mark.parametrize("n", [3, 12])
def test_previews_show_previews_n_images(tmp_path, n):
    from radpretrain.data.dataset import StoreDataset
    from radpretrain.methods.simclr import SimCLR
    from radpretrain.synthetic.toy import make_toy_store

    root = make_toy_store(tmp_path / "toy", n_patients=8, images_per_patient=2)
    ds = StoreDataset(root, image_size=16)
    batch = torch.utils.data.default_collate([ds[i] for i in range(16)])
    m = SimCLR({"seed": 0, "data": {"image_size": 16, "mean": 0.3, "std": 0.2}, "previews": {"n": n},
                "model": {"backbone": "resnet18", "pretrained": "none"}})
    m.train()
    (p,) = m.save_previews(batch, tmp_path / "previews")
    assert p.name == "simclr_views_step0000000.png" and m.training  # the training mode is restored
    assert _grid_columns(p) == n * (16 + 2)  # n images and their 2-px gaps per row (was always 8)
    m.cfg["previews"]["n"] = 0
    assert m.save_previews(batch, tmp_path / "none") == []
