"""rollout.vllm.placement=actors: vLLM engines as Ray actors on devices of their own, fed the
actor's weights by a broadcast from trainer rank 0 (rlhf/rollout/weight_broadcast.py).

- `EngineActor`: one engine (a `VLLMSampler`) in its own process; a plain class, which
  rlhf/ray/vllm_engines.py starts as a Ray actor with its devices (tensor_parallel_size GPUs,
  or CPUs) and hands to the PPO actor role's workers.
- `EngineActorsEngine`: the actor role's rollout engine. It is the colocated `VLLMEngine`
  (same seeds per answer, same `Rollout`, same log-probs) with the sampler replaced by
  `RemoteSamplers`, which splits each call's prompts over the engine actors, and with
  `sync_weights` replaced by the broadcast.

The weight-sync group is trainer rank 0 plus every worker of every engine; trainer rank 0
hosts its store on its node's address (as Ray reports it). Ranks other than 0 of a sharded
actor still walk through the weights (their gathers are collectives) and send nothing.
"""

from __future__ import annotations

import os
import tempfile
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from rlhf.rollout.engine import Collective, SamplingParams, row_slices
from rlhf.rollout.vllm_engine import VLLMEngine
from rlhf.rollout.vllm_sampler import SamplerSettings, VLLMSampler
from rlhf.rollout.weight_broadcast import WeightGroup, WeightReceiver, WeightSyncError, backend_for, open_store
from rlhf.rollout.weights import iter_full_weights


class ActorSampler(VLLMSampler):
    """A sampler whose workers can also join the weight broadcast and receive from it."""

    worker_extension = WeightReceiver


class EngineActor:
    """One vLLM engine in this process, for the Ray actor that holds it."""

    def __init__(self, model_config: str, settings: SamplerSettings, eos_token_id: int):
        """`model_config`: the policy's config.json text (the engine starts from random weights
        of that shape: the trainer's first broadcast brings the real ones, so no checkpoint
        needs to be readable where the engine runs)."""
        # The engine core in this process (the actor is the engine's process); vLLM's own
        # binding of OpenMP threads to cores would ignore the CPUs Ray gave this actor.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        with tempfile.TemporaryDirectory(prefix="rlhf-vllm-actor-") as directory:
            (Path(directory) / "config.json").write_text(model_config)
            self.sampler = ActorSampler(directory, settings, eos_token_id)
        self.syncs = 0

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 seeds: Sequence[int] | None = None, batch_size: int | None = None
                 ) -> list[tuple[list[int], list[float]]]:
        return self.sampler.generate(prompts, params, seeds, batch_size)

    def join_weight_group(self, host: str, port: int, first_rank: int, world_size: int, backend: str,
                          timeout_s: float = 600.0) -> list[int]:
        """Every worker of this engine joins the group (ranks first_rank, first_rank + 1, ...);
        `timeout_s` bounds each of its collectives."""
        return self.sampler.llm.collective_rpc("rlhf_join_weight_group",
                                               args=(host, port, first_rank, world_size, backend, timeout_s))

    def receive_weights(self) -> int:
        """Receive one broadcast of the trainer's weights into every worker; tensors loaded."""
        counts = self.sampler.llm.collective_rpc("rlhf_receive_weights")
        self.sampler.llm.reset_prefix_cache()  # cached prefixes were computed with the old weights
        self.syncs += 1
        print(f"[vllm-engine] weights received: {counts[0]} tensors (sync {self.syncs})", flush=True)
        return int(counts[0])

    def sleep(self) -> None:
        self.sampler.sleep()

    def wake_up(self) -> None:
        self.sampler.wake_up()


class RemoteSamplers:
    """The engine actors behind the sampler interface `VLLMEngine` drives: a call's prompts
    (and their seeds) are split near-equally over the engines, which sample in parallel, and
    the answers come back in prompt order. Each engine has devices of its own, so there is
    nothing to release between rollouts: `sleep` and `wake_up` do nothing."""

    def __init__(self, engines: Sequence[Any] = ()):
        self.engines = list(engines)

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 seeds: Sequence[int] | None = None, batch_size: int | None = None
                 ) -> list[tuple[list[int], list[float]]]:
        """`batch_size`: per engine and vLLM call."""
        import ray

        if not self.engines:
            raise RuntimeError("rollout.vllm.placement=actors: no engine actors were attached to this engine")
        refs = []
        for engine, part in zip(self.engines, row_slices(len(prompts), len(self.engines))):
            if part.stop > part.start:
                refs.append(engine.generate.remote([list(p) for p in prompts[part]], params,
                                                   None if seeds is None else list(seeds[part]), batch_size))
        return [answer for answers in ray.get(refs) for answer in answers]

    def sleep(self) -> None:
        pass

    def wake_up(self) -> None:
        pass


