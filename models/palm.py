"""PaLM (Chowdhery et al. 2022, https://arxiv.org/abs/2204.02311), small enough to read in one sitting.

What makes it PaLM rather than GPT:
- parallel attention and feed-forward in each block, from one fused input projection (section 2, "Parallel Layers");
- SwiGLU feed-forward (Shazeer 2020);
- rotary position embeddings (Su et al. 2021);
- multi-query attention: one key/value head shared by all query heads (Shazeer 2019), which also makes the
  KV cache `heads` times smaller;
- no biases anywhere, bias-free LayerNorm, input and output embeddings tied.

LoRA (Hu et al. 2021) finetune scopes let the reward model and the actor/critic train small low-rank deltas on a shared,
frozen base. Shapes: b batch, n query positions, N key positions (cache + new), h heads, d head dim.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.cache import KVCache
from models.config import Positive, PositiveFloat, check_bounds
from models.decode import Decoder
from models.sampling import Generation, check_filters, sample_token, suppressed, token_ids


@dataclass(frozen=True)
class PaLMConfig:
    num_tokens: Positive  # vocabulary size
    dim: Positive
    depth: Positive
    causal: bool = True
    dim_head: Positive = 64
    heads: Positive = 8
    ff_mult: Positive = 4
    max_seq_len: Positive = 2048  # the context: the rotary positions and KV cache go this far
    rotary_base: PositiveFloat = 10000.0

    def __post_init__(self):
        for name in ("num_tokens", "dim", "depth", "dim_head", "heads", "ff_mult", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"PaLM {name} must be a positive integer, got {value!r}")
        check_bounds(self)
        if self.dim_head % 2:
            raise ValueError(f"PaLM dim_head must be even for rotary embeddings, got {self.dim_head}")


class LoRA(nn.Module):
    """x -> x A B * (alpha / r). B starts at zero, so a new scope leaves the model unchanged."""

    def __init__(self, dim_in: int, dim_out: int, r: int = 8, alpha: float | None = None):
        super().__init__()
        self.scale = (alpha if alpha is not None else r) / r
        self.A = nn.Parameter(torch.randn(dim_in, r) / math.sqrt(dim_in))
        self.B = nn.Parameter(torch.zeros(r, dim_out))

    def forward(self, x: Tensor) -> Tensor:
        return (x @ self.A @ self.B) * self.scale


class Rotary(nn.Module):
    def __init__(self, dim_head: int, base: float):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, dim_head, 2).float() / dim_head))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """positions (b, n) -> cos, signed sin (b, n, d), for apply_rotary."""
        freqs = positions.float()[..., None] * self.inv_freq  # (b, n, d/2)
        cos, sin = freqs.cos(), freqs.sin()
        return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, signed_sin: Tensor) -> Tensor:
    """Rotate the two halves of x's last dim (x1, x2) to (x1 cos - x2 sin, x2 cos + x1 sin).

    rotate_half(x) = cat(-x2, x1) is a roll of x by d/2 with the sign folded into the sine table, one operator
    instead of chunk, neg and cat (and the same floats: -(x2) sin == x2 (-sin) exactly).
    """
    out = x * cos + x.roll(x.shape[-1] // 2, -1) * signed_sin
    return out if out.dtype == x.dtype else out.to(x.dtype)  # a bf16 x against the fp32 tables: round once


class ParallelBlock(nn.Module):
    """x + attn(norm(x)) + ff(norm(x)), with q, k, v and the feed-forward input from a single matmul."""

    def __init__(self, cfg: PaLMConfig):
        super().__init__()
        self.heads, self.dim_head = cfg.heads, cfg.dim_head
        attn_inner, ff_inner = cfg.heads * cfg.dim_head, cfg.dim * cfg.ff_mult
        self.fused_dims = (attn_inner, cfg.dim_head, cfg.dim_head, ff_inner * 2)
        self.norm = nn.LayerNorm(cfg.dim, bias=False)
        self.fused_proj = nn.Linear(cfg.dim, sum(self.fused_dims), bias=False)
        self.attn_out = nn.Linear(attn_inner, cfg.dim, bias=False)
        self.ff_out = nn.Linear(ff_inner, cfg.dim, bias=False)

    def forward(self, x, cos, sin, attn_mask, is_causal, cache: KVCache | None, layer: int, lora: nn.ModuleDict | None,
                dropout: float = 0.0):
        h = self.norm(x)
        b, n, _ = x.shape
        heads, d = self.heads, self.dim_head
        qkv, ff = self.fused_proj(h).split((sum(self.fused_dims[:3]), self.fused_dims[3]), dim=-1)
        if lora is not None:
            qkv = qkv + lora["qkv"](h)
        qk, v = qkv.split(((heads + 1) * d, d), dim=-1)
        # the q heads and the one k head sit side by side: one rotation for both
        qk = apply_rotary(qk.view(b, n, heads + 1, d), cos[:, :, None], sin[:, :, None])  # (b, n, h + 1, d)
        q, k = qk[:, :, :heads], qk[:, :, heads]  # (b, n, h, d), (b, n, d): one k/v head for all queries
        if cache is not None:
            k, v = cache.append(layer, k, v)  # (b, N, d)
        k, v = k[:, None], v[:, None]  # (b, 1, N, d)
        if n == 1:
            # one new position (decoding): the heads become query rows against the single key/value head,
            # one small attention with no copies of k and v
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout).reshape(b, 1, -1)
        else:
            k, v = (t.expand(-1, heads, -1, -1) for t in (k, v))
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=attn_mask, is_causal=is_causal,
                                                 dropout_p=dropout)  # (b, h, n, d)
            out = out.transpose(1, 2).reshape(b, n, heads * d)

        attn = self.attn_out(out)
        if lora is not None:
            attn = attn + lora["out"](out)
        value, gate = ff.chunk(2, dim=-1)
        hidden = F.silu(gate) * value
        if dropout:
            hidden = F.dropout(hidden, dropout)
        return x + attn + self.ff_out(hidden)


class PaLM(nn.Module):
    def __init__(self, num_tokens: int, dim: int, depth: int, causal: bool = True, dim_head: int = 64, heads: int = 8,
                 ff_mult: int = 4, max_seq_len: int = 2048, rotary_base: float = 10000.0):
        super().__init__()
        self.config = PaLMConfig(num_tokens, dim, depth, causal, dim_head, heads, ff_mult, max_seq_len, rotary_base)
        self.causal = causal
        self.token_emb = nn.Embedding(num_tokens, dim)
        nn.init.normal_(self.token_emb.weight, std=0.02)
        self.rotary = Rotary(dim_head, rotary_base)
        self.layers = nn.ModuleList(ParallelBlock(self.config) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, bias=False)
        self.finetune_modules = nn.ModuleDict()  # scope -> one {"qkv", "out"} LoRA pair per layer

    @classmethod
    def from_config(cls, config: PaLMConfig | dict) -> "PaLM":
        return cls(**(asdict(config) if isinstance(config, PaLMConfig) else config))

    # ---- finetune scopes -------------------------------------------------------------------------------------
    def add_finetune_params(self, scope: str, lora_r: int = 8) -> None:
        if scope in self.finetune_modules:
            raise ValueError(f"finetune scope {scope!r} already exists")
        cfg, attn_inner = self.config, self.config.heads * self.config.dim_head
        qkv_out = attn_inner + 2 * cfg.dim_head
        self.finetune_modules[scope] = nn.ModuleList(
            nn.ModuleDict({"qkv": LoRA(cfg.dim, qkv_out, lora_r), "out": LoRA(attn_inner, cfg.dim, lora_r)})
            for _ in range(cfg.depth)
        )

    def finetune_parameters(self, scope: str) -> list[nn.Parameter]:
        if scope not in self.finetune_modules:
            raise KeyError(f"no finetune scope {scope!r}; have {sorted(self.finetune_modules)}")
        return list(self.finetune_modules[scope].parameters())

    def base_parameters(self) -> list[nn.Parameter]:
        return [p for name, p in self.named_parameters() if not name.startswith("finetune_modules.")]

    # ---- forward -------------------------------------------------------------------------------------------
    def forward(self, x: Tensor, return_loss: bool = False, mask: Tensor | None = None,
                finetune_scope: str | None = None, return_only_embedding: bool = False,
                extra_embed: Tensor | None = None, cache: KVCache | None = None,
                positions: Tensor | None = None, causal: bool | None = None, return_embedding_and_logits: bool = False,
                dropout: float = 0.0):
        """x: (b, n) token ids. mask: (b, n) True for real tokens (False = padding); with a cache it covers cache + x.

        dropout: the rate on the attention weights and the feed-forward hidden units (the reference's attn_dropout
        and ff_dropout, one rate for both as its set_dropout sets them). It applies to this call whatever the module's
        train/eval mode, so a caller passes it only where it trains (ActorCritic does, in train mode only).

        return_loss: next-token cross-entropy over every position whose target is a real token (padding is the only
        thing left out: token id 0 is an ordinary token).
        return_embedding_and_logits: (final embeddings, logits), both from this one pass.
        """
        if return_loss:
            inputs, targets = x[:, :-1], x[:, 1:]
            in_mask = mask[:, :-1] if mask is not None else None
            logits = self(inputs, mask=in_mask, finetune_scope=finetune_scope, extra_embed=extra_embed,
                          positions=positions[:, :-1] if positions is not None else None, dropout=dropout)
            return lm_loss(logits, targets, mask[:, 1:] if mask is not None else None)

        causal = self.causal if causal is None else causal
        b, n = x.shape
        offset = cache.length if cache is not None else 0
        if positions is None:
            positions = self._positions(mask, b, n, offset, x.device)
        attn_mask, is_causal = self._attention_mask(mask, n, offset, causal, x.device)
        cos, sin = self.rotary(positions)

        h = self.token_emb(x)
        if extra_embed is not None:
            h = h + extra_embed
        lora = self.finetune_modules[finetune_scope] if finetune_scope is not None else None
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, attn_mask, is_causal, cache, i, lora[i] if lora is not None else None, dropout)
        if cache is not None:
            cache.advance(n)
        h = self.norm(h)
        if return_only_embedding:
            return h
        logits = h @ self.token_emb.weight.t()  # tied output embedding
        return (h, logits) if return_embedding_and_logits else logits

    @staticmethod
    def _positions(mask: Tensor | None, b: int, n: int, offset: int, device) -> Tensor:
        if mask is None:
            return torch.arange(offset, offset + n, device=device).expand(b, n)
        # left padding: a row's first real token is position 0
        return (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -n:]

    @staticmethod
    def _attention_mask(mask: Tensor | None, n: int, offset: int, causal: bool, device):
        if mask is None:
            # no padding: the fused causal kernel for a full pass; a cached decode step sees everything before it
            return None, causal and offset == 0 and n > 1
        total = offset + n
        q_idx = torch.arange(offset, total, device=device)[:, None]
        k_idx = torch.arange(total, device=device)[None, :]
        allowed = mask[:, None, None, :total].bool()  # (b, 1, 1, N)
        if causal:
            allowed = allowed & (k_idx <= q_idx)
        # a padding query still attends to itself, so no row is empty (an empty row is NaN in softmax)
        return allowed | (k_idx == q_idx), False

    # ---- generation ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, prompt: Tensor, prompt_mask: Tensor | None, max_new_tokens: int, *, temperature: float = 1.0,
               filter_thres: float | None = None, top_k: int | None = None, eos_token: int | None = None,
               pad_value: int = 0, finetune_scope: str | None = None, generator: torch.Generator | None = None,
               use_cache: bool = True, suppress_tokens=None) -> Generation:
        """Batched sampling from left-padded prompts (b, P). Rows that emit eos_token get padding after it.

        filter_thres keeps the top (1 - filter_thres) of the vocabulary (default 0.9, as the reference); top_k keeps
        the k largest logits instead (filter_thres then defaults to 0, and giving both is an error).
        suppress_tokens: ids never emitted (padding, ids beyond the tokenizer's vocabulary).
        """
        b, P = prompt.shape
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if P + max_new_tokens > self.config.max_seq_len:
            raise ValueError(f"prompt ({P}) + new tokens ({max_new_tokens}) exceed the context of "
                             f"{self.config.max_seq_len} tokens")
        filter_thres = check_filters(filter_thres, top_k)
        banned = token_ids(suppress_tokens, prompt.device)
        mask = prompt_mask.bool() if prompt_mask is not None else torch.ones_like(prompt, dtype=torch.bool)
        padded = not bool(mask.all())
        if not use_cache:
            return self._sample_without_cache(prompt, prompt_mask, mask, padded, max_new_tokens, temperature,
                                              filter_thres, top_k, eos_token, pad_value, finetune_scope, generator,
                                              banned)
        decoder = Decoder(self, b, P + max_new_tokens, finetune_scope, prompt.device)
        logits = decoder.prefill(prompt, mask if padded else None, max_new_tokens)
        tokens, alive = [], []
        done = torch.zeros(b, dtype=torch.bool, device=prompt.device) if eos_token is not None else None
        for step in range(max_new_tokens):
            token = sample_token(suppressed(logits, banned), temperature, filter_thres, generator, top_k=top_k)
            if done is not None:
                alive.append(~done)
                token = torch.where(done, pad_value, token)
                done = done | (token == eos_token)
            tokens.append(token)
            if step + 1 == max_new_tokens or (done is not None and bool(done.all())):
                break
            logits = decoder.step(token)
        new = torch.stack(tokens, dim=1)
        new_mask = torch.stack(alive, dim=1) if alive else torch.ones_like(new, dtype=torch.bool)
        return Generation(prompt=prompt, prompt_mask=prompt_mask if prompt_mask is not None else mask,
                          tokens=new, mask=new_mask)

    def _sample_without_cache(self, prompt, prompt_mask, mask, padded, max_new_tokens, temperature, filter_thres,
                              top_k, eos_token, pad_value, finetune_scope, generator, banned=None) -> Generation:
        """The reference's way: a full forward pass over everything so far for every new token."""
        b, P = prompt.shape
        tokens, done = prompt, torch.zeros(b, dtype=torch.bool, device=prompt.device)
        new_tokens, new_mask = [], []
        for _ in range(max_new_tokens):
            logits = self(tokens, mask=mask if padded else None, finetune_scope=finetune_scope)[:, -1]
            token = sample_token(suppressed(logits, banned), temperature, filter_thres, generator, top_k=top_k)
            alive = ~done
            token = torch.where(alive, token, torch.full_like(token, pad_value))
            new_tokens.append(token)
            new_mask.append(alive)
            tokens = torch.cat((tokens, token[:, None]), dim=-1)
            mask = torch.cat((mask, alive[:, None]), dim=-1)
            if eos_token is not None:
                done = done | (token == eos_token)
            if bool(done.all()):
                break
        return Generation(prompt=prompt, prompt_mask=prompt_mask if prompt_mask is not None else mask[:, :P],
                          tokens=torch.stack(new_tokens, dim=1), mask=torch.stack(new_mask, dim=1))

    @torch.no_grad()
    def generate(self, seq_len: int, prompt: Tensor | list[Tensor] | None = None, temperature: float = 1.0,
                 filter_thres: float | None = None, eos_token: int | None = None, pad_value: int = 0,
                 prompt_mask: Tensor | None = None, finetune_scope: str | None = None,
                 generator: torch.Generator | None = None, use_cache: bool = True,
                 top_k: int | None = None) -> Tensor:
        """Sample until the sequence (prompt included) is seq_len long; returns only the new tokens.

        prompt: (n,), (b, n), or a list of 1-D prompts of different lengths (left-padded here). None starts from one
        random token, as the reference does, and that token is part of the (1, seq_len) result.
        """
        device = next(self.parameters()).device
        start = None
        if prompt is None:
            start = torch.randint(0, self.config.num_tokens, (1, 1), device=device, generator=generator)
            prompt = start
        prompt, prompt_mask, squeeze = as_prompt_batch(prompt, prompt_mask, pad_value)
        if seq_len <= prompt.shape[-1]:
            raise ValueError(f"seq_len ({seq_len}) must be longer than the prompt ({prompt.shape[-1]} tokens)")
        out = self.sample(prompt, prompt_mask, seq_len - prompt.shape[-1], temperature=temperature,
                          filter_thres=filter_thres, top_k=top_k, eos_token=eos_token, pad_value=pad_value,
                          finetune_scope=finetune_scope, generator=generator, use_cache=use_cache)
        if start is not None:
            return torch.cat((start, out.tokens), dim=-1)
        return out.tokens[0] if squeeze else out.tokens

    # ---- persistence (weights only, no pickle) --------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(path),
                  metadata={"palm_config": _json(asdict(self.config))})

    def load(self, path: str | Path) -> None:
        from safetensors.torch import load_file

        self.load_state_dict(load_file(str(path)))


