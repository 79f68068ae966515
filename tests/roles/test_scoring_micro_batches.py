"""Scoring in micro-batches (issue 24): the reference log-probs, critic values, reward-model
scores and the actor's old log-probs of a rollout are computed in pieces of
ppo.micro_batch_size rows, cut between groups of answers to one prompt, each piece trimmed of
its padding; they equal the whole-batch forward's, and the largest tensor the scoring phase
allocates no longer grows with the rollout batch."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlhf.logging.perf import LargestTensor
from rlhf.distributed.strategy import TrainedModel
from rlhf.roles import forward, roles
from rlhf.roles.roles import Actor, Critic, Reference, RewardModel, RoleForwards
from rlhf.roles.update import PolicyLossSettings
from rlhf.rollout.types import Rollout

PROMPT, RESPONSE = 20, 8


def group_rollout(groups: int, group: int, vocab: int, seed: int = 0, short: int = 2) -> Rollout:
    """`groups` prompts of 6..20 tokens (left-padded with id 0), each followed by `group`
    answers of 1..8 tokens (then pad 0). The first `short` groups are short (prompts of at most
    8, answers of at most 3 tokens), so a piece holding only them is narrower than the batch."""
    generator = torch.Generator().manual_seed(seed)
    rows = groups * group
    sequences = torch.randint(3, vocab, (rows, PROMPT + RESPONSE), generator=generator)
    mask = torch.ones_like(sequences)
    for g in range(groups):
        is_short = g < short
        prompt = int(torch.randint(6, 9 if is_short else PROMPT + 1, (1,), generator=generator))
        first = g * group
        for row in range(first, first + group):
            sequences[row, :PROMPT] = sequences[first, :PROMPT]
            answer = int(torch.randint(1, 4 if is_short else RESPONSE + 1, (1,), generator=generator))
            mask[row, PROMPT + answer :] = 0
        mask[first : first + group, : PROMPT - prompt] = 0
    sequences[mask == 0] = 0
    return Rollout(sequences=sequences, attention_mask=mask, prompt_length=PROMPT,
                   response_mask=mask[:, PROMPT:].float(), eos_found=torch.ones(rows, dtype=torch.bool))


class Forwards:
    """Records the rollouts a role's scoring forward is called on (wraps the function roles.py calls)."""

    def __init__(self, monkeypatch, name: str):
        self.shapes: list[tuple[int, int]] = []
        real = getattr(roles, name)

        def spy(model, batch, *args, **kwargs):  # a Rollout
            self.shapes.append(tuple(getattr(batch, "sequences", batch).shape))
            return real(model, batch, *args, **kwargs)

        monkeypatch.setattr(roles, name, spy)


@pytest.mark.parametrize("rows, size, group, pieces, expected", [
    (24, 8, 4, None, [(0, 8), (8, 16), (16, 24)]),          # two whole groups a piece
    (24, 8, 3, None, [(0, 6), (6, 12), (12, 18), (18, 24)]),  # 8 is no multiple of 3: two groups of 3
    (24, 6, 4, None, [(0, 4), (4, 8), (8, 12), (12, 16), (16, 20), (20, 24)]),  # one group of 4 fits in 6
    (8, 3, 4, None, [(0, 3), (3, 6), (6, 8)]),              # a group larger than a piece: split
    (20, 8, 1, None, [(0, 8), (8, 16), (16, 20)]),
    (8, 8, 4, None, [(0, 8)]),                               # fits: one forward, as before
    (64, None, 4, None, [(0, 64)]),                          # the default: the whole batch
    (9, 8, 1, 3, [(0, 3), (3, 6), (6, 9)]),                  # workers agreed on 3 pieces
    (12, 8, 3, 3, [(0, 6), (6, 9), (9, 12)]),                # ... in whole groups (4 groups over 3 pieces)
    (1, 1, 1, 2, [(0, 1), (1, 1)]),                          # fewer rows than pieces: an empty one
])
def test_pieces_are_cut_between_groups_where_the_micro_batch_allows(rows, size, group, pieces, expected):
    slices = RoleForwards(size, group).slices(rows, pieces)
    assert [(s.start, s.stop) for s in slices] == expected


def test_fewer_pieces_than_the_batch_needs_are_refused():
    with pytest.raises(ValueError, match="need 3 pieces"):
        RoleForwards(8, 1).slices(20, 2)


