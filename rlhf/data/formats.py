"""Turn one row (a dict from `sources.iter_rows`) into canonical records, one parser per set kind.

Each kind accepts several common layouts. With `format: auto` the layout is detected per row
from the fields it has, in the order listed in `SFT_FORMATS` etc.; any other value forces one
layout. Fields are read through the source's column mapping, and every problem raises
DataError naming the row's location and the user's own column name.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any, Callable, Mapping

from rlhf.data.records import ROLES, Message, PretrainRecord, PromptRecord, RankRecord, SFTRecord
from rlhf.data.sources import type_name
from rlhf.errors import DataError, UserError

CANONICAL_FIELDS = (
    "prompt", "response", "completion", "chosen", "rejected", "messages", "instruction", "input",
    "output", "instances", "responses", "scores", "ranks", "margin", "text", "system",
)

SFT_FORMATS = ("auto", "messages", "prompt_response", "prompt_chosen", "alpaca", "self_instruct", "hh")
RANK_FORMATS = ("auto", "prompt_chosen", "hh", "responses")
PROMPT_FORMATS = ("auto", "prompt", "messages", "alpaca", "self_instruct", "hh")
PRETRAIN_FORMATS = ("auto", "text")
FORMATS = {"sft": SFT_FORMATS, "rank": RANK_FORMATS, "prompt": PROMPT_FORMATS, "pretrain": PRETRAIN_FORMATS}

_ACCEPTED = {
    "sft": "messages | prompt + response (or completion) | prompt + chosen | instruction + output "
    "(+ input) | instruction + instances | chosen as a conversation or a 'Human: ... Assistant: ...' "
    "dialogue | text holding such a dialogue",
    "rank": "prompt + chosen + rejected | chosen + rejected as message lists or 'Human: ... Assistant: ...' "
    "dialogues | prompt + responses (+ scores or ranks)",
    "prompt": "prompt | messages | instruction (+ input or instances) | chosen as a conversation or a "
    "'Human: ... Assistant: ...' dialogue | text holding such a dialogue",
    "pretrain": "text",
}


def check_format(kind: str, fmt: str) -> None:
    """Raise UserError when `fmt` is not a format of set kind `kind`."""
    if fmt not in FORMATS[kind]:
        raise UserError(f"data format '{fmt}' is not one of the {kind} formats: {', '.join(FORMATS[kind])}")


class _Fields:
    """A row seen through the column mapping; its errors name the user's columns."""

    def __init__(self, data: dict, location: str, columns: Mapping[str, str] | None, kind: str):
        self.data = data
        self.location = location
        self.columns = columns or {}
        self.kind = kind

    def column(self, name: str) -> str:
        return self.columns.get(name, name)

    def has(self, name: str) -> bool:
        # Parquet and `datasets` fill absent columns with None: that is "missing" too.
        return self.data.get(self.column(name)) is not None

    def raw(self, name: str) -> Any:
        if not self.has(name):
            raise self.missing(name)
        return self.data[self.column(name)]

    def error(self, name: str | None, message: str) -> DataError:
        return DataError(self.location, self.column(name) if name else None, message)

    def missing(self, name: str | None) -> DataError:
        if name and self.data.get(self.column(name), "") is None:
            return self.error(name, "null instead of a value")
        present = ", ".join(map(str, self.data)) or "none"
        where = "missing" if name else "no known fields"
        # A text column the parser does not know is most likely the missing field under another name.
        unknown = [str(key) for key, value in self.data.items() if isinstance(value, (str, list))
                   and key not in CANONICAL_FIELDS and key not in self.columns.values()]
        if name and unknown:
            hint = f"; if '{unknown[0]}' holds the {name}, map it with `columns: {{{name}: {unknown[0]}}}`"
        else:
            hint = " (map other column names with `columns`)"
        return self.error(name, f"{where}; the row has fields: {present}; accepted {self.kind} formats: "
                                f"{_ACCEPTED[self.kind]}{hint}")

    def string(self, name: str) -> str:
        return self.check_string(name, self.raw(name))

    def optional_string(self, name: str) -> str | None:
        """An optional string; empty counts as absent (CSV cannot leave a cell out)."""
        if not self.has(name):
            return None
        value = self.raw(name)
        if not isinstance(value, str):
            raise self.error(name, f"expected a string, got {type_name(value)}")
        return self.check_unicode(name, value) if value.strip() else None

    def check_string(self, name: str, value: Any, what: str = "") -> str:
        if not isinstance(value, str):
            raise self.error(name, f"{what}expected a string, got {type_name(value)}")
        if not value.strip():
            raise self.error(name, f"{what}empty or whitespace-only")
        return self.check_unicode(name, value, what)

    def check_unicode(self, name: str, value: str, what: str = "") -> str:
        # JSON may escape half a surrogate pair ("\ud800"); tokenizers refuse such strings.
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:
            raise self.error(name, f"{what}invalid Unicode: an unpaired surrogate "
                                   f"\\u{ord(value[err.start]):04x} at character {err.start}") from None
        return value


