"""`VLLMEngine`: rollouts sampled by a vLLM engine in this process (rollout.engine=vllm,
rollout.vllm.placement=colocate), returned as the decode engine returns them.

- Every answer is its own vLLM request with its own seed, derived from the iteration's seed
  and the answer's global sample id (`SampleSeeds`): a group of n answers to one prompt is n
  requests of the same prompt (vLLM's prefix cache computes the prompt once), and an answer
  is the same however prompts are spread over workers.
- Log-probs: of each sampled token under softmax(logits / T) (vllm_sampler.py); None where
  top-k / top-p filter the distribution (then vLLM's are of the filtered one).
- Weights: vLLM keeps its own copy. `sync_weights` streams the trainer's weights into it
  (rlhf/rollout/weights.py: one module at a time, gathered from ZeRO-3 / FSDP2 shards, LoRA
  merged). The actor calls it before a rollout whenever an update has changed them (and
  before the first one: the engine starts from random weights of the model's shape, so it
  never reads a checkpoint the trainer has already loaded, possibly as GGUF or sharded).
- Batches: each engine is handed at most `batch_size` (rollout.batch_size) requests per vLLM
  call, so that its KV cache and a step's activations are bounded by it as the decode
  engine's are; every answer keeps its seed, so the chunking changes no token.
- Memory: with `sleep` the engine's KV cache (on a GPU also its weights) is released after
  each rollout and restored before the next (`VLLMSampler.sleep`).

Each trainer process owns one engine on its own device and samples its own share of the
prompts; nothing in `generate` is a collective, `sync_weights` is one where weights are sharded.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import torch

from rlhf.models.engines import unwrap_engine
from rlhf.rollout.decode import SampleSeeds
from rlhf.rollout.engine import Collective, RolloutEngine, SamplingParams, empty_rollout, finish_rollout, left_pad
from rlhf.rollout.types import Rollout
from rlhf.rollout.vllm_sampler import SamplerSettings, VLLMSampler
from rlhf.rollout.weights import iter_full_weights

MASK64 = (1 << 64) - 1


def sample_seed(seed: int, sample_id: int) -> int:
    """The seed of one answer's request: (seed, sample id) mixed by SplitMix64's finaliser, so
    that neighbouring ids (and iterations) draw unrelated streams; below 2**63."""
    z = (seed * 0x9E3779B97F4A7C15 + sample_id + 1) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return (z ^ (z >> 31)) >> 1


def engine_model_dir(model: torch.nn.Module, directory: Path) -> Path:
    """A model directory vLLM can be built from without reading any weights: the policy's
    config.json alone (the engine loads random weights, then the trainer's)."""
    root = unwrap_engine(model)
    base = root.get_base_model() if hasattr(root, "get_base_model") else root  # PEFT
    base.config.save_pretrained(directory)
    return directory


@contextmanager
def engine_in_this_process() -> Iterator[None]:
    """Build a vLLM engine inside this process (VLLM_ENABLE_V1_MULTIPROCESSING=0): weights are
    handed over in memory, no process is spawned. The CPU backend's worker would pin this
    process's OpenMP threads to cores of its choosing and disable `torch.set_num_threads` for
    good; the process's threads are the run's to set (the trainer's, and several trainer
    processes share a machine's cores), so binding is off unless the environment asks for it
    (VLLM_CPU_OMP_THREADS_BIND) and `set_num_threads` is given back once the engine is built."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    set_num_threads, threads = torch.set_num_threads, torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads = set_num_threads
        torch.set_num_threads(threads)


def colocated_sampler(model: torch.nn.Module, settings: SamplerSettings, eos_token_id: int) -> VLLMSampler:
    """A vLLM engine inside this (the trainer's) process (`engine_in_this_process`), of the
    policy's shape, with the weights `settings.load_format` says (dummy: the first sync's)."""
    with engine_in_this_process(), tempfile.TemporaryDirectory(prefix="rlhf-vllm-") as directory:
        return VLLMSampler(engine_model_dir(model, Path(directory)), settings, eos_token_id)


class VLLMEngine(RolloutEngine):
    takes_seeds = True
    needs_sync = True

    def __init__(self, model: torch.nn.Module, eos_token_id: int, pad_token_id: int, settings: SamplerSettings,
                 world: Collective | None = None, sleep: bool = True, sampler: VLLMSampler | None = None,
                 batch_size: int = 32):
        """An engine for the policy `model` (the trainer's module); `settings` as rollout.vllm
        gives them. `sampler`: an engine built already (tests share one). `batch_size`: answers
        (sequences: each of a group's n counts) per vLLM call."""
        super().__init__(model, eos_token_id, pad_token_id, batch_size, world=world, gather_weights=False)
        self.sleep = sleep
        if sampler is None:
            sampler = colocated_sampler(model, settings, eos_token_id)
            if sleep:
                sampler.sleep()
        self.sampler = sampler
        self.synced_once = False

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 seeds: SampleSeeds | None = None) -> Rollout:
        """One answer per prompt; with `seeds`, answer i depends only on the seed and its id
        `seeds.ids[i]`. Log-probs as the module docstring says."""
        if not prompts:
            return empty_rollout(with_logprobs=True)
        request_seeds = None if seeds is None else [sample_seed(seeds.seed, int(i)) for i in seeds.ids]
        self.sampler.wake_up()
        try:
            answers = self.sampler.generate(prompts, params, request_seeds, batch_size=self.batch_size)
        finally:
            if self.sleep:
                self.sampler.sleep()
        device = self._device()
        width = max(len(tokens) for tokens, _ in answers)
        responses = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        logprobs = torch.zeros((len(prompts), width), dtype=torch.float32)
        for row, (tokens, token_logprobs) in enumerate(answers):
            responses[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            logprobs[row, : len(tokens)] = torch.tensor(token_logprobs, dtype=torch.float32)
        prompt_ids, prompt_mask = left_pad(prompts, self.pad_token_id)
        rollout = finish_rollout(prompt_ids, prompt_mask, responses, self.eos_token_id, self.pad_token_id)
        unfiltered = params.top_k <= 0 and params.top_p >= 1.0
        rollout.logprobs = logprobs * rollout.response_mask if unfiltered else None
        return rollout.to(device)

    def sync_weights(self, model: torch.nn.Module | None = None, world: Collective | None = None) -> int:
        """Load the trainer's current weights of `model` (default: the engine's policy) into
        the engine; a collective where they are sharded. Returns the tensors loaded."""
        count = self.sampler.load_weights(iter_full_weights(model if model is not None else self.model,
                                                            world if world is not None else self.world))
        self.synced_once = True
        return count

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device
