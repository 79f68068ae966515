"""Reductions restricted to a mask (response tokens of a padded batch).

Every function treats ``mask`` as boolean (non-zero = keep) and selects with
``torch.where`` instead of multiplying, so that garbage at masked-out
positions (``-inf`` log-probs of padding, ``nan`` from an empty row) can never
leak into the result through ``0 * inf = nan``.
"""

from typing import Optional

import torch

__all__ = ["masked_sum", "masked_mean", "masked_var", "masked_whiten"]


def _as_bool(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    # Expanding up front makes the token count match the number of elements
    # of ``x`` that are kept, even when the mask is broadcast (e.g. (batch, 1)).
    return mask.to(torch.bool).expand_as(like)


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
    """Sum of ``x`` over positions where ``mask`` is non-zero.

    Args:
        x: values, e.g. ``(batch, seq)``.
        mask: same shape as ``x`` (or broadcastable to it), float or bool.
        dim: reduce only this dimension; ``None`` reduces everything.

    Returns:
        Scalar tensor, or ``x`` with ``dim`` removed (e.g. ``(batch,)``).
    """
    keep = _as_bool(mask, x)
    picked = torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))
    return picked.sum() if dim is None else picked.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
    """Mean of ``x`` over positions where ``mask`` is non-zero.

    A reduction with no kept element returns 0 rather than ``nan``: an
    all-padding row (or a micro-batch without response tokens) should not
    poison a loss or a logged statistic.

    Args:
        x: values, e.g. ``(batch, seq)``.
        mask: same shape as ``x`` (or broadcastable to it), float or bool.
        dim: reduce only this dimension; ``None`` reduces everything.

    Returns:
        Scalar tensor, or ``x`` with ``dim`` removed (e.g. ``(batch,)``).
    """
    keep = _as_bool(mask, x)
    total = masked_sum(x, keep, dim)
    count = keep.sum() if dim is None else keep.sum(dim)
    return total / count.clamp_min(1).to(total.dtype)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over all positions where ``mask`` is non-zero.

    Args:
        x: values, e.g. ``(batch, seq)``.
        mask: same shape as ``x``, float or bool.
        unbiased: apply Bessel's correction ``n / (n - 1)``. With a single kept
            element the correction is undefined; the biased value (0) is
            returned instead of ``nan``/``inf``.

    Returns:
        Scalar tensor.
    """
    keep = _as_bool(mask, x)
    mean = masked_mean(x, keep)
    var = masked_mean((x - mean) ** 2, keep)
    if unbiased:
        n = keep.sum().to(var.dtype)
        bessel = torch.where(n > 1, n / (n - 1).clamp_min(1), torch.ones_like(n))
        var = var * bessel
    return var


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """Normalise ``x`` to unit variance using statistics of masked positions only.

    Used for advantage normalisation in PPO: prompt and padding positions would
    otherwise drag the mean towards 0 and shrink the variance.

    Args:
        x: values, e.g. advantages ``(batch, seq)``.
        mask: same shape as ``x``, float or bool.
        shift_mean: subtract the mean. With ``False`` only the scale changes and
            the original mean is kept (useful for rewards, whose sign matters).
        eps: added to the variance before the square root.

    Returns:
        ``(batch, seq)`` tensor, 0 at masked-out positions.
    """
    keep = _as_bool(mask, x)
    mean = masked_mean(x, keep)
    var = masked_var(x, keep, unbiased=True)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(keep, whitened, torch.zeros((), dtype=whitened.dtype, device=x.device))
