"""Generation: the KV cache changes nothing but speed, ragged batches decode like single prompts, eos ends a row."""

import copy
import math

import pytest
import torch

from models.cache import KVCache
from models.decode import Decoder
from models.palm import as_prompt_batch
from models.sampling import keep_top_k, sample_token, top_k_filter
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


# ---- the incremental decoder (models/decode.py) against full forward passes ----------------------------------------
def with_trained_scope(palm, scope="actor"):
    """A copy of palm with a LoRA scope whose deltas are not zero, so that a decoder ignoring them would show."""
    palm = copy.deepcopy(palm)
    palm.add_finetune_params(scope)
    with torch.no_grad():
        for p in palm.finetune_parameters(scope):
            p.normal_(0, 0.2, generator=torch.Generator().manual_seed(p.numel()))
    return palm


@pytest.mark.parametrize("scope", [None, "actor"])
@pytest.mark.parametrize("padded", [False, True])
def test_decoder_logits_match_a_full_forward_at_every_step(memorised, scope, padded):
    palm, data = memorised
    if scope:
        palm = with_trained_scope(palm, scope)
    seq, mask = data[:2, :12].clone(), torch.ones(2, 12, dtype=torch.bool)
    if padded:
        mask[1, :3] = False  # row 1 is left-padded: its positions start after the padding
    P = 6
    with torch.no_grad():
        decoder = Decoder(palm, 2, 12, scope, "cpu")
        steps = [decoder.prefill(seq[:, :P], mask[:, :P] if padded else None, 12 - P)]
        steps += [decoder.step(seq[:, i]) for i in range(P, 11)]
    full = palm(seq, mask=mask if padded else None, finetune_scope=scope)[:, P - 1:11]
    torch.testing.assert_close(torch.stack(steps, dim=1), full, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("scope", [None, "actor"])  # bf16 keeps a scope's LoRA apart from the weights
def test_greedy_in_bf16_equals_step_by_step_argmax_in_bf16(memorised, scope):
    palm, data = memorised
    palm = (with_trained_scope(palm, scope) if scope else copy.deepcopy(palm)).to(torch.bfloat16)
    for row in (3, 6):
        prompt = data[row, :5]
        cached = palm.generate(5 + NEW, prompt=prompt, temperature=0., finetune_scope=scope)
        seq = prompt[None]
        for _ in range(NEW):
            seq = torch.cat((seq, palm(seq, finetune_scope=scope)[:, -1].argmax(-1, keepdim=True)), dim=-1)
        assert torch.equal(cached, seq[0, 5:])
        assert len(set(cached.tolist())) > 3


def test_greedy_with_a_lora_scope_equals_step_by_step_argmax_in_that_scope(memorised):
    palm, data = memorised
    palm = with_trained_scope(palm)
    prompt = data[2, :5]
    cached = palm.generate(5 + NEW, prompt=prompt, temperature=0., finetune_scope="actor")
    seq = prompt[None]
    for _ in range(NEW):
        seq = torch.cat((seq, palm(seq, finetune_scope="actor")[:, -1].argmax(-1, keepdim=True)), dim=-1)
    assert torch.equal(cached, seq[0, 5:])
    assert not torch.equal(cached, palm.generate(5 + NEW, prompt=prompt, temperature=0.))  # the scope matters


def test_sampling_draws_what_torch_multinomial_draws_on_the_same_generator():
    logits = torch.randn(5, VOCAB, generator=torch.Generator().manual_seed(1)) * 3
    for seed in range(20):
        drawn = sample_token(logits, 0.7, 0.0, torch.Generator().manual_seed(seed))
        probs = torch.softmax(logits / 0.7, dim=-1)
        expected = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(seed)).squeeze(-1)
        assert torch.equal(drawn, expected)


def test_top_k_keeps_exactly_the_k_largest_logits(memorised):
    palm, data = memorised
    prompt = data[4, :4]
    logits = palm(prompt[None])[0, -1]
    allowed = set(logits.topk(3).indices.tolist())
    g = torch.Generator().manual_seed(0)
    # a high temperature flattens the memorised model's sharp distribution
    out = palm.generate(5, prompt=prompt.expand(300, -1), temperature=50.0, top_k=3, generator=g)
    assert set(out[:, 0].tolist()) == allowed  # 300 draws from 3 tokens: each one shows up
    wide = palm.generate(5, prompt=prompt.expand(300, -1), temperature=50.0, top_k=0, generator=g)
    assert len(set(wide[:, 0].tolist())) > 3  # 0 keeps every token
    filtered = keep_top_k(logits[None], 3)
    assert filtered.isfinite().sum() == 3 and torch.equal(filtered[0, list(allowed)], logits[list(allowed)])
    assert torch.equal(keep_top_k(logits[None], None), logits[None])
    assert torch.equal(keep_top_k(logits[None], VOCAB + 5), logits[None])


def test_top_k_and_filter_thres_together_are_refused(palm):
    prompt = torch.ones(3, dtype=torch.long)
    with pytest.raises(ValueError, match="top_k .* or filter_thres"):
        palm.generate(6, prompt=prompt, top_k=5, filter_thres=0.9)
    with pytest.raises(ValueError, match="top_k"):
        sample_token(torch.zeros(1, VOCAB), 1.0, 0.5, None, top_k=2)
    with pytest.raises(ValueError, match="non-negative integer"):
        palm.generate(6, prompt=prompt, top_k=-1)
    assert palm.generate(6, prompt=prompt, top_k=5, filter_thres=0.0).shape == (3,)
