"""Losses of the RLHF stages (SFT, reward model, PPO / PPO-ptx, DPO / IPO).

All functions are pure: tensors in, ``(loss, stats)`` out, where ``stats``
holds detached scalar tensors meant for logging (no host sync happens here;
the caller decides when to call ``.item()``). The exception is
:func:`loss_denominator`, a host-side count taken once per global
mini-batch.
"""

from typing import Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from rlhf.algorithms.masked import masked_mean, masked_sum, masked_var

__all__ = [
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
]

Stats = Dict[str, torch.Tensor]
Margin = Optional[Union[float, torch.Tensor]]

_FULL_PRECISION = (torch.float32, torch.float64)


def _gather_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    if temperature != 1.0:
        logits = logits / temperature
    picked = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    # log softmax(z)[y] = z_y - logsumexp(z): avoids materialising a second
    # (.., vocab) tensor of log-probabilities just to read one entry per row.
    return picked - torch.logsumexp(logits, dim=-1)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Log-probability of each token under ``softmax(logits / temperature)``.

    The logits must already be aligned with ``tokens`` (``logits[:, t]`` is the
    distribution that produced ``tokens[:, t]``): the caller does the shift.
    The temperature must match the one used for sampling, otherwise the PPO
    ratio compares two different distributions.

    Half-precision logits are upcast one batch row at a time: logsumexp over a
    large vocabulary in bf16 is too coarse for importance ratios, and a single
    float32 copy of the whole batch can be several GiB.

    Args:
        logits: ``(batch, seq, vocab)``.
        tokens: ``(batch, seq)`` long token ids.
        temperature: sampling temperature, > 0.

    Returns:
        ``(batch, seq)`` log-probabilities, float32 (or float64 for float64 logits).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if logits.shape[:-1] != tokens.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} must be tokens {tuple(tokens.shape)} plus a vocab dim"
        )
    if logits.dtype in _FULL_PRECISION:
        return _gather_logprobs(logits, tokens, temperature)
    if logits.shape[0] == 0:
        return logits.new_zeros(tokens.shape, dtype=torch.float32)
    rows = [
        _gather_logprobs(row.float(), row_tokens, temperature)
        for row, row_tokens in zip(logits.split(1), tokens.split(1))
    ]
    return torch.cat(rows, dim=0)


