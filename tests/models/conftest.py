"""Tiny models shared by the models/ tests: small enough that the whole suite runs in seconds on a laptop CPU."""

import pytest
import torch

from models import PaLM, RewardModel, RLHFTrainer

VOCAB = 64


@pytest.fixture(scope="package", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine they run ~20x slower with them."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_palm(seed: int = 0, **overrides) -> PaLM:
    torch.manual_seed(seed)
    kwargs = dict(num_tokens=VOCAB, dim=32, depth=2, dim_head=16, heads=2, ff_mult=2, max_seq_len=128)
    kwargs.update(overrides)
    return PaLM(**kwargs)


def tiny_reward_model(palm: PaLM | None = None, seed: int = 1, **kwargs) -> RewardModel:
    palm = palm if palm is not None else tiny_palm(seed)
    torch.manual_seed(seed)
    rm = RewardModel(palm, **kwargs)
    # a random head instead of the near-zero default, so different responses get clearly different rewards
    last = rm.to_pred if rm.head == "mean-pooled" else rm.to_pred[-1]
    torch.nn.init.normal_(last.weight, std=1.0)
    return rm


def tiny_trainer(seed: int = 0, vocab: int = VOCAB, prompts: torch.Tensor | None = None, **kwargs) -> RLHFTrainer:
    palm = tiny_palm(seed, num_tokens=vocab)
    rm = tiny_reward_model(tiny_palm(seed + 1, num_tokens=vocab), seed=seed + 1)
    if prompts is None:
        prompts = torch.randint(0, VOCAB, (6, 5), generator=torch.Generator().manual_seed(seed))
    return RLHFTrainer(palm=palm, reward_model=rm, prompt_token_ids=prompts, seed=seed, **kwargs)


@pytest.fixture
def palm() -> PaLM:
    return tiny_palm()


@pytest.fixture(scope="package")
def memorised(one_thread) -> tuple[PaLM, torch.Tensor]:
    """A PaLM that has memorised 8 random sequences, and those sequences.

    A random tied-embedding model mostly repeats its last token under greedy decoding, which would let a broken cache
    or mask pass unnoticed; this one continues each prefix with varied, context-dependent tokens and clear margins.
    Tests must not train it further.
    """
    torch.manual_seed(0)
    palm = PaLM(num_tokens=VOCAB, dim=32, depth=2, dim_head=16, heads=2, ff_mult=2, max_seq_len=128)
    data = torch.randint(0, VOCAB, (8, 24))
    opt = torch.optim.AdamW(palm.parameters(), lr=1e-2)
    for _ in range(40):
        opt.zero_grad()
        palm(data, return_loss=True).backward()
        opt.step()
    return palm.eval(), data
