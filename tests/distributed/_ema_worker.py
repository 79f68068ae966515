"""One worker of tests/distributed/test_sharded_ema.py (or the single-process reference, run
in the test's own process): a tiny Llama trained a few steps through a Strategy with an EMA
of its weights, then the EMA written back into the model. Rank 0 saves what the test compares.

    python tests/distributed/_ema_worker.py OUT_DIR STRATEGY   (RANK, WORLD_SIZE, ... in the env)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rlhf.config_sections import StrategyConfig
from rlhf.distributed.factory import build_strategy
from rlhf.distributed.optim import OptimizerSpec
from rlhf.training.ema import EMA

STEPS, DECAY, ROWS, LENGTH, VOCAB = 3, 0.5, 4, 16, 64
STRATEGIES = {"single": StrategyConfig(name="single"), "zero3": StrategyConfig(name="deepspeed", zero_stage=3),
              "fsdp": StrategyConfig(name="fsdp")}


def tiny_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=LENGTH,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config).float()


def _plain(name: str) -> str:
    """A DeepSpeed engine names its module's parameters module.<name>."""
    return name[len("module."):] if name.startswith("module.") else name


def full_weights(strategy, trained, strategy_name: str) -> dict[str, torch.Tensor]:
    """Copies: on CPU a full state dict may share storage with the live parameters (an FSDP2
    shard of a one-rank shard group is the whole tensor), which copy_to overwrites."""
    state = trained.module.state_dict() if strategy_name == "single" else strategy.full_state_dict(trained)
    return {k: v.detach().clone() for k, v in state.items()}


def run(out: Path, strategy_name: str) -> None:
    strategy = build_strategy(STRATEGIES[strategy_name])
    strategy.setup(seed=0)
    model = tiny_model()
    spec = OptimizerSpec(lr=1e-2, weight_decay=0.0, betas=(0.9, 0.95), eps=1e-8, max_grad_norm=0.0,
                         scheduler="constant", warmup_steps=0, total_steps=STEPS, min_lr_ratio=0.0)
    rows = ROWS // strategy.world_size
    trained = strategy.wrap(model, spec, accumulation=1, micro_batch_size=rows)
    ema = EMA(trained.module, DECAY)
    ids = torch.randint(0, VOCAB, (STEPS, ROWS, LENGTH), generator=torch.Generator().manual_seed(1))
    losses, norms = [], []
    for step in range(STEPS):
        # This rank's rows; the loss is its token-loss sum over the global batch's token count.
        mine = ids[step, strategy.rank * rows:(strategy.rank + 1) * rows].to(strategy.device)
        logits = trained.module(input_ids=mine).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), mine[:, 1:].reshape(-1),
                                                 reduction="sum") / (ROWS * (LENGTH - 1))
        strategy.backward(trained, loss)
        norms.append(strategy.step(trained))  # the gradient's scale, which Adam's update hides
        ema.update(trained.module)
        losses.append(strategy.all_reduce({"loss": float(loss.detach())}, op="sum")["loss"])
    shadow = {_plain(k): v for k, v in ema.state_dict().items()}
    final = full_weights(strategy, trained, strategy_name)
    ema.copy_to(trained.module)
    written = full_weights(strategy, trained, strategy_name)
    held = strategy.all_reduce({"held": float(bool(ema.state_dict()))}, op="sum")["held"]
    if strategy.is_main:
        out.mkdir(parents=True, exist_ok=True)
        torch.save({"ema": shadow, "final": final, "written": written}, out / "weights.pt")
        meshes = [list(shape) for shape in getattr(strategy, "meshes", {})]
        (out / "run.json").write_text(json.dumps({"losses": losses, "norms": norms, "meshes": meshes, "ranks_holding_ema": held}))
    strategy.teardown()


if __name__ == "__main__":
    torch.set_num_threads(1)
    run(Path(sys.argv[1]), sys.argv[2])
