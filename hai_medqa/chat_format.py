"""The one conversation format used by training, chat and evaluation (EXAONE-3.5's chat rules).

Training, the chat REPL and evaluation all build their prompts here, so the bytes the model sees at
inference are exactly the bytes it was trained on. The rules are those of EXAONE-3.5's official
chat template:

- if the first message is not a system message, an empty system turn ``[|system|][|endofturn|]\\n``
  comes first (some tools omit it - a train/serve mismatch we avoid);
- every message renders as ``[|<role>|]<content>``, followed by ``\\n`` after a user message and by
  ``[|endofturn|]\\n`` after a system or assistant message;
- the generation prompt is ``[|assistant|]`` with no newline after it.

EOS is ``[|endofturn|]``. Padding uses a distinct token (``[PAD]``): with pad == eos, the EOS labels
would be masked as padding and the model would never learn to stop.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from loguru import logger

from hai_medqa.errors import HaiMedQAError

EOT = "[|endofturn|]"
"""End-of-turn marker; also the tokenizer's EOS token."""

ROLES = ("system", "user", "assistant")
GENERATION_PROMPT = "[|assistant|]"
EMPTY_SYSTEM_TURN = "[|system|]" + EOT + "\n"

DEFAULT_SYSTEM_PROMPT = (
    "당신은 친절하고 신뢰할 수 있는 한국어 의료 상담 챗봇입니다. "
    "질문이 모호할 경우 추가 질문을 하여 진단과 처방을 구체화하세요."
)
"""The Korean medical-counselling system prompt of the original project."""

# The same rules as `render`, as a jinja template for tokenizer_config.json (identical to the one
# shipped with EXAONE-3.5-*-Instruct). `check_tokenizer_template` keeps the two in agreement.
EXAONE_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}{{ '[|system|][|endofturn|]\\n' }}{% endif %}"
    "{{ '[|' + message['role'] + '|]' + message['content'] }}"
    "{% if message['role'] == 'user' %}{{ '\\n' }}{% else %}{{ '[|endofturn|]\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '[|assistant|]' }}{% endif %}"
)


class ChatFormatError(HaiMedQAError, ValueError):
    """A conversation or record that cannot be rendered in the EXAONE chat format."""


