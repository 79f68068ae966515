"""`VLLMSampler`: one `vllm.LLM` behind four calls (generate, load_weights, sleep, wake_up),
with no Ray and no knowledge of the run. `VLLMEngine` (vllm_engine.py) drives it from the
trainer's process; the Ray engine actors (vllm_actors.py) hold one each.

Log-probs. vLLM returns the sampled token's log-prob in one of its `logprobs_mode`s: `raw_*`
before temperature, `processed_*` after every processor (temperature, then top-k/top-p). PPO
scores softmax(logits / T) without filters (rlhf/rollout/types.py), so the engine runs in
`processed_logprobs` mode and its log-probs are that distribution's exactly when top-k and
top-p are off; `generate` returns them only then (`logprobs_valid`).

Weights arrive in Hugging Face names. They are loaded through a worker extension
(`WeightLoader`, vLLM's `worker_extension_cls`) called by `collective_rpc`, so the same call
reaches every tensor-parallel worker of the engine, each of which keeps its own slice; with
the engine in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0, one worker) the tensors are
handed over without a copy.

Sleep. On a GPU, `LLM.sleep(level=1)` moves the weights to host memory and frees the KV cache
(CuMem pool, `enable_sleep_mode`); the CPU backend ignores sleep (vLLM 0.32 logs "sleep mode is
not supported on CPU"), so there the sampler frees the KV cache itself: the storages behind
the cache tensors are resized to 0 bytes and back on wake-up (the tensors, and every view
of them that attention layers hold, stay valid; their contents are forgotten, so the prefix
cache is reset).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch


def layer_of(name: str) -> str:
    """The decoder layer an HF parameter name belongs to (`model.layers.3.mlp.up_proj.weight`
    -> `layers.3`), or "" for the rest (embeddings, final norm, head)."""
    parts = name.split(".")
    for index, part in enumerate(parts[:-1]):
        if part in ("layers", "h", "blocks") and parts[index + 1].isdigit():
            return f"{part}.{parts[index + 1]}"
    return ""


class WeightLoader:
    """Mixed into each vLLM worker (`worker_extension_cls`): loads HF-named tensors into the
    worker's model, which slices them for its tensor-parallel rank and fuses q/k/v and
    gate/up itself (`load_weights` of vLLM's model classes)."""

    def rlhf_load_weights(self, named: list[tuple[str, torch.Tensor]]) -> int:
        """vLLM's in-place reload (`Worker.reload_weights`): the layers these tensors belong to
        are rebuilt from checkpoint-format weights and processed again for the kernels (the
        CPU backend repacks its linears after loading, so writing into the parameters that
        the model shows would miss what the kernels read); the other layers keep theirs. The
        caller sends whole layers per call."""
        self.reload_weights(weights_iterator=iter(named), is_checkpoint_format=True)  # type: ignore[attr-defined]
        model = self.model_runner.model  # type: ignore[attr-defined]
        head = getattr(model, "lm_head", None)
        tied = head is not None and any(head.weight is module.weight for module in model.modules()
                                        if module is not head and hasattr(module, "weight"))
        if tied and any(name.endswith("embed_tokens.weight") for name, _ in named):
            # A head tied to the embeddings gets no weights of its own (they are skipped by
            # name), so the reload leaves its kernel's prepacked copy (the CPU backend's
            # `cpu_linear`) as it was: process it again from the new shared weight.
            head.quant_method.process_weights_after_loading(head)
        return len(named)

    def rlhf_kv_cache_storages(self) -> list[torch.UntypedStorage]:
        """The distinct storages behind this worker's KV cache tensors."""
        seen: dict[int, torch.UntypedStorage] = {}
        for tensor in _flatten(getattr(self.model_runner, "kv_caches", [])):  # type: ignore[attr-defined]
            storage = tensor.untyped_storage()
            seen.setdefault(storage.data_ptr() if storage.size() else id(storage), storage)
        return list(seen.values())

    def rlhf_free_kv_cache(self) -> int:
        """Release the KV cache's memory (its contents are lost); returns the bytes freed."""
        saved = getattr(self, "_rlhf_kv_sizes", None)
        if saved:  # already freed
            return 0
        storages = self.rlhf_kv_cache_storages()
        self._rlhf_kv_sizes = [(storage, storage.size()) for storage in storages]
        for storage in storages:
            storage.resize_(0)
        return sum(size for _, size in self._rlhf_kv_sizes)

    def rlhf_restore_kv_cache(self) -> int:
        """Allocate the KV cache's memory again (zeroed); returns the bytes allocated."""
        saved = getattr(self, "_rlhf_kv_sizes", None) or []
        for storage, size in saved:
            storage.resize_(size)
        for tensor in _flatten(getattr(self.model_runner, "kv_caches", [])):  # type: ignore[attr-defined]
            tensor.zero_()  # fresh pages hold whatever malloc left there
        self._rlhf_kv_sizes = []
        return sum(size for _, size in saved)


def _flatten(tensors) -> list[torch.Tensor]:
    if isinstance(tensors, torch.Tensor):
        return [tensors]
    if isinstance(tensors, (list, tuple)):
        return [t for item in tensors for t in _flatten(item)]
    if isinstance(tensors, dict):
        return [t for item in tensors.values() for t in _flatten(item)]
    return []


@dataclass
class SamplerSettings:
    """How the engine is built (rollout.vllm.* of the config, rlhf/config.py `VLLMConfig`)."""

    dtype: str = "auto"
    seed: int = 0
    gpu_memory_utilization: float = 0.3
    max_model_len: int | None = None
    kv_cache_gib: float | None = None
    tensor_parallel_size: int = 1
    enable_sleep_mode: bool = False
    enforce_eager: bool = True
    load_format: str = "auto"
    """auto: read the weights from the model directory; dummy: random weights, for an engine
    whose first `load_weights` brings the real ones (the trainer's sync)."""
    distributed_executor_backend: str | None = None


class VLLMSampler:
    worker_extension: type = WeightLoader
    """Mixed into vLLM's workers; the engine actors' sampler adds the broadcast's receiving side
    (rlhf/rollout/weight_broadcast.py)."""

    def __init__(self, model_dir: str | Path, settings: SamplerSettings, eos_token_id: int):
        """A vLLM engine over the HF model directory `model_dir` (its config.json; its weights
        unless `settings.load_format` is dummy). The tokenizer is not loaded: prompts and
        answers are token ids, and answers stop at `eos_token_id` alone (the directory's
        generation_config.json is ignored, so none of its penalties or stop ids apply)."""
        from vllm import LLM

        # vLLM logs every in-place reload, and warns that the weights outside it were "not
        # loaded": one layer per reload is what `load_weights` sends (a line per layer per sync).
        logging.getLogger("vllm.model_executor.model_loader.reload.inplace").setLevel(logging.ERROR)
        self.eos_token_id = eos_token_id
        self.settings = settings
        kwargs = {}
        if settings.kv_cache_gib is not None:
            kwargs["kv_cache_memory_bytes"] = int(settings.kv_cache_gib * 2**30)
        if settings.max_model_len is not None:
            kwargs["max_model_len"] = settings.max_model_len
        if settings.distributed_executor_backend:
            kwargs["distributed_executor_backend"] = settings.distributed_executor_backend
        if _platform_is_cpu():
            # A prompt prefilled in pieces has its sampled token thrown away, and vLLM 0.32 then
            # winds the request's seeded generator back, which a CPU generator cannot do
            # ("CPU Generator does not use offset"): whole prompts only, one step holding the
            # longest (vLLM requires the step's budget to cover max_model_len then).
            kwargs["enable_chunked_prefill"] = False
            kwargs["max_num_batched_tokens"] = max(settings.max_model_len or 32768, 8192)
        extension = self.worker_extension
        self.llm = LLM(model=str(model_dir), skip_tokenizer_init=True, dtype=settings.dtype, seed=settings.seed,
                       gpu_memory_utilization=settings.gpu_memory_utilization,
                       tensor_parallel_size=settings.tensor_parallel_size,
                       enable_sleep_mode=settings.enable_sleep_mode, enforce_eager=settings.enforce_eager,
                       load_format=settings.load_format, generation_config="vllm",
                       logprobs_mode="processed_logprobs",
                       worker_extension_cls=f"{extension.__module__}.{extension.__qualname__}", **kwargs)
        self.asleep = False
        self.weights_awake = False
        """Asleep on a GPU with the weights woken for a sync, the KV cache not yet."""
        self.on_cpu = _platform_is_cpu()

    def sampling_params(self, max_new_tokens: int, temperature: float, top_k: int, top_p: float,
                        seed: int | None):
        from vllm import SamplingParams

        return SamplingParams(n=1, max_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                              # ignore_eos: vLLM would also stop at the model config's EOS ids,
                              # which need not be the tokenizer's; ours is the only stop.
                              seed=seed, logprobs=0, stop_token_ids=[self.eos_token_id], ignore_eos=True,
                              detokenize=False, skip_special_tokens=False)

    def generate(self, prompts: Sequence[Sequence[int]], params, seeds: Sequence[int] | None = None,
                 batch_size: int | None = None) -> list[tuple[list[int], list[float]]]:
        """For each prompt (token ids) its sampled tokens (EOS included where it came) and each
        one's log-prob under softmax(logits / T) (with top-k/top-p set: of the filtered
        distribution, see the module docstring). `params`: rlhf's `SamplingParams`. `seeds`:
        one per prompt, so that an answer depends only on its own seed, not on which prompts
        share its call. `batch_size`: at most that many prompts per vLLM call (None: all)."""
        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        step = batch_size or max(len(prompts), 1)
        results = []
        for start in range(0, len(prompts), step):
            part = slice(start, start + step)
            results += self._generate(prompts[part], params, None if seeds is None else seeds[part])
        return results

    def _generate(self, prompts: Sequence[Sequence[int]], params, seeds: Sequence[int] | None
                  ) -> list[tuple[list[int], list[float]]]:
        from vllm.inputs import TokensPrompt

        per_prompt = [self.sampling_params(params.max_new_tokens, params.temperature, params.top_k, params.top_p,
                                           None if seeds is None else int(seeds[i])) for i in range(len(prompts))]
        requests = [TokensPrompt(prompt_token_ids=list(map(int, p))) for p in prompts]
        outputs = self.llm.generate(requests, per_prompt, use_tqdm=False)
        results = []
        for output in outputs:
            answer = output.outputs[0]
            tokens = list(answer.token_ids)
            logprobs = [float(step[token].logprob) for step, token in zip(answer.logprobs or [], tokens)]
            if len(logprobs) != len(tokens):
                raise RuntimeError(f"vLLM returned {len(logprobs)} log-probs for {len(tokens)} tokens")
            results.append((tokens, logprobs))
        return results

    def load_weights(self, named: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Load HF-named tensors (any number, streamed) into every worker; returns how many.
        They go over one layer at a time (the names' `layers.<i>.` part; what is outside the
        decoder layers, together), in the order given, each layer handed over before the next
        is asked for, so a caller that gathers sharded weights one at a time holds one layer."""
        if self.asleep and not self.on_cpu and self.settings.enable_sleep_mode and not self.weights_awake:
            # The weights back on the device first, the KV cache only for the rollout (`wake_up`).
            self.llm.wake_up(tags=["weights"])
            self.weights_awake = True
        count, batch, current = 0, [], None
        for name, tensor in named:
            layer = layer_of(name)
            if batch and layer != current:
                count += self._load(batch)
                batch = []
            current = layer
            # A copy: the tensor may be gathered storage that its source releases (ZeRO-3
            # partitions it again) once the next one is asked for; a layer's worth is held.
            batch.append((name, tensor.detach().clone()))
        if batch:
            count += self._load(batch)
        self.llm.reset_prefix_cache()  # cached prefixes were computed with the old weights
        return count

    def _load(self, batch: list[tuple[str, torch.Tensor]]) -> int:
        if _other_process(self):  # pickled to the workers: from host memory, each moves them to its device
            batch = [(name, tensor.cpu()) for name, tensor in batch]
        return int(self.llm.collective_rpc("rlhf_load_weights", args=(batch,))[0])

    def sleep(self) -> None:
        """Free the KV cache (and, on a GPU in sleep mode, move the weights to host memory)
        until `wake_up`; nothing may be generating."""
        if self.asleep:
            return
        if self.on_cpu:
            self.llm.collective_rpc("rlhf_free_kv_cache")
        elif self.settings.enable_sleep_mode:
            self.llm.sleep(level=1)
        self.asleep, self.weights_awake = True, False

    def wake_up(self) -> None:
        if not self.asleep:
            return
        if self.on_cpu:
            self.llm.collective_rpc("rlhf_restore_kv_cache")
        elif self.settings.enable_sleep_mode:
            self.llm.wake_up(tags=["kv_cache"] if self.weights_awake else None)
        self.llm.reset_prefix_cache()  # the freed cache's contents are gone
        self.asleep = self.weights_awake = False

    def kv_cache_bytes(self) -> int:
        """Bytes the KV cache holds now (0 while asleep on the CPU)."""
        sizes = self.llm.collective_rpc(lambda worker: sum(s.size() for s in worker.rlhf_kv_cache_storages()))
        return int(sum(sizes))


def _platform_is_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def _other_process(sampler: VLLMSampler) -> bool:
    """Whether the engine's workers run in other processes (then tensors are pickled)."""
    return os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1") != "0" or sampler.settings.tensor_parallel_size > 1
