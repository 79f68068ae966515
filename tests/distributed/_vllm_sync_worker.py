"""One worker of tests/distributed/test_vllm_sync.py: a tiny Llama sharded over 2 gloo ranks
(FSDP2 or ZeRO-3), a colocated vLLM engine per rank fed through `iter_full_weights`, one actor
update; rank 0 writes how far each rank's engine log-probs were from the actor's forward.

    python tests/distributed/_vllm_sync_worker.py OUT_DIR STRATEGY   (RANK, WORLD_SIZE, ... in the env)
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
from rlhf.roles.roles import Actor
from rlhf.roles.update import PolicyLossSettings
from rlhf.rollout.decode import SampleSeeds
from rlhf.rollout.engine import SamplingParams
from rlhf.rollout.types import Experience
from rlhf.rollout.vllm_engine import VLLMEngine
from rlhf.rollout.vllm_sampler import SamplerSettings

STRATEGIES = {"fsdp": StrategyConfig(name="fsdp"),
              "zero3": StrategyConfig(name="deepspeed", zero_stage=3)}
PROMPTS = [[5, 9, 17, 3], [40, 41], [7, 7, 7, 7, 8], [60, 2, 33]]  # 2 per rank
PARAMS = SamplingParams(max_new_tokens=8, temperature=1.0)
SPEC = OptimizerSpec(lr=3e-2, weight_decay=0.0, betas=(0.9, 0.95), eps=1e-8, max_grad_norm=0.0, scheduler="constant",
                     warmup_steps=0, total_steps=2, min_lr_ratio=0.0)


def run(out: Path, strategy_name: str) -> None:
    strategy = build_strategy(STRATEGIES[strategy_name])
    strategy.setup(seed=0)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                                         tie_word_embeddings=True)).float()
    trained = strategy.wrap(model, SPEC, accumulation=1, micro_batch_size=2)
    module = getattr(trained.module, "module", trained.module)
    settings = SamplerSettings(dtype="float32", seed=strategy.rank, kv_cache_gib=1 / 32, max_model_len=32,
                               load_format="dummy")
    engine = VLLMEngine(module, eos_token_id=1, pad_token_id=0, settings=settings, world=strategy)
    actor = Actor(trained, engine, 1.0, PolicyLossSettings(), mini_batch_size=4, micro_batch_size=2)
    mine = PROMPTS[strategy.rank::2]
    ids = list(range(strategy.rank, 4, 2))

    def gap(rollout) -> float:
        mask = rollout.response_mask
        return float(((actor.logprobs(rollout) - rollout.logprobs) * mask).abs().max())  # collective forward

    first = actor.generate(mine, PARAMS, seed=1, sample_ids=ids, sample_count=4)  # syncs: a collective gather
    synced = gap(first)
    old = actor.logprobs(first)
    zeros = torch.zeros_like(old)
    sign = torch.tensor([1.0 if i % 2 == 0 else -1.0 for i in ids])[:, None]
    experience = Experience(first, old, old, zeros, zeros, sign * first.response_mask, zeros, torch.zeros(2))
    # Every rank trains on its own two samples (a mini-batch of 4 over 2 ranks).
    orders = [torch.arange(2)]
    actor.mini_batch_size = 2 * strategy.world_size
    actor.update(experience, orders, kl_coef=0.0, step_offset=0)
    stale = gap(engine.generate(mine, PARAMS, SampleSeeds(2, ids, 4)))
    fresh = gap(actor.generate(mine, PARAMS, seed=2, sample_ids=ids, sample_count=4))
    result = {"rank": strategy.rank, "synced": synced, "stale": stale, "fresh": fresh}
    (out / f"rank{strategy.rank}.json").write_text(json.dumps(result))
    strategy.barrier()
    strategy.teardown()


if __name__ == "__main__":
    run(Path(sys.argv[1]), sys.argv[2])
