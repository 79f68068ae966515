"""Reward (and value) models: a causal-LM backbone with a scalar head.

The model is a transformers `*ForSequenceClassification` with `num_labels=1`, so the export
reloads with `AutoModelForSequenceClassification`. We compute scores ourselves instead of
calling its forward: the score is read at the last attended position of each sequence (the
EOS of the answer, or its last token when truncated), whatever the padding side, and
independent of pad_token_id (transformers' own pooling compares ids with pad_token_id,
which is wrong for tokenizers whose pad and EOS coincide).

Score statistics on the RM eval set (`reward_stats.json`) travel with the export; PPO
normalises rewards with them.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, PreTrainedModel

from rlhf.config_sections import ModelConfig
from rlhf.errors import UserError
from rlhf.models.checkpointing import enable_gradient_checkpointing
from rlhf.models.engines import unwrap_engine
from rlhf.models.loading import (PendingWeights, Placement, model_kwargs, build_empty, build_partitioned_from_gguf,
                                 detach_gguf_quantizer, effective_placement, resolve_location, zero3_construction)
from rlhf.models.positions import position_ids_from_mask
from rlhf.models.shared_prefix import shared_prefix_attention_mask

REWARD_STATS_FILE = "reward_stats.json"


@dataclass
class RewardStats:
    mean: float
    std: float
    count: int

    def save(self, directory: str | Path) -> None:
        (Path(directory) / REWARD_STATS_FILE).write_text(json.dumps(asdict(self), indent=2), encoding="utf-8")

    @classmethod
    def load(cls, directory: str | Path) -> "RewardStats | None":
        path = Path(directory) / REWARD_STATS_FILE
        if not path.is_file():
            return None
        return cls(**json.loads(path.read_text(encoding="utf-8")))


def _is_scalar_head_checkpoint(location: str, cfg: ModelConfig) -> bool:
    try:
        config = AutoConfig.from_pretrained(location, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError):
        return False
    return any(a.endswith("ForSequenceClassification") for a in (config.architectures or [])) and config.num_labels == 1


def load_scalar_model(
    cfg: ModelConfig, device: torch.device, path: str | None = None, seed: int = 0, dtype: torch.dtype | None = None,
    placement: Placement | None = None,
) -> PreTrainedModel:
    """Load a backbone with a scalar head, placed as `placement` says (default: whole). From a
    causal LM (the SFT model) the head is new and initialised N(0, 1/(d+1)) (Stiennon et al.
    2020 / InstructGPT's reward-head init, so initial scores have unit-scale variance); from a
    reward-model export it is kept."""
    path = path or cfg.path
    location, gguf_file = resolve_location(cfg, path)
    placement = effective_placement(placement, cfg, location, gguf_file)
    has_head = gguf_file is None and _is_scalar_head_checkpoint(location, cfg)
    kwargs = model_kwargs(cfg, device, dtype)
    if placement.mode == "meta":
        model = build_empty(AutoModelForSequenceClassification, location, gguf_file, kwargs, num_labels=1)
        model.pending_weights = PendingWeights(
            location, gguf_file, lambda: load_scalar_model(cfg, torch.device("cpu"), path, seed, dtype),
            new_head_values(model, seed))
    else:
        if placement.mode == "zero3" and gguf_file:
            model, missing = build_partitioned_from_gguf(AutoModelForSequenceClassification, location, gguf_file,
                                                         kwargs, placement, num_labels=1)
            if missing - _head_names(model):
                raise UserError(f"model.gguf_file: {gguf_file} holds no weights for {sorted(missing)[:5]}")
        else:
            try:
                with zero3_construction(placement):
                    model = AutoModelForSequenceClassification.from_pretrained(location, gguf_file=gguf_file,
                                                                               num_labels=1, **kwargs)
            except (OSError, ValueError) as exc:
                raise UserError(f"cannot load a reward/value model from '{path}': {str(exc).splitlines()[0]}") from None
            if gguf_file:
                detach_gguf_quantizer(model)
        if not has_head:
            head = score_head(model)
            params = [p for p in (head.weight, head.bias) if p is not None]
            with placement.modify(params):  # a partitioned head is whole (on rank 0) in here
                _init_head(head, seed)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    text_config = model.config.get_text_config()
    if text_config.pad_token_id is None:
        # transformers' own pooling (never read here: scores come from `sequence_scores`) refuses
        # batches without a pad id, and the root forward that FSDP2 needs runs it.
        eos = text_config.eos_token_id
        text_config.pad_token_id = (eos[0] if isinstance(eos, list) else eos) or 0
    # Partitioned parameters are already on the device zero.Init chose; meta ones have no data yet.
    return model.to(device) if placement.mode == "whole" else model


def _init_head(head: torch.nn.Linear, seed: int) -> None:
    hidden = head.weight.shape[-1]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        torch.nn.init.normal_(head.weight, std=1.0 / math.sqrt(hidden + 1))
    if head.bias is not None:
        torch.nn.init.zeros_(head.bias)


def _head_names(model: PreTrainedModel) -> set[str]:
    """The checkpoint names of the scalar head's parameters."""
    names = {id(p): n for n, p in model.named_parameters()}
    head = score_head(model)
    return {names[id(p)] for p in (head.weight, head.bias) if p is not None}


def new_head_values(model: PreTrainedModel, seed: int) -> Callable[[set[str]], dict[str, torch.Tensor]]:
    """For a model whose weights are loaded into shards: given the names the checkpoint lacks,
    the full values `_init_head` gives a new head (every rank computes the same ones), by the
    checkpoint's names. The head's shape is taken now, before a PEFT wrapper hides it."""
    head = score_head(model)
    names = {id(p): n for n, p in model.named_parameters()}
    weight_name = names[id(head.weight)]
    bias_name = names[id(head.bias)] if head.bias is not None else None
    shape = (head.in_features, head.out_features, head.weight.dtype)

    def values(missing: set[str]) -> dict[str, torch.Tensor]:
        if weight_name not in missing:
            return {}
        in_features, out_features, dtype = shape
        full = torch.nn.Linear(in_features, out_features, bias=bias_name is not None, dtype=dtype, device="cpu")
        _init_head(full, seed)
        out = {weight_name: full.weight.detach()}
        if bias_name is not None:
            out[bias_name] = full.bias.detach()
        return out

    return values


def transformers_model(model: torch.nn.Module) -> PreTrainedModel:
    """The transformers model inside an engine wrapper and a PEFT model (whose adapters are
    injected into it)."""
    model = unwrap_engine(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def score_head(model: torch.nn.Module) -> torch.nn.Module:
    """The scalar head (a linear layer, or PEFT's trained copy of one under LoRA)."""
    model = transformers_model(model)
    for name in ("score", "classifier", "v_head"):
        head = getattr(model, name, None)
        if isinstance(head, torch.nn.Linear) or isinstance(getattr(head, "original_module", None), torch.nn.Linear):
            return head
    raise UserError(f"{type(model).__name__} has no scalar head this project knows (score / classifier)")


def backbone(model: PreTrainedModel) -> torch.nn.Module:
    model = transformers_model(model)
    return getattr(model, model.base_model_prefix)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(batch,) index of the last attended position, for left or right padding."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * attention_mask.long()).argmax(dim=-1)


def final_hidden(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 position_ids: torch.Tensor, **attention: object) -> torch.Tensor:
    """(batch, seq, hidden) final hidden states (after the last norm).

    A bare model runs its backbone alone, which skips the scalar head's pooling. A model
    inside a training engine (a DeepSpeed engine, an FSDP2 root) runs the root forward, and the
    backbone's output is taken on its way to the head: both engines keep per-forward state in
    the root's forward that a direct backbone call would skip. DeepSpeed's engine.forward
    opens each micro-step (its ZeRO optimizer counts micro-steps there, and ZeRO-3 then copies
    a micro-batch's gradient over the step's earlier ones instead of adding it, so gradient
    accumulation lost all but the last micro-batch); FSDP2's root gathers the parameters
    outside the transformer blocks (embedding, final norm, head) and keeps them gathered for
    the head and the backward. The root forward's own head output and pooling are unused."""
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
                  **attention)
    inner = unwrap_engine(model)
    if inner is model and not (_is_fsdp(model) or _is_fsdp(transformers_model(model))):
        return backbone(model)(**inputs).last_hidden_state
    captured: list[torch.Tensor] = []

    def keep_hidden(_module: torch.nn.Module, _args: tuple, output) -> None:
        captured.append(output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0])

    # A forward hook for the length of one call (nothing rebound): only the backbone's output
    # is kept, where output_hidden_states would hold every layer's until the head has run.
    handle = backbone(model).register_forward_hook(keep_hidden)
    try:
        model(**inputs)
    finally:
        handle.remove()
    return captured[-1]


