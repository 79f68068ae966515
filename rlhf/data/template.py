"""Chat templates: render conversations and split them into prompt and answer spans.

Models with a chat template use their own. A tokenizer without one (a base model such as
Gemma-3-270M) gets FALLBACK_CHAT_TEMPLATE, which renders

    <system text>\\n\\n              (only when a system message is present)
    User: <text>\\n\\n
    Assistant: <text><eos>\\n\\n

and, for generation, ends with "Assistant:". It is stored with the exported tokenizer, so
every later stage and plain `transformers` render the same text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from transformers import PreTrainedTokenizerBase

from rlhf.data.records import Message

FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}User: {{ message['content'] }}\n\n"
    "{% else %}Assistant: {{ message['content'] }}{{ eos_token }}\n\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def ensure_chat_template(tokenizer: PreTrainedTokenizerBase) -> None:
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE


def render(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in messages],
        tokenize=False,
        add_generation_prompt=generation_prompt,
    )


@dataclass
class Segment:
    text: str
    trained: bool
    """True for assistant answers that the SFT loss covers (through the EOS)."""
    append_eos: bool = False
    """The template did not emit EOS after this answer; the token is appended."""
    final_answer: bool = False


class TemplateError(ValueError):
    """The chat template does not render a conversation as prefix-consistent text."""


def conversation_segments(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message], all_assistant_turns: bool
) -> list[Segment]:
    """Cut the rendered conversation into untrained (prompt, template glue) and trained
    (assistant answer up to and including EOS) spans.

    Each answer span is found as the difference between rendering the conversation up to it
    with a generation prompt and rendering it with the answer, so it is exactly what the model
    produces at inference time after the generation prompt.
    """
    eos = tokenizer.eos_token
    last_assistant = max(i for i, m in enumerate(messages) if m.role == "assistant")
    segments: list[Segment] = []
    done = ""
    for i, message in enumerate(messages):
        if message.role != "assistant":
            continue
        before = render(tokenizer, messages[:i], generation_prompt=True)
        after = render(tokenizer, messages[: i + 1], generation_prompt=False)
        if not before.startswith(done) or not after.startswith(before):
            raise TemplateError(
                "the chat template does not render turn by turn (an earlier turn changes when a later "
                "one is added); set data.all_assistant_turns=false or use a prefix-consistent template"
            )
        segments.append(Segment(before[len(done):], trained=False))
        answer = after[len(before):]
        # The EOS that closes this answer comes after its content (the content may mention
        # the EOS text itself, e.g. in a conversation about tokenizers).
        content_at = answer.find(message.content.strip())
        cut = answer.find(eos, content_at + len(message.content.strip()) if content_at >= 0 else 0)
        trained = all_assistant_turns or i == last_assistant
        if cut >= 0:
            end = cut + len(eos)
            segments.append(Segment(answer[:end], trained, final_answer=i == last_assistant))
            if answer[end:]:
                segments.append(Segment(answer[end:], trained=False))
        else:
            segments.append(Segment(answer, trained, append_eos=True, final_answer=i == last_assistant))
        done = after
    return segments


def prompt_text(tokenizer: PreTrainedTokenizerBase, prompt: Sequence[Message]) -> str:
    """The text a policy sees before answering: the prompt plus the generation prompt."""
    return render(tokenizer, prompt, generation_prompt=True)


def answer_ids(tokenizer: PreTrainedTokenizerBase, prompt: Sequence[Message], answer: str) -> list[int]:
    """Token ids of `answer` as the template places it after `prompt`, ending with EOS and
    without the template's trailing glue (so it matches what generation stops at)."""
    segments = conversation_segments(
        tokenizer, [*prompt, Message("assistant", answer)], all_assistant_turns=False
    )
    final = next(s for s in segments if s.final_answer)
    ids = tokenizer(final.text, add_special_tokens=False)["input_ids"]
    if final.append_eos:
        ids.append(tokenizer.eos_token_id)
    return ids
