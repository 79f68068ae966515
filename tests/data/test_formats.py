"""Every accepted row format, and every malformed case as the user sees it (file:line: field)."""

from __future__ import annotations

import json

import pytest

from rlhf.config_sections import DataSourceConfig
from rlhf.data.builders import load_records
from rlhf.data.formats import (
    parse_hh_dialogue,
    parse_pretrain_row,
    parse_prompt_row,
    parse_rank_row,
    parse_sft_row,
)
from rlhf.data.records import Message, RankRecord
from rlhf.errors import DataError, UserError

LOC = "x.jsonl:1"
HH = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: How are you?\n\nAssistant: Fine, thanks."


def user(text: str) -> Message:
    return Message("user", text)


def assistant(text: str) -> Message:
    return Message("assistant", text)


def system(text: str) -> Message:
    return Message("system", text)


def load_error(tmp_path, kind: str, rows: list, **source) -> tuple[str, str]:
    """The error loading `rows` (dicts, one per line, the bad one last) raises, and the file path."""
    path = tmp_path / "x.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(DataError) as caught:
        load_records(kind, DataSourceConfig(path=str(path), **source))
    return str(caught.value), str(path)


GOOD_SFT = {"prompt": "p", "response": "r"}

# --- SFT formats ------------------------------------------------------------------------


def test_sft_messages():
    row = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
                        {"role": "assistant", "content": "A"}]}
    [record] = parse_sft_row(row, LOC)
    assert record.messages == [system("S"), user("Q"), assistant("A")]
    assert record.source == LOC and record.response == "A"


def test_sft_messages_with_text_parts():
    row = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Q"}]},
                        {"role": "assistant", "content": "A"}]}
    assert parse_sft_row(row, LOC)[0].messages == [user("Q"), assistant("A")]


@pytest.mark.parametrize("answer_field", ["response", "completion"])
def test_sft_prompt_response(answer_field):
    [record] = parse_sft_row({"prompt": "Q", answer_field: "A", "system": "Be brief."}, LOC)
    assert record.messages == [system("Be brief."), user("Q"), assistant("A")]


def test_sft_prompt_response_conversational():
    row = {"prompt": [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
                      {"role": "user", "content": "Q2"}],
           "completion": [{"role": "assistant", "content": "A2"}]}
    assert parse_sft_row(row, LOC)[0].messages == [user("Q1"), assistant("A1"), user("Q2"), assistant("A2")]


def test_sft_prompt_chosen():
    [record] = parse_sft_row({"prompt": "Q", "chosen": "good", "rejected": "bad"}, LOC)
    assert record.messages == [user("Q"), assistant("good")]


@pytest.mark.parametrize("input_text, content", [("", "Do it."), ("data", "Do it.\n\ndata")])
def test_sft_alpaca(input_text, content):
    [record] = parse_sft_row({"instruction": "Do it.", "input": input_text, "output": "Done."}, LOC)
    assert record.messages == [user(content), assistant("Done.")]


def test_sft_self_instruct_one_record_per_usable_instance():
    row = {"instruction": "Sum.", "instances": [{"input": "1 2", "output": "3"}, {"input": "x", "output": " "},
                                                {"input": "", "output": "0"}]}
    records = parse_sft_row(row, LOC)
    assert [r.messages for r in records] == [[user("Sum.\n\n1 2"), assistant("3")], [user("Sum."), assistant("0")]]


@pytest.mark.parametrize("field", ["chosen", "text"])
def test_sft_hh_dialogue(field):
    [record] = parse_sft_row({field: HH}, LOC)
    assert record.messages == [user("Hi there"), assistant("Hello!"), user("How are you?"), assistant("Fine, thanks.")]


def test_sft_hh_dialogue_without_leading_newlines():
    [record] = parse_sft_row({"chosen": "Human: Hi\n\nAssistant: Hello"}, LOC)
    assert record.messages == [user("Hi"), assistant("Hello")]


def test_sft_on_chosen_conversation_of_implicit_prompt_preference_data():
    row = {"chosen": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "good"}],
           "rejected": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "bad"}]}
    assert parse_sft_row(row, LOC)[0].messages == [user("Q"), assistant("good")]
    assert parse_prompt_row(row, LOC).prompt == [user("Q")]


def test_sft_forced_format_and_column_mapping():
    row = {"question": "Q", "answer": "A", "response": "ignored"}
    [record] = parse_sft_row(row, LOC, {"prompt": "question", "chosen": "answer"}, "prompt_chosen")
    assert record.messages == [user("Q"), assistant("A")]


def test_unknown_format_is_a_user_error():
    with pytest.raises(UserError, match="'alpacca' is not one of the sft formats"):
        parse_sft_row(GOOD_SFT, LOC, fmt="alpacca")