# --- shared pieces ----------------------------------------------------------------------


def _message_list(fields: _Fields, name: str, value: Any = None) -> list[Message]:
    value = fields.raw(name) if value is None else value
    if not isinstance(value, list):
        raise fields.error(name, f"expected a list of messages, got {type_name(value)}")
    if not value:
        raise fields.error(name, "empty message list")
    messages = []
    for index, item in enumerate(value):
        if not isinstance(item, dict):
            raise fields.error(name, f"message {index}: expected an object with 'role' and 'content', "
                                     f"got {type_name(item)}")
        role = item.get("role")
        if role not in ROLES:
            raise fields.error(name, f"message {index}: role {role!r} is not one of {', '.join(ROLES)}")
        content = _text_content(item.get("content"))
        fields.check_string(name, content, f"message {index}: content: ")
        messages.append(Message(role, content))
    return messages


def _text_content(content: Any) -> Any:
    """OpenAI content may be a list of parts; text-only parts are joined, anything else is returned as is."""
    if isinstance(content, list) and content and all(
        isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
        for part in content
    ):
        return "".join(part["text"] for part in content)
    return content


def _ends_with_user(fields: _Fields, name: str, messages: list[Message], what: str) -> list[Message]:
    if not messages or messages[-1].role != "user":
        last = messages[-1].role if messages else "nothing"
        raise fields.error(name, f"{what} must end with a user message, got {last}")
    return messages


def _with_system(fields: _Fields, prompt: list[Message]) -> list[Message]:
    system = fields.optional_string("system")
    if system is None:
        return prompt
    if prompt[0].role == "system":
        raise fields.error("system", "given twice: the prompt already starts with a system message")
    return [Message("system", system), *prompt]


def _prompt(fields: _Fields, drop_answer: bool = False) -> list[Message]:
    """`prompt` as a string, an HH dialogue string or a message list, ending with a user turn."""
    value = fields.raw("prompt")
    if isinstance(value, str):
        if _is_hh(value):
            return _with_system(fields, _hh_prompt(fields, "prompt", value, drop_answer))
        return _with_system(fields, [Message("user", fields.check_string("prompt", value))])
    if isinstance(value, list):
        messages = _message_list(fields, "prompt", value)
        if drop_answer and messages[-1].role == "assistant":
            messages = messages[:-1]
        return _with_system(fields, _ends_with_user(fields, "prompt", messages, "the prompt"))
    raise fields.error("prompt", f"expected a string or a list of messages, got {type_name(value)}")