def lm_nll(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token negative log-likelihood and the number of tokens it covers.

    ``sum_i -log softmax(logits[i])[targets[i]]`` over the ``i`` with
    ``targets[i] != ignore_index``. This is the SFT loss and the PPO-ptx
    pretraining term (Ouyang et al. 2022, eq. 2, ``gamma * E_{x ~ D_pretrain}
    [log pi(x)]``), written as a sum: the caller divides by the token count of
    the whole global batch (all micro-batches, all workers), so that every
    token weighs the same. Averaging per-micro-batch means instead would
    overweight the tokens of short micro-batches.

    The logits must already be aligned with the targets (row ``i`` is the
    distribution that predicts ``targets[i]``): no shift happens here, the
    caller selects the positions (e.g. only those with a target).

    Half-precision logits are upcast to float32 before the log-softmax: a
    bf16 log-softmax over tens of thousands of classes visibly biases the loss.

    Args:
        logits: ``(n, vocab)``.
        targets: ``(n,)`` long token ids, ``ignore_index`` where no loss is wanted.
        ignore_index: target value to skip.

    Returns:
        ``(nll_sum, n_tokens)``: scalar float32 sum (float64 for float64
        logits; 0, still differentiable, when every target is ignored) and
        scalar long count of the targets that were not ignored.
    """
    if logits.dim() != 2 or targets.dim() != 1 or logits.shape[0] != targets.shape[0]:
        raise ValueError(
            f"logits {tuple(logits.shape)} must be (n, vocab) and targets {tuple(targets.shape)} (n,)"
        )
    if logits.dtype not in _FULL_PRECISION:
        logits = logits.float()
    nll_sum = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum")
    return nll_sum, (targets != ignore_index).sum()


def _margin_tensor(margin: Margin, like: torch.Tensor) -> torch.Tensor:
    if margin is None:
        return torch.zeros((), dtype=like.dtype, device=like.device)
    if isinstance(margin, torch.Tensor):
        return margin.to(dtype=like.dtype, device=like.device)
    return torch.tensor(float(margin), dtype=like.dtype, device=like.device)


def _safe_mean(x: torch.Tensor) -> torch.Tensor:
    # Statistics of an empty set of pairs are reported as 0 rather than nan.
    return x.sum() / max(x.numel(), 1)


def kwise_ranking_loss(
    scores: torch.Tensor,
    pair_index: torch.Tensor,
    pair_group: torch.Tensor,
    num_groups: int,
    margin: Margin = None,
    center_coef: float = 0.0,
) -> Tuple[torch.Tensor, Stats]:
    """InstructGPT K-wise ranking loss with every answer scored once.

    Ouyang et al. 2022, eq. 1::

        loss(theta) = -1/C(K,2) * E_{(x, y_w, y_l)} [log sigmoid(r(x, y_w) - r(x, y_l))]

    All C(K,2) comparisons of a prompt come from the same K forward passes
    (scored once, compared many times) and are averaged per prompt, so each
    prompt counts equally whatever its K; Ouyang et al. found that treating
    the pairs as independent samples overfits. Tied answers yield no pair, so
    a prompt may have fewer than C(K,2) pairs: its mean is over the pairs it
    has, and a prompt with none is left out of the outer mean. With K = 2
    (one pair per prompt) this is the Bradley-Terry pairwise loss
    ``mean(-log sigmoid(r_w - r_l - m))``.

    The optional margin ``m`` (Touvron et al. 2023, Llama 2, eq. 2) is
    subtracted inside the sigmoid: it asks for a larger gap on pairs the
    labellers rated as clearly different.

    Optional reward centring adds ``center_coef * mean(scores^2)``: the
    ranking loss only sees differences, so the common offset of the scores is
    unconstrained and can drift; this keeps the mean score near 0 so rewards
    fed to PPO are on a stable scale (an auxiliary loss in the spirit of
    Eisenstein et al. 2023; InstructGPT instead subtracts a bias after
    training).

    Args:
        scores: ``(N,)`` reward of every answer in the batch.
        pair_index: ``(P, 2)`` long indices into ``scores`` of
            (better, worse), ties excluded.
        pair_group: ``(P,)`` long prompt id of each pair, in ``[0, num_groups)``.
        num_groups: number of prompts in the batch.
        margin: ``None``, a float, or a ``(P,)`` tensor of per-pair margins.
        center_coef: weight of the centring penalty; 0 disables it.

    Returns:
        ``(loss, stats)``; stats (over pairs, not prompt-weighted):
        ``accuracy``, ``reward_margin`` (mean s_better - s_worse),
        ``score_mean``, ``num_pairs``.
    """
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D (one reward per answer), got {tuple(scores.shape)}")
    if pair_index.dim() != 2 or pair_index.shape[1] != 2:
        raise ValueError(f"pair_index must be (P, 2), got {tuple(pair_index.shape)}")
    if pair_group.shape != pair_index.shape[:1]:
        raise ValueError(f"pair_group must be ({pair_index.shape[0]},), got {tuple(pair_group.shape)}")

    diff = scores[pair_index[:, 0]] - scores[pair_index[:, 1]]
    per_pair = -F.logsigmoid(diff - _margin_tensor(margin, diff))
    group_sum = per_pair.new_zeros(num_groups).index_add(0, pair_group, per_pair)
    group_count = per_pair.new_zeros(num_groups).index_add(0, pair_group, torch.ones_like(per_pair))
    has_pairs = group_count > 0
    # The 1/C(K,2) of eq. 1, with C(K,2) replaced by the actual untied pair count.
    group_loss = group_sum / group_count.clamp_min(1)
    loss = torch.where(has_pairs, group_loss, torch.zeros_like(group_loss)).sum() / has_pairs.sum().clamp_min(1)
    if center_coef:
        loss = loss + center_coef * scores.pow(2).mean()

    with torch.no_grad():
        stats = {
            "accuracy": _safe_mean((diff > 0).to(diff.dtype)),
            "reward_margin": _safe_mean(diff),
            "score_mean": _safe_mean(scores),
            "num_pairs": torch.tensor(float(diff.numel()), device=diff.device),
        }
    return loss, {k: v.detach() for k, v in stats.items()}


def clipped_surrogate(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    clip_eps: float = 0.2,
    dual_clip: Optional[float] = None,
) -> Tuple[torch.Tensor, Stats]:
    """PPO clipped surrogate loss of every token, before any reduction.

    Schulman et al. 2017, eq. 7, written as a loss (negated objective)::

        ratio = exp(logp - old_logp)
        L     = max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))

    The max is the pessimistic bound: once the ratio has moved past the clip
    edge in the direction the advantage favours, the clipped (constant) term
    is selected and the token's gradient is zero.

    ``dual_clip`` = c > 1 (Ye et al. 2020, "Mastering Complex Control in MOBA
    Games with Deep RL", eq. 5) additionally caps the loss at ``-c * A`` for
    negative advantages: a huge ratio on a bad action would otherwise give an
    unbounded step.

    The reduction over tokens is left to :func:`aggregate_loss`, so that the
    aggregation (token mean, sequence mean, Dr. GRPO's constant
    normaliser) is a choice of the caller.

    Args:
        logprobs: ``(batch, seq)`` current policy log-probs (with grad).
        old_logprobs: ``(batch, seq)`` rollout policy log-probs.
        advantages: ``(batch, seq)``.
        response_mask: ``(batch, seq)`` float or bool, 1 on response tokens.
        clip_eps: epsilon of the ratio clip, > 0.
        dual_clip: ``None`` or c > 1.

    Returns:
        ``(per_token_loss, stats)``: ``(batch, seq)`` loss, 0 outside the
        mask (whatever the log-probs or advantages hold there); stats, masked
        means over response tokens: ``clip_frac`` (fraction of response tokens
        where the clipped term was strictly larger, i.e. selected),
        ``approx_kl`` (k3 estimate of KL(pi_old || pi), Schulman 2020 note:
        ``(ratio - 1) - log ratio``), ``ratio_mean``, and ``dual_clip_frac``
        when dual clipping is on.
    """
    if clip_eps <= 0:
        raise ValueError(f"clip_eps must be > 0, got {clip_eps}")
    if dual_clip is not None and dual_clip <= 1:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")

    # Off-mask positions may hold -inf log-probs; zero their log-ratio so that
    # exp() stays finite and no nan reaches the gradient through torch.where.
    keep = response_mask.to(torch.bool)
    log_ratio = torch.where(keep, logprobs - old_logprobs, torch.zeros_like(logprobs))
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    per_token = torch.maximum(unclipped, clipped)
    if dual_clip is not None:
        capped = torch.minimum(per_token, -dual_clip * advantages)
        dual_active = (advantages < 0) & (capped < per_token)
        per_token = torch.where(advantages < 0, capped, per_token)
    per_token = torch.where(keep, per_token, torch.zeros_like(per_token))

    with torch.no_grad():
        stats = {
            "clip_frac": masked_mean((clipped > unclipped).to(ratio.dtype), keep),
            "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, keep),
            "ratio_mean": masked_mean(ratio, keep),
        }
        if dual_clip is not None:
            stats["dual_clip_frac"] = masked_mean(dual_active.to(ratio.dtype), keep)
    return per_token, {k: v.detach() for k, v in stats.items()}


# Loss aggregation modes of Liu et al. 2025 ("Understanding R1-Zero-Like
# Training: A Critical Perspective", Dr. GRPO), in their order of appearance.
LOSS_AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")


def _check_aggregation(mode: str) -> None:
    if mode not in LOSS_AGGREGATIONS:
        raise ValueError(f"unknown loss aggregation {mode!r}; valid modes are {', '.join(LOSS_AGGREGATIONS)}")


def loss_denominator(response_mask: torch.Tensor, mode: str, constant: Optional[float] = None) -> float:
    """Normaliser of :func:`aggregate_loss` for a (mini-)batch, as a host-side number.

    * ``"token_mean"``: the number of response tokens.
    * ``"seq_mean_token_mean"``: the number of sequences (rows).
    * ``"seq_mean_token_sum_norm"``: rows x ``constant``, a fixed number
      such as the generation budget ``max_new_tokens`` (Dr. GRPO's
      normaliser); required for this mode, ignored by the others.

    Each count is additive over rows, so workers holding parts of a global
    mini-batch can each count their part and all-reduce (sum) the results.
    The count is at least 1: a batch without response tokens then gives a
    loss of 0 rather than nan, as :func:`masked_mean` does. Computed once per
    global mini-batch, so the host sync of the token count is cheap.

    Args:
        response_mask: ``(batch, seq)`` float or bool, 1 on response tokens.
        mode: one of :data:`LOSS_AGGREGATIONS`.
        constant: the per-sequence constant of ``"seq_mean_token_sum_norm"``, > 0.

    Returns:
        The denominator as a python float.
    """
    _check_aggregation(mode)
    if response_mask.dim() != 2:
        raise ValueError(f"response_mask must be (batch, seq), got {tuple(response_mask.shape)}")
    rows = float(response_mask.shape[0])
    if mode == "token_mean":
        count = float(response_mask.to(torch.bool).sum())
    elif mode == "seq_mean_token_mean":
        count = rows
    else:
        if constant is None or constant <= 0:
            raise ValueError(
                f"loss aggregation seq_mean_token_sum_norm needs a constant > 0 (e.g. max_new_tokens), got {constant}"
            )
        count = rows * float(constant)
    return max(count, 1.0)


def aggregate_loss(
    per_token: torch.Tensor, response_mask: torch.Tensor, mode: str, denominator: float
) -> torch.Tensor:
    """Reduce a per-token loss to a scalar with one of the Dr. GRPO aggregation modes.

    Liu et al. 2025 ("Understanding R1-Zero-Like Training", Dr. GRPO), with
    ``l_it`` the loss of token t of sequence i, ``L_i`` its token count, G
    the number of sequences and T the total token count of the mini-batch:

    * ``"token_mean"``: ``sum_it l_it / T``. Every token weighs the same
      (PPO as usually implemented; DAPO, Yu et al. 2025, Sec. 3.3).
    * ``"seq_mean_token_mean"``: ``1/G sum_i (1/L_i) sum_t l_it``, GRPO's
      (Shao et al. 2024, eq. 3): every sequence weighs the same, so a token
      of a long answer weighs less. Liu et al. show this length bias favours
      long wrong answers (their per-token penalty is diluted).
    * ``"seq_mean_token_sum_norm"``: ``1/G sum_i (1/C) sum_t l_it`` with a
      constant C (e.g. max_new_tokens): Dr. GRPO's unbiased choice, every
      token weighs the same whatever the batch's lengths.

    Contract: split a global mini-batch into micro-batches (over gradient
    accumulation steps and workers); when each micro-batch calls this with
    the ``denominator`` of the WHOLE mini-batch (:func:`loss_denominator` of
    its full mask, or the all-reduced sum of the parts' counts), the sum of
    the micro-batch losses, and so of their gradients, is exactly the mode's
    loss over the whole mini-batch. This holds because each mode is a sum
    over tokens (token_mean, seq_mean_token_sum_norm) or over whole
    sequences (seq_mean_token_mean, with each row kept in one micro-batch)
    divided by a number that does not depend on how the batch is split.

    Args:
        per_token: ``(batch, seq)`` loss per token, e.g. from
            :func:`clipped_surrogate`.
        response_mask: ``(batch, seq)`` float or bool, 1 on response tokens.
        mode: one of :data:`LOSS_AGGREGATIONS`.
        denominator: the mini-batch's :func:`loss_denominator`, > 0.

    Returns:
        Scalar loss; rows without response tokens contribute 0.
    """
    _check_aggregation(mode)
    if denominator <= 0:
        raise ValueError(f"denominator must be > 0, got {denominator}")
    if mode == "seq_mean_token_mean":
        row_sums = masked_sum(per_token, response_mask, dim=-1)
        row_counts = response_mask.to(torch.bool).expand_as(per_token).sum(-1)
        total = (row_sums / row_counts.clamp_min(1).to(row_sums.dtype)).sum()
    else:
        total = masked_sum(per_token, response_mask)
    return total / denominator


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    response_mask: torch.Tensor,
    clip_eps: Optional[float] = 0.2,
) -> Tuple[torch.Tensor, Stats]:
    """Clipped value-function loss, masked mean over response tokens.

    ``0.5 * max((V - R)^2, (clip(V, V_old - eps, V_old + eps) - R)^2)``: the
    value clipping of OpenAI Baselines' PPO2 (analysed in Engstrom et al.
    2020, "Implementation Matters in Deep Policy Gradients"); not in the PPO
    paper, whose eq. 9 uses the plain squared error ``(V - R)^2``. As with
    the policy, the max is pessimistic: the critic gets no gradient for moving
    further than ``eps`` from its rollout estimate.

    Args:
        values: ``(batch, seq)`` current critic output (with grad).
        old_values: ``(batch, seq)`` critic output at rollout time.
        returns: ``(batch, seq)`` targets (e.g. from :func:`compute_gae`).
        response_mask: ``(batch, seq)`` float or bool, 1 on response tokens.
        clip_eps: clip range in value units; ``None`` disables clipping.

    Returns:
        ``(loss, stats)``; stats: ``clip_frac`` (fraction of response tokens
        where the clipped error was strictly larger, i.e. selected).
    """
    keep = response_mask.to(torch.bool)
    unclipped = (values - returns) ** 2
    if clip_eps is None:
        per_token = unclipped
        clip_frac = torch.zeros((), dtype=values.dtype, device=values.device)
    else:
        if clip_eps <= 0:
            raise ValueError(f"clip_eps must be > 0 or None, got {clip_eps}")
        values_clipped = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
        clipped = (values_clipped - returns) ** 2
        per_token = torch.maximum(unclipped, clipped)
        with torch.no_grad():
            clip_frac = masked_mean((clipped > unclipped).to(values.dtype), keep)
    loss = 0.5 * masked_mean(per_token, keep)
    return loss, {"clip_frac": clip_frac.detach()}


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of ``softmax(logits)`` at every position.

    ``H = logsumexp(z) - sum_i softmax(z)_i * z_i``, which needs no
    log-probability tensor. Entries set to ``-inf`` (top-k / top-p masking)
    have probability 0 and contribute 0 rather than ``0 * -inf = nan``.

    Args:
        logits: ``(batch, seq, vocab)``.

    Returns:
        ``(batch, seq)`` entropy in nats; the masked mean is the caller's.
    """
    if logits.dtype not in _FULL_PRECISION:
        logits = logits.float()
    probs = torch.softmax(logits, dim=-1)
    finite = torch.where(probs > 0, logits, torch.zeros_like(logits))
    return torch.logsumexp(logits, dim=-1) - (probs * finite).sum(-1)


@torch.no_grad()
def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Fraction of the return variance the critic explains, over masked tokens.

    ``1 - Var[R - V] / Var[R]``: 1 is a perfect critic, 0 is no better than
    predicting the mean return, negative is worse than that. ``nan`` when the
    returns are constant (the ratio is undefined, and a fake number would
    hide it on a dashboard).

    Args:
        values: ``(batch, seq)`` critic predictions.
        returns: ``(batch, seq)`` targets.
        mask: ``(batch, seq)`` float or bool, 1 on response tokens.

    Returns:
        Detached scalar tensor.
    """
    var_returns = masked_var(returns, mask, unbiased=False)
    var_error = masked_var(returns - values, mask, unbiased=False)
    nan = torch.full_like(var_returns, float("nan"))
    return torch.where(var_returns > 0, 1.0 - var_error / var_returns, nan)


# Direct preference optimisation and its IPO variant, in their order of appearance.
DPO_LOSS_TYPES = ("sigmoid", "ipo")


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
    loss_type: str = "sigmoid",
) -> Tuple[torch.Tensor, Stats]:
    """DPO / IPO loss of every (chosen, rejected) pair, before any reduction.

    With ``h = (log pi(y_c) - log ref(y_c)) - (log pi(y_r) - log ref(y_r))``:

    * ``"sigmoid"``: Rafailov et al. 2023 (DPO), eq. 7, ``-log sigmoid(beta * h)``; with
      ``label_smoothing`` = eps the conservative DPO of Mitchell 2023 ("A note on DPO with
      noisy preferences", cDPO): each label is taken to be flipped with probability eps,
      ``-(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)``. Its gradient vanishes
      where ``sigmoid(beta h) = 1 - eps`` instead of pushing ``h`` to infinity.
    * ``"ipo"``: Azar et al. 2023 (IPO), eq. 17, ``(h - 1 / (2 beta))^2``, beta playing their
      tau: a squared loss whose minimum is a finite margin, so the policy stays near the
      reference even on deterministic preferences. Which log-probabilities to pass is the
      caller's choice (TRL passes per-token means for IPO, sums for DPO).

    The log-probabilities are whatever the caller reduced over each answer's tokens (sums of
    the answer tokens' log-probs for DPO). ``beta * (log pi - log ref)`` is DPO's implicit
    reward (eq. 5 without the partition function), reported in the stats.

    Args:
        policy_chosen_logps: ``(P,)`` log pi of each pair's preferred answer (with grad).
        policy_rejected_logps: ``(P,)`` log pi of each pair's other answer (with grad).
        ref_chosen_logps: ``(P,)`` the frozen reference's log-prob of the preferred answer.
        ref_rejected_logps: ``(P,)`` the same for the other answer.
        beta: strength of the KL regularisation, > 0.
        label_smoothing: eps in [0, 0.5), ``"sigmoid"`` only.
        loss_type: one of :data:`DPO_LOSS_TYPES`.

    Returns:
        ``(per_pair_loss, stats)``: ``(P,)`` loss; stats, each ``(P,)`` and detached (the
        caller reduces them as it reduces the loss): ``reward_chosen`` and
        ``reward_rejected`` (implicit rewards), ``accuracy`` (1.0 where reward_chosen >
        reward_rejected), ``margin`` (reward_chosen - reward_rejected).
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown DPO loss type {loss_type!r}; valid types are {', '.join(DPO_LOSS_TYPES)}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if label_smoothing and loss_type != "sigmoid":
        raise ValueError(f"label_smoothing applies to the sigmoid loss only, not {loss_type!r}")
    shape = policy_chosen_logps.shape
    for name, tensor in (("policy_rejected_logps", policy_rejected_logps), ("ref_chosen_logps", ref_chosen_logps),
                         ("ref_rejected_logps", ref_rejected_logps)):
        if tensor.shape != shape:
            raise ValueError(f"{name} {tuple(tensor.shape)} must match policy_chosen_logps {tuple(shape)}")

    chosen_ratio = policy_chosen_logps - ref_chosen_logps
    rejected_ratio = policy_rejected_logps - ref_rejected_logps
    h = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        per_pair = -F.logsigmoid(beta * h)
        if label_smoothing:
            per_pair = (1.0 - label_smoothing) * per_pair - label_smoothing * F.logsigmoid(-beta * h)
    else:
        per_pair = (h - 1.0 / (2.0 * beta)) ** 2

    with torch.no_grad():
        reward_chosen = beta * chosen_ratio
        reward_rejected = beta * rejected_ratio
        stats = {
            "reward_chosen": reward_chosen,
            "reward_rejected": reward_rejected,
            "accuracy": (reward_chosen > reward_rejected).to(reward_chosen.dtype),
            "margin": reward_chosen - reward_rejected,
        }
    return per_pair, {k: v.detach() for k, v in stats.items()}


def per_prompt_mean(
    per_pair: torch.Tensor, pair_group: torch.Tensor, num_groups: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean of a per-pair value over each prompt's pairs.

    The weighting of :func:`kwise_ranking_loss` (Ouyang et al. 2022, eq. 1): a prompt's
    C(K,2) pairs share one prompt's weight, so a prompt with K answers counts as much as
    a prompt with two. Summing the returned means over the prompts that have pairs, on
    every micro-batch, and dividing by the number of such prompts in the whole global batch
    gives the global per-prompt mean whatever the split into micro-batches.

    Args:
        per_pair: ``(P,)`` values, e.g. the loss of :func:`dpo_loss`.
        pair_group: ``(P,)`` long prompt id of each pair, in ``[0, num_groups)``.
        num_groups: number of prompts.

    Returns:
        ``(means, has_pairs)``: ``(num_groups,)`` mean per prompt (0 for a prompt without
        pairs) and ``(num_groups,)`` bool, which prompts have pairs.
    """
    if per_pair.dim() != 1 or pair_group.shape != per_pair.shape:
        raise ValueError(f"per_pair {tuple(per_pair.shape)} and pair_group {tuple(pair_group.shape)} must be (P,)")
    group_sum = per_pair.new_zeros(num_groups).index_add(0, pair_group, per_pair)
    group_count = per_pair.new_zeros(num_groups).index_add(0, pair_group, torch.ones_like(per_pair))
    return group_sum / group_count.clamp_min(1), group_count > 0