# --- HH dialogue parser -----------------------------------------------------------------


def test_hh_roles_need_not_alternate_and_inline_markers_are_content():
    text = "\n\nHuman: a\n\nAssistant: b  Human: inline\n\nAssistant: c"
    assert parse_hh_dialogue(text, LOC, "chosen") == [user("a"), assistant("b  Human: inline"), assistant("c")]


def test_hh_empty_final_answer_only_where_allowed():
    text = "\n\nHuman: a\n\nAssistant:"
    assert parse_hh_dialogue(text, LOC, "chosen", allow_empty_answer=True) == [user("a"), assistant("")]
    with pytest.raises(DataError, match="field 'chosen': turn 2 \\('Assistant:'\\) is empty"):
        parse_hh_dialogue(text, LOC, "chosen")


@pytest.mark.parametrize("text, message", [
    ("\n\nHuman: a", "no 'Assistant:' turn"),
    ("\n\nHuman: \n\nAssistant: b", "turn 1 \\('Human:'\\) is empty"),
    ("just text", "expected a dialogue starting with 'Human:'"),
])
def test_hh_malformed(text, message):
    with pytest.raises(DataError, match=f"^x.jsonl:1: field 'chosen': {message}"):
        parse_hh_dialogue(text, LOC, "chosen")


# --- SFT malformed, through a file ------------------------------------------------------


def test_sft_missing_field_lists_fields_and_formats(tmp_path):
    message, path = load_error(tmp_path, "sft", [GOOD_SFT, GOOD_SFT, {"prompt": "p", "answer": "a"}])
    assert message.startswith(f"{path}:3: field 'response': missing; the row has fields: prompt, answer; "
                              "accepted sft formats: messages | prompt + response")


def test_sft_no_known_field(tmp_path):
    message, path = load_error(tmp_path, "sft", [{"foo": 1}])
    assert message.startswith(f"{path}:1: no known fields; the row has fields: foo;")


def test_sft_wrong_type(tmp_path):
    message, path = load_error(tmp_path, "sft", [GOOD_SFT, {"prompt": "p", "response": 3}])
    assert message == f"{path}:2: field 'response': expected a string or a list with one assistant message, got int"


@pytest.mark.parametrize("value", ["", "  \n\t"])
def test_sft_empty_string(tmp_path, value):
    message, path = load_error(tmp_path, "sft", [{"prompt": value, "response": "r"}])
    assert message == f"{path}:1: field 'prompt': empty or whitespace-only"


def test_sft_error_names_the_users_column(tmp_path):
    message, path = load_error(tmp_path, "sft", [{"question": "q", "answer": 5}],
                               columns={"prompt": "question", "response": "answer"})
    assert message.startswith(f"{path}:1: field 'answer': expected a string")


@pytest.mark.parametrize("messages, error", [
    ([{"role": "user", "content": "q"}], "the conversation must end with an assistant message, got user"),
    ([{"role": "assistant", "content": "a"}], "the conversation has no user message"),
    ([{"role": "tool", "content": "q"}], "message 0: role 'tool' is not one of system, user, assistant"),
    ([{"role": "user", "content": 1}], "message 0: content: expected a string, got int"),
    ([{"role": "user", "content": " "}], "message 0: content: empty or whitespace-only"),
    ("hello", "expected a list of messages, got str"),
    ([], "empty message list"),
])
def test_sft_bad_messages(tmp_path, messages, error):
    message, path = load_error(tmp_path, "sft", [{"messages": messages}])
    assert message == f"{path}:1: field 'messages': {error}"


