"""Building each PPO role from the stage config: used by stages/ppo.py, where one process
holds all four roles, and by the Ray role workers, where each process holds one."""

from __future__ import annotations

from rlhf.config import PPOConfig
from rlhf.data.builders import load_records
from rlhf.data.sft_dataset import SFTBatches, encode_text
from rlhf.distributed.strategy import Strategy
from rlhf.errors import ConfigError, UserError
from rlhf.models.fused_head import use_fused_head_loss
from rlhf.models.loading import load_causal_lm
from rlhf.models.lora import apply_lora
from rlhf.models.reward import RewardStats, load_scalar_model
from rlhf.roles.roles import Actor, Critic, Reference, RewardModel
from rlhf.training.optim import OptimizerSpec


def steps_per_iteration(cfg: PPOConfig) -> int:
    return cfg.ppo.ppo_epochs * cfg.ppo.rollout_batch_size // cfg.ppo.mini_batch_size


def accumulation_steps(cfg: PPOConfig, world_size: int) -> tuple[int, int]:
    """Backward calls per optimizer step on each worker for (actor, critic): the micro-batches
    of a mini-batch, plus the pretraining micro-batch for the actor under PPO-ptx."""
    per_pass = cfg.ppo.micro_batch_size * world_size
    if cfg.ppo.mini_batch_size % per_pass:
        raise ConfigError(f"ppo.mini_batch_size={cfg.ppo.mini_batch_size} must be a multiple of ppo.micro_batch_size "
                          f"x workers = {cfg.ppo.micro_batch_size} x {world_size}")
    critic = cfg.ppo.mini_batch_size // per_pass
    return critic + (1 if cfg.ppo.ptx_coef > 0 else 0), critic


def reward_stats_for(cfg: PPOConfig) -> RewardStats | None:
    stats = RewardStats.load(cfg.reward_model.path)
    if cfg.reward.normalize == "rm_stats" and stats is None:
        raise UserError(f"reward.normalize=rm_stats but {cfg.reward_model.path} has no reward_stats.json "
                        "(export it with `rlhf rm`, or set reward.normalize=running)")
    return stats


def build_actor(cfg: PPOConfig, strategy: Strategy, tokenizer) -> Actor:
    """The policy, from the SFT model, wrapped for training by the strategy."""
    total_steps = cfg.ppo.iterations * steps_per_iteration(cfg)
    accumulation, _ = accumulation_steps(cfg, strategy.world_size)
    model = load_causal_lm(cfg.model, strategy.device)
    if cfg.ppo.ptx_coef > 0:
        use_fused_head_loss(model)  # the pretraining loss without whole logits (rlhf/models/fused_head.py)
    model = apply_lora(model, cfg.model.lora)
    spec = OptimizerSpec.from_train(cfg.train, total_steps, lr=cfg.ppo.actor_lr)
    return Actor(strategy.wrap(model, spec, accumulation, cfg.ppo.micro_batch_size), tokenizer.eos_token_id,
                 tokenizer.pad_token_id, cfg.rollout.temperature, cfg.rollout.batch_size, cfg.rollout.engine)


def build_critic(cfg: PPOConfig, strategy: Strategy) -> Critic:
    """The value model, from the reward model (or the SFT model), wrapped for training."""
    total_steps = cfg.ppo.iterations * steps_per_iteration(cfg)
    _, accumulation = accumulation_steps(cfg, strategy.world_size)
    source = cfg.reward_model if cfg.ppo.critic_init == "reward" else cfg.model
    model = load_scalar_model(source, strategy.device, seed=cfg.seed)
    spec = OptimizerSpec.from_train(cfg.train, total_steps, lr=cfg.ppo.critic_lr)
    return Critic(strategy.wrap(model, spec, accumulation, cfg.ppo.micro_batch_size))


def build_reference(cfg: PPOConfig, strategy: Strategy) -> Reference:
    return Reference(load_causal_lm(cfg.model, strategy.device), cfg.rollout.temperature)


def build_reward_model(cfg: PPOConfig, strategy: Strategy) -> RewardModel:
    return RewardModel(load_scalar_model(cfg.reward_model, strategy.device), reward_stats_for(cfg))


def build_pretrain_batches(cfg: PPOConfig, tokenizer) -> SFTBatches:
    """PPO-ptx data: plain text, every token a target, as micro-batches addressed by step."""
    records, _ = load_records("pretrain", cfg.data.pretrain, cfg.data.on_error)
    examples = [encode_text(tokenizer, r.text, cfg.data.pretrain_max_length) for r in records]
    return SFTBatches(examples, cfg.ppo.ptx_micro_batch_size, tokenizer.pad_token_id, packing=False,
                      max_length=cfg.data.pretrain_max_length, seed=cfg.seed)


def ptx_batch_fn(cfg: PPOConfig, tokenizer):
    """step -> the pretraining micro-batch of that optimizer step; None without PPO-ptx."""
    if cfg.ppo.ptx_coef <= 0:
        return None
    batches = build_pretrain_batches(cfg, tokenizer)
    return lambda step: batches.batch(step // len(batches), step % len(batches))