def _answer(fields: _Fields, name: str) -> str:
    """An answer: a string, or TRL's conversational form, a list with one assistant message."""
    value = fields.raw(name)
    if isinstance(value, str):
        return fields.check_string(name, value)
    if isinstance(value, list):
        messages = _message_list(fields, name, value)
        if len(messages) == 1 and messages[0].role == "assistant":
            return messages[0].content
        raise fields.error(name, f"expected a string or a list with one assistant message, got a list of "
                                 f"{len(messages)} messages ({', '.join(m.role for m in messages)})")
    raise fields.error(name, f"expected a string or a list with one assistant message, got {type_name(value)}")


def _instruction_prompt(instruction: str, input_text: str | None) -> list[Message]:
    if input_text and input_text.strip():
        return [Message("user", f"{instruction}\n\n{input_text}")]
    return [Message("user", instruction)]


def _number(fields: _Fields, name: str, value: Any, what: str = "") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise fields.error(name, f"{what}expected a number, got {type_name(value)}")
    if not math.isfinite(value):
        raise fields.error(name, f"{what}expected a finite number, got {value}")
    return float(value)


def _margin(fields: _Fields) -> float | None:
    if not fields.has("margin"):
        return None
    value = fields.raw("margin")
    if isinstance(value, str):  # CSV cells are strings
        if not value.strip():
            return None
        try:
            value = float(value)
        except ValueError:
            raise fields.error("margin", f"expected a number, got {value!r}") from None
    return _number(fields, "margin", value)


# --- HH dialogues ("\n\nHuman: ...\n\nAssistant: ...") --------------------------------------

_HH_MARKER = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}
_HH_ANSWER_MARKER = "\n\nAssistant:"


def _is_hh(text: str) -> bool:
    return text.lstrip().startswith(("Human:", "Assistant:"))


def _normalise_hh(text: str) -> str:
    """The dialogue with every turn, the first included, introduced by "\\n\\n<Speaker>:"."""
    return "\n\n" + text.replace("\r\n", "\n").lstrip()


def _hh_turns(text: str, location: str, field: str) -> list[tuple[str, str]]:
    """(marker, stripped content) per turn; "Human:" inside a line is content, not a turn."""
    if not _is_hh(text):
        raise DataError(location, field, "expected a dialogue starting with 'Human:' "
                                         "('\\n\\nHuman: ...\\n\\nAssistant: ...')")
    parts = _HH_MARKER.split(_normalise_hh(text))
    return [(parts[i], parts[i + 1].strip()) for i in range(1, len(parts), 2)]


def _check_hh_turns(turns: list[tuple[str, str]], location: str, field: str, empty_answer_ok: bool) -> None:
    for index, (marker, content) in enumerate(turns):
        final_answer = index == len(turns) - 1 and marker == "Assistant"
        if not content and not (final_answer and empty_answer_ok):
            raise DataError(location, field, f"turn {index + 1} ('{marker}:') is empty")


def parse_hh_dialogue(text: str, location: str, field: str, *, allow_empty_answer: bool = False) -> list[Message]:
    """Messages of an Anthropic HH dialogue. Roles need not alternate.

    An empty final "Assistant:" turn (the HH way to write a prompt) is kept as an empty
    message when `allow_empty_answer`; any other empty turn is an error.
    """
    turns = _hh_turns(text, location, field)
    if not any(marker == "Assistant" for marker, _ in turns):
        raise DataError(location, field, "no 'Assistant:' turn")
    _check_hh_turns(turns, location, field, allow_empty_answer)
    return [Message(_HH_ROLES[marker], content) for marker, content in turns]


def _hh_prompt(fields: _Fields, name: str, text: str, drop_answer: bool) -> list[Message]:
    """The turns of an HH dialogue before the answer; an empty final "Assistant:" is dropped.

    With `drop_answer`, every trailing "Assistant:" turn goes: HH answers sometimes run on
    into an invented "\\n\\nAssistant:" turn, and all of it is the answer.
    """
    turns = _hh_turns(text, fields.location, fields.column(name))
    if turns and turns[-1][0] == "Assistant" and not turns[-1][1]:
        turns = turns[:-1]
    while drop_answer and turns and turns[-1][0] == "Assistant":
        turns = turns[:-1]
    _check_hh_turns(turns, fields.location, fields.column(name), empty_answer_ok=False)
    messages = [Message(_HH_ROLES[marker], content) for marker, content in turns]
    return _ends_with_user(fields, name, messages, "the dialogue before the answer")


