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
