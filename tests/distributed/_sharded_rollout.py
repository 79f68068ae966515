"""Child of test_sharded_rollout.py, run by torchrun on 2 ranks: both rollout engines sample
from a model sharded by the strategy (DeepSpeed ZeRO-3 or FSDP2) with a different prompt count
on each rank (so a different number of batches, and rows that end at different steps), while
every tensor handed to a `torch.distributed` collective is checked against the strategy's
device (on a GPU run a CPU tensor there fails under NCCL).

    torchrun --standalone --nproc_per_node 2 _sharded_rollout.py {zero3,fsdp} MODEL_DIR OUT_DIR EOS

Each engine runs once with rollout.gather_weights=false (every forward gathers the weights,
the ranks keep in step) and once with the default (the strategy gathers them once per call).

Writes OUT_DIR/rank{r}.pt: the rollouts; the elements all-gathered and the forwards run during
some of them; the collectives seen (name -> count) with every call whose tensors were on
another device than the strategy's.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed
import torch.distributed.distributed_c10d as c10d
from transformers import AutoTokenizer

from rlhf.config_sections import ModelConfig, StrategyConfig
from rlhf.distributed.factory import build_strategy
from rlhf.distributed.optim import OptimizerSpec
from rlhf.models.loading import load_causal_lm
from rlhf.rollout.decode import DecodeEngine, SampleSeeds
from rlhf.rollout.engine import HFGenerateEngine, SamplingParams

STRATEGIES = ("fsdp", "zero3")
GATHER_EVERY_WEIGHT = {"zero_optimization": {"stage3_param_persistence_threshold": 0}}
"""ZeRO-3 keeps parameters under 100k elements whole on every rank by default: all of the tiny
model's, whose forwards would then gather nothing. Threshold 0 partitions them all."""


def strategy_config(name: str, out_dir: Path) -> StrategyConfig:
    if name == "fsdp":
        return StrategyConfig(name="fsdp")
    raw = out_dir / "zero3.json"
    raw.write_text(json.dumps(GATHER_EVERY_WEIGHT))
    return StrategyConfig(name="deepspeed", zero_stage=3, deepspeed_config=str(raw))
SPEC = OptimizerSpec(lr=1e-3, weight_decay=0.0, betas=(0.9, 0.95), eps=1e-8, max_grad_norm=1.0,
                     scheduler="constant", warmup_steps=0, total_steps=1, min_lr_ratio=0.0)
PROMPTS = ["List 3 fruits in uppercase.", "Name 2 birds, in lowercase.", "Write the word cat twice.",
           "Count from one to four."]
SHARES = {0: [0, 1, 2], 1: [3]}
"""Global prompt ids per rank: with batches of 2, rank 0 runs 2 batches and rank 1 one."""
ALL_ON_ZERO = {0: [0, 1, 2, 3], 1: []}
"""A second decode call where rank 1 has nothing to do but join rank 0's forwards."""
BATCH_SIZE, SEED, HF_SEED = 2, 7, 100
PARAMS = SamplingParams(max_new_tokens=8, temperature=1.0)

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single", "_all_gather_base",
               "broadcast", "reduce", "reduce_scatter", "reduce_scatter_tensor", "reduce_scatter_single",
               "_reduce_scatter_base", "all_to_all", "all_to_all_single", "gather", "scatter", "send", "recv",
               "isend", "irecv")


def tensors_in(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in tensors_in(item)]
    return []