def _is_fsdp(model: torch.nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return False
    return isinstance(model, FSDPModule)


def _hidden(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    return final_hidden(model, input_ids, attention_mask, position_ids_from_mask(attention_mask))


def token_values(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(batch, seq) head output at every position (the critic's per-token values)."""
    return score_head(model)(_hidden(model, input_ids, attention_mask)).squeeze(-1).float()


def sequence_scores(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(batch,) score of each sequence, read at its last attended token."""
    hidden = _hidden(model, input_ids, attention_mask)
    last = hidden[torch.arange(hidden.shape[0], device=hidden.device), last_token_index(attention_mask)]
    return score_head(model)(last).squeeze(-1).float()


def shared_prefix_scores(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    segment_ids: torch.Tensor,
    position_ids: torch.Tensor,
    score_index: torch.Tensor,
) -> torch.Tensor:
    """(answers,) scores of answers laid out as rows [prompt, answer 1, ..., answer K] (see
    rlhf/models/shared_prefix.py), read at the flat (row * seq + column) positions in
    `score_index`: the same scores `sequence_scores` gives each [prompt, answer] row."""
    inner = transformers_model(model)
    mask = shared_prefix_attention_mask(segment_ids, inner.config._attn_implementation, inner.dtype)
    hidden = final_hidden(model, input_ids, mask, position_ids)
    picked = hidden.reshape(-1, hidden.shape[-1])[score_index]
    return score_head(model)(picked).squeeze(-1).float()
