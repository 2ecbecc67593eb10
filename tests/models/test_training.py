"""Training steps, the learning-rate schedule and the random streams a resume restores. (A resumed stage continuing
bit-identically through a real checkpoint is tested on the pipeline's own path: tests/tasks/test_loop.py.)"""

import pytest
import torch

from models.training import capture_rng, lr_at, restore_rng, train_step
from tests.models.conftest import VOCAB, tiny_palm


def fresh():
    palm = tiny_palm(seed=0)
    return palm, torch.optim.AdamW(palm.parameters(), lr=1e-2)


def test_rng_capture_covers_torch_and_named_generators():
    g = torch.Generator().manual_seed(3)
    state = capture_rng({"data": g})
    assert set(state) >= {"rng.torch", "rng.data"} and all(isinstance(v, torch.Tensor) for v in state.values())
    expected = (torch.rand(3), torch.rand(3, generator=g))
    torch.rand(5), torch.rand(5, generator=g)  # the streams move on
    restore_rng(state, {"data": g})
    again = (torch.rand(3), torch.rand(3, generator=g))
    assert torch.equal(expected[0], again[0]) and torch.equal(expected[1], again[1])


@pytest.mark.parametrize("amp_dtype", [None, torch.float32, torch.bfloat16])
def test_train_step_runs_on_the_device_it_is_given(amp_dtype):
    palm, opt = fresh()
    before = [p.detach().clone() for p in palm.parameters()]
    seq = torch.randint(0, VOCAB, (2, 8))
    stats = train_step(lambda: palm(seq, return_loss=True), list(palm.parameters()), opt,
                       device=torch.device("cpu"), amp_dtype=amp_dtype)
    assert stats["loss"] > 0 and stats["grad_norm"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, palm.parameters()))
    assert all(p.dtype == torch.float32 for p in palm.parameters())


def test_train_step_passes_extra_metrics_through():
    palm, opt = fresh()
    seq = torch.randint(0, VOCAB, (2, 8))
    stats = train_step(lambda: (palm(seq, return_loss=True), {"accuracy": torch.tensor(0.25)}),
                       list(palm.parameters()), opt, device="cpu", max_grad_norm=None)
    assert stats["accuracy"] == 0.25


def test_a_non_finite_loss_stops_before_the_weights_are_touched():
    palm, opt = fresh()
    before = [p.detach().clone() for p in palm.parameters()]
    seq = torch.randint(0, VOCAB, (2, 8))
    with pytest.raises(FloatingPointError, match="loss is nan"):
        train_step(lambda: palm(seq, return_loss=True) * float("nan"), list(palm.parameters()), opt, device="cpu")
    assert all(torch.equal(a, b) for a, b in zip(before, palm.parameters()))


def test_train_step_clips_the_gradient_norm():
    palm, opt = fresh()
    seq = torch.randint(0, VOCAB, (2, 8))
    stats = train_step(lambda: palm(seq, return_loss=True) * 100, list(palm.parameters()), opt, device="cpu",
                       max_grad_norm=0.5)
    clipped = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in palm.parameters() if p.grad is not None]))
    assert stats["grad_norm"] > 0.5  # reported before clipping
    assert clipped.item() == pytest.approx(0.5, rel=1e-4)


def test_learning_rate_schedule_warms_up_then_decays_to_the_floor():
    kw = dict(lr=1.0, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    assert lr_at(0, **kw) == pytest.approx(0.1)
    assert lr_at(9, **kw) == pytest.approx(1.0)
    assert lr_at(10, **kw) == pytest.approx(1.0)
    assert lr_at(60, **kw) == pytest.approx(0.55)
    assert lr_at(110, **kw) == pytest.approx(0.1) and lr_at(500, **kw) == pytest.approx(0.1)