def validate_messages(messages: Sequence[Mapping[str, Any]]) -> None:
    """Raise ChatFormatError naming the first malformed message (unknown role, non-string content,
    or a system message anywhere but first)."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ChatFormatError(f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping) or "role" not in msg or "content" not in msg:
            raise ChatFormatError(f"message {i} must be a dict with 'role' and 'content', got {msg!r:.80}")
        role, content = msg["role"], msg["content"]
        if role not in ROLES:
            raise ChatFormatError(f"message {i} has role {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise ChatFormatError(f"message {i} ({role}) content must be a string, got {type(content).__name__}")
        if role == "system" and i != 0:
            raise ChatFormatError(f"message {i} is a system message; only the first message may be one")


def render(messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False) -> str:
    """Render a conversation to text with EXAONE-3.5's rules (see module docstring).

    Example: ``[|system|]SYS[|endofturn|]\\n[|user|]질문\\n[|assistant|]답변[|endofturn|]\\n``.
    No BOS is emitted (the official template emits none either).
    """
    validate_messages(messages)
    parts: list[str] = []
    for i, msg in enumerate(messages):
        if i == 0 and msg["role"] != "system":
            parts.append(EMPTY_SYSTEM_TURN)
        parts.append(f"[|{msg['role']}|]{msg['content']}")
        parts.append("\n" if msg["role"] == "user" else EOT + "\n")
    if add_generation_prompt:
        parts.append(GENERATION_PROMPT)
    return "".join(parts)


def resolve_system_prompt(explicit: str | None, trained: str | None = None) -> str:
    """The one system-prompt rule, used by training, chat and evaluation.

    ``None`` means "not given": the prompt the model was trained with (`trained`, from its training
    record), else `DEFAULT_SYSTEM_PROMPT`. ``""`` means "no system prompt" (the empty system turn).

    >>> resolve_system_prompt(None) == DEFAULT_SYSTEM_PROMPT
    True
    >>> resolve_system_prompt(None, trained="너는 의사다"), resolve_system_prompt("", trained="너는 의사다")
    ('너는 의사다', '')
    """
    if explicit is not None:
        return explicit
    return DEFAULT_SYSTEM_PROMPT if trained is None else trained


def record_to_messages(record: Mapping[str, Any], system_prompt: str | None = None) -> list[dict]:
    """Turn one preprocessed jsonl record into chat messages.

    A record is either single-turn ``{"instruction": question, "output": answer, ...}`` (the output of
    `hai_medqa.data.preprocess`) or multi-turn ``{"messages": [{"role", "content"}, ...]}``. The system
    prompt (resolved by `resolve_system_prompt`: None = the default, "" = none, which renders as the
    empty system turn) is prepended unless the record brings its own system message.
    """
    system_prompt = resolve_system_prompt(system_prompt)
    if not isinstance(record, Mapping):
        raise ChatFormatError(f"record must be a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = [{"role": m.get("role"), "content": m.get("content")} if isinstance(m, Mapping) else m
                    for m in (record["messages"] or [])]
    else:
        missing = [k for k in ("instruction", "output") if k not in record]
        if missing:
            raise ChatFormatError(f"record lacks {' and '.join(repr(k) for k in missing)} (and has no 'messages')")
        instruction, output = record["instruction"], record["output"]
        if not isinstance(instruction, str) or not instruction.strip():
            raise ChatFormatError("record 'instruction' must be a non-empty string")
        if not isinstance(output, str) or not output.strip():
            raise ChatFormatError("record 'output' must be a non-empty string")
        messages = [{"role": "user", "content": instruction}, {"role": "assistant", "content": output}]
    if not messages:
        raise ChatFormatError("record has an empty 'messages' list")
    if system_prompt and not (isinstance(messages[0], Mapping) and messages[0].get("role") == "system"):
        messages.insert(0, {"role": "system", "content": system_prompt})
    validate_messages(messages)
    return messages


def split_prompt_answer(messages: Sequence[Mapping[str, Any]]) -> tuple[str, str]:
    """Split a conversation ending in an assistant turn into (prompt_text, answer_text).

    ``prompt_text`` is everything before the last answer, ending with ``[|assistant|]``;
    ``answer_text`` is the answer followed by ``[|endofturn|]`` - the tokens a model is trained to
    produce (the newline after EOT belongs to no one: generation stops at EOS). By construction
    ``render(messages) == prompt_text + answer_text + "\\n"``.
    """
    validate_messages(messages)
    if not messages or messages[-1]["role"] != "assistant":
        raise ChatFormatError("the last message must be an assistant message to split prompt and answer")
    prompt_text = render(messages[:-1], add_generation_prompt=True)
    answer_text = messages[-1]["content"] + EOT
    return prompt_text, answer_text


# Conversations that exercise every rule; used to compare a tokenizer's template with `render`.
_PROBE_CONVERSATIONS: tuple[tuple[dict, ...], ...] = (
    ({"role": "user", "content": "두통이 심해요."},),
    ({"role": "system", "content": "SYS"}, {"role": "user", "content": "질문"}),
    (
        {"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
        {"role": "user", "content": "열이 나요"},
        {"role": "assistant", "content": "언제부터인가요?"},
        {"role": "user", "content": "어제부터요\n밤에 더 심해요"},
    ),
    ({"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}),
)


def check_tokenizer_template(tokenizer: Any) -> list[str]:
    """Return the problems found in a tokenizer's chat setup (empty list = consistent with `render`).

    Checks that the tokenizer carries a chat template, that it renders the probe conversations (with
    and without a generation prompt) byte-identically to `render`, that EOS is ``[|endofturn|]`` and
    that padding uses a token distinct from EOS.
    """
    problems: list[str] = []
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        problems.append("tokenizer has no chat_template (the project renders with hai_medqa.chat_format instead)")
    else:
        for conv in _PROBE_CONVERSATIONS:
            for gen in (False, True):
                try:
                    got = tokenizer.apply_chat_template(list(conv), tokenize=False, add_generation_prompt=gen)
                except Exception as e:  # a broken template is a finding, not a crash
                    problems.append(f"chat_template failed to render: {type(e).__name__}: {e}")
                    break
                want = render(conv, add_generation_prompt=gen)
                if got != want:
                    problems.append(
                        f"chat_template renders differently from hai_medqa.chat_format "
                        f"(add_generation_prompt={gen}): expected {want!r}, got {got!r}"
                    )
                    break
            else:
                continue
            break
    eos = getattr(tokenizer, "eos_token", None)
    pad = getattr(tokenizer, "pad_token", None)
    if eos != EOT:
        problems.append(f"eos_token is {eos!r}, expected {EOT!r}")
    if pad is None:
        problems.append("tokenizer has no pad_token (expected a dedicated one such as '[PAD]')")
    elif pad == eos:
        problems.append(f"pad_token equals eos_token ({pad!r}); EOS labels would be masked as padding")
    elif EOT in tokenizer.get_vocab() and tokenizer.convert_tokens_to_ids(EOT) == tokenizer.pad_token_id:
        problems.append("pad_token_id equals the id of [|endofturn|]")
    return problems


@dataclass(frozen=True)
class ChatTokenIds:
    """The special-token ids every stage needs: end of turn (= EOS), padding, and BOS if any."""

    eot_id: int
    pad_id: int
    bos_id: int | None


def apply_tokenizer_rule(tokenizer: Any, *, source: str, repair_template: bool = True) -> ChatTokenIds:
    """The tokenizer rule that training, merge, chat and evaluation all apply, with one policy.

    - ``[|endofturn|]`` must be one known token, and padding must use another: otherwise a
      ChatFormatError naming `source` (with pad == end of turn the model never learns to stop, and
      generation cannot tell padding from an answer's end);
    - the chat template must render exactly as `render`; when it does not, it is replaced by
      `EXAONE_CHAT_TEMPLATE` (`repair_template`, so the folders a stage writes carry the exact
      template) with a warning, or only warned about;
    - an EOS other than ``[|endofturn|]`` is warned about (generation stops at the id returned here).
    """
    eot_id = tokenizer.convert_tokens_to_ids(EOT)
    if eot_id is None or eot_id == getattr(tokenizer, "unk_token_id", None):
        raise ChatFormatError(f"tokenizer from {source} has no {EOT} token: not an EXAONE-3.5 tokenizer")
    pad_id = getattr(tokenizer, "pad_token_id", None)
    if pad_id is None or pad_id == eot_id:
        raise ChatFormatError(
            f"tokenizer from {source}: the pad token must exist and differ from {EOT} (pad id {pad_id}), "
            "or the model never learns to stop and generation cannot tell padding from an answer's end")
    for problem in check_tokenizer_template(tokenizer):
        if "chat_template" in problem and repair_template:
            logger.warning(f"tokenizer from {source}: {problem}; using the project's EXAONE chat template")
            tokenizer.chat_template = EXAONE_CHAT_TEMPLATE
        elif "pad_token" not in problem:
            logger.warning(f"tokenizer from {source}: {problem}")
    return ChatTokenIds(eot_id=int(eot_id), pad_id=int(pad_id), bos_id=getattr(tokenizer, "bos_token_id", None))