def _split_hh_pair(chosen: str, rejected: str) -> tuple[str, str, str] | None:
    """(shared prompt, chosen answer, rejected answer), cut at the last "Assistant:" both share.

    Cutting the text rather than comparing parsed turns matters: sampled answers in HH-RLHF
    sometimes run on into invented "\\n\\nHuman:"/"\\n\\nAssistant:" turns, which belong to the
    answer the labeller judged. None when the dialogues part before their last answer.
    """
    common = len(os.path.commonprefix([chosen, rejected]))
    cut = chosen.rfind(_HH_ANSWER_MARKER, 0, common)
    if cut < 0:
        return None
    answer_start = cut + len(_HH_ANSWER_MARKER)
    if "\n\nHuman:" in chosen[answer_start:common]:
        return None  # both answered the same, then a later human turn differs
    return chosen[:cut], chosen[answer_start:].strip(), rejected[answer_start:].strip()


# --- SFT --------------------------------------------------------------------------------


def _detect_sft(fields: _Fields) -> str:
    if fields.has("messages"):
        return "messages"
    if fields.has("prompt") and (fields.has("response") or fields.has("completion")):
        return "prompt_response"
    if fields.has("prompt") and fields.has("chosen"):
        return "prompt_chosen"
    if fields.has("instruction") and fields.has("output"):
        return "alpaca"
    if fields.has("instruction") and fields.has("instances"):
        return "self_instruct"
    if fields.has("chosen") or fields.has("text"):
        return "hh"
    if fields.has("prompt"):
        raise fields.missing("response")
    if fields.has("instruction"):
        raise fields.missing("output")
    if fields.has("response") or fields.has("completion"):
        raise fields.missing("prompt")
    raise fields.missing(None)


def _sft_conversation(fields: _Fields, name: str) -> list[list[Message]]:
    messages = _with_system(fields, _message_list(fields, name))
    if messages[-1].role != "assistant":
        raise fields.error(name, f"the conversation must end with an assistant message, got {messages[-1].role}")
    if not any(message.role == "user" for message in messages):
        raise fields.error(name, "the conversation has no user message")
    return [messages]


def _sft_messages(fields: _Fields) -> list[list[Message]]:
    return _sft_conversation(fields, "messages")


def _sft_prompt_response(fields: _Fields) -> list[list[Message]]:
    if not fields.has("prompt"):
        raise fields.missing("prompt")
    answer_field = "response" if fields.has("response") or not fields.has("completion") else "completion"
    return [[*_prompt(fields), Message("assistant", _answer(fields, answer_field))]]


def _sft_prompt_chosen(fields: _Fields) -> list[list[Message]]:
    prompt = _prompt(fields)  # read first: a missing prompt is the error to report
    return [[*prompt, Message("assistant", _answer(fields, "chosen"))]]


def _sft_alpaca(fields: _Fields) -> list[list[Message]]:
    instruction = fields.string("instruction")
    output = fields.string("output")
    prompt = _instruction_prompt(instruction, fields.optional_string("input"))
    return [[*_with_system(fields, prompt), Message("assistant", output)]]


def _sft_self_instruct(fields: _Fields) -> list[list[Message]]:
    instruction = fields.string("instruction")
    instances = fields.raw("instances")
    if not isinstance(instances, list):
        raise fields.error("instances", f"expected a list of {{input, output}} objects, got {type_name(instances)}")
    conversations = []
    for instance in instances:
        # Unusable instances are dropped, as long as one remains.
        if not isinstance(instance, dict):
            continue
        output, input_text = instance.get("output"), instance.get("input")
        if not isinstance(output, str) or not output.strip() or not isinstance(input_text, (str, type(None))):
            continue
        prompt = _with_system(fields, _instruction_prompt(instruction, input_text))
        conversations.append([*prompt, Message("assistant", output)])
    if not conversations:
        raise fields.error("instances", "no instance has a non-empty string 'output'")
    return conversations


