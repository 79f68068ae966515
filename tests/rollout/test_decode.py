"""The decode engine: the distribution it samples from, its log-probs, masks, ordering and
filtering."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf.data.records import Message
from rlhf.data.template import prompt_text
from rlhf.roles.forward import policy_logprobs
from rlhf.kernels.llama_step import LlamaDecodeStep
from rlhf.rollout.decode import DecodeEngine, SampleSeeds, filter_logits, sample_tokens, sample_with_logprobs
from rlhf.rollout.engine import SamplingParams


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), AutoTokenizer.from_pretrained(tiny_model_dir)


def encode(tok, texts):
    return [tok(prompt_text(tok, [Message("user", t)]), add_special_tokens=False)["input_ids"] for t in texts]


TEXTS = ["List 3 fruits in uppercase.", "Hi", "Name 2 owls and say why they hoot at night.", "Why?", "Count to 4."]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_equal_a_full_forward_of_the_rollout(model_and_tokenizer, temperature):
    model, tok = model_and_tokenizer
    torch.manual_seed(0)
    rollout = DecodeEngine(model, tok.eos_token_id, tok.pad_token_id, batch_size=2).generate(
        encode(tok, TEXTS), SamplingParams(max_new_tokens=16, temperature=temperature))
    recomputed, _ = policy_logprobs(model, rollout, temperature)
    keep = rollout.response_mask.bool()
    torch.testing.assert_close(rollout.logprobs[keep], recomputed[keep], rtol=1e-4, atol=1e-4)
    assert (rollout.logprobs[~keep] == 0).all()
    # Rows of different lengths: some rows finished early and left their batch.
    lengths = rollout.response_lengths.tolist()
    assert len(set(lengths)) > 1, lengths


def test_a_seeded_sample_is_the_same_however_prompts_are_batched_or_spread_over_workers(model_and_tokenizer):
    model, tok = model_and_tokenizer
    prompts = encode(tok, TEXTS + ["Tell me a joke about cats.", "Spell 'owl' backwards."])
    params = SamplingParams(max_new_tokens=10)
    torch.manual_seed(123)  # the global generator plays no part
    whole = DecodeEngine(model, tok.eos_token_id, tok.pad_token_id, batch_size=7).generate(
        prompts, params, seeds=SampleSeeds(5, range(7)))
    torch.manual_seed(456)
    small_batches = DecodeEngine(model, tok.eos_token_id, tok.pad_token_id, batch_size=2).generate(
        prompts, params, seeds=SampleSeeds(5, range(7)))
    # Two workers, holding the global samples 0, 2, 4, 6 and 1, 3, 5.
    shares = [DecodeEngine(model, tok.eos_token_id, tok.pad_token_id, batch_size=3).generate(
        prompts[rank::2], params, seeds=SampleSeeds(5, range(rank, 7, 2), sample_count=7)) for rank in (0, 1)]

    def responses(rollout):
        return [row[mask.bool()].tolist() for row, mask in zip(rollout.responses, rollout.response_mask)]

    expected = responses(whole)
    assert responses(small_batches) == expected
    assert responses(shares[0]) == expected[0::2] and responses(shares[1]) == expected[1::2]
    other_seed = DecodeEngine(model, tok.eos_token_id, tok.pad_token_id, batch_size=7).generate(
        prompts, params, seeds=SampleSeeds(6, range(7)))
    assert responses(other_seed) != expected


def test_rows_keep_prompt_order_masks_and_eos(model_and_tokenizer):
    model, tok = model_and_tokenizer
    prompts = encode(tok, TEXTS)
    torch.manual_seed(1)
    rollout = DecodeEngine(model, tok.eos_token_id, tok.pad_token_id, batch_size=2).generate(
        prompts, SamplingParams(max_new_tokens=12))
    width = rollout.prompt_length
    for row, prompt in enumerate(prompts):  # sorted into batches by length, returned in input order
        assert rollout.sequences[row, width - len(prompt): width].tolist() == prompt
        assert rollout.attention_mask[row, : width - len(prompt)].sum() == 0
        n = int(rollout.response_mask[row].sum())
        response = rollout.responses[row]
        assert rollout.response_mask[row, :n].all() and not rollout.response_mask[row, n:].any()
        if rollout.eos_found[row]:
            assert response[n - 1] == tok.eos_token_id and (response[: n - 1] != tok.eos_token_id).all()
        else:
            assert n == 12
        assert (response[n:] == tok.pad_token_id).all()


def test_same_seed_same_rollout_and_batch_size_only_regroups(model_and_tokenizer):
    model, tok = model_and_tokenizer
    prompts, params = encode(tok, TEXTS), SamplingParams(max_new_tokens=10)
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        runs.append(DecodeEngine(model, tok.eos_token_id, tok.pad_token_id, batch_size=4).generate(prompts, params))
    assert torch.equal(runs[0].sequences, runs[1].sequences)


@pytest.mark.parametrize("llama_step", [True, False])
def test_a_repeated_prompt_runs_its_prompt_pass_once_and_samples_as_alone(model_and_tokenizer, llama_step):
    model, tok = model_and_tokenizer
    first, second = encode(tok, TEXTS[:2])
    prompts = [first, second, first, first, second]  # two groups, interleaved
    params = SamplingParams(max_new_tokens=10)
    prompt_rows = []
    hook = model.register_forward_pre_hook(
        lambda module, args, kwargs: prompt_rows.append(kwargs["input_ids"].shape) if kwargs["input_ids"].shape[1] > 1
        else None, with_kwargs=True)
    original_prefill = LlamaDecodeStep.prefill

    def counted_prefill(step, prompt_ids, *args):
        prompt_rows.append(prompt_ids.shape)
        return original_prefill(step, prompt_ids, *args)

    try:
        LlamaDecodeStep.prefill = counted_prefill
        engine = DecodeEngine(model, tok.eos_token_id, tok.pad_token_id, batch_size=8, llama_step=llama_step)
        grouped = engine.generate(prompts, params, seeds=SampleSeeds(7, range(5)))
        assert [shape[0] for shape in prompt_rows] == [2]  # one prompt pass, over the two distinct prompts
        alone = [engine.generate([prompt], params, seeds=SampleSeeds(7, [i], sample_count=5))
                 for i, prompt in enumerate(prompts)]
    finally:
        LlamaDecodeStep.prefill = original_prefill
        hook.remove()
    for i, single in enumerate(alone):
        width = int(single.response_mask.sum())
        assert int(grouped.response_mask[i].sum()) == width
        assert torch.equal(grouped.responses[i, :width], single.responses[0, :width])
        torch.testing.assert_close(grouped.logprobs[i, :width], single.logprobs[0, :width], rtol=1e-4, atol=1e-5)
    # The rows of a group are different samples, not copies.
    assert not torch.equal(grouped.responses[0], grouped.responses[2])


def test_sampler_matches_the_softmax_distribution():
    logits = torch.tensor([[2.0, 0.0, -1.0, 1.0]])
    generator = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_tokens(logits, generator) for _ in range(20000)]).flatten()
    frequencies = torch.bincount(draws, minlength=4).double() / draws.numel()
    expected = torch.softmax(logits.double(), -1)[0]
    # 20000 draws: the standard error of each frequency is below 0.0036.
    assert torch.allclose(frequencies, expected, atol=0.015), (frequencies, expected)


def test_sampled_log_probs_and_a_reused_workspace():
    logits = torch.tensor([[2.0, 0.0, -1.0, 1.0], [0.5, float("-inf"), 3.0, -2.0]])
    workspace = torch.full((4, 6), float("nan"), dtype=torch.float64)  # larger than needed, stale contents
    first, second = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for _ in range(50):
        tokens, logps = sample_with_logprobs(logits, first, workspace)
        assert torch.equal(tokens, sample_tokens(logits, second))
        assert tokens[1] != 1  # probability 0
        expected = torch.log_softmax(logits, -1).gather(-1, tokens[:, None]).squeeze(-1)
        torch.testing.assert_close(logps, expected, rtol=0, atol=1e-6)
        assert logps.dtype == torch.float32


def test_sampler_never_draws_a_token_of_probability_zero():
    # Zero-probability entries at both edges of the vocabulary (where an inverted CDF lands on
    # rounding), next to mass that underflows in float64 but is not zero.
    row = torch.full((50,), float("-inf"))
    row[1], row[2], row[25], row[48] = 0.0, -800.0, 3.0, -1.0
    logits = row.repeat(4000, 1)
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        tokens, logps = sample_with_logprobs(logits, generator)
        assert set(tokens.unique().tolist()) <= {1, 2, 25, 48}
        assert not bool((tokens == 2).any())  # exp(-800 - 3) is 0 in float64
        assert torch.isfinite(logps).all()


def test_filters_keep_top_k_and_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, 2, 1.0)).tolist() == [[False, False, True, True]]
    # Mass before the third token is 0.8 < 0.9, so the nucleus of 0.9 keeps three tokens.
    assert torch.isinf(filter_logits(logits, 0, 0.9)).tolist() == [[False, False, False, True]]
    assert torch.isinf(filter_logits(logits, 0, 0.5)).tolist() == [[False, True, True, True]]
    generator = torch.Generator().manual_seed(0)
    draws = {int(sample_tokens(filter_logits(logits, 2, 1.0), generator)) for _ in range(500)}
    assert draws == {0, 1}


class _Fixed:
    """A role that answers every rollout with zeros of the asked shape, counting its calls."""

    def __init__(self, per_token: bool):
        self.per_token, self.calls = per_token, 0

    def _zeros(self, rollout):
        self.calls += 1
        return torch.zeros(rollout.response_mask.shape) if self.per_token else torch.zeros(len(rollout.sequences))

    logprobs = values = scores = _zeros


@pytest.mark.parametrize("reuse", [True, False])
def test_ppo_takes_the_samplers_logprobs_instead_of_an_actor_forward(model_and_tokenizer, reuse):
    from rlhf.config import RewardConfig
    from rlhf.data.prompt_dataset import PromptBatch
    from rlhf.roles.rewards import RewardSources
    from rlhf.roles.team import score

    model, tok = model_and_tokenizer
    torch.manual_seed(0)
    rollout = DecodeEngine(model, tok.eos_token_id, tok.pad_token_id).generate(encode(tok, TEXTS),
                                                                              SamplingParams(max_new_tokens=8))
    actor, reference, critic, reward = _Fixed(True), _Fixed(True), _Fixed(True), _Fixed(False)
    prompts = PromptBatch(encode(tok, TEXTS), TEXTS, [{} for _ in TEXTS])
    rewards = RewardSources(RewardConfig(), reward, tok)
    scored = score(rollout, actor, reference, critic, rewards, prompts, reuse_logprobs=reuse)
    assert actor.calls == (0 if reuse else 1) and reference.calls == 1
    expected = rollout.logprobs if reuse else torch.zeros_like(rollout.logprobs)
    assert torch.equal(scored.logprobs, expected)
