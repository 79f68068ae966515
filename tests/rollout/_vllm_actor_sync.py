"""Run inside a loopback-only network namespace (test_vllm_actors.py): a private Ray, two vLLM
engine actors (one CPU each), and this process as trainer rank 0 of the weight-sync group
(gloo, three ranks: this process and each engine's worker). Writes what it measured to
argv[1] as JSON.

A tiny Llama (head size 32: the CPU engine refuses 16) is broadcast once; then the trainer's
weights change (an optimizer step on a loss that moves every weight) and the engine samples
twice from the same seeds: before the next broadcast (stale) and after it. Each time the
engine's log-probs of its sampled tokens are compared with the trainer's forward over them."""

from __future__ import annotations

import json
import os
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_policy() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).float().eval()
    with torch.no_grad():  # logits of a useful spread: the stale engine's gap is then clear
        model.model.embed_tokens.weight.mul_(8.0)
    return model


def update(model: torch.nn.Module) -> None:
    """One Adam step on the negative log-likelihood of a fixed token sequence (every weight moves by lr)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    ids = torch.arange(3, 40).unsqueeze(0)
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    model.eval()


def gap(engine, model, prompts, params, seeds) -> tuple[list[float | int], object]:
    """(max, mean |engine log-prob - trainer log-prob| over the sampled tokens, their count),
    and the rollout."""
    from rlhf.roles.forward import policy_logprobs

    rollout = engine.generate(prompts, params, seeds=seeds)
    with torch.no_grad():
        trainer, _ = policy_logprobs(model, rollout, params.temperature)
    mask = rollout.response_mask
    diff = (trainer - rollout.logprobs).abs() * mask
    return [float(diff.max()), float(diff.sum() / mask.sum()), int(mask.sum())], rollout


def main(out_path: str) -> None:
    import ray

    from rlhf.ray.vllm_engines import start_engine_actors
    from rlhf.rollout.decode import SampleSeeds
    from rlhf.rollout.engine import SamplingParams
    from rlhf.rollout.vllm_actors import EngineActorsEngine, RemoteSamplers, policy_config_json
    from rlhf.rollout.vllm_sampler import SamplerSettings
    from rlhf.rollout.weight_broadcast import WeightSyncError

    torch.set_num_threads(1)
    started = time.time()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "1"}})
    model = tiny_policy()
    settings = SamplerSettings(dtype="float32", max_model_len=64, load_format="dummy")
    engines = start_engine_actors(2, settings, policy_config_json(model), eos_token_id=2, cpus_per_engine=1)
    try:
        engine = EngineActorsEngine(model, eos_token_id=2, pad_token_id=0, dtype=torch.float32)
        engine.attach(engines.handles, engines.workers_per_engine, "127.0.0.1")  # a group of 3: trainer + 2 engines
        ready = time.time() - started
        prompts = [[1, 5, 9, 13], [1, 7], [1, 20, 21, 22, 23, 24], [1, 30, 31], [1, 44, 45]]  # 3 + 2 over the engines
        params = SamplingParams(max_new_tokens=12, temperature=1.0)
        seeds = SampleSeeds(7, range(len(prompts)), len(prompts))
        sent = engine.sync_weights()
        synced_before, _ = gap(engine, model, prompts, params, seeds)
        update(model)
        stale, _ = gap(engine, model, prompts, params, seeds)
        tick = time.time()
        resent = engine.sync_weights()
        sync_s = time.time() - tick
        synced, split = gap(engine, model, prompts, params, seeds)
        # The same requests on engine 0 alone: each answer depends on its seed only, not on the engine.
        engine.sampler = RemoteSamplers(engines.handles[:1])
        alone = engine.generate(prompts, params, seeds=seeds)
        same = bool(torch.equal(alone.sequences, split.sequences) and torch.equal(alone.logprobs, split.logprobs))
        pids = ray.get([handle.__ray_call__.remote(lambda actor: os.getpid()) for handle in engines.handles])
        # Engine 1 dies: the next sync fails, naming it and a tensor, instead of waiting for it.
        engine.sampler = RemoteSamplers(engines.handles)
        ray.kill(engines.handles[1], no_restart=True)
        tick = time.time()
        try:
            engine.sync_weights()
            dead_engine_error = None
        except WeightSyncError as error:
            dead_engine_error = {"message": str(error), "tensor": error.tensor, "seconds": time.time() - tick}
        out = {"dead_engine_error": dead_engine_error, "sent": sent, "resent": resent, "params": len(list(model.parameters())),
               "synced_before_update": synced_before, "stale": stale, "synced": synced,
               "split_equals_one_engine": same, "startup_s": ready, "sync_s": sync_s, "engine_pids": pids,
               "driver_pid": os.getpid()}
    finally:
        engines.kill()
        ray.shutdown()
    with open(out_path, "w") as handle:
        json.dump(out, handle)


if __name__ == "__main__":
    main(sys.argv[1])
