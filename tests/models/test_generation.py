"""Generation: the KV cache changes nothing but speed, ragged batches decode like single prompts, eos ends a row."""

import math

import pytest
import torch

from models.cache import KVCache
from models.palm import as_prompt_batch
from models.sampling import top_k_filter
from tests.models.conftest import VOCAB, tiny_palm

NEW = 12


def greedy_by_full_forwards(palm, prompt, steps):
    """The definition of greedy decoding: argmax of a fresh full forward pass over everything so far."""
    seq = prompt[None]
    for _ in range(steps):
        nxt = palm(seq)[:, -1].argmax(-1)
        seq = torch.cat((seq, nxt[:, None]), dim=-1)
    return seq[0, len(prompt):]


def alone(palm, prompt, steps=NEW):
    return palm.generate(len(prompt) + steps, prompt=prompt, temperature=0.)


def ragged_prompts(data):
    return [data[0, :3], data[1, :6], data[2, :4]]


def test_greedy_with_cache_equals_step_by_step_argmax(memorised):
    palm, data = memorised
    prompt = data[3, :5]
    cached = palm.generate(5 + NEW, prompt=prompt, temperature=0.)
    assert cached.shape == (NEW,)  # seq_len counts the prompt; only new tokens come back
    assert torch.equal(cached, greedy_by_full_forwards(palm, prompt, NEW))
    assert torch.equal(cached, palm.generate(5 + NEW, prompt=prompt, temperature=0., use_cache=False))
    assert len(set(cached.tolist())) > 3  # a repeating decoder would make this test vacuous


def test_cached_step_logits_match_a_full_forward(memorised):
    palm, data = memorised
    seq = data[:2, :10]
    cache = KVCache.empty(palm, 2, 10, "cpu")
    steps = [palm(seq[:, :6], cache=cache)[:, -1]]
    steps += [palm(seq[:, i:i + 1], cache=cache)[:, -1] for i in range(6, 10)]
    full = palm(seq)[:, 5:]
    torch.testing.assert_close(torch.stack(steps, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("use_cache", [True, False])
def test_ragged_batch_rows_equal_each_prompt_alone(memorised, use_cache):
    palm, data = memorised
    prompts = ragged_prompts(data)
    P = max(len(p) for p in prompts)
    batch = palm.generate(P + NEW, prompt=prompts, temperature=0., use_cache=use_cache)
    assert batch.shape == (3, NEW)
    for row, prompt in zip(batch, prompts):
        assert torch.equal(row, alone(palm, prompt))


def test_a_row_that_emits_eos_gets_padding_while_the_others_continue(memorised):
    palm, data = memorised
    prompts = ragged_prompts(data)
    singles = [alone(palm, p).tolist() for p in prompts]
    # eos := a token row 0 emits at step s (first time) and the other rows never emit
    s, eos = next((s, t) for s, t in enumerate(singles[0])
                  if t not in singles[0][:s] and all(t not in other for other in singles[1:]))
    assert s < NEW - 1

    pad = 63 if eos != 63 else 62
    out = palm.generate(6 + NEW, prompt=prompts, temperature=0., eos_token=eos, pad_value=pad)
    assert out.shape == (3, NEW)
    assert out[0, :s + 1].tolist() == singles[0][:s + 1]
    assert out[0, s + 1:].tolist() == [pad] * (NEW - s - 1)
    assert out[1].tolist() == singles[1] and out[2].tolist() == singles[2]

    batch, mask, _ = as_prompt_batch(prompts, None, pad)
    gen = palm.sample(batch, mask, NEW, temperature=0., eos_token=eos, pad_value=pad)
    assert gen.mask[0].tolist() == [True] * (s + 1) + [False] * (NEW - s - 1)  # the eos itself is a real token
    assert gen.mask[1:].all()
    assert gen.response_lengths.tolist() == [s + 1, NEW, NEW]


def test_generation_stops_once_every_row_has_emitted_eos(memorised):
    palm, data = memorised
    prompts = [data[1, :6], data[2, :4]]
    singles = [alone(palm, p).tolist() for p in prompts]
    common = [t for t in singles[0] if t in singles[1]]
    assert common, "fixture no longer gives two rows a shared token"
    eos = common[0]
    ends = [row.index(eos) for row in singles]
    out = palm.generate(6 + NEW, prompt=prompts, temperature=0., eos_token=eos)
    assert out.shape == (2, max(ends) + 1)
    assert max(ends) + 1 < NEW
    for row, end, single in zip(out.tolist(), ends, singles):
        assert row[:end + 1] == single[:end + 1]
        assert row[end + 1:] == [0] * (max(ends) - end)


def test_sampling_keeps_only_the_top_fraction_of_the_vocabulary(memorised):
    palm, data = memorised
    prompt = data[4, :4]
    logits = palm(prompt[None])[0, -1]
    k = math.ceil((1 - 0.9) * VOCAB)
    allowed = set(logits.topk(k).indices.tolist())
    g = torch.Generator().manual_seed(0)
    out = palm.generate(5, prompt=prompt.expand(300, -1), temperature=1.0, filter_thres=0.9, generator=g)
    drawn = set(out[:, 0].tolist())
    assert drawn <= allowed and len(drawn) > 1
    assert top_k_filter(logits[None], 0.0).isfinite().all()  # thres 0 keeps the whole distribution


def test_seeded_sampling_is_reproducible(memorised):
    palm, data = memorised
    a = palm.generate(12, prompt=data[5, :4], generator=torch.Generator().manual_seed(7))
    b = palm.generate(12, prompt=data[5, :4], generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_generate_without_prompt_returns_seq_len_tokens(palm):
    assert palm.generate(10).shape == (1, 10)


def test_generate_rejects_bad_lengths(palm):
    with pytest.raises(ValueError, match="seq_len"):
        palm.generate(4, prompt=torch.ones(4, dtype=torch.long))
    with pytest.raises(ValueError, match="exceed the context"):
        palm.generate(500, prompt=torch.ones(4, dtype=torch.long))
    with pytest.raises(ValueError, match="at least one token"):
        palm.generate(8, prompt=[torch.ones(3, dtype=torch.long), torch.ones(0, dtype=torch.long)])


def test_generation_leaves_the_model_and_its_gradients_alone():
    palm = tiny_palm()
    before = [p.detach().clone() for p in palm.parameters()]
    palm.generate(8, prompt=torch.ones(3, dtype=torch.long))
    assert all(torch.equal(a, b) and p.grad is None for a, b, p in zip(before, palm.parameters(), palm.parameters()))
