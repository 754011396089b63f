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