@pytest.mark.parametrize("size, group", [(8, 4), (6, 4), (3, 4), (5, 1)])
def test_reference_log_probs_in_pieces_equal_the_whole_batch(lm, monkeypatch, size, group):
    rollout = group_rollout(6, 4, lm.config.vocab_size)
    mask = rollout.response_mask
    whole = Reference(lm, temperature=0.7).logprobs(rollout) * mask
    packed = []
    real_rows = forward.shared_prompt_rows
    monkeypatch.setattr(forward, "shared_prompt_rows", lambda m, r: packed.append(real_rows(m, r)) or packed[-1])
    calls = Forwards(monkeypatch, "policy_logprobs")
    pieces = Reference(lm, temperature=0.7, forwards=RoleForwards(size, group)).logprobs(rollout)
    assert pieces.shape == whole.shape
    torch.testing.assert_close(pieces * mask, whole, rtol=1e-5, atol=1e-5)
    expected = RoleForwards(size, group).slices(24)
    assert [rows for rows, _ in calls.shapes] == [s.stop - s.start for s in expected]
    if group == 4 and size >= group:  # whole groups in every piece: each is packed behind one copy of its prompts
        assert len(packed) == len(expected) and all(p is not None for p in packed)
    # The first piece holds only the short groups (or part of them): trimmed to their width.
    assert calls.shapes[0][1] <= 8 + 3 < PROMPT + RESPONSE


@pytest.mark.parametrize("size, group", [(8, 4), (3, 4)])
def test_critic_values_and_reward_scores_in_pieces_equal_the_whole_batch(scalar, monkeypatch, size, group):
    rollout = group_rollout(6, 4, scalar.config.vocab_size, seed=1)
    mask = rollout.response_mask
    critic = Critic(TrainedModel(scalar, None, None), None, mini_batch_size=8, micro_batch_size=8)
    whole_values, whole_scores = critic.values(rollout) * mask, RewardModel(scalar, None).scores(rollout)
    values_calls, scores_calls = Forwards(monkeypatch, "response_values"), Forwards(monkeypatch, "response_scores")
    critic.forwards = RoleForwards(size, group)
    values = critic.values(rollout)
    scores = RewardModel(scalar, None, forwards=RoleForwards(size, group)).scores(rollout)
    assert values.shape == whole_values.shape and scores.shape == whole_scores.shape == (24,)
    torch.testing.assert_close(values * mask, whole_values, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scores, whole_scores, rtol=1e-5, atol=1e-5)
    pieces = len(RoleForwards(size, group).slices(24))
    assert len(values_calls.shapes) == len(scores_calls.shapes) == pieces > 1
    assert max(rows for rows, _ in values_calls.shapes + scores_calls.shapes) <= size


class AgreeingStrategy:
    """A worker of a sharded role whose peers need `pieces` forwards (the max over workers)."""

    def __init__(self, pieces: int):
        self.world_size, self.pieces, self.asked = 2, pieces, []

    def all_reduce(self, values: dict[str, float], op: str = "mean") -> dict[str, float]:
        self.asked.append((dict(values), op))
        return {"pieces": float(max(self.pieces, values["pieces"]))}