def test_sft_prompt_list_must_end_with_user(tmp_path):
    row = {"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "response": "r"}
    message, path = load_error(tmp_path, "sft", [row])
    assert message == f"{path}:1: field 'prompt': the prompt must end with a user message, got assistant"


def test_sft_self_instruct_without_usable_instance(tmp_path):
    row = {"instruction": "i", "instances": [{"input": "x", "output": ""}, "junk"]}
    message, path = load_error(tmp_path, "sft", [row])
    assert message == f"{path}:1: field 'instances': no instance has a non-empty string 'output'"


def test_sft_hh_empty_final_answer(tmp_path):
    message, path = load_error(tmp_path, "sft", [{"chosen": "\n\nHuman: q\n\nAssistant: "}])
    assert message == f"{path}:1: field 'chosen': turn 2 ('Assistant:') is empty"


# --- rank formats -----------------------------------------------------------------------


def test_rank_prompt_chosen_rejected():
    record = parse_rank_row({"prompt": "Q", "chosen": "good", "rejected": "bad", "margin": 2}, LOC)
    assert (record.prompt, record.responses, record.scores, record.margin) == ([user("Q")], ["good", "bad"], [1.0, 0.0], 2.0)
    assert record.pairs() == [(0, 1)]


def test_rank_conversational_with_prompt():
    row = {"prompt": [{"role": "user", "content": "Q"}],
           "chosen": [{"role": "assistant", "content": "good"}], "rejected": [{"role": "assistant", "content": "bad"}]}
    record = parse_rank_row(row, LOC)
    assert (record.prompt, record.responses) == ([user("Q")], ["good", "bad"])


def test_rank_conversational_implicit_prompt():
    shared = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    row = {"chosen": shared + [{"role": "assistant", "content": "good"}],
           "rejected": shared + [{"role": "assistant", "content": "bad"}]}
    record = parse_rank_row(row, LOC)
    assert (record.prompt, record.responses) == ([system("S"), user("Q")], ["good", "bad"])


def test_rank_hh_dialogues():
    record = parse_rank_row({"chosen": HH, "rejected": HH.replace("Fine, thanks.", "Go away.")}, LOC)
    assert record.prompt == [user("Hi there"), assistant("Hello!"), user("How are you?")]
    assert record.responses == ["Fine, thanks.", "Go away."] and record.scores == [1.0, 0.0]


def test_rank_hh_answer_running_on_into_invented_turns_stays_whole():
    run_on = HH.replace("Fine, thanks.", "Fine.\n\nHuman: and you?\n\nAssistant: Me too.")
    record = parse_rank_row({"chosen": HH, "rejected": run_on}, LOC)
    assert record.prompt[-1] == user("How are you?")
    assert record.responses == ["Fine, thanks.", "Fine.\n\nHuman: and you?\n\nAssistant: Me too."]


def test_rank_hh_empty_chosen_answer_is_kept():
    record = parse_rank_row({"chosen": "\n\nHuman: q\n\nAssistant:", "rejected": "\n\nHuman: q\n\nAssistant: bad"}, LOC)
    assert record.responses == ["", "bad"]


def test_rank_responses_best_first():
    record = parse_rank_row({"prompt": "Q", "responses": ["a", "b", "c"]}, LOC)
    assert record.scores == [2.0, 1.0, 0.0] and len(record.pairs()) == 3


def test_rank_scores_with_ties_give_fewer_pairs():
    record = parse_rank_row({"prompt": "Q", "responses": ["a", "b", "c", "d"], "scores": [3, 2, 2, 1]}, LOC)
    assert record.scores == [3.0, 2.0, 2.0, 1.0]
    assert len(record.pairs()) == 5


def test_rank_ranks_are_lower_is_better():
    by_rank = parse_rank_row({"prompt": "Q", "responses": ["a", "b", "c"], "ranks": [2, 1, 3]}, LOC)
    by_score = parse_rank_row({"prompt": "Q", "responses": ["a", "b", "c"], "scores": [0.5, 0.9, 0.1]}, LOC)
    assert sorted(by_rank.pairs()) == sorted(by_score.pairs()) == [(0, 2), (1, 0), (1, 2)]


def test_rank_duplicate_responses_with_different_scores_are_allowed():
    record = parse_rank_row({"prompt": "Q", "responses": ["a", "a"], "scores": [1, 0]}, LOC)
    assert record.pairs() == [(0, 1)]


# --- rank malformed ---------------------------------------------------------------------

GOOD_RANK = {"prompt": "p", "chosen": "c", "rejected": "r"}


@pytest.mark.parametrize("row, error", [
    ({"prompt": "p", "chosen": "same", "rejected": "same "}, "field 'rejected': chosen and rejected are identical"),
    ({"prompt": "p", "chosen": "c"}, "field 'rejected': missing; the row has fields: prompt, chosen"),
    ({"chosen": HH, "rejected": HH}, "field 'rejected': chosen and rejected are identical"),
    ({"chosen": HH, "rejected": HH.replace("How are you?", "Who are you?")},
     "field 'rejected': chosen and rejected do not share the same prompt"),
    ({"chosen": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "Q2"}, {"role": "assistant", "content": "b"}]},
     "field 'rejected': chosen and rejected do not share the same prompt"),
    ({"prompt": "p", "responses": ["only"]}, "field 'responses': needs at least 2 answers to rank, got 1"),
    ({"prompt": "p", "responses": ["a", "b"], "scores": [1, 1]}, "field 'scores': all answers are tied: no preference pair"),
    ({"prompt": "p", "responses": ["a", "b"], "ranks": [2, 2]}, "field 'ranks': all answers are tied: no preference pair"),
    ({"prompt": "p", "responses": ["a", "b"], "scores": [1, 0], "ranks": [1, 2]}, "field 'ranks': give either scores or ranks"),
    ({"prompt": "p", "responses": ["a", "b"], "scores": [1]}, "field 'scores': has 1 values but there are 2 responses"),
    ({"prompt": "p", "responses": ["a", "b"], "scores": [1, "x"]}, "field 'scores': value 1: expected a number, got str"),
    ({"prompt": "p", "responses": ["a", "b"], "scores": [True, 0]}, "field 'scores': value 0: expected a number, got bool"),
    ({"prompt": "p", "responses": ["a", ""]}, "field 'responses': answer 1: empty or whitespace-only"),
    ({**GOOD_RANK, "margin": True}, "field 'margin': expected a number, got bool"),
])
def test_rank_malformed(tmp_path, row, error):
    message, path = load_error(tmp_path, "rank", [GOOD_RANK, row])
    assert message.startswith(f"{path}:2: {error}")


