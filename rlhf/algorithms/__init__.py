"""Pure tensor functions of the RLHF algorithms (no models, configs or I/O)."""

from rlhf.algorithms.gae import compute_gae
from rlhf.algorithms.kl import KL_ESTIMATORS, AdaptiveKLController, FixedKLController, kl_estimate
from rlhf.algorithms.losses import (
    entropy_from_logits,
    explained_variance,
    kwise_ranking_loss,
    pairwise_ranking_loss,
    ppo_policy_loss,
    ptx_loss,
    sft_loss,
    token_logprobs,
    value_loss,
)
from rlhf.algorithms.masked import masked_mean, masked_sum, masked_var, masked_whiten

__all__ = [
    "compute_gae",
    "KL_ESTIMATORS",
    "kl_estimate",
    "FixedKLController",
    "AdaptiveKLController",
    "token_logprobs",
    "sft_loss",
    "ptx_loss",
    "pairwise_ranking_loss",
    "kwise_ranking_loss",
    "ppo_policy_loss",
    "value_loss",
    "entropy_from_logits",
    "explained_variance",
    "masked_sum",
    "masked_mean",
    "masked_var",
    "masked_whiten",
]
