"""Critic-free advantage estimators over a global batch: GRPO, Dr. GRPO, RLOO, REINFORCE++.

Group layout: with ``n`` samples per prompt the batch holds groups of ``n``
consecutive answers to the same prompt, so sample ``i`` belongs to group
``i // n``. Scores are one sequence-level reward per answer, ``(batch,)``.

Statistics are computed in float32 or wider (bf16 group means lose too much
precision), and the advantages are constants for the losses, hence the
``no_grad`` on the estimators.

A group whose rewards are all equal has zero advantage under every group
estimator. This holds exactly here, not only up to rounding: in float32,
``r - mean(r)`` of seven copies of 0.1 is -7.5e-9 on each (the mean is one ulp
off), the std of those equal deviations is 0, and ``/ (std + 1e-6)`` turns the
rounding error into an advantage of -0.0075. Such groups are centred to exact
zeros first.
"""

from typing import Dict

import torch

from rlhf.algorithms.masked import masked_whiten

__all__ = [
    "group_view",
    "grpo_advantages",
    "rloo_advantages",
    "broadcast_to_tokens",
    "discounted_returns",
    "reinforce_pp_advantages",
    "uniform_groups",
    "group_stats",
]


def _check_scores(scores: torch.Tensor, group_size: int) -> None:
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D (batch,), got shape {tuple(scores.shape)}")


