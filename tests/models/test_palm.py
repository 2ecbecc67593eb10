"""PaLM: the language-model loss, causality, attention, LoRA scopes, config checks, persistence, and that it learns."""

import pytest
import torch
import torch.nn.functional as F

from models import PaLM, PaLMConfig
from models.cache import KVCache
from tests.models.conftest import VOCAB, tiny_palm


def test_forward_returns_logits_and_loss(palm):
    seq = torch.randint(0, VOCAB, (3, 10))
    logits = palm(seq)
    assert logits.shape == (3, 10, VOCAB)
    loss = palm(seq, return_loss=True)
    assert loss.ndim == 0 and torch.isfinite(loss)


def test_loss_counts_token_zero_as_an_ordinary_target(palm):
    # The reference ignores target id 0; here 0 is a real token. Half the targets are 0 so ignoring them would show.
    seq = torch.randint(1, VOCAB, (2, 12))
    seq[:, ::2] = 0
    logits = palm(seq[:, :-1])
    expected = F.cross_entropy(logits.reshape(-1, VOCAB), seq[:, 1:].reshape(-1))
    torch.testing.assert_close(palm(seq, return_loss=True), expected)


def test_loss_leaves_out_only_positions_marked_as_padding(palm):
    real = torch.randint(0, VOCAB, (1, 7))
    padded = torch.cat((real, torch.zeros(1, 5, dtype=torch.long)), dim=-1)  # right padding, pad id 0
    mask = torch.zeros_like(padded, dtype=torch.bool)
    mask[:, :7] = True
    loss = palm(padded, return_loss=True, mask=mask)
    torch.testing.assert_close(loss, palm(real, return_loss=True))

    other_padding = padded.clone()
    other_padding[:, 7:] = torch.randint(1, VOCAB, (1, 5))
    torch.testing.assert_close(palm(other_padding, return_loss=True, mask=mask), loss)


def test_causal_model_never_looks_ahead(palm):
    seq = torch.randint(0, VOCAB, (2, 9))
    changed = seq.clone()
    changed[:, 6] = (changed[:, 6] + 1) % VOCAB
    before, after = palm(seq), palm(changed)
    torch.testing.assert_close(before[:, :6], after[:, :6])
    assert not torch.allclose(before[:, 6:], after[:, 6:])


def test_non_causal_model_sees_the_whole_sequence():
    palm = tiny_palm(causal=False)
    seq = torch.randint(0, VOCAB, (2, 9))
    changed = seq.clone()
    changed[:, 6] = (changed[:, 6] + 1) % VOCAB
    assert not torch.allclose(palm(seq)[:, :6], palm(changed)[:, :6])


def test_attention_goes_through_scaled_dot_product_attention(palm, monkeypatch):
    calls = []
    real = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    palm(torch.randint(0, VOCAB, (2, 5)))
    assert len(calls) == palm.config.depth
    assert calls[0] == (2, palm.config.heads, 5, palm.config.dim_head)  # (b, h, n, d)


def test_kv_cache_is_multi_query(palm):
    cache = KVCache.empty(palm, batch=3, max_len=11, device="cpu")
    cfg = palm.config
    assert cache.keys.shape == cache.values.shape == (cfg.depth, 3, 11, cfg.dim_head)  # one k/v head, not `heads`
    palm(torch.randint(0, VOCAB, (3, 4)), cache=cache)
    assert cache.length == 4


def test_a_new_lora_scope_starts_as_the_base_model(palm):
    seq = torch.randint(0, VOCAB, (2, 8))
    palm.add_finetune_params("task")
    torch.testing.assert_close(palm(seq, finetune_scope="task"), palm(seq))


def test_finetuning_a_scope_changes_only_that_scope(palm):
    palm.add_finetune_params("task")
    palm.add_finetune_params("other")
    before = {name: p.detach().clone() for name, p in palm.named_parameters()}
    opt = torch.optim.AdamW(palm.finetune_parameters("task"), lr=1e-2)
    seq = torch.randint(0, VOCAB, (2, 8))
    for _ in range(3):
        opt.zero_grad()
        palm(seq, return_loss=True, finetune_scope="task").backward()
        opt.step()
    changed = {name for name, p in palm.named_parameters() if not torch.equal(p, before[name])}
    assert changed and all(name.startswith("finetune_modules.task.") for name in changed)
    assert any(name.endswith(".B") for name in changed)
    assert not torch.allclose(palm(seq, finetune_scope="task"), palm(seq))


@pytest.mark.parametrize("setting, value", [("dim", 0), ("depth", -1), ("heads", 1.5), ("num_tokens", True),
                                            ("dim_head", 0), ("max_seq_len", 0)])
def test_bad_config_is_rejected_naming_the_setting(setting, value):
    kwargs = dict(num_tokens=VOCAB, dim=32, depth=1)
    kwargs[setting] = value
    with pytest.raises(ValueError, match=setting):
        PaLM(**kwargs)


def test_odd_dim_head_is_rejected_at_construction():
    with pytest.raises(ValueError, match="dim_head"):
        PaLM(num_tokens=VOCAB, dim=32, depth=1, dim_head=15)


def test_finetune_scope_errors(palm):
    palm.add_finetune_params("task")
    with pytest.raises(ValueError, match="task"):
        palm.add_finetune_params("task")
    with pytest.raises(KeyError, match="missing"):
        palm.finetune_parameters("missing")


def test_save_and_load_round_trip(palm, tmp_path):
    path = tmp_path / "palm.safetensors"
    palm.save(path)
    fresh = tiny_palm(seed=123)
    seq = torch.randint(0, VOCAB, (1, 6))
    assert not torch.allclose(fresh(seq), palm(seq))
    fresh.load(path)
    assert torch.equal(fresh(seq), palm(seq))
    assert PaLM.from_config(palm.config).config == palm.config
    assert PaLM.from_config({"num_tokens": 10, "dim": 8, "depth": 1}).config == PaLMConfig(10, 8, 1)


def test_tiny_model_overfits_a_fixed_batch():
    torch.manual_seed(0)
    palm = PaLM(num_tokens=32, dim=48, depth=1, dim_head=16, heads=2)  # the default initialisation, as users build it
    seq = torch.randint(0, 32, (4, 16))
    opt = torch.optim.AdamW(palm.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        loss = palm(seq, return_loss=True)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[0] > 3.0  # about log(32): nothing memorised yet
    assert losses[-1] < 0.05
