"""Incremental decoding: one new position per step against the KV cache, in as few operations as the maths needs.

The general forward pass (palm.py) handles any number of positions, padding masks, LoRA scopes and gradients. At one
position per step and a small batch the arithmetic is a handful of matrix-vector products, and every extra operator
call costs about as much as a small one of them, so this module runs the same maths for that case alone:

- the weights are prepared once per generation call: in fp32 a LoRA scope is merged into them and, on a CPU, the
  projections are kept transposed, (in, out), which this machine's BLAS reads 1.4 to 2.4x faster at one row than
  nn.Linear's (out, in) (benchmarks/RESULTS.md; bf16 is the other way round, 5x slower transposed, and keeps
  (out, in)). Either holds one copy of the block weights for the duration of the call;
- rotary cos/sin for every position of the call come from one `Rotary` call, and q and k are rotated together, with
  rotate-half written as a roll against a sign-folded sine;
- the residual adds are fused into the output projections (`addmm`), and no mask or output tensor grows by
  concatenation per step.

Shapes: b batch, h heads, d head dim, N cached positions, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from models.cache import KVCache


def _transposed_weights(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether projections run as x @ W_t with W_t (in, out) contiguous, rather than F.linear's (out, in).

    Measured on this project's 2-core AMD EPYC (torch 2.13, MKL), in three benchmark runs: at one row, fp32 (in, out)
    reads the 17.6 MB of PaLM(256, dim 256, depth 4) weights in 0.69 to 1.46 ms against 1.59 to 2.10 ms for
    (out, in); bf16 (in, out) takes 6 ms against 0.76 to 1.18 for (out, in). GPUs and other dtypes keep the module's
    own layout.
    """
    return device.type == "cpu" and dtype == torch.float32


