"""Repetition of sampled answers, from token ids: a symptom of repetition hacking in RLHF
(a reward model that pays for some phrase gets it back over and over)."""

from __future__ import annotations

import torch

# n-grams are compared through a polynomial hash modulo a Mersenne prime: every product stays
# below 2^62 in int64, and two different n-grams of one answer collide with odds ~1/2^31.
_PRIME = 2**31 - 1
_BASE = 1_000_003


def repeated_ngram_share(tokens: torch.Tensor, mask: torch.Tensor, n: int = 3) -> torch.Tensor:
    """Per answer, the share of its n-grams that repeat an earlier n-gram of the same answer:
    "a b c a b c" has the 3-grams abc, bca, cab, abc, one of four a repeat (0.25). `tokens`
    (batch, response) ids, `mask` (batch, response) 1 on the answer's tokens (a prefix of each
    row); an answer with fewer than n tokens counts 0. Returns (batch,) float."""
    batch, width = tokens.shape
    if width < n:
        return torch.zeros(batch, device=tokens.device)
    grams = tokens.long().unfold(1, n, 1)  # (batch, width - n + 1, n)
    valid = mask.bool().unfold(1, n, 1).all(-1)
    hashes = torch.zeros(grams.shape[:2], dtype=torch.long, device=tokens.device)
    for k in range(n):
        hashes = (hashes * _BASE + grams[..., k].remainder(_PRIME) + 1) % _PRIME
    # n-grams outside the answer get distinct negative values, so they never match anything.
    outside = -torch.arange(1, hashes.shape[1] + 1, device=tokens.device).expand_as(hashes)
    ordered = torch.where(valid, hashes, outside).sort(-1).values
    repeats = (ordered[:, 1:] == ordered[:, :-1]).sum(-1)
    return repeats.float() / valid.sum(-1).clamp(min=1).float()