@pytest.mark.parametrize("rows, pieces", [(8, 3), (2, 3)])
def test_sharded_actor_workers_run_as_many_forwards_as_the_busiest(tiny_model_dir, monkeypatch, rows, pieces):
    """Under ZeRO-3 and FSDP2 a forward is a collective: a worker with fewer rows than its peers
    still runs their number of forwards (a spare one on its last row where it has too few
    rows), and its log-probs are unchanged."""
    module = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    rollout = group_rollout(rows // 2, 2, module.config.vocab_size, seed=2)
    mask = rollout.response_mask
    strategy = AgreeingStrategy(pieces)
    actor = Actor(TrainedModel(module, None, None, strategy=strategy), None, 0.7, PolicyLossSettings(),
                  mini_batch_size=8, micro_batch_size=4)
    whole = Reference(module, 0.7).logprobs(rollout) * mask
    calls = Forwards(monkeypatch, "policy_logprobs")
    actor.forwards = RoleForwards(4, 2)
    logprobs = actor.logprobs(rollout)
    assert strategy.asked == [({"pieces": float(len(RoleForwards(4, 2).slices(rows)))}, "max")]
    assert len(calls.shapes) == pieces
    torch.testing.assert_close(logprobs * mask, whole, rtol=1e-5, atol=1e-5)
    assert module.training  # back in training mode after scoring


def ppo_roles(tmp_path, quickstart_data, tiny_model_dir):
    """LocalRoles of a GAE run with every scoring forward: actor (reuse_logprobs off),
    reference, critic and reward model, groups of 4, ppo.micro_batch_size 8."""
    from pathlib import Path

    from rlhf.config import PPOConfig, load_config
    from rlhf.distributed.factory import build_strategy
    from rlhf.models.loading import load_tokenizer
    from rlhf.roles.team import LocalRoles

    repo = Path(__file__).resolve().parents[2]
    cfg = load_config(PPOConfig, [str(repo / "configs" / "ppo.yaml")], [
        f"model.path={tiny_model_dir}", f"reward_model.path={tiny_model_dir}",
        f"data.prompts.path={quickstart_data['prompts']}", f"output_dir={tmp_path}", "ppo.rollout_batch_size=16",
        "rollout.n_samples_per_prompt=4", "ppo.mini_batch_size=64", "ppo.micro_batch_size=8", "rollout.reuse_logprobs=false", "kl.coef=0.1", "ppo.advantage=gae",
        "reward.normalize=none", "logging.progress=false"])
    strategy = build_strategy(cfg.strategy)
    strategy.setup(cfg.seed)
    return LocalRoles(cfg, strategy, load_tokenizer(cfg.model))


def largest_scoring_tensor(team, rollout: Rollout) -> tuple[int, object]:
    from rlhf.data.prompt_dataset import PromptBatch

    rows = rollout.sequences.shape[0]
    prompts = PromptBatch([[5, 6]] * rows, ["p"] * rows, [{}] * rows)
    with LargestTensor() as largest:
        scored = team.score(rollout, prompts)
    return largest.bytes, scored


def test_scoring_memory_does_not_grow_with_the_rollout_batch(tmp_path, quickstart_data, tiny_model_dir):
    """Peak memory of the scoring phase, measured as the largest tensor any operation of
    `LocalRoles.score` outputs (a TorchDispatchMode sees every op's outputs): at one rollout
    batch it is a piece's (rows, response, vocabulary) logits, which grow with the rows
    forwarded together. Exact and deterministic on the CPU, unlike the process's resident
    memory (allocator caching, other threads) or the profiler's allocation events (which
    also count the output tensors that do grow with the batch, a few KiB). A rollout of 64
    rows (the 8-row rollout eight times, so each piece is the same 8 rows) must allocate
    nothing larger than the 8-row rollout does; the whole-batch forward of the code before
    issue 24 allocated 8 times as much (see the next test)."""
    team = ppo_roles(tmp_path, quickstart_data, tiny_model_dir)
    try:
        vocab = team.reference.model.config.vocab_size
        # Trimmed already, as a rollout from the decode engine is: every piece is as wide as the batch.
        small = group_rollout(2, 4, vocab, seed=3, short=0).trimmed()
        large = small.select(torch.arange(64) % 8)
        small_bytes, small_scored = largest_scoring_tensor(team, small)
        large_bytes, large_scored = largest_scoring_tensor(team, large)
        response = small.response_mask.shape[1]
        assert small_bytes >= 8 * response * vocab * 4  # the measure sees a piece's float32 logits
        assert large_bytes == small_bytes
        # And the 64 rows are scored as the 8 are, by every role.
        for name in ("logprobs", "ref_logprobs", "values", "scores"):
            got, want = getattr(large_scored, name), getattr(small_scored, name).repeat(8, *([1] * (getattr(
                small_scored, name).ndim - 1)))
            mask = small.response_mask.repeat(8, 1) if got.ndim == 2 else 1.0
            torch.testing.assert_close(got * mask, want * mask, rtol=1e-5, atol=1e-5, msg=name)
    finally:
        team.shutdown()


def test_the_whole_batch_forward_grew_with_the_rollout_batch(tmp_path, quickstart_data, tiny_model_dir):
    """The measure above tells the two apart: with every role scoring the whole batch at once
    (RoleForwards(), what the code did before issue 24) 64 rows allocate 8 times the logits."""
    team = ppo_roles(tmp_path, quickstart_data, tiny_model_dir)
    try:
        for role in (team.actor, team.reference, team.critic, team.reward_model):
            assert role.forwards == RoleForwards(8, 4, padding_free=True)  # LocalRoles: ppo.micro_batch_size, the group, ppo.padding_free
            role.forwards = RoleForwards()
        small = group_rollout(2, 4, team.reference.model.config.vocab_size, seed=3, short=0).trimmed()
        small_bytes, _ = largest_scoring_tensor(team, small)
        large_bytes, _ = largest_scoring_tensor(team, small.select(torch.arange(64) % 8))
        assert large_bytes == 8 * small_bytes
    finally:
        team.shutdown()