class EngineActorsEngine(VLLMEngine):
    """The PPO actor role's engine when its vLLM engines are Ray actors."""

    def __init__(self, model: torch.nn.Module, eos_token_id: int, pad_token_id: int, world: Collective | None = None,
                 dtype: torch.dtype | None = None, batch_size: int = 32, sync_timeout_s: float = 300.0):
        """`dtype`: what the weights are sent as (the trainer's compute dtype; None: as they
        are). `sync_timeout_s`: the longest any collective of the weight broadcast may wait
        (rollout.vllm.sync_timeout_s). The engine actors come later, with `attach` (the Ray
        layer starts them)."""
        super().__init__(model, eos_token_id, pad_token_id, SamplerSettings(), world=world, sleep=False,
                         sampler=RemoteSamplers(), batch_size=batch_size)
        self.dtype = dtype
        self.sync_timeout = timedelta(seconds=sync_timeout_s)
        self.group: WeightGroup | None = None

    @property
    def rank(self) -> int:
        return getattr(self.world, "rank", 0) if self.world is not None else 0

    def attach(self, engines: Sequence[Any], workers_per_engine: int, host: str) -> None:
        """Sample with `engines` (Ray actor handles of `EngineActor`). Trainer rank 0 forms
        the weight-sync group with all their workers, hosting its store on `host` (this node's
        address as Ray reports it): a blocking rendezvous with every engine."""
        import ray

        self.sampler = RemoteSamplers(engines)
        if self.rank != 0:
            return
        world_size = 1 + len(engines) * workers_per_engine
        device = getattr(self.world, "device", None) or torch.device("cpu")
        timeout = self.sync_timeout
        store = open_store(host, 0, world_size, timeout=timeout)
        joined = [engine.join_weight_group.remote(host, store.port, 1 + index * workers_per_engine, world_size,
                                                  backend_for(device), timeout.total_seconds())
                  for index, engine in enumerate(engines)]
        self.group = _rendezvous(lambda: WeightGroup(store, 0, world_size, device, timeout, address=host), joined)

    def sync_weights(self, model: torch.nn.Module | None = None, world: Collective | None = None) -> int:
        """Broadcast the trainer's current weights to every engine (every trainer rank calls
        this: under ZeRO-3 / FSDP2 the gathers are collectives); returns the tensors sent."""
        import ray

        model = model if model is not None else self.model
        world = world if world is not None else self.world
        weights = iter_full_weights(model, world)
        sent = 0
        if self.rank != 0:
            for _ in weights:  # take part in the gathers; rank 0 sends
                pass
        else:
            if self.group is None:
                raise RuntimeError("rollout.vllm.placement=actors: the engine actors were never attached")
            received = [engine.receive_weights.remote() for engine in self.sampler.engines]
            try:
                sent = self.group.send(weights, self.dtype)
            except WeightSyncError as error:
                raise WeightSyncError(f"{error}; {_failed_engines(received)}", error.tensor) from error
            counts = ray.get(received)
            if any(count != sent for count in counts):
                raise RuntimeError(f"weight sync: {sent} tensors sent, the engines loaded {counts}")
        if world is not None and getattr(world, "world_size", 1) > 1:
            # No rank samples before every engine holds the new weights: where the weights are
            # whole on each rank (ZeRO-1/2) the others would finish walking them at once, and
            # their requests could reach an engine before rank 0's broadcast.
            world.all_reduce({"synced": 1.0}, op="max")
        self.synced_once = True
        return sent


def _failed_engines(received: list, wait_s: float = 10.0) -> str:
    """Which engine actors' receiving calls (`received`, one per engine, in engine order) have
    failed, waiting up to `wait_s` for a dead actor's failure to reach us."""
    import ray

    ray.wait(received, num_returns=len(received), timeout=wait_s)
    failed = []
    for index, ref in enumerate(received):
        ready, _ = ray.wait([ref], timeout=0)
        if not ready:
            continue
        try:
            ray.get(ready[0])
        except Exception as error:  # noqa: BLE001  # reported, not handled
            failed.append(f"engine actor {index} ({type(error).__name__}: {str(error).splitlines()[0][:200]})")
    if not failed:
        return f"no engine actor of {len(received)} reported a failure within {wait_s:.0f} s"
    return "failed: " + "; ".join(failed)


def _rendezvous(build: Callable[[], WeightGroup], joined: list) -> WeightGroup:
    """`build()` (rank 0's side of the group, which returns once every engine worker has
    joined) while the engines' join calls are watched: an engine that fails to join (vLLM
    missing, another kind of device) raises its error here at once, rather than after the
    rendezvous has waited out its timeout."""
    import ray

    built: dict[str, Any] = {}

    def run() -> None:
        try:
            built["group"] = build()
        except BaseException as error:  # re-raised in the caller's thread
            built["error"] = error

    thread = threading.Thread(target=run, name="rlhf-weight-group", daemon=True)
    thread.start()
    pending = list(joined)
    while thread.is_alive():
        thread.join(timeout=0.5)
        if pending:
            done, pending = ray.wait(pending, num_returns=len(pending), timeout=0)
            ray.get(done)  # raises a failed join
    if "error" in built:
        raise built["error"]
    ray.get(joined)
    return built["group"]


def policy_config(model: torch.nn.Module):
    """The policy's transformers config, under an engine wrapper or PEFT."""
    from rlhf.models.engines import unwrap_engine

    root = unwrap_engine(model)
    base = root.get_base_model() if hasattr(root, "get_base_model") else root  # PEFT
    return base.config


def policy_config_json(model: torch.nn.Module) -> str:
    """The policy's config.json text, for engine actors to build an engine of its shape."""
    return policy_config(model).to_json_string(use_diff=False)
