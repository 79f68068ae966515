"""`LlamaDecodeStep`: one decode step of a Llama-architecture model computed from its own
weights, with a preallocated KV cache.

A decode step feeds one token per row through every layer. With few rows the step is short
on arithmetic, so what the Python around it costs shows: transformers' forward rebuilds the
attention mask, walks its module hooks and grows its cache with `torch.cat` at every step.
This step does only the arithmetic:
- q/k/v and gate/up are each one matmul over weights concatenated once per `generate` call;
- keys and values are written in place into a buffer sized for prompt plus response;
- the padding mask is a boolean row that grows by one column per step.
The prompt itself still goes through the model's own forward (`start` copies its cache),
so position handling, rotary scaling and masking of the prompt are transformers' own.

Only a plain `LlamaForCausalLM` with unsharded, unwrapped `nn.Linear` layers takes this
path (`supports`); anything else (LoRA, quantised or sharded layers, other architectures)
keeps the model's forward. tests/rollout/test_llama_step.py checks the logits against it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache, LlamaForCausalLM

from rlhf.rollout.skinny import linear_for_few_rows


@dataclass
class _Layer:
    input_norm: torch.Tensor
    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    out: torch.Tensor
    out_bias: torch.Tensor | None
    post_norm: torch.Tensor
    gate_up: torch.Tensor
    gate_up_bias: torch.Tensor | None
    down: torch.Tensor
    down_bias: torch.Tensor | None


def _cat_bias(*linears: torch.nn.Linear) -> torch.Tensor | None:
    if all(linear.bias is None for linear in linears):
        return None
    return torch.cat([linear.bias if linear.bias is not None else linear.weight.new_zeros(linear.out_features)
                      for linear in linears])


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
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
        self.embed = model.model.embed_tokens.weight
        self.final_norm = model.model.norm.weight
        self.head = model.lm_head.weight
        self.head_bias = model.lm_head.bias
        self.rotary = model.model.rotary_emb
        first = model.model.layers[0]
        self.scaling = first.self_attn.scaling
        self.act = first.mlp.act_fn
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
        self.cos, self.sin = cos[0], sin[0]  # (positions, head_dim)

    def _layer(self, layer: torch.nn.Module) -> _Layer:
        attention, mlp = layer.self_attn, layer.mlp
        return _Layer(
            input_norm=layer.input_layernorm.weight,
            qkv=torch.cat([attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight]),
            qkv_bias=_cat_bias(attention.q_proj, attention.k_proj, attention.v_proj),
            out=attention.o_proj.weight, out_bias=attention.o_proj.bias,
            post_norm=layer.post_attention_layernorm.weight,
            gate_up=torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]),
            gate_up_bias=_cat_bias(mlp.gate_proj, mlp.up_proj),
            down=mlp.down_proj.weight, down_bias=mlp.down_proj.bias,
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
        mask = self.valid[:, None, None, : self.length]
        hidden = F.embedding(tokens, self.embed)  # (rows, hidden)
        cos, sin = self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)  # (rows, 1, head_dim)
        q_size, kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
        half = self.head_dim // 2
        for index, layer in enumerate(self.layers):
            x = _rms_norm(hidden, layer.input_norm, self.eps)
            qkv = linear_for_few_rows(x, layer.qkv, layer.qkv_bias)
            # Rotary embedding of q and k heads together: x·cos + rotate_half(x)·sin.
            qk = qkv[:, : q_size + kv_size].view(rows, self.heads + self.kv_heads, self.head_dim)
            qk = qk * cos + torch.cat([-qk[..., half:], qk[..., :half]], dim=-1) * sin
            q = qk[:, : self.heads].unsqueeze(2)  # (rows, heads, 1, head_dim)
            v = qkv[:, q_size + kv_size :]
            self.kv[index, 0, :, :, slot] = qk[:, self.heads :]
            self.kv[index, 1, :, :, slot] = v.view(rows, self.kv_heads, self.head_dim)
            keys, values = self.kv[index, 0, :, :, : self.length], self.kv[index, 1, :, :, : self.length]
            attended = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scaling,
                                                      enable_gqa=self.kv_heads != self.heads)
            hidden = hidden + linear_for_few_rows(attended.reshape(rows, q_size), layer.out, layer.out_bias)
            x = _rms_norm(hidden, layer.post_norm, self.eps)
            gate, up = linear_for_few_rows(x, layer.gate_up, layer.gate_up_bias).chunk(2, dim=-1)
            hidden = hidden + linear_for_few_rows(self.act(gate) * up, layer.down, layer.down_bias)
        hidden = _rms_norm(hidden, self.final_norm, self.eps)
        return linear_for_few_rows(hidden, self.head, self.head_bias)