class Decoder:
    """One generation call's decoding state: prepared weights, the KV cache and the rotary tables.

    prefill(prompt) runs the general forward pass over the prompt (filling the cache) and returns the next-token
    logits (b, V); step(token) feeds one token per row and returns the logits after it.
    """

    def __init__(self, palm, batch: int, max_len: int, finetune_scope: str | None, device):
        cfg = palm.config
        self.palm, self.scope = palm, finetune_scope
        self.heads, self.d = cfg.heads, cfg.dim_head
        weight = palm.token_emb.weight
        self.transposed = _transposed_weights(weight.device, weight.dtype)
        # merging a LoRA delta into bf16 weights would round most of it away: merge in fp32 only
        self.merge = finetune_scope is not None and weight.dtype == torch.float32
        self.qkv = cfg.heads * cfg.dim_head + 2 * cfg.dim_head  # q, k and v columns of the fused projection
        self.ff_inner = cfg.dim * cfg.ff_mult
        self.splits = ((cfg.heads + 1) * cfg.dim_head, cfg.dim_head, self.ff_inner, self.ff_inner)  # qk, v, value, gate
        lora = palm.finetune_modules[finetune_scope] if finetune_scope is not None else None
        self.layers = [self._prepare(block, lora[i] if lora is not None else None) for i, block in
                       enumerate(palm.layers)]
        self.emb = weight  # (V, dim): the input embedding, and the tied output projection
        self.out_emb = weight.t().contiguous() if self.transposed else weight
        self.norm_w, self.norm_eps = palm.norm.weight, palm.norm.eps
        self.cache = KVCache.empty(palm, batch, max_len, device)
        # per layer (b, 1, max_len, d) views: SDPA's single key/value head, narrowed to N each step
        self.keys, self.values = list(self.cache.keys), list(self.cache.values)  # per layer (b, max_len, d)
        self.k4 = [k.unsqueeze(1) for k in self.keys]
        self.v4 = [v.unsqueeze(1) for v in self.values]
        self.mask4 = None  # (b, 1, 1, max_len) keys each row may attend to, when the prompts are padded
        self.cos = self.sin = None  # (T, 1 or b, 1, d) per new position, set by prefill
        self.step_index = 0

    def _prepare(self, block, lora) -> dict:
        fused, attn_out, ff_out = block.fused_proj.weight, block.attn_out.weight, block.ff_out.weight  # (out, in)
        layer = {"norm": block.norm.weight, "eps": block.norm.eps, "lora": None}
        if self.merge:
            # W_eff = W + scale * (A B)^T: the same function as the scope's forward, up to fp32 rounding
            fused = fused.clone()
            fused[:self.qkv].add_((lora["qkv"].A @ lora["qkv"].B).t(), alpha=lora["qkv"].scale)
            attn_out = attn_out + (lora["out"].A @ lora["out"].B).t() * lora["out"].scale
        elif lora is not None:
            layer["lora"] = lora
        if self.transposed:
            fused, attn_out, ff_out = (w.t().contiguous() for w in (fused, attn_out, ff_out))
        layer.update(fused=fused, attn_out=attn_out, ff_out=ff_out)
        return layer

    def _mm(self, x: Tensor, w: Tensor) -> Tensor:
        return torch.mm(x, w) if self.transposed else F.linear(x, w)

    def _add_mm(self, x: Tensor, y: Tensor, w: Tensor) -> Tensor:
        """x + y W^T in one call."""
        return torch.addmm(x, y, w if self.transposed else w.t())

    # ---- the prompt --------------------------------------------------------------------------------------------
    def prefill(self, prompt: Tensor, mask: Tensor | None, new_tokens: int) -> Tensor:
        """prompt (b, P), mask (b, P) or None when no row is padded -> logits (b, V) for the first new token."""
        b, P = prompt.shape
        h = self.palm(prompt, mask=mask, finetune_scope=self.scope, cache=self.cache, return_only_embedding=True)
        # the rotary table for every position a new token can take in this call: row r's t-th new token sits at
        # position (real prompt tokens of r) + t, as PaLM._positions counts them
        start = mask.sum(-1, keepdim=True) if mask is not None else torch.full((1, 1), P, device=prompt.device)
        positions = start + torch.arange(new_tokens, device=prompt.device)  # (1 or b, T)
        cos, sin = self.palm.rotary(positions)  # (1 or b, T, d); sin with rotate-half's sign folded in
        self.cos, self.sin = (c.transpose(0, 1)[:, :, None].contiguous() for c in (cos, sin))  # (T, 1 or b, 1, d)
        if mask is not None:
            full = torch.ones(b, self.cache.keys.shape[2], dtype=torch.bool, device=prompt.device)
            full[:, :P] = mask
            self.mask4 = full[:, None, None, :]
        return self._mm(h[:, -1], self.out_emb)

    # ---- one token -------------------------------------------------------------------------------------------
    def step(self, token: Tensor) -> Tensor:
        """token (b,) -> logits (b, V). The t-th call feeds the t-th new token."""
        t, pos = self.step_index, self.cache.length  # pos: the cache slot this token's key and value go to
        n = pos + 1
        cos, sin = self.cos[t], self.sin[t]  # (1 or b, 1, d)
        mask = self.mask4.narrow(-1, 0, n) if self.mask4 is not None else None
        b, h, d = token.shape[0], self.heads, self.d
        x = F.embedding(token, self.emb)  # (b, dim)
        for i, layer in enumerate(self.layers):
            hn = F.layer_norm(x, x.shape[-1:], layer["norm"], None, layer["eps"])
            proj = self._mm(hn, layer["fused"])  # (b, h d + d + d + 2 ff): q, k, v, ff value, ff gate
            lora = layer["lora"]
            if lora is not None:
                proj.narrow(1, 0, self.qkv).add_(lora["qkv"](hn))
            qk, v, value, gate = proj.split(self.splits, dim=1)
            qk = qk.view(b, h + 1, d)  # the q heads and the one k head, rotated together
            rotated = torch.addcmul(qk * cos, qk.roll(d // 2, -1), sin)
            if rotated.dtype != x.dtype:  # bf16 weights: rotate in fp32 and round once, as apply_rotary does
                rotated = rotated.to(x.dtype)
            self.keys[i].select(1, pos).copy_(rotated.select(1, h))
            self.values[i].select(1, pos).copy_(v)
            out = F.scaled_dot_product_attention(rotated.narrow(1, 0, h).unsqueeze(1), self.k4[i].narrow(2, 0, n),
                                                 self.v4[i].narrow(2, 0, n), attn_mask=mask)  # (b, 1, h, d)
            out = out.view(b, h * d)
            act = F.silu(gate) * value  # SwiGLU
            if lora is not None:
                x = x + (self._mm(out, layer["attn_out"]) + lora["out"](out))
                x = self._add_mm(x, act, layer["ff_out"])
            else:
                x = self._add_mm(self._add_mm(x, out, layer["attn_out"]), act, layer["ff_out"])
        self.cache.advance(1)
        self.step_index += 1
        x = F.layer_norm(x, x.shape[-1:], self.norm_w, None, self.norm_eps)
        return self._mm(x, self.out_emb)