def lm_loss(logits: Tensor, targets: Tensor, target_mask: Tensor | None) -> Tensor:
    """Mean next-token cross-entropy over targets that are real tokens."""
    # flat (b n, c) rows: the layout cross_entropy reads fastest (a (b, c, n) view makes it gather across rows)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction="none")
    loss = loss.view_as(targets)
    if target_mask is None:
        return loss.mean()
    target_mask = target_mask.to(loss.dtype)
    return (loss * target_mask).sum() / target_mask.sum().clamp(min=1)


def as_prompt_batch(prompt, prompt_mask, pad_value: int):
    """Normalise a prompt to a left-padded (b, P) batch and its mask. Returns (prompt, mask, was_1d)."""
    if isinstance(prompt, (list, tuple)):
        lengths = [len(p) for p in prompt]
        if not lengths or min(lengths) == 0:
            raise ValueError("every prompt needs at least one token")
        P, device = max(lengths), prompt[0].device
        batch = torch.full((len(prompt), P), pad_value, dtype=torch.long, device=device)
        mask = torch.zeros((len(prompt), P), dtype=torch.bool, device=device)
        for i, p in enumerate(prompt):
            batch[i, P - len(p):] = p
            mask[i, P - len(p):] = True
        return batch, mask, False
    if prompt.ndim == 1:
        return prompt[None], (prompt_mask[None] if prompt_mask is not None else None), True
    return prompt, prompt_mask, False


def _json(obj) -> str:
    import json

    return json.dumps(obj, sort_keys=True)