def _sft_hh(fields: _Fields) -> list[list[Message]]:
    name = "chosen" if fields.has("chosen") or not fields.has("text") else "text"
    if name == "chosen" and isinstance(fields.data.get(fields.column(name)), list):
        return _sft_conversation(fields, name)  # TRL implicit-prompt preference data
    text = fields.string(name)
    messages = parse_hh_dialogue(text, fields.location, fields.column(name))
    if messages[-1].role != "assistant":
        raise fields.error(name, "the dialogue ends with a 'Human:' turn; SFT needs a final 'Assistant:' answer")
    return [messages]


_SFT_PARSERS: dict[str, Callable[[_Fields], list[list[Message]]]] = {
    "messages": _sft_messages,
    "prompt_response": _sft_prompt_response,
    "prompt_chosen": _sft_prompt_chosen,
    "alpaca": _sft_alpaca,
    "self_instruct": _sft_self_instruct,
    "hh": _sft_hh,
}


def parse_sft_row(data: dict, location: str, columns: Mapping[str, str] | None = None,
                  fmt: str = "auto") -> list[SFTRecord]:
    """One row of an SFT set as conversations ending with an assistant answer (several for Self-Instruct)."""
    check_format("sft", fmt)
    fields = _Fields(data, location, columns, "sft")
    conversations = _SFT_PARSERS[_detect_sft(fields) if fmt == "auto" else fmt](fields)
    return [SFTRecord(messages=messages, source=location) for messages in conversations]


# --- rank -------------------------------------------------------------------------------


def _detect_rank(fields: _Fields) -> str:
    if fields.has("responses"):
        return "responses"
    if fields.has("chosen") and fields.has("rejected"):
        chosen = fields.raw("chosen")
        if fields.has("prompt") or not isinstance(chosen, str):
            return "prompt_chosen"
        if _is_hh(chosen):
            return "hh"
        raise fields.missing("prompt")  # plain answers need a prompt beside them
    if fields.has("chosen"):
        raise fields.missing("rejected")
    if fields.has("rejected"):
        raise fields.missing("chosen")
    if fields.has("prompt"):
        raise fields.missing("chosen")
    raise fields.missing(None)


def _check_distinct(fields: _Fields, chosen: str, rejected: str) -> None:
    if chosen.strip() == rejected.strip():
        raise fields.error("rejected", "chosen and rejected are identical")


def _rank_prompt_chosen(fields: _Fields) -> tuple[list[Message], list[str], list[float]]:
    if fields.has("prompt"):
        prompt = _prompt(fields)
        chosen, rejected = _answer(fields, "chosen"), _answer(fields, "rejected")
    else:
        # TRL's implicit prompt: two whole conversations that differ only in the last answer.
        conversations = {}
        for name in ("chosen", "rejected"):
            messages = _message_list(fields, name)
            if messages[-1].role != "assistant":
                raise fields.error(name, f"the conversation must end with an assistant message, "
                                         f"got {messages[-1].role}")
            conversations[name] = messages
        prompt = conversations["chosen"][:-1]
        if conversations["rejected"][:-1] != prompt:
            raise fields.error("rejected", "chosen and rejected do not share the same prompt "
                                           "(the messages before the last answer differ)")
        prompt = _with_system(fields, _ends_with_user(fields, "chosen", prompt, "the conversation before the answer"))
        chosen, rejected = conversations["chosen"][-1].content, conversations["rejected"][-1].content
    _check_distinct(fields, chosen, rejected)
    return prompt, [chosen, rejected], [1.0, 0.0]