def test_rank_nan_score(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"prompt": "p", "responses": ["a", "b"], "scores": [NaN, 1]}\n')
    with pytest.raises(DataError, match=f"^{path}:1: field 'scores': value 0: expected a finite number, got nan"):
        load_records("rank", DataSourceConfig(path=str(path)))


# --- prompt and pretrain ----------------------------------------------------------------


@pytest.mark.parametrize("row, prompt", [
    ({"prompt": "Q", "system": "S"}, [system("S"), user("Q")]),
    ({"prompt": [{"role": "user", "content": "Q"}]}, [user("Q")]),
    ({"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}, [user("Q")]),
    ({"instruction": "Do.", "input": "x"}, [user("Do.\n\nx")]),
    ({"instruction": "Do.", "instances": [{"input": "x", "output": "y"}]}, [user("Do.\n\nx")]),
    ({"prompt": "\n\nHuman: Q\n\nAssistant:"}, [user("Q")]),
    ({"text": HH}, [user("Hi there"), assistant("Hello!"), user("How are you?")]),
    ({"chosen": HH, "rejected": "x"}, [user("Hi there"), assistant("Hello!"), user("How are you?")]),
])
def test_prompt_formats(row, prompt):
    record = parse_prompt_row(row, LOC)
    assert record.prompt == prompt and record.source == LOC


@pytest.mark.parametrize("row, reference", [
    ({"chosen": HH, "rejected": "x"}, "Fine, thanks."),
    ({"chosen": "\n\nHuman: Q\n\nAssistant: A\n\nAssistant: more"}, "A\n\nmore"),  # a run-on answer: all of it
    ({"chosen": "\n\nHuman: Q\n\nAssistant:", "rejected": "\n\nHuman: Q\n\nAssistant: B"}, ""),  # HH's empty reply
    ({"prompt": "Q", "chosen": " good ", "rejected": "bad"}, "good"),
    ({"chosen": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "good"}]}, "good"),
    ({"chosen": HH, "reference": "own"}, "own"),  # the row's own column wins
    ({"text": HH}, None),
    ({"prompt": "Q", "answer": "7"}, None),
])
def test_a_preference_row_read_as_a_prompt_keeps_its_chosen_answer_as_the_reference(row, reference):
    # rlhf eval's ROUGE-L, BLEU and "reference" judge read it (HH prompt sets have no other answer).
    assert parse_prompt_row(row, LOC).fields.get("reference") == reference


def test_prompt_must_end_with_user(tmp_path):
    row = {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"},
                        {"role": "assistant", "content": "B"}]}
    message, path = load_error(tmp_path, "prompt", [row])
    assert message == f"{path}:1: field 'messages': the conversation must end with a user message, got assistant"


def test_prompt_missing(tmp_path):
    message, path = load_error(tmp_path, "prompt", [{"question": "q"}])
    assert message.startswith(f"{path}:1: field 'prompt': missing; the row has fields: question")


def test_pretrain_text():
    record = parse_pretrain_row({"content": "Some text."}, LOC, {"text": "content"})
    assert record.text == "Some text." and record.source == LOC


@pytest.mark.parametrize("row, error", [
    ({"body": "x"}, "field 'text': missing; the row has fields: body"),
    ({"text": " "}, "field 'text': empty or whitespace-only"),
    ({"text": ["a"]}, "field 'text': expected a string, got list"),
])
def test_pretrain_malformed(tmp_path, row, error):
    message, path = load_error(tmp_path, "pretrain", [row])
    assert message.startswith(f"{path}:1: {error}")


def test_records_are_the_canonical_types():
    assert isinstance(parse_rank_row(GOOD_RANK, LOC), RankRecord)
