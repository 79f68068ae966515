"""Pure tensor functions of the RLHF algorithms (no models, configs or I/O)."""

from rlhf.algorithms.advantages import (
    broadcast_to_tokens,
    discounted_returns,
    group_stats,
    group_view,
    grpo_advantages,
    reinforce_pp_advantages,
    rloo_advantages,
    uniform_groups,
)
from rlhf.algorithms.gae import compute_gae
from rlhf.algorithms.kl import KL_ESTIMATORS, AdaptiveKLController, FixedKLController, kl_estimate
from rlhf.algorithms.losses import (
    DPO_LOSS_TYPES,
    LOSS_AGGREGATIONS,
    aggregate_loss,
    clipped_surrogate,
    dpo_loss,
    entropy_from_logits,
    explained_variance,
    kwise_ranking_loss,
    lm_nll,
    loss_denominator,
    per_prompt_mean,
    token_logprobs,
    value_loss,
)
from rlhf.algorithms.masked import masked_mean, masked_sum, masked_var, masked_whiten

__all__ = [
    "compute_gae",
    "group_view",
    "grpo_advantages",
    "rloo_advantages",
    "broadcast_to_tokens",
    "discounted_returns",
    "reinforce_pp_advantages",
    "uniform_groups",
    "group_stats",
    "KL_ESTIMATORS",
    "kl_estimate",
    "FixedKLController",
    "AdaptiveKLController",
    "token_logprobs",
    "lm_nll",
    "kwise_ranking_loss",
    "clipped_surrogate",
    "LOSS_AGGREGATIONS",
    "loss_denominator",
    "aggregate_loss",
    "value_loss",
    "entropy_from_logits",
    "explained_variance",
    "DPO_LOSS_TYPES",
    "dpo_loss",
    "per_prompt_mean",
    "masked_sum",
    "masked_mean",
    "masked_var",
    "masked_whiten",
]