def group_view(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """View ``(batch,)`` scores as ``(batch // n, n)`` groups, one row per prompt.

    Args:
        scores: ``(batch,)`` one reward per answer, groups of ``n`` consecutive answers.
        group_size: ``n``, the number of samples per prompt.

    Returns:
        ``(batch // n, n)`` view of ``scores`` (no copy).

    Raises:
        ValueError: ``scores`` is not 1-D, ``n < 1``, or ``batch`` is not a multiple of ``n``.
    """
    _check_scores(scores, group_size)
    if scores.shape[0] % group_size != 0:
        raise ValueError(
            f"batch of {scores.shape[0]} scores is not a multiple of group_size={group_size}: "
            "the batch must hold whole groups of n_samples_per_prompt consecutive answers"
        )
    return scores.view(-1, group_size)


def _float_groups(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    groups = group_view(scores, group_size)
    return groups.to(torch.promote_types(scores.dtype, torch.float32))


def _uniform_rows(groups: torch.Tensor, atol: float = 0.0) -> torch.Tensor:
    # (groups,) bool: max - min <= atol. An empty group (n = 0) cannot occur (n >= 1).
    return (groups.amax(dim=1) - groups.amin(dim=1)) <= atol


def _centered(groups: torch.Tensor) -> torch.Tensor:
    """``r - mean(r)`` per group, exactly 0 on groups whose rewards are all equal."""
    centered = groups - groups.mean(dim=1, keepdim=True)
    return torch.where(_uniform_rows(groups).unsqueeze(1), torch.zeros_like(centered), centered)


def _group_std(centered: torch.Tensor) -> torch.Tensor:
    """``(groups, 1)`` std with Bessel's correction from centred rewards; 0 for a group of one
    (where ``torch.std`` would give ``nan``)."""
    n = centered.shape[1]
    return ((centered**2).sum(dim=1, keepdim=True) / max(n - 1, 1)).sqrt()


@torch.no_grad()
def grpo_advantages(
    scores: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """Group-relative advantages of GRPO, or of Dr. GRPO with ``scale=False``.

    GRPO with outcome supervision (Shao et al. 2024, DeepSeekMath, arXiv:2402.03300, §4.1.2):
    ``A_i = (r_i - mean(r)) / (std(r) + eps)`` over the ``n`` answers to the
    same prompt, the same value on every token of answer ``i``. ``std`` uses
    Bessel's correction, as ``torch.std`` in TRL's and verl's implementations.

    Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training: A
    Critical Perspective", arXiv:2503.20783) drops the division: ``A_i = r_i - mean(r)``,
    removing the question-level difficulty bias that the std introduces.

    A group of one, and a group whose rewards are all equal, get advantage 0
    (never ``nan``).

    Args:
        scores: ``(batch,)`` sequence-level rewards, groups of ``n`` consecutive answers.
        group_size: ``n``, samples per prompt.
        scale: divide by the group std (GRPO); ``False`` gives Dr. GRPO.
        eps: added to the std before dividing.

    Returns:
        ``(batch,)`` advantages in float32 or wider.
    """
    centered = _centered(_float_groups(scores, group_size))
    if scale:
        std = _group_std(centered)
        # std is 0 only where every centred reward is 0: divide by 1 there, so eps=0 gives 0, not nan.
        centered = centered / torch.where(std > 0, std + eps, torch.ones_like(std))
    return centered.reshape(-1)


@torch.no_grad()
def rloo_advantages(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """REINFORCE Leave-One-Out advantages (Ahmadian et al. 2024, "Back to Basics:
    Revisiting REINFORCE Style Optimization for Learning from Human Feedback in LLMs",
    arXiv:2402.14740, after Kool et al. 2019, "Buy 4 REINFORCE Samples, Get a Baseline for Free!").

    Each answer's baseline is the mean reward of the other ``n - 1`` answers to
    the same prompt: ``A_i = r_i - 1/(n-1) sum_{j != i} r_j``, which equals
    ``n/(n-1) * (r_i - mean(r))`` (the form computed here).

    Args:
        scores: ``(batch,)`` sequence-level rewards, groups of ``n`` consecutive answers.
        group_size: ``n >= 2``, samples per prompt.

    Returns:
        ``(batch,)`` advantages in float32 or wider.

    Raises:
        ValueError: ``n < 2`` (no other sample to form the baseline).
    """
    if isinstance(group_size, int) and not isinstance(group_size, bool) and group_size < 2:
        raise ValueError(f"RLOO needs at least 2 samples per prompt, got group_size={group_size}")
    centered = _centered(_float_groups(scores, group_size))
    return (centered * (group_size / (group_size - 1))).reshape(-1)


def broadcast_to_tokens(advantages: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Put each answer's advantage on each of its response tokens.

    Args:
        advantages: ``(batch,)`` one advantage per answer.
        response_mask: ``(batch, seq)`` float or bool, 1 on response tokens.

    Returns:
        ``(batch, seq)`` in the dtype of ``advantages``, 0 off the mask.
    """
    if advantages.dim() != 1 or response_mask.dim() != 2 or advantages.shape[0] != response_mask.shape[0]:
        raise ValueError(
            f"advantages {tuple(advantages.shape)} must be (batch,) and response_mask "
            f"{tuple(response_mask.shape)} (batch, seq) with the same batch"
        )
    keep = response_mask.to(torch.bool)
    zero = torch.zeros((), dtype=advantages.dtype, device=advantages.device)
    return torch.where(keep, advantages.unsqueeze(1), zero)


@torch.no_grad()
def discounted_returns(
    rewards: torch.Tensor, response_mask: torch.Tensor, gamma: float = 1.0
) -> torch.Tensor:
    """Per-token Monte-Carlo returns ``G_t = r_t + gamma * G_{t+1}`` over response tokens.

    The advantage of REINFORCE++ (Hu 2025, "REINFORCE++: A Simple and Efficient
    Approach for Aligning Large Language Models", arXiv:2501.03262): token rewards are
    ``-beta * KL_t`` on every response token plus the score on the last one
    (``rlhf.algorithms.rewards.shape_rewards``), and ``A_t = sum_{i >= t}
    gamma^(i-t) r_i``. As in ``compute_gae``, off-mask positions are skipped:
    the return after the last response token is 0, rewards off the mask are
    ignored, and masked tokens on either side of an interior gap are
    consecutive steps.

    Args:
        rewards: ``(batch, seq)`` per-token rewards.
        response_mask: ``(batch, seq)`` float or bool, 1 on response tokens.
        gamma: discount factor.

    Returns:
        ``(batch, seq)`` returns in float32 or wider, 0 off the mask.
    """
    if rewards.dim() != 2 or rewards.shape != response_mask.shape:
        raise ValueError(
            f"rewards {tuple(rewards.shape)} and response_mask {tuple(response_mask.shape)} "
            "must have the same (batch, seq) shape"
        )
    dtype = torch.promote_types(rewards.dtype, torch.float32)
    rewards = rewards.to(dtype)
    keep = response_mask.to(torch.bool)
    zero = torch.zeros((), dtype=dtype, device=rewards.device)

    batch, seq = rewards.shape
    returns = torch.zeros(batch, seq, dtype=dtype, device=rewards.device)
    next_return = torch.zeros(batch, dtype=dtype, device=rewards.device)
    for t in range(seq - 1, -1, -1):
        k = keep[:, t]
        # G_t = r_t + gamma * G_{t+1}  (Hu 2025; the Monte-Carlo return of REINFORCE, Williams 1992)
        g = torch.where(k, rewards[:, t] + gamma * next_return, zero)
        returns[:, t] = g
        next_return = torch.where(k, g, next_return)
    return returns


@torch.no_grad()
def reinforce_pp_advantages(
    rewards: torch.Tensor, response_mask: torch.Tensor, gamma: float = 1.0
) -> torch.Tensor:
    """REINFORCE++ advantages: discounted returns whitened over the batch (Hu 2025).

    ``A = (G - mean(G)) / std(G)``, mean and (unbiased) std taken over every
    response token of the batch given, padding excluded
    (``masked_whiten(discounted_returns(...))``).

    The normalisation is meant over the *global* batch: when the batch is
    split across workers, gather the returns (or all-reduce their masked sum,
    sum of squares and count) and whiten once; whitening each worker's shard
    gives each shard its own mean and scale.

    Args:
        rewards: ``(batch, seq)`` per-token rewards (``-beta * KL_t`` plus the
            score on the last response token).
        response_mask: ``(batch, seq)`` float or bool, 1 on response tokens.
        gamma: discount factor.

    Returns:
        ``(batch, seq)`` advantages in float32 or wider, 0 off the mask.
    """
    return masked_whiten(discounted_returns(rewards, response_mask, gamma), response_mask)


def uniform_groups(scores: torch.Tensor, group_size: int, atol: float = 0.0) -> torch.Tensor:
    """Groups whose rewards are all equal (``max - min <= atol``).

    Under GRPO, Dr. GRPO and RLOO such a group has zero advantage on every
    answer: it carries no learning signal, and a caller may drop it (DAPO's
    dynamic sampling, Yu et al. 2025, arXiv:2503.14476, filters exactly these).

    Args:
        scores: ``(batch,)`` sequence-level rewards, groups of ``n`` consecutive answers.
        group_size: ``n``, samples per prompt.
        atol: absolute tolerance on the spread of a group.

    Returns:
        ``(batch // n,)`` bool, True for a uniform group. Use
        ``mask.repeat_interleave(n)`` for a per-answer mask.
    """
    return _uniform_rows(_float_groups(scores, group_size).detach(), atol)


@torch.no_grad()
def group_stats(scores: torch.Tensor, group_size: int, atol: float = 0.0) -> Dict[str, torch.Tensor]:
    """Detached scalar statistics of the reward groups, for logging.

    Args:
        scores: ``(batch,)`` sequence-level rewards, groups of ``n`` consecutive answers.
        group_size: ``n``, samples per prompt.
        atol: tolerance of ``uniform_groups``.

    Returns:
        ``group_reward_std_mean``: mean over groups of each group's std
        (Bessel's correction, 0 for a group of one); ``uniform_group_share``:
        fraction of groups whose rewards are all equal. 0-d float tensors.
    """
    groups = _float_groups(scores, group_size)
    std = _group_std(_centered(groups)).squeeze(1)
    uniform = _uniform_rows(groups, atol).to(groups.dtype)
    # Sum / max(count, 1): an empty batch logs 0 rather than nan, as masked_mean does.
    count = max(groups.shape[0], 1)
    return {
        "group_reward_std_mean": (std.sum() / count).detach(),
        "uniform_group_share": (uniform.sum() / count).detach(),
    }
