"""Training steps and resumable state: a resumed run continues bit-identically to one that never stopped."""

import io
import random

import pytest
import torch

from models.training import (capture_rng, lr_at, restore_rng, restore_training_state, train_step, training_state)
from tests.models.conftest import VOCAB, tiny_palm, tiny_trainer


def fresh():
    palm = tiny_palm(seed=0)
    return palm, torch.optim.AdamW(palm.parameters(), lr=1e-2)


def noisy_steps(palm, opt, n):
    """Steps that draw a random batch from the global RNG and Python's, as a data loader would."""
    for _ in range(n):
        seq = torch.randint(0, VOCAB, (2, 8 + random.randint(0, 4)))
        train_step(lambda: palm(seq, return_loss=True), list(palm.parameters()), opt, device="cpu")


def through_storage(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)  # what a checkpoint read gives back: no pickled code


def test_resumed_training_is_bit_identical():
    torch.manual_seed(1)
    random.seed(1)
    palm, opt = fresh()
    noisy_steps(palm, opt, 3)
    saved = through_storage(training_state(palm, opt, step=3, note="kept"))
    noisy_steps(palm, opt, 2)

    torch.manual_seed(999)  # the resumed process starts from unrelated random state
    random.seed(999)
    palm2, opt2 = fresh()
    assert restore_training_state(saved, palm2, opt2) == 3
    assert saved["extra"] == {"note": "kept"}
    noisy_steps(palm2, opt2, 2)
    assert all(torch.equal(a, b) for a, b in zip(palm.parameters(), palm2.parameters()))


def test_state_captured_in_memory_is_a_snapshot():
    torch.manual_seed(1)
    palm, opt = fresh()
    noisy_steps(palm, opt, 3)
    state = training_state(palm, opt, step=3)
    noisy_steps(palm, opt, 2)
    palm2, opt2 = fresh()
    restore_training_state(state, palm2, opt2)
    noisy_steps(palm2, opt2, 2)
    assert all(torch.equal(a, b) for a, b in zip(palm.parameters(), palm2.parameters()))


def test_resumed_ppo_is_bit_identical():
    def run_steps(trainer, n):
        for _ in range(n):
            trainer.step(trainer.prompts, trainer.prompts_mask, 4, minibatch_size=3)

    trainer = tiny_trainer(actor_lr=1e-2, adaptive_kl=True, kl_horizon=50, ppo_epochs=2)
    run_steps(trainer, 2)
    saved = through_storage(training_state(trainer.actor_critic, trainer.optimizer, 2,
                                           generators=trainer.generators(), kl=trainer.kl.state_dict()))
    run_steps(trainer, 2)

    resumed = tiny_trainer(actor_lr=1e-2, adaptive_kl=True, kl_horizon=50, ppo_epochs=2)  # same frozen models
    for i, g in enumerate(resumed.generators().values()):
        g.manual_seed(1000 + i)  # a restarted process: its random streams are somewhere else
    restore_training_state(saved, resumed.actor_critic, resumed.optimizer, resumed.generators())
    resumed.kl.load_state_dict(saved["extra"]["kl"])
    run_steps(resumed, 2)
    assert all(torch.equal(a, b) for a, b in zip(trainer.actor_critic.parameters(),
                                                 resumed.actor_critic.parameters()))
    assert resumed.kl.value == trainer.kl.value


def test_rng_capture_covers_torch_python_and_named_generators():
    g = torch.Generator().manual_seed(3)
    state = capture_rng({"data": g})
    expected = (torch.rand(3), random.random(), torch.rand(3, generator=g))
    restore_rng(state, {"data": g})
    again = (torch.rand(3), random.random(), torch.rand(3, generator=g))
    assert torch.equal(expected[0], again[0]) and expected[1] == again[1] and torch.equal(expected[2], again[2])


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
