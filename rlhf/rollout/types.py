"""The tensors one rollout carries between generation, scoring and training.

Per-token tensors cover the response region only: column j is response token j, i.e.
`sequences[:, prompt_length + j]`, predicted from position `prompt_length + j - 1`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch


@dataclass
class Rollout:
    sequences: torch.Tensor
    """(batch, prompt_length + response_length) left-padded prompt, then the response; after
    the first EOS every position holds the pad id."""
    attention_mask: torch.Tensor
    """(batch, prompt_length + response_length) 1 on prompt and response tokens (EOS included)."""
    prompt_length: int
    """Columns of the (left-padded) prompt region."""
    response_mask: torch.Tensor
    """(batch, response_length) float, 1 on response tokens up to and including the first EOS."""
    eos_found: torch.Tensor
    """(batch,) bool, the response ended with EOS (False: cut at max_new_tokens)."""
    logprobs: torch.Tensor | None = None
    """(batch, response_length) the sampler's log-prob of each response token under
    softmax(logits / temperature), 0 after the response; None when the engine gives none."""

    @property
    def responses(self) -> torch.Tensor:
        """(batch, response_length) response token ids."""
        return self.sequences[:, self.prompt_length :]

    @property
    def response_lengths(self) -> torch.Tensor:
        return self.response_mask.sum(-1).long()

    def to(self, device: torch.device) -> "Rollout":
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)
                                if isinstance(getattr(self, f.name), torch.Tensor)})

    def select(self, index: torch.Tensor) -> "Rollout":
        return replace(self, **{f.name: getattr(self, f.name)[index] for f in fields(self)
                                if isinstance(getattr(self, f.name), torch.Tensor)})

    def padded(self, prompt_width: int, response_width: int, pad_token_id: int) -> "Rollout":
        """The same rows widened to `prompt_width` prompt columns (padding on the left) and
        `response_width` response columns (padding on the right)."""
        left, right = prompt_width - self.prompt_length, response_width - self.response_mask.shape[1]
        if left == 0 and right == 0:
            return self
        pad = torch.nn.functional.pad
        return Rollout(
            sequences=pad(self.sequences, (left, right), value=pad_token_id),
            attention_mask=pad(self.attention_mask, (left, right), value=0),
            prompt_length=prompt_width,
            response_mask=pad(self.response_mask, (0, right), value=0.0),
            eos_found=self.eos_found,
            logprobs=None if self.logprobs is None else pad(self.logprobs, (0, right), value=0.0),
        )

    def trimmed(self) -> "Rollout":
        """The same rows without the columns that are padding in every row: prompt columns
        left of the longest prompt and response columns right of the longest response (at
        least one is kept). Positions come from the attention mask, so every log-prob and
        value of a real token is unchanged; a selected micro-batch is usually narrower than
        the rollout it came from, and these columns would cost a full forward and backward."""
        attended = self.attention_mask[:, : self.prompt_length].any(0)
        # One prompt column always stays: the first response token is predicted from it.
        drop_left = min(int(attended.long().argmax()) if bool(attended.any()) else self.prompt_length,
                        self.prompt_length - 1)
        keep_right = max(int(self.response_lengths.max()) if self.response_mask.numel() else 0, 1)
        end = self.prompt_length + keep_right
        return Rollout(
            sequences=self.sequences[:, drop_left:end],
            attention_mask=self.attention_mask[:, drop_left:end],
            prompt_length=self.prompt_length - drop_left,
            response_mask=self.response_mask[:, :keep_right],
            eos_found=self.eos_found,
            logprobs=None if self.logprobs is None else self.logprobs[:, :keep_right],
        )


@dataclass
class Experience:
    """A scored rollout, ready for PPO updates. Per-token tensors are (batch, response_length)."""

    rollout: Rollout
    logprobs: torch.Tensor
    """Actor log-probs of the sampled tokens at rollout time (temperature-scaled)."""
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    rewards: torch.Tensor
    """Per-token rewards: -β·KL on every response token (unless kl.in_loss) plus the
    normalised reward-model score on the last response token."""
    advantages: torch.Tensor
    returns: torch.Tensor
    scores: torch.Tensor
    """(batch,) raw reward-model scores."""

    def to(self, device: torch.device) -> "Experience":
        return Experience(self.rollout.to(device),
                          **{f.name: getattr(self, f.name).to(device) for f in fields(self) if f.name != "rollout"})

    def select(self, index: torch.Tensor) -> "Experience":
        return Experience(
            self.rollout.select(index),
            **{f.name: getattr(self, f.name)[index] for f in fields(self) if f.name != "rollout"},
        )

    def trimmed(self) -> "Experience":
        """Rollout.trimmed, with the per-token tensors cut to the kept response columns."""
        rollout = self.rollout.trimmed()
        width = rollout.response_mask.shape[1]
        return Experience(rollout, **{f.name: getattr(self, f.name)[:, :width] if getattr(self, f.name).ndim == 2
                                      else getattr(self, f.name) for f in fields(self) if f.name != "rollout"})


@dataclass(frozen=True)
class NonFinite:
    """The named values of a step that hold NaN or inf (the update is skipped)."""

    names: tuple[str, ...]


@dataclass
class Scored:
    """A rollout with everything the roles compute for it, before rewards. Per-token tensors
    are (batch, response_length), aligned with `rollout.response_mask`."""

    rollout: Rollout
    logprobs: torch.Tensor
    """Actor log-probs of the sampled tokens at rollout time (π_old, temperature-scaled)."""
    ref_logprobs: torch.Tensor
    """The reference's log-probs (the actor's own when there is no reference: a zero KL)."""
    values: torch.Tensor
    """Critic values V(s) of the state before each response token (zeros without a critic)."""
    scores: torch.Tensor
    """(batch,) raw rewards: the weighted sum of `sources`."""
    sources: dict[str, torch.Tensor] = field(default_factory=dict)
    """(batch,) raw reward of each source ("model", "http", a function's "module:function") and
    each component a function returned ("module:function/name")."""

    def nonfinite(self) -> NonFinite | None:
        """What holds NaN or inf; a non-finite reward names the reward functions or service it
        came from, so the guard's message points at the cause."""
        bad = []
        for name, t in (("reward", self.scores), ("logprobs", self.logprobs), ("ref_logprobs", self.ref_logprobs),
                        ("values", self.values)):
            if not bool(torch.isfinite(t).all()):
                # Functions and services are named; the reward model's NaN keeps the guard's
                # usual advice (learning rate, data).
                culprits = [source for source, v in self.sources.items()
                            if source != "model" and "/" not in source and not bool(torch.isfinite(v).all())]
                bad.append(f"{name} (from {', '.join(culprits)})" if name == "reward" and culprits else name)
        return NonFinite(tuple(bad)) if bad else None
