"""Model shapes: the sizes the estimate needs, and the exact parameter count, read without
loading any weights.

The model's config is read (`config.json`, or a GGUF header; remote code never runs) and the
model is instantiated on the meta device to count parameters exactly; `model.tiny` builds the
tiny Llama on the meta device. transformers and torch are imported only when a count is
needed, so importing the planner stays cheap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from rlhf.config_sections import LoraConfig, ModelConfig
from rlhf.errors import UserError
from rlhf.plan.units import count


@dataclass
class ModelShape:
    """The sizes the estimate needs, read from a model's config."""

    params: int
    """Parameters of the causal LM (tied embeddings counted once)."""
    hidden_size: int
    num_layers: int
    vocab_size: int
    num_heads: int
    intermediate_size: int
    num_kv_heads: Optional[int] = None
    """Key/value heads (grouped-query attention); None: num_heads."""
    head_dim: Optional[int] = None
    """None: hidden_size // num_heads."""
    tied_embeddings: bool = True
    """The LM head shares the input embedding's weights."""
    architecture: Optional[str] = None
    """The transformers class that builds it (LlamaForCausalLM, ...)."""

    @property
    def kv_width(self) -> int:
        """Elements of one token's key (or value) in one layer."""
        heads = self.num_kv_heads or self.num_heads
        return heads * (self.head_dim or self.hidden_size // self.num_heads)

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size * (1 if self.tied_embeddings else 2)

    @property
    def layer_params(self) -> int:
        """Parameters of one decoder layer (the rest, spread evenly over the layers)."""
        return max(self.params - self.embedding_params, 0) // max(self.num_layers, 1)

    @property
    def scalar_params(self) -> int:
        """Parameters of the same backbone with a scalar head (reward model, critic): the LM
        head (when it has its own weights) is replaced by a hidden_size x 1 score head."""
        head = 0 if self.tied_embeddings else self.vocab_size * self.hidden_size
        return self.params - head + self.hidden_size


def count_parameters(model_cfg: ModelConfig, field_name: str = "model") -> ModelShape:
    """The model's shape and exact parameter count, without loading weights: `model.tiny`
    builds the tiny Llama's config; otherwise the config is read (remote code never runs)
    and the model is instantiated on the meta device."""
    import torch

    if model_cfg.tiny is not None:
        from rlhf.models.tiny import build_tiny_model

        # The tokenizer is trained later and may stop below the target vocabulary: an upper bound.
        with torch.device("meta"):
            model = build_tiny_model(model_cfg.tiny, model_cfg.tiny.vocab_size, pad_token_id=0, eos_token_id=1, seed=0)
    else:
        from transformers import AutoModelForCausalLM

        config = _read_model_config(model_cfg, field_name)
        try:
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config)
        except (ValueError, KeyError) as exc:
            raise UserError(f"{field_name}.path: {model_cfg.path}: transformers cannot build a causal LM from its "
                            f"config ({type(config).__name__}): {str(exc).splitlines()[0]}") from None
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = text.hidden_size
    heads = text.num_attention_heads
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    return ModelShape(
        params=sum(p.numel() for p in model.parameters()),
        hidden_size=hidden,
        num_layers=text.num_hidden_layers,
        vocab_size=text.vocab_size,
        num_heads=heads,
        intermediate_size=getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None) or 4 * hidden,
        num_kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or hidden // heads,
        tied_embeddings=head is None or head.weight is embedding.weight,
        architecture=type(model).__name__,
    )


def _read_model_config(model_cfg: ModelConfig, field_name: str):
    from transformers import AutoConfig

    from rlhf.models.loading import resolve_location

    location, gguf_file = resolve_location(model_cfg, model_cfg.path, f"{field_name}.path")
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        # The planner never runs code shipped with a checkpoint, whatever trust_remote_code says.
        return AutoConfig.from_pretrained(location, revision=model_cfg.revision, trust_remote_code=False, **kwargs)
    except (OSError, ValueError) as exc:
        raise UserError(f"{field_name}.path: cannot read the model config of '{model_cfg.path}' (the planner reads "
                        f"only the config and never runs remote code): {str(exc).splitlines()[0]}") from None


def lora_params(shape: ModelShape, lora: LoraConfig) -> int:
    """Adapter parameters: A (r x in) and B (out x r) per target module and layer, estimated
    as 2 * r * hidden each."""
    return 2 * lora.r * shape.hidden_size * len(lora.target_modules) * shape.num_layers


def describe_model(model_cfg: ModelConfig, shape: ModelShape) -> str:
    """One line for the plan's header: where the model comes from and its sizes."""
    where = "tiny (built from model.tiny)" if model_cfg.tiny is not None else (
        model_cfg.path + (f" [{model_cfg.gguf_file}]" if model_cfg.gguf_file else ""))
    return (f"{where}: {count(shape.params)} parameters, hidden {shape.hidden_size}, {shape.num_layers} layers, "
            f"{shape.num_heads} heads, vocab {shape.vocab_size}")
