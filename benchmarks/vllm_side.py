"""The vLLM side of the rollout and RL benchmarks: a `VLLMSampler` built in the benchmark's
process as the colocated engine is (rlhf/rollout/vllm_engine.py), from the model directory's
own weights, and its start-up cost taken apart: the engine's construction, and its first
`generate` call (the CPU backend builds and warms its kernels there)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import common

common.add_project_to_path()

from rlhf.rollout.engine import SamplingParams  # noqa: E402
from rlhf.rollout.vllm_engine import engine_in_this_process, sample_seed  # noqa: E402
from rlhf.rollout.vllm_sampler import SamplerSettings, VLLMSampler  # noqa: E402


def build(directory: Path, eos_token_id: int, max_model_len: int, kv_cache_gib: float,
          dtype: str = "float32") -> tuple[VLLMSampler, float]:
    """The engine over `directory` and the seconds its construction took."""
    settings = SamplerSettings(dtype=dtype, max_model_len=max_model_len, kv_cache_gib=kv_cache_gib)
    started = time.perf_counter()
    with engine_in_this_process():
        sampler = VLLMSampler(directory, settings, eos_token_id)
    return sampler, time.perf_counter() - started


def generate(sampler: VLLMSampler, prompts: Sequence[Sequence[int]], new_tokens: int, seed: int,
             batch_size: int | None = None) -> int:
    """One call at temperature 1, no top-k/top-p, answer i seeded by (seed, i) as the engine
    seeds a rollout's answers; returns the new tokens (EOS included where it came)."""
    params = SamplingParams(max_new_tokens=new_tokens, temperature=1.0)
    seeds = [sample_seed(seed, i) for i in range(len(prompts))]
    return sum(len(tokens) for tokens, _ in sampler.generate(prompts, params, seeds, batch_size))


def startup(directory: Path, eos_token_id: int, prompts: Sequence[Sequence[int]], new_tokens: int,
            kv_cache_gib: float, dtype: str = "float32", max_prompt_length: int | None = None
            ) -> tuple[VLLMSampler, dict]:
    """Import vLLM, build the engine (for prompts up to `max_prompt_length` tokens, default the
    longest of `prompts`) and make its first call (`prompts`); the engine and {import_s,
    construct_s, first_call_s, first_call_prompts, vllm, ...} (import_s is 0 where vLLM was
    imported already)."""
    started = time.perf_counter()
    import vllm

    imported = time.perf_counter() - started
    max_model_len = (max_prompt_length or max(len(p) for p in prompts)) + new_tokens
    sampler, construct = build(directory, eos_token_id, max_model_len, kv_cache_gib, dtype)
    started = time.perf_counter()
    generate(sampler, prompts, new_tokens, seed=0)
    return sampler, {"import_s": imported, "construct_s": construct, "first_call_s": time.perf_counter() - started,
                     "first_call_prompts": len(prompts), "vllm": vllm.__version__, "dtype": dtype,
                     "kv_cache_gib": kv_cache_gib}


def stage_startup(overrides: Sequence[str], directory: Path, records: Sequence[dict], answers_per_prompt: int,
                  new_tokens: int, max_prompt_length: int) -> dict | None:
    """For an RL stage benchmark run with rollout.engine=vllm (in `overrides`): vLLM's start-up
    (import, construction, first rollout) with the run's policy, the dtype its engine takes
    (rlhf/rollout/vllm_dtype.py, from strategy.mixed_precision as this machine resolves it;
    the model's weights are fp32), its first rollout (`records`' prompts, chat-formatted and
    cut to `max_prompt_length` tokens, each `answers_per_prompt` times) and length. Run before
    the stage, in a fresh engine: the stage's own start-up falls in its warm-up steps, outside
    every timed number. None for another engine."""
    if "rollout.engine=vllm" not in overrides:
        return None
    import gc

    import torch
    from transformers import AutoTokenizer

    from rlhf.config_sections import StrategyConfig
    from rlhf.data.records import Message
    from rlhf.data.template import prompt_text
    from rlhf.distributed.precision import resolve_precision
    from rlhf.rollout.vllm_dtype import dtype_name, engine_dtype

    given = dict(o.split("=", 1) for o in overrides if "=" in o)
    mixed = given.get("strategy.mixed_precision", StrategyConfig().mixed_precision)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype_name(engine_dtype(given.get("rollout.vllm.dtype", "auto"), resolve_precision(mixed, device),
                                    torch.float32))
    tokenizer = AutoTokenizer.from_pretrained(directory)
    encoded = [tokenizer(prompt_text(tokenizer, [Message("user", r["prompt"])]),
                         add_special_tokens=False)["input_ids"][-max_prompt_length:] for r in records]
    prompts = [p for p in encoded for _ in range(answers_per_prompt)]
    sampler, numbers = startup(directory, tokenizer.eos_token_id, prompts, new_tokens, kv_cache_gib=1.0,
                               dtype=dtype, max_prompt_length=max_prompt_length)
    del sampler
    gc.collect()
    print(f"vLLM start-up (measured apart): {numbers['import_s']:.1f} s to import, {numbers['construct_s']:.1f} s "
          f"to build, {numbers['first_call_s']:.1f} s for the first rollout ({len(prompts)} answers, {dtype})",
          flush=True)
    return numbers
