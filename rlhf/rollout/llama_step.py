"""`LlamaDecodeStep`: one decode step of a Llama-architecture model computed from its own
weights, with a preallocated KV cache.

A decode step feeds one token per row through every layer. With few rows the step is short
on arithmetic, so what the Python around it costs shows: transformers' forward rebuilds the
attention mask, walks its module hooks and grows its cache with `torch.cat` at every step.
This step does only the arithmetic:
- q/k/v and gate/up are each one matmul over weights concatenated once per `generate` call;
- keys and values are written in place into a buffer sized for prompt plus response;
- the padding mask is a boolean row that grows by one column per step, turned into one
  additive bias per step for all layers;
- attention for the single query token is two batched products per KV head, its query heads
  together, with the scale folded into the queries' rotary table (`F.scaled_dot_product_attention`
  took its generic path here, ~130 µs a layer for SmolLM2 at 8 rows);
- on CPUs where linear layers run through oneDNN, the weights are packed once per call into
  its blocked layout (rlhf/rollout/skinny.py).
The prompt itself still goes through the model's own forward (`start` copies its cache),
so position handling, rotary scaling and masking of the prompt are transformers' own.

Only a plain `LlamaForCausalLM` with unsharded, unwrapped `nn.Linear` layers takes this
path (`supports`); anything else (LoRA, quantised or sharded layers, other architectures)
keeps the model's forward. tests/rollout/test_llama_step.py checks the logits against it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from transformers import DynamicCache, LlamaForCausalLM

from rlhf.rollout.skinny import few_row_linear


Linear = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class _Layer:
    input_norm: torch.Tensor
    qkv: Linear
    out: Linear
    post_norm: torch.Tensor
    gate_up: Linear
    down: Linear


def _cat_bias(*linears: torch.nn.Linear) -> torch.Tensor | None:
    if all(linear.bias is None for linear in linears):
        return None
    return torch.cat([linear.bias if linear.bias is not None else linear.weight.new_zeros(linear.out_features)
                      for linear in linears])


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Half precision: normalise in fp32 and cast back before the weight, as LlamaRMSNorm does,
    # so the sampler's log-probs stay those of the model's own forward.
    wide = x.float()
    wide = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + eps)
    return weight * wide.to(x.dtype)


class LlamaDecodeStep:
    @staticmethod
    def supports(model: torch.nn.Module) -> bool:
        if type(model) is not LlamaForCausalLM:
            return False
        params = list(model.parameters())
        if any(hasattr(p, "ds_numel") or type(p) is not torch.nn.Parameter for p in params):
            return False  # ZeRO-3 partitions or FSDP2 DTensors: the forward must gather them
        if getattr(model.model.rotary_emb, "rope_type", "default") == "dynamic":
            return False  # its frequencies change with the longest position seen, step by step
        linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
        return all(type(m) is torch.nn.Linear and not m._forward_hooks and not m._forward_pre_hooks
                   for m in linears)

    @torch.no_grad()
    def __init__(self, model: LlamaForCausalLM):
        """Concatenate the weights once per `generate` call (the policy changes between calls,
        not within one); `start` then takes over each batch after the model's own prefill."""
        config = model.config
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.eps = config.rms_norm_eps
        if model.dtype == torch.float32:
            self.norm = functools.partial(F.rms_norm, normalized_shape=(config.hidden_size,), eps=self.eps)
        else:
            self.norm = functools.partial(_rms_norm, eps=self.eps)
        self.embed = model.model.embed_tokens.weight
        self.final_norm = model.model.norm.weight
        self.head = few_row_linear(model.lm_head.weight, model.lm_head.bias)
        self.rotary = model.model.rotary_emb
        first = model.model.layers[0]
        self.scaling = first.self_attn.scaling
        # SiLU as the function: a module call costs more than the op at a small model's sizes.
        self.act = F.silu if isinstance(first.mlp.act_fn, torch.nn.SiLU) else first.mlp.act_fn
        self.layers = [self._layer(layer) for layer in model.model.layers]

    @torch.no_grad()
    def start(self, cache: DynamicCache, prompt_mask: torch.Tensor, max_new_tokens: int) -> None:
        """Take over a batch after the model's own prefill: `cache` holds the prompt's keys and
        values (left-padded, `prompt_mask` marks the real tokens); room is made for
        `max_new_tokens`."""
        rows, width = prompt_mask.shape
        first_keys = cache.layers[0].keys
        self.kv = first_keys.new_empty((len(self.layers), 2, rows, self.kv_heads, width + max_new_tokens, self.head_dim))
        for index, layer in enumerate(cache.layers):
            self.kv[index, 0, :, :, :width] = layer.keys
            self.kv[index, 1, :, :, :width] = layer.values
        self.valid = torch.zeros((rows, width + max_new_tokens), dtype=torch.bool, device=prompt_mask.device)
        self.valid[:, :width] = prompt_mask.bool()
        self.length = width
        # cos/sin of every position a response can reach, computed once by the model's own
        # rotary module (so any static scaling it applies is kept).
        positions = torch.arange(width + max_new_tokens, device=prompt_mask.device).unsqueeze(0)
        cos, sin = self.rotary(self.embed[:1], positions)
        half = self.head_dim // 2
        # rotate_half(x)·sin = swap_halves(x)·[-sin₁, sin₂]: the sign moves into the table.
        sin = torch.cat([-sin[0, :, :half], sin[0, :, half:]], dim=-1)
        # The attention scale folded into the query heads' cos/sin: one rotation gives scaled
        # queries and plain keys. Tables: (positions, heads + kv_heads, head_dim).
        head_scale = cos.new_tensor([self.scaling] * self.heads + [1.0] * self.kv_heads).view(1, -1, 1)
        self.cos, self.sin = cos[0].unsqueeze(1) * head_scale, sin.unsqueeze(1) * head_scale

    def _layer(self, layer: torch.nn.Module) -> _Layer:
        attention, mlp = layer.self_attn, layer.mlp
        return _Layer(
            input_norm=layer.input_layernorm.weight,
            qkv=few_row_linear(torch.cat([attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight]),
                               _cat_bias(attention.q_proj, attention.k_proj, attention.v_proj)),
            out=few_row_linear(attention.o_proj.weight, attention.o_proj.bias),
            post_norm=layer.post_attention_layernorm.weight,
            gate_up=few_row_linear(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]),
                                   _cat_bias(mlp.gate_proj, mlp.up_proj)),
            down=few_row_linear(mlp.down_proj.weight, mlp.down_proj.bias),
        )

    def keep(self, rows: torch.Tensor) -> None:
        """Drop every row of the cache but `rows` (finished sequences leave the batch)."""
        self.kv = self.kv.index_select(2, rows)
        self.valid = self.valid.index_select(0, rows)

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits (rows, vocab) after feeding `tokens` (rows,) at `positions` (rows,)."""
        rows = tokens.shape[0]
        slot = self.length
        self.valid[:, slot] = True
        self.length += 1
        valid = self.valid[:, : self.length]
        # Padding as an additive bias, built once for all layers: (rows, 1, 1, length).
        bias = torch.zeros(valid.shape, dtype=self.kv.dtype, device=tokens.device)
        bias = bias.masked_fill_(~valid, float("-inf"))[:, None, None, :]
        # Every layer's views of this step, taken in one go: a small model's step is bound by
        # the cost of each Python-level tensor call, not by arithmetic.
        new_keys = self.kv[:, 0, :, :, slot].unbind(0)  # per layer (rows, kv_heads, head_dim)
        new_values = self.kv[:, 1, :, :, slot].unbind(0)
        keys_t = self.kv[:, 0, :, :, : self.length].transpose(-1, -2).unbind(0)  # (rows, kv_heads, head_dim, length)
        values = self.kv[:, 1, :, :, : self.length].unbind(0)  # (rows, kv_heads, length, head_dim)
        hidden = F.embedding(tokens, self.embed)  # (rows, hidden)
        cos, sin = self.cos[positions], self.sin[positions]  # (rows, heads + kv_heads, head_dim)
        heads, q_size, kv_size = self.heads + self.kv_heads, self.heads * self.head_dim, self.kv_heads * self.head_dim
        split, q_shape = [q_size + kv_size, kv_size], (rows, self.kv_heads, self.heads // self.kv_heads, self.head_dim)
        norm = self.norm
        for layer, new_k, new_v, k_t, v in zip(self.layers, new_keys, new_values, keys_t, values):
            qk, new_value = layer.qkv(norm(hidden, weight=layer.input_norm)).split(split, dim=-1)
            # Rotary embedding of q and k heads together: x·cos + rotate_half(x)·sin.
            qk = qk.view(rows, heads, 2, -1)
            qk = torch.addcmul(qk.view(rows, heads, -1) * cos, qk.flip(2).view(rows, heads, -1), sin)
            new_k.copy_(qk[:, self.heads :])
            new_v.copy_(new_value.view(rows, self.kv_heads, self.head_dim))
            # One query token per row: attention as two small products per KV head, its
            # query heads together (grouped-query attention without copying K/V).
            weights = torch.softmax(torch.matmul(qk[:, : self.heads].view(q_shape), k_t) + bias, dim=-1)
            hidden = hidden + layer.out(torch.matmul(weights, v).view(rows, q_size))
            gate, up = layer.gate_up(norm(hidden, weight=layer.post_norm)).chunk(2, dim=-1)
            hidden = hidden + layer.down(self.act(gate) * up)
        return self.head(norm(hidden, weight=self.final_norm))
