"""Prompt masking, truncation and packing of SFT examples, on a real (tiny) tokenizer."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf.data.records import Message, SFTRecord
from rlhf.data.sft_dataset import (
    IGNORE_INDEX,
    SFTBatches,
    SFTExample,
    TruncationStats,
    collate_packed,
    collate_padded,
    encode_sft,
    pack_examples,
)
from rlhf.data.template import FALLBACK_CHAT_TEMPLATE, answer_ids, ensure_chat_template, prompt_text
from rlhf.models.tiny import train_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def fallback_tokenizer():
    tok = train_tokenizer(["User: hello there\n\nAssistant: general kenobi"] * 20, 300)
    tok.chat_template = None
    ensure_chat_template(tok)
    return tok


def record(*turns: str) -> SFTRecord:
    roles = ["user", "assistant"] * len(turns)
    return SFTRecord([Message(r, t) for r, t in zip(roles, turns)], "t.jsonl:1")


def trained_text(tok, example) -> str:
    return tok.decode([i for i in example.labels if i != IGNORE_INDEX])


@pytest.mark.parametrize("which", ["chatml", "fallback"])
def test_every_prompt_token_is_masked_and_every_answer_token_kept(which, tokenizer, fallback_tokenizer):
    tok = tokenizer if which == "chatml" else fallback_tokenizer
    rec = record("List 3 fruits in uppercase.", "APPLE, PEAR, PLUM")
    example = encode_sft(tok, rec, max_length=256, max_prompt_length=128)
    prompt_ids = tok(prompt_text(tok, rec.prompt), add_special_tokens=False)["input_ids"]
    answer = answer_ids(tok, rec.prompt, rec.response)
    # The sequence is prompt + answer (+ template glue after EOS), nothing else.
    assert example.input_ids[: len(prompt_ids)] == prompt_ids
    assert example.input_ids[len(prompt_ids) : len(prompt_ids) + len(answer)] == answer
    assert all(label == IGNORE_INDEX for label in example.labels[: len(prompt_ids)])
    assert example.labels[len(prompt_ids) : len(prompt_ids) + len(answer)] == answer
    assert answer[-1] == tok.eos_token_id
    # The fallback template puts a space between "Assistant:" and the answer.
    assert trained_text(tok, example).strip() == "APPLE, PEAR, PLUM" + tok.eos_token
    assert all(label == IGNORE_INDEX for label in example.labels[len(prompt_ids) + len(answer) :])


def test_fallback_template_renders_the_documented_format(fallback_tokenizer):
    assert fallback_tokenizer.chat_template == FALLBACK_CHAT_TEMPLATE
    text = prompt_text(fallback_tokenizer, [Message("system", "Be brief."), Message("user", "hi")])
    assert text == "Be brief.\n\nUser: hi\n\nAssistant:"


def test_multi_turn_trains_all_or_only_the_last_answer(tokenizer):
    rec = record("Name 2 colors, in lowercase.", "red, blue", "One more.", "green")
    every = encode_sft(tokenizer, rec, 256, 128, all_assistant_turns=True)
    last = encode_sft(tokenizer, rec, 256, 128, all_assistant_turns=False)
    eos = tokenizer.eos_token
    assert trained_text(tokenizer, every) == f"red, blue{eos}green{eos}"
    assert trained_text(tokenizer, last) == f"green{eos}"
    assert every.input_ids == last.input_ids


def test_long_prompt_keeps_its_end_and_is_counted(tokenizer):
    rec = record("word " * 200 + "List 3 fruits in uppercase.", "APPLE, PEAR, PLUM")
    stats = TruncationStats()
    example = encode_sft(tokenizer, rec, max_length=64, max_prompt_length=24, stats=stats)
    assert stats.prompt_truncated == 1 and stats.response_truncated == 0
    answer = answer_ids(tokenizer, rec.prompt, rec.response)
    glue = len(tokenizer("\n", add_special_tokens=False)["input_ids"])  # ChatML's newline after EOS
    assert len(example.input_ids) == 24 + len(answer) + glue
    # The end of the prompt (the actual question and the generation prompt) survives.
    assert "in uppercase." in tokenizer.decode(example.input_ids[:24])
    assert trained_text(tokenizer, example).endswith(tokenizer.eos_token)


def test_long_answer_keeps_its_start_never_vanishes_and_is_counted(tokenizer):
    rec = record("List 3 fruits.", ", ".join(["apple"] * 100))
    stats = TruncationStats()
    example = encode_sft(tokenizer, rec, max_length=48, max_prompt_length=30, stats=stats)
    assert len(example.input_ids) == 48
    assert stats.response_truncated == 1 and stats.prompt_truncated == 0
    kept = [i for i in example.labels if i != IGNORE_INDEX]
    assert len(kept) >= 1 and tokenizer.eos_token_id not in kept
    assert trained_text(tokenizer, example).startswith("apple, apple")


def test_packing_fits_whole_examples_and_matches_unpacked_loss(tokenizer, tiny_model_dir):
    recs = [record(f"List {n} fruits in lowercase.", ", ".join(["pear"] * n)) for n in range(1, 8)]
    examples = [encode_sft(tokenizer, r, 64, 32) for r in recs]
    rows = pack_examples(examples, max_length=64)
    assert sorted(len(e.input_ids) for row in rows for e in row.examples) == sorted(len(e.input_ids) for e in examples)
    assert all(row.length <= 64 for row in rows)
    assert len(rows) < len(examples)

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()

    def nll(batch):
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       position_ids=batch.position_ids, use_cache=False).logits
        return torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.size(-1)), batch.labels[:, 1:].reshape(-1), reduction="sum")

    packed = collate_packed(rows, tokenizer.pad_token_id)
    padded = collate_padded(examples, tokenizer.pad_token_id)
    assert packed.attention_mask is None and packed.input_ids.shape[0] == len(rows)
    assert packed.num_target_tokens == padded.num_target_tokens
    torch.testing.assert_close(nll(packed), nll(padded), rtol=1e-5, atol=1e-4)


def test_batches_are_seeded_and_randomly_addressable(tokenizer):
    examples = [encode_sft(tokenizer, record(f"List {n} cats.", "cat"), 64, 32) for n in range(10)]
    a = SFTBatches(examples, 3, tokenizer.pad_token_id, packing=False, max_length=64, seed=1)
    b = SFTBatches(examples, 3, tokenizer.pad_token_id, packing=False, max_length=64, seed=1)
    assert len(a) == 4
    first = [x.input_ids.tolist() for x in a.epoch(0)]
    assert first == [b.batch(0, i).input_ids.tolist() for i in range(4)]
    assert first != [x.input_ids.tolist() for x in a.epoch(1)]


@pytest.mark.parametrize("packing", [False, True])
def test_lm_nll_from_target_positions_only_equals_the_full_logits_loss(tiny_model_dir, packing):
    from rlhf.kernels.lm_loss import lm_forward_nll

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    generator = torch.Generator().manual_seed(0)
    examples = []
    for prompt, answer in ((5, 7), (9, 3), (2, 11)):
        ids = torch.randint(0, model.config.vocab_size, (prompt + answer,), generator=generator).tolist()
        examples.append(SFTExample(ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    batch = collate_packed(pack_examples(examples, 64), 0) if packing else collate_padded(examples, 0)
    full = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                 use_cache=False).logits
    targets = batch.labels[:, 1:]
    expected = torch.nn.functional.cross_entropy(full[:, :-1].reshape(-1, full.shape[-1]), targets.reshape(-1),
                                                 ignore_index=IGNORE_INDEX, reduction="sum")
    nll, n = lm_forward_nll(model, batch)
    assert n == int((targets != IGNORE_INDEX).sum()) == 7 + 3 + 11  # every answer token, none of the prompts
    torch.testing.assert_close(nll, expected, rtol=1e-5, atol=1e-4)


def test_length_grouping_keeps_each_epochs_examples_and_cuts_padding():
    lengths = torch.randint(20, 200, (300,), generator=torch.Generator().manual_seed(0)).tolist()
    examples = [SFTExample(list(range(1, n + 1)), list(range(1, n + 1))) for n in lengths]
    plain = SFTBatches(examples, 4, 0, packing=False, max_length=256, seed=3)
    grouped = SFTBatches(examples, 4, 0, packing=False, max_length=256, seed=3, group_by_length=True)

    def example_lengths(batches):
        return sorted(int(n) for x in batches for n in x.attention_mask.sum(-1))

    for e in (0, 1):
        a, b = list(plain.epoch(e)), list(grouped.epoch(e))
        assert len(a) == len(b) == 75
        assert example_lengths(a) == example_lengths(b) == sorted(lengths)  # the same examples, each once
        padded_positions = [sum(x.input_ids.numel() for x in batches) for batches in (a, b)]
        assert padded_positions[1] < 0.8 * padded_positions[0], padded_positions
        # Micro-batches come in random order, not sorted by length.
        widths = [x.input_ids.shape[1] for x in b]
        assert widths != sorted(widths) and widths != sorted(widths, reverse=True)
    again = SFTBatches(examples, 4, 0, packing=False, max_length=256, seed=3, group_by_length=True)
    assert [x.input_ids.tolist() for x in again.epoch(1)] == [x.input_ids.tolist() for x in grouped.epoch(1)]
    assert [x.input_ids.shape for x in grouped.epoch(0)] != [x.input_ids.shape for x in grouped.epoch(1)]
