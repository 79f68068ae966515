"""`LlamaDecodeStep`: the prompt and then one decode step at a time of a Llama-architecture
model, computed from its own weights, with a preallocated KV cache.

A decode step feeds one token per row through every layer. With few rows the step is short
on arithmetic, so what the Python around it costs shows: transformers' forward rebuilds the
attention mask, walks its module hooks and grows its cache with `torch.cat` at every step, and
its prompt forward plus the copy of its cache cost more per call than `prefill` on a small
model such as the tiny benchmark model, whose prompt pass is light on arithmetic
(BENCHMARKS.md, 'Measurements behind the code'). This class does only the arithmetic:
- q/k/v are one matmul per layer, over weights concatenated once per `generate` call and
  ordered by KV group: each group's query heads, then its key and its value head. The
  rotary embedding then turns the whole product at once (the value slot's table is cos 1,
  sin 0), the new key and value are one copy into the cache, and the query heads of every
  row and group are a plain strided view for the two batched products of attention;
- gate/up are one matmul; the residual additions of the output and down projections are
  fused into the product (`addmm`) where the weight is small enough to keep the plain one;
- keys and values are written in place into a buffer sized for prompt plus response, and the
  padding mask is an additive bias kept for the whole call, added inside the score product;
- the attention scale is folded into the queries' rotary table;
- on CPUs the large fp32 weights are packed once per call into oneDNN's blocked layout
  (rlhf/kernels/skinny.py): a step's products are bound by reading the weights from memory,
  and the packed layout reads faster.
`prefill` runs the left-padded prompts with `F.scaled_dot_product_attention` under a causal
mask over each row's real tokens, at transformers' positions (the running count of real
tokens), with the model's own rotary module and projection layers.

Mixed precision (a model whose fp32 weights compute under autocast, rlhf/models/autocast.py):
with `dtype` the step casts its weights to it once per call, as it concatenates them, and
runs prompt and steps in it (the KV cache too); the prompt pass's projection layers run under
autocast in that dtype.

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
from transformers import LlamaForCausalLM

from rlhf.kernels.cpu_linear import CPULinear
from rlhf.kernels.fused_head import LossHead
from rlhf.kernels.skinny import few_row_linear, few_row_linear_add
from rlhf.models.autocast import only_autocast_hooks
from rlhf.models.engines import is_whole

PLAIN_LINEARS = (torch.nn.Linear, CPULinear, LossHead)
"""Layer classes computing exactly `F.linear`, whose weights the step may use directly."""


Linear = Callable[[torch.Tensor], torch.Tensor]
ResidualLinear = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class _Layer:
    input_norm: torch.Tensor
    qkv: Linear  # (rows, hidden) -> (rows, kv_heads * (group + 2) * head_dim), see `_grouped_qkv`
    out: ResidualLinear  # (residual, x) -> residual + o_proj(x)
    post_norm: torch.Tensor
    gate_up: Linear
    down: ResidualLinear


def _bias(linear: torch.nn.Linear) -> torch.Tensor:
    return linear.bias if linear.bias is not None else linear.weight.new_zeros(linear.out_features)


def _cat_bias(*linears: torch.nn.Linear) -> torch.Tensor | None:
    if all(linear.bias is None for linear in linears):
        return None
    return torch.cat([_bias(linear) for linear in linears])


def _grouped_qkv(attention: torch.nn.Module, kv_heads: int, group: int, head_dim: int
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """q/k/v weights (and biases) as one matrix whose output rows are ordered per KV group:
    the group's `group` query heads, then its key head, then its value head."""
    def grouped(tensors: list[torch.Tensor], trailing: tuple[int, ...]) -> torch.Tensor:
        q, k, v = tensors
        return torch.cat([q.reshape(kv_heads, group, head_dim, *trailing), k.reshape(kv_heads, 1, head_dim, *trailing),
                          v.reshape(kv_heads, 1, head_dim, *trailing)], dim=1).reshape(-1, *trailing)

    projections = (attention.q_proj, attention.k_proj, attention.v_proj)
    weight = grouped([p.weight for p in projections], (projections[0].in_features,))
    if all(p.bias is None for p in projections):
        return weight, None
    return weight, grouped([_bias(p) for p in projections], ())


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x·cos + rotate_half(x)·sin, with rotate_half's sign kept in the `sin` table:
    rotate_half(x)·sin = swap_halves(x)·[-sin₁, sin₂]."""
    return torch.addcmul(x * cos, x.unflatten(-1, (2, -1)).flip(-2).flatten(-2), sin)


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
        if not all(is_whole(p) for p in params):
            return False  # ZeRO-3 partitions or FSDP2 DTensors: the forward must gather them
        if getattr(model.model.rotary_emb, "rope_type", "default") == "dynamic":
            return False  # its frequencies change with the longest position seen, step by step
        linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
        return all(type(m) in PLAIN_LINEARS and only_autocast_hooks(m) for m in linears)

    @torch.no_grad()
    def __init__(self, model: LlamaForCausalLM, dtype: torch.dtype | None = None):
        """Concatenate the weights once per `generate` call (the policy changes between calls,
        not within one); `prefill` then starts each batch. `dtype`: compute in it (the weights
        cast once here), as autocast computes the model's forward."""
        config = model.config
        self.dtype = dtype if dtype is not None and dtype != model.dtype else None
        cast = (lambda t: t if t is None else t.to(self.dtype)) if self.dtype is not None else (lambda t: t)  # noqa: E731
        self._cast = cast
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.group = self.heads // self.kv_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        if (self.dtype or model.dtype) == torch.float32:
            self.norm = functools.partial(F.rms_norm, normalized_shape=(config.hidden_size,), eps=config.rms_norm_eps)
        else:
            self.norm = functools.partial(_rms_norm, eps=config.rms_norm_eps)
        self.embed = cast(model.model.embed_tokens.weight)
        self.final_norm = cast(model.model.norm.weight)
        self.head = few_row_linear(cast(model.lm_head.weight), cast(model.lm_head.bias))
        self.rotary = model.model.rotary_emb
        self.blocks = list(model.model.layers)  # their own projections run the prompt
        first = self.blocks[0]
        self.scaling = first.self_attn.scaling
        # SiLU as the function: a module call costs more than the op at a small model's sizes.
        self.act = F.silu if isinstance(first.mlp.act_fn, torch.nn.SiLU) else first.mlp.act_fn
        self.layers = [self._layer(block) for block in self.blocks]

    def _layer(self, block: torch.nn.Module) -> _Layer:
        attention, mlp, cast = block.self_attn, block.mlp, self._cast
        qkv_weight, qkv_bias = _grouped_qkv(attention, self.kv_heads, self.group, self.head_dim)
        return _Layer(
            input_norm=cast(block.input_layernorm.weight),
            qkv=few_row_linear(cast(qkv_weight), cast(qkv_bias)),
            out=few_row_linear_add(cast(attention.o_proj.weight), cast(attention.o_proj.bias)),
            post_norm=cast(block.post_attention_layernorm.weight),
            gate_up=few_row_linear(cast(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])),
                                   cast(_cat_bias(mlp.gate_proj, mlp.up_proj))),
            down=few_row_linear_add(cast(mlp.down_proj.weight), cast(mlp.down_proj.bias)),
        )

    def _rotary_tables(self, positions: int, device: torch.device) -> None:
        """cos/sin of every position a response can reach, from the model's own rotary module
        (so any static scaling it applies is kept), per slot of a KV group: (positions, 1,
        group + 2, head_dim). Query slots carry the attention scale; the value slot is the
        identity (cos 1, sin 0)."""
        cos, sin = self.rotary(self.embed[:1], torch.arange(positions, device=device).unsqueeze(0))
        cos, sin = cos[0], sin[0]
        half = self.head_dim // 2
        sin = torch.cat([-sin[:, :half], sin[:, half:]], dim=-1)
        self.cos = torch.stack([cos * self.scaling] * self.group + [cos, torch.ones_like(cos)], dim=1).unsqueeze(1)
        self.sin = torch.stack([sin * self.scaling] * self.group + [sin, torch.zeros_like(sin)], dim=1).unsqueeze(1)

    @torch.no_grad()
    def prefill(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Run left-padded prompts (`prompt_mask` marks the real tokens), keep their keys and
        values with room for `max_new_tokens`, and return the logits (rows, vocab) after each
        prompt's last token."""
        # The block's own projection layers hold the model's weights: autocast casts them.
        with torch.autocast(prompt_ids.device.type, dtype=self.dtype or torch.bfloat16, enabled=self.dtype is not None):
            return self._prefill(prompt_ids, prompt_mask, max_new_tokens)

    def _prefill(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        rows, width = prompt_ids.shape
        device, group, kv_heads, head_dim = prompt_ids.device, self.group, self.kv_heads, self.head_dim
        self._rotary_tables(width + max_new_tokens, device)
        self.kv = self.embed.new_empty((len(self.layers), rows, kv_heads, 2, width + max_new_tokens, head_dim))
        real = prompt_mask.bool()
        # Padding as an additive bias for the whole call, one row per KV group: (rows, kv, 1, length).
        self.bias = self.embed.new_zeros((rows, kv_heads, 1, width + max_new_tokens))
        self.bias[..., :width].masked_fill_(~real[:, None, None, :], float("-inf"))
        self.length = width
        positions = (prompt_mask.cumsum(-1) - 1).clamp_(min=0)
        cos, sin = self.cos[positions], self.sin[positions]  # (rows, width, 1, group + 2, head_dim)
        # Causal over each row's real tokens; a padding query also sees itself, so no row of
        # scores is all -inf (its output is never read).
        allowed = torch.ones((width, width), dtype=torch.bool, device=device).tril_() & real[:, None, :]
        allowed = (allowed | torch.eye(width, dtype=torch.bool, device=device)).unsqueeze(1)
        hidden = F.embedding(prompt_ids, self.embed)
        for index, (layer, block) in enumerate(zip(self.layers, self.blocks)):
            attention, mlp = block.self_attn, block.mlp
            x = self.norm(hidden, weight=layer.input_norm)
            x = torch.cat([attention.q_proj(x).view(rows, width, kv_heads, group, head_dim),
                           attention.k_proj(x).view(rows, width, kv_heads, 1, head_dim),
                           attention.v_proj(x).view(rows, width, kv_heads, 1, head_dim)], dim=3)
            x = _rotate(x, cos, sin)
            self.kv[index, :, :, :, :width] = x[:, :, :, group:].permute(0, 2, 3, 1, 4)
            queries = x[:, :, :, :group].reshape(rows, width, self.heads, head_dim).transpose(1, 2)
            out = F.scaled_dot_product_attention(queries, self.kv[index, :, :, 0, :width], self.kv[index, :, :, 1, :width],
                                                 attn_mask=allowed, scale=1.0, enable_gqa=group > 1)
            hidden = hidden + attention.o_proj(out.transpose(1, 2).reshape(rows, width, self.heads * head_dim))
            x = self.norm(hidden, weight=layer.post_norm)
            hidden = hidden + mlp.down_proj(self.act(mlp.gate_proj(x)) * mlp.up_proj(x))
        return self.head(self.norm(hidden[:, -1], weight=self.final_norm))

    def keep(self, rows: torch.Tensor) -> None:
        """Drop every row of the cache but `rows` (finished sequences leave the batch)."""
        self.kv = self.kv.index_select(1, rows)
        self.bias = self.bias.index_select(0, rows)

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits (rows, vocab) after feeding `tokens` (rows,) at `positions` (rows,)."""
        rows, group = tokens.shape[0], self.group
        slot = self.length
        self.length += 1
        groups, q_size = rows * self.kv_heads, self.heads * self.head_dim
        bias = self.bias[..., : self.length].reshape(groups, 1, self.length)
        # Every layer's views of this step, taken in one go: a small model's step is bound by
        # the cost of each Python-level tensor call, not by arithmetic.
        new_entries = self.kv[:, :, :, :, slot].unbind(0)  # per layer (rows, kv, 2, head_dim)
        keys_t = self.kv[:, :, :, 0, : self.length].flatten(1, 2).transpose(-1, -2).unbind(0)  # (groups, head_dim, length)
        values = self.kv[:, :, :, 1, : self.length].flatten(1, 2).unbind(0)  # (groups, length, head_dim)
        hidden = F.embedding(tokens, self.embed)  # (rows, hidden)
        cos, sin = self.cos[positions], self.sin[positions]  # (rows, 1, group + 2, head_dim)
        grouped = (rows, self.kv_heads, group + 2, self.head_dim)
        norm = self.norm
        for layer, new_entry, k_t, v in zip(self.layers, new_entries, keys_t, values):
            x = _rotate(layer.qkv(norm(hidden, weight=layer.input_norm)).view(grouped), cos, sin)
            new_entry.copy_(x[:, :, group:])
            # One query token per row: each KV group's query heads as one batch entry of two
            # small products (grouped-query attention without copying K/V).
            weights = torch.softmax(torch.baddbmm(bias, x[:, :, :group].reshape(groups, group, -1), k_t), dim=-1)
            hidden = layer.out(hidden, torch.bmm(weights, v).view(rows, q_size))
            gate, up = layer.gate_up(norm(hidden, weight=layer.post_norm)).chunk(2, dim=-1)
            hidden = layer.down(hidden, self.act(gate) * up)
        return self.head(norm(hidden, weight=self.final_norm))
