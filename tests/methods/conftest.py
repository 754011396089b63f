"""Shared helpers for the method tests."""

import pytest


@pytest.fixture
def loss_before_after():
    """``f(model, opt, eval_loss, steps)``: ``eval_loss()`` before and after ``steps`` optimiser
    steps on ``model.compute_loss(batch, i)`` (a tensor or a dict with ``loss``)."""

    def run(model, opt, batch, eval_loss, steps: int) -> tuple[float, float]:
        before = eval_loss()
        for i in range(steps):
            out = model.compute_loss(batch, i)
            loss = out["loss"] if isinstance(out, dict) else out
            opt.zero_grad()
            loss.backward()
            opt.step()
        return before, eval_loss()

    return run