def _rank_hh(fields: _Fields) -> tuple[list[Message], list[str], list[float]]:
    chosen, rejected = fields.string("chosen"), fields.string("rejected")
    for name, text in (("chosen", chosen), ("rejected", rejected)):
        _hh_turns(text, fields.location, fields.column(name))  # both must be HH dialogues
    _check_distinct(fields, chosen, rejected)
    split = _split_hh_pair(_normalise_hh(chosen), _normalise_hh(rejected))
    if split is None:
        raise fields.error("rejected", "chosen and rejected do not share the same prompt")
    prompt_text, chosen_answer, rejected_answer = split
    if not prompt_text.strip():
        raise fields.error("chosen", "the dialogue has no 'Human:' turn before the answer")
    prompt = _hh_prompt(fields, "chosen", prompt_text, drop_answer=False)
    # Empty answers are kept: in HH-RLHF an empty reply is sometimes the preferred, harmless one.
    _check_distinct(fields, chosen_answer, rejected_answer)
    return prompt, [chosen_answer, rejected_answer], [1.0, 0.0]


def _rank_responses(fields: _Fields) -> tuple[list[Message], list[str], list[float]]:
    prompt = _prompt(fields)
    responses = fields.raw("responses")
    if not isinstance(responses, list):
        raise fields.error("responses", f"expected a list of strings, got {type_name(responses)}")
    if len(responses) < 2:
        raise fields.error("responses", f"needs at least 2 answers to rank, got {len(responses)}")
    for index, response in enumerate(responses):
        fields.check_string("responses", response, f"answer {index}: ")
    if fields.has("scores") and fields.has("ranks"):
        raise fields.error("ranks", "give either scores or ranks, not both")
    if fields.has("scores") or fields.has("ranks"):
        name = "scores" if fields.has("scores") else "ranks"
        values = fields.raw(name)
        if not isinstance(values, list):
            raise fields.error(name, f"expected a list of numbers, got {type_name(values)}")
        if len(values) != len(responses):
            raise fields.error(name, f"has {len(values)} values but there are {len(responses)} responses")
        numbers = [_number(fields, name, value, f"value {index}: ") for index, value in enumerate(values)]
        # Rank 1 is best, so the score is the negated rank.
        scores = numbers if name == "scores" else [-rank for rank in numbers]
        if len(set(scores)) == 1:
            raise fields.error(name, "all answers are tied: no preference pair")
    else:
        scores = [float(len(responses) - 1 - index) for index in range(len(responses))]  # best first
    return prompt, list(responses), scores


_RANK_PARSERS = {"prompt_chosen": _rank_prompt_chosen, "hh": _rank_hh, "responses": _rank_responses}


def parse_rank_row(data: dict, location: str, columns: Mapping[str, str] | None = None,
                   fmt: str = "auto") -> RankRecord:
    """One row of a preference set as a prompt with K >= 2 scored answers."""
    check_format("rank", fmt)
    fields = _Fields(data, location, columns, "rank")
    prompt, responses, scores = _RANK_PARSERS[_detect_rank(fields) if fmt == "auto" else fmt](fields)
    return RankRecord(prompt=prompt, responses=responses, scores=scores, margin=_margin(fields), source=location)


# --- prompt -----------------------------------------------------------------------------


def _detect_prompt(fields: _Fields) -> str:
    for fmt, name in (("prompt", "prompt"), ("messages", "messages"), ("alpaca", "instruction")):
        if fields.has(name):
            return fmt
    if fields.has("chosen") or fields.has("text"):
        return "hh"
    raise fields.missing("prompt" if fields.data else None)


def _prompt_conversation(fields: _Fields, name: str) -> list[Message]:
    """A message list up to the policy's turn: a final assistant answer is dropped."""
    messages = _message_list(fields, name)
    if messages[-1].role == "assistant":
        messages = messages[:-1]
    return _with_system(fields, _ends_with_user(fields, name, messages, "the conversation"))


