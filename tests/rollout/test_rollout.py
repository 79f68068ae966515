"""Rollout: sampling, masks up to the first EOS, and log-probs equal to the sampler's."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from rlhf.data.records import Message
from rlhf.data.template import prompt_text
from rlhf.roles.forward import policy_logprobs
from rlhf.rollout.engine import HFGenerateEngine, SamplingParams, concat_rollouts, finish_rollout, left_pad


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), AutoTokenizer.from_pretrained(tiny_model_dir)


def prompts(tok):
    texts = [prompt_text(tok, [Message("user", t)]) for t in ("List 3 fruits in uppercase.", "Name 2 owls.", "Hi")]
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_recomputed_logprobs_equal_the_samplers(model_and_tokenizer, temperature):
    model, tok = model_and_tokenizer
    ids, mask = left_pad(prompts(tok), tok.pad_token_id)
    torch.manual_seed(0)
    out = model.generate(input_ids=ids, attention_mask=mask, generation_config=GenerationConfig(
        do_sample=True, temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=12,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id), output_scores=True, return_dict_in_generate=True)
    responses = out.sequences[:, ids.shape[1]:]
    rollout = finish_rollout(ids, mask, responses, tok.eos_token_id, tok.pad_token_id)
    # The sampler's distribution at each step: its processed scores are logits / temperature.
    sampler = torch.stack([torch.log_softmax(s, -1) for s in out.scores], dim=1)
    sampler = sampler.gather(-1, responses.unsqueeze(-1)).squeeze(-1)
    ours, _ = policy_logprobs(model, rollout, temperature)
    keep = rollout.response_mask.bool()
    torch.testing.assert_close(ours[keep], sampler[keep], rtol=1e-4, atol=1e-4)
    # With a different temperature the numbers differ: the test could catch a missing scaling.
    other, _ = policy_logprobs(model, rollout, temperature * 2)
    assert not torch.allclose(other[keep], sampler[keep], atol=1e-3)


def test_engine_stops_at_eos_and_masks_through_it(model_and_tokenizer):
    model, tok = model_and_tokenizer
    engine = HFGenerateEngine(model, tok.eos_token_id, tok.pad_token_id, batch_size=2)
    torch.manual_seed(1)
    rollout = engine.generate(prompts(tok), SamplingParams(max_new_tokens=16))
    assert rollout.sequences.shape[0] == 3
    for row in range(3):
        response = rollout.responses[row]
        n = int(rollout.response_mask[row].sum())
        assert rollout.response_mask[row, :n].all() and not rollout.response_mask[row, n:].any()
        if rollout.eos_found[row]:
            assert response[n - 1] == tok.eos_token_id and (response[: n - 1] != tok.eos_token_id).all()
        else:
            assert n == rollout.response_mask.shape[1]
        assert (response[n:] == tok.pad_token_id).all()
    assert rollout.attention_mask.sum().item() == sum(len(p) for p in prompts(tok)) + rollout.response_mask.sum().item()


def test_concat_keeps_left_padded_prompts_and_right_padded_responses():
    a = finish_rollout(*left_pad([[5, 6]], 0), torch.tensor([[7, 2]]), 2, 0)
    b = finish_rollout(*left_pad([[5, 6, 7, 8]], 0), torch.tensor([[9, 9, 2]]), 2, 0)
    joined = concat_rollouts([a, b], 0)
    assert joined.prompt_length == 4
    assert joined.sequences.tolist() == [[0, 0, 5, 6, 7, 2, 0], [5, 6, 7, 8, 9, 9, 2]]
    assert joined.response_mask.tolist() == [[1, 1, 0], [1, 1, 1]]


def test_entropy_is_differentiable_only_when_it_is_in_the_loss(model_and_tokenizer):
    model, tok = model_and_tokenizer
    ids, mask = left_pad(prompts(tok), tok.pad_token_id)
    torch.manual_seed(0)
    responses = torch.randint(0, model.config.vocab_size, (ids.shape[0], 6))
    rollout = finish_rollout(ids, mask, responses, tok.eos_token_id, tok.pad_token_id)
    stats_logprobs, stats_entropy = policy_logprobs(model, rollout, 1.0, with_entropy=True)
    loss_logprobs, loss_entropy = policy_logprobs(model, rollout, 1.0, with_entropy=True, entropy_grad=True)
    assert stats_logprobs.requires_grad and not stats_entropy.requires_grad
    assert loss_entropy.requires_grad
    torch.testing.assert_close(stats_entropy, loss_entropy.detach())
    torch.testing.assert_close(stats_logprobs, loss_logprobs)
    # The entropy term moves the weights: its gradient is not zero.
    loss_entropy.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    model.zero_grad(set_to_none=True)


def test_trimmed_micro_batch_drops_shared_padding_and_keeps_every_logprob_and_value(model_and_tokenizer, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from rlhf.roles.forward import response_values
    from rlhf.rollout.types import Experience

    model, tok = model_and_tokenizer
    torch.manual_seed(0)
    tokens = lambda *shape: torch.randint(3, model.config.vocab_size, shape)  # noqa: E731 (no pad/EOS ids)
    ids, mask = left_pad([tokens(10).tolist(), tokens(6).tolist(), tokens(4).tolist()], tok.pad_token_id)
    responses = tokens(3, 9)
    responses[:, 4] = tok.eos_token_id  # every response ends by the 5th token: 4 padding columns on the right
    rollout = finish_rollout(ids, mask, responses, tok.eos_token_id, tok.pad_token_id)
    short_prompts = rollout.select(torch.tensor([1, 2]))  # the left 4 prompt columns are padding in both
    trimmed = short_prompts.trimmed()
    assert trimmed.response_mask.shape[1] == 5 and trimmed.prompt_length == short_prompts.prompt_length - 4 == 6
    assert trimmed.attention_mask[:, 0].any() and trimmed.response_mask[:, -1].any()
    width = trimmed.response_mask.shape[1]
    full, _ = policy_logprobs(model, short_prompts, 1.0)
    cut, _ = policy_logprobs(model, trimmed, 1.0)
    keep = short_prompts.response_mask[:, :width].bool()
    torch.testing.assert_close(cut[keep], full[:, :width][keep], rtol=1e-4, atol=1e-5)
    model.save_pretrained(tmp_path)
    critic = AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=1).eval()
    torch.testing.assert_close(response_values(critic, trimmed)[keep], response_values(critic, short_prompts)[:, :width][keep],
                               rtol=1e-4, atol=1e-5)
    per_token = torch.arange(9.0).expand(2, 9)
    experience = Experience(short_prompts, *([per_token] * 6), torch.zeros(2)).trimmed()
    assert experience.rollout.response_mask.shape == experience.advantages.shape == (2, 5)
    assert experience.scores.shape == (2,)