class CollectiveDevices:
    """Wraps every tensor collective of `torch.distributed` (and of `distributed_c10d`, which
    torch's own helpers call) to count the calls and note each one given a tensor on another
    device than `expected()`. Installed before the strategy's setup: DeepSpeed binds some
    collectives when it initialises."""

    def __init__(self, expected: Callable[[], torch.device]):
        self.expected = expected
        self.calls: Counter[str] = Counter()
        self.wrong: list[str] = []
        self.gathered = 0
        """Elements all-gathered so far (the outputs' sizes): how much weight was gathered."""
        self.depth = 0  # a collective that calls another (torch's all_gather_into_tensor) counts once

    def install(self) -> None:
        for module in (torch.distributed, c10d):
            for name in COLLECTIVES:
                original = getattr(module, name, None)
                if original is not None:
                    setattr(module, name, self._wrapped(name, original))

    def _wrapped(self, name: str, original: Callable) -> Callable:
        def collective(*args, **kwargs):
            self.calls[name] += 1
            expected = self.expected()
            devices = {t.device for t in tensors_in(list(args) + list(kwargs.values()))}
            if any(device != expected for device in devices):
                self.wrong.append(f"{name}: {sorted(map(str, devices))}, strategy device {expected}")
            if "all_gather" in name and self.depth == 0:  # the output comes first: a tensor, or the ranks' parts
                output = args[0] if args else kwargs.get("output_tensor", kwargs.get("tensor_list"))
                self.gathered += sum(t.numel() for t in tensors_in(output))
            self.depth += 1
            try:
                return original(*args, **kwargs)
            finally:
                self.depth -= 1

        return collective


def main(name: str, model_dir: str, out_dir: Path, eos: int) -> None:
    strategy = build_strategy(strategy_config(name, out_dir))
    recorder = CollectiveDevices(lambda: strategy.device)
    recorder.install()
    strategy.setup(seed=0)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    trained = strategy.wrap(load_causal_lm(ModelConfig(path=model_dir), strategy.device), SPEC)
    model = getattr(trained.module, "module", trained.module)  # engines wrap the HF model as .module
    pad = tokenizer.pad_token_id
    ids = [tokenizer(text)["input_ids"] for text in PROMPTS]
    rank = strategy.rank

    forwards = [0]
    model.register_forward_pre_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))
    gathers: dict[str, tuple[int, int]] = {}

    def measured(name: str, call: Callable[[], Any]) -> Any:
        """`call()`, noting the elements all-gathered and the model forwards it ran."""
        elements, runs = recorder.gathered, forwards[0]
        out = call()
        gathers[name] = (recorder.gathered - elements, forwards[0] - runs)
        return out

    # rollout.gather_weights=false: every forward gathers, the ranks keep in step.
    decode = DecodeEngine(model, eos, pad, BATCH_SIZE, llama_step=False, world=strategy, gather_weights=False)
    mine = SHARES[rank]
    split = measured("decode", lambda: decode.generate([ids[i] for i in mine], PARAMS,
                                                       seeds=SampleSeeds(SEED, mine, len(PROMPTS))))
    lopsided = ALL_ON_ZERO[rank]
    alone = decode.generate([ids[i] for i in lopsided], PARAMS, seeds=SampleSeeds(SEED, lopsided, len(PROMPTS)))
    hf = HFGenerateEngine(model, eos, pad, BATCH_SIZE, world=strategy, gather_weights=False)
    torch.manual_seed(HF_SEED + rank)
    sampled = hf.generate([ids[i] for i in mine], PARAMS)

    # The default: the strategy gathers the weights once for each generate call.
    gathered = DecodeEngine(model, eos, pad, BATCH_SIZE, llama_step=False, world=strategy)
    split_gathered = measured("decode_gathered", lambda: gathered.generate(
        [ids[i] for i in mine], PARAMS, seeds=SampleSeeds(SEED, mine, len(PROMPTS))))
    torch.manual_seed(HF_SEED + rank)
    sampled_gathered = measured("hf_gathered", lambda: HFGenerateEngine(model, eos, pad, BATCH_SIZE, world=strategy)
                                .generate([ids[i] for i in mine], PARAMS))
    weights = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())  # whole sizes (DTensor: global)
    blocks = sum(getattr(p, "ds_numel", p.numel()) for p in model.model.layers.parameters())

    torch.save({"decode": split, "decode_lopsided": alone, "hf": sampled, "decode_gathered": split_gathered,
                "hf_gathered": sampled_gathered, "gathers": gathers, "weights": weights, "block_weights": blocks,
                "calls": dict(recorder.calls), "wrong": recorder.wrong, "device": str(strategy.device)},
               out_dir / f"rank{rank}.pt")
    strategy.teardown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]))