def _prompt_messages(fields: _Fields) -> list[Message]:
    return _prompt_conversation(fields, "messages")


def _prompt_instruction(fields: _Fields) -> list[Message]:
    instruction = fields.string("instruction")
    input_text = fields.optional_string("input")
    if input_text is None and fields.has("instances"):
        # Self-Instruct: the first instance's input completes the instruction.
        instances = fields.raw("instances")
        first = instances[0] if isinstance(instances, list) and instances else None
        if isinstance(first, dict) and isinstance(first.get("input"), str):
            input_text = first["input"]
    return _with_system(fields, _instruction_prompt(instruction, input_text))


def _prompt_hh(fields: _Fields) -> list[Message]:
    name = "chosen" if fields.has("chosen") or not fields.has("text") else "text"
    if name == "chosen" and isinstance(fields.data.get(fields.column(name)), list):
        return _prompt_conversation(fields, name)  # TRL implicit-prompt preference data
    return _hh_prompt(fields, name, fields.string(name), drop_answer=True)


def _hh_reference(fields: _Fields) -> str | None:
    """The chosen answer of a preference row read as a prompt: what `rlhf eval` compares
    sampled answers with (ROUGE-L, BLEU, the "reference" judge). An empty chosen answer (HH
    prefers some empty replies) is an empty reference, so that every row of the file has one."""
    if not fields.has("chosen"):
        return None
    chosen = fields.raw("chosen")
    if isinstance(chosen, list):  # a conversation ending with the chosen answer
        last = chosen[-1] if chosen else None
        if isinstance(last, dict) and last.get("role") == "assistant" and isinstance(last.get("content"), str):
            return last["content"].strip()
        return None
    if not isinstance(chosen, str):
        return None
    if not _is_hh(chosen):
        return chosen.strip()  # prompt + chosen rows: the answer alone
    turns = _hh_turns(chosen, fields.location, fields.column("chosen"))
    answer = []
    while turns and turns[-1][0] == "Assistant":  # as the prompt drops them: all of it is the answer
        answer.insert(0, turns.pop()[1])
    return "\n\n".join(a for a in answer if a) if answer else None


_PROMPT_PARSERS = {
    "prompt": lambda fields: _prompt(fields, drop_answer=True),
    "messages": _prompt_messages,
    "alpaca": _prompt_instruction,
    "self_instruct": _prompt_instruction,
    "hh": _prompt_hh,
}


def parse_prompt_row(data: dict, location: str, columns: Mapping[str, str] | None = None,
                     fmt: str = "auto") -> PromptRecord:
    """One row of a prompt set as the conversation up to the policy's answer (ending with a user turn)."""
    check_format("prompt", fmt)
    fields = _Fields(data, location, columns, "prompt")
    prompt = _PROMPT_PARSERS[_detect_prompt(fields) if fmt == "auto" else fmt](fields)
    used = {fields.column(name) for name in ("prompt", "messages", "instruction", "input", "instances", "chosen",
                                             "rejected", "text")}
    extra = {str(key): value for key, value in data.items() if key not in used and _plain_json(value)}
    if "reference" not in extra:
        reference = _hh_reference(fields)
        if reference is not None:
            extra["reference"] = reference
    return PromptRecord(prompt=prompt, source=location, fields=extra)


def _plain_json(value: Any) -> bool:
    """A value a reward function may receive as it is (and send to a reward server as JSON)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain_json(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain_json(v) for k, v in value.items())
    return False


# --- pretrain ---------------------------------------------------------------------------


def parse_pretrain_row(data: dict, location: str, columns: Mapping[str, str] | None = None,
                       fmt: str = "auto") -> PretrainRecord:
    """One row of a pretraining set: a non-empty `text`."""
    check_format("pretrain", fmt)
    fields = _Fields(data, location, columns, "pretrain")
    return PretrainRecord(text=fields.string("text"), source=location)
