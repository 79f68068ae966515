"""rollout.engine=hf samples with the configured settings only, whatever the checkpoint's
own generation_config says (transformers fills unset fields from it)."""

import copy

import pytest
import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from rlhf.rollout.engine import HFGenerateEngine, SamplingParams

PAD, EOS, VOCAB = 0, 1, 64
# Equal-length prompts: no left padding, so the reference sampler below needs no position ids.
PROMPTS = [[5, 9, 17, 3], [40, 41, 42, 43], [7, 7, 7, 7], [60, 2, 33, 12]]


def tiny_llama() -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=None,
        # A larger init than the default 0.02 gives peaked next-token distributions, so that
        # min_p, repetition penalties and top-k would visibly change what is sampled.
        initializer_range=0.5,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return LlamaForCausalLM(config).eval()


def with_checkpoint_defaults(model: LlamaForCausalLM) -> LlamaForCausalLM:
    """A copy with the same weights whose generation_config carries sampling options
    (as a checkpoint's generation_config.json may); none of them is in our settings."""
    dirty = copy.deepcopy(model)
    dirty.generation_config = GenerationConfig(
        do_sample=True, repetition_penalty=5.0, no_repeat_ngram_size=1, min_p=0.5, min_new_tokens=5,
        suppress_tokens=list(range(2, 34)), top_k=3, typical_p=0.5, epsilon_cutoff=0.01,
        pad_token_id=PAD, eos_token_id=EOS,
    )
    return dirty


PARAMS = SamplingParams(max_new_tokens=12, temperature=1.0, top_k=0, top_p=1.0)


def rollout_of(model, seed: int = 0):
    engine = HFGenerateEngine(model, EOS, PAD, batch_size=len(PROMPTS))
    torch.manual_seed(seed)
    return engine.generate(PROMPTS, PARAMS)


def test_checkpoint_generation_config_does_not_change_the_samples():
    clean = tiny_llama()
    dirty = with_checkpoint_defaults(clean)
    saved = dirty.generation_config
    a, b = rollout_of(clean), rollout_of(dirty)
    assert torch.equal(a.sequences, b.sequences)
    assert torch.equal(a.response_mask, b.response_mask)
    # the checkpoint's config is back in place afterwards
    assert dirty.generation_config is saved and dirty.generation_config.repetition_penalty == 5.0


def test_samples_come_from_the_full_softmax():
    # top_k=0 means no top-k (transformers' own default would be top_k=50 of the 64 tokens)
    # and nothing else filters the distribution: the engine's samples equal a hand-written
    # sampler drawing from softmax(logits) over the whole vocabulary with the same RNG stream
    # (one torch.multinomial per step for the whole batch, as transformers' _sample does).
    model = with_checkpoint_defaults(tiny_llama())
    rollout = rollout_of(model, seed=3)
    torch.manual_seed(3)
    ids = torch.tensor(PROMPTS)
    done = torch.zeros(len(PROMPTS), dtype=torch.bool)
    with torch.no_grad():
        for _ in range(PARAMS.max_new_tokens):
            probs = torch.softmax(model(input_ids=ids).logits[:, -1].float(), dim=-1)
            nxt = torch.multinomial(probs, num_samples=1).squeeze(1)
            nxt = torch.where(done, torch.full_like(nxt, PAD), nxt)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            done |= nxt == EOS
            if done.all():
                break
    expected = ids[:, len(PROMPTS[0]):]
    got = rollout.sequences[:, rollout.prompt_length:]
    width = got.shape[1]
    assert width == expected.shape[1]
    keep = rollout.response_mask.bool()
    assert torch.equal(got[keep], expected[keep])
    # the draw is not trivially small: several tokens per row
    assert keep.sum() > len(PROMPTS)


def test_generation_config_restored_when_generate_raises(monkeypatch):
    model = with_checkpoint_defaults(tiny_llama())
    saved = model.generation_config
    seen = {}

    def failing_generate(**kwargs):
        seen["model_level"] = model.generation_config
        raise RuntimeError("boom")

    monkeypatch.setattr(model, "generate", failing_generate)
    model.train()
    with pytest.raises(RuntimeError, match="boom"):
        HFGenerateEngine(model, EOS, PAD).generate(PROMPTS, PARAMS)
    # during the call the model-level config held our settings only ...
    assert seen["model_level"] is not saved and seen["model_level"].repetition_penalty is None
    assert seen["model_level"].top_k == 0
    # ... and afterwards everything is as before, train mode included
    assert model.generation_config is saved and model.training


def test_lora_wrapped_model_is_immune_too():
    # PEFT's generate copies the wrapper's generation_config onto the wrapped model first:
    # both levels must hold our settings during the call.
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=True)
    clean = peft.get_peft_model(tiny_llama(), copy.deepcopy(lora))
    dirty = peft.get_peft_model(with_checkpoint_defaults(tiny_llama()), copy.deepcopy(lora))
    dirty.load_state_dict(clean.state_dict())
    saved = dirty.get_base_model().generation_config
    assert torch.equal(rollout_of(clean).sequences, rollout_of(dirty).sequences)
    assert dirty.get_base_model().generation_config is saved
