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
    "질문이 모호하면 증상의 부위, 시작 시점, 정도처럼 필요한 정보를 먼저 물어보세요. "
    "진단을 내리거나 약과 용량을 처방하지 말고, 일반적인 건강 정보를 설명한 뒤 알맞은 진료과나 "
    "의료기관의 진료를 권하세요. 응급 상황이 의심되면 즉시 119에 연락하도록 안내하세요."
)
"""The project's Korean medical-counselling system prompt: it asks follow-up questions when a question
is vague and points to care without diagnosing or prescribing, as the model card's disclaimer says."""

ORIGINAL_SYSTEM_PROMPT = (
    "당신은 친절하고 신뢰할 수 있는 한국어 의료 상담 챗봇입니다. "
    "질문이 모호할 경우 추가 질문을 하여 진단과 처방을 구체화하세요."
)
"""The original project's prompt ("... refine the diagnosis and prescription"), kept by name for
reproducing its runs; it contradicts the disclaimer, so it is not the default."""

SYSTEM_PROMPTS: dict[str, str] = {"default": DEFAULT_SYSTEM_PROMPT, "original": ORIGINAL_SYSTEM_PROMPT}
"""Named system prompts: ``system_prompt: original`` in a training config or ``--system-prompt original``
selects one by name (`resolve_system_prompt`); any other value is used as the prompt text itself."""

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
    A name of `SYSTEM_PROMPTS` (``default``, ``original``) stands for that prompt's text.

    >>> resolve_system_prompt(None) == DEFAULT_SYSTEM_PROMPT
    True
    >>> resolve_system_prompt(None, trained="너는 의사다"), resolve_system_prompt("", trained="너는 의사다")
    ('너는 의사다', '')
    >>> resolve_system_prompt("original") == ORIGINAL_SYSTEM_PROMPT
    True
    """
    if explicit is not None:
        return SYSTEM_PROMPTS.get(explicit, explicit)
    return DEFAULT_SYSTEM_PROMPT if trained is None else trained


def with_system_prompt(messages: Sequence[Mapping[str, Any]], system_prompt: str | None) -> list[dict]:
    """`messages` with the system prompt (resolved by `resolve_system_prompt`) first, unless the
    conversation brings its own system message; "" adds none (the empty system turn renders)."""
    system_prompt = resolve_system_prompt(system_prompt)
    messages = [dict(m) if isinstance(m, Mapping) else m for m in messages]
    if system_prompt and not (messages and isinstance(messages[0], Mapping) and messages[0].get("role") == "system"):
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def record_to_messages(record: Mapping[str, Any], system_prompt: str | None = None) -> list[dict]:
    """Turn one jsonl record into chat messages, the system prompt first.

    Any format `hai_medqa.conversations` reads (the project's ``{"instruction", "output"}``, Alpaca,
    OpenAI ``messages``, ShareGPT, TRL prompt/completion); the record's text fields must be complete
    (an answer included). The system prompt (resolved by `resolve_system_prompt`: None = the default,
    "" = none, which renders as the empty system turn) is prepended unless the record brings its own
    system message.
    """
    from hai_medqa.conversations import record_messages  # the reader imports this module

    _, messages = record_messages(record)
    messages = with_system_prompt(messages, system_prompt)
    validate_messages(messages)
    return messages


def assistant_turns(messages: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """Split a conversation ending in an assistant turn into (prompt piece, answer piece), one pair per
    assistant message.

    The answer piece is the message's content followed by ``[|endofturn|]`` (what a model is trained
    to produce); the prompt piece is all the text since the previous answer piece, ending with
    ``[|assistant|]`` (the first one starts with the system turn; later ones with the ``\n`` after the
    previous ``[|endofturn|]``). By construction ``"".join(p + a for p, a in pairs) + "\n" ==
    render(messages)``, and the text before answer k is what inference renders at that turn:
    ``render(messages[:i], add_generation_prompt=True)`` for the assistant message at index i.

    >>> assistant_turns([{"role": "user", "content": "배가 아파요"}, {"role": "assistant", "content": "어디가요?"},
    ...                  {"role": "user", "content": "오른쪽 아래요"}, {"role": "assistant", "content": "병원에 가세요."}])
    ... # doctest: +NORMALIZE_WHITESPACE
    [('[|system|][|endofturn|]\\n[|user|]배가 아파요\\n[|assistant|]', '어디가요?[|endofturn|]'),
     ('\\n[|user|]오른쪽 아래요\\n[|assistant|]', '병원에 가세요.[|endofturn|]')]
    """
    validate_messages(messages)
    if not messages or messages[-1]["role"] != "assistant":
        raise ChatFormatError("the last message must be an assistant message to split prompt and answer")
    pairs: list[tuple[str, str]] = []
    done = 0  # characters of the rendered conversation already in a pair
    for i, msg in enumerate(messages):
        if msg["role"] == "assistant":
            before = render(messages[:i], add_generation_prompt=True)
            pairs.append((before[done:], msg["content"] + EOT))
            done = len(before) + len(msg["content"]) + len(EOT)
    return pairs


def split_prompt_answer(messages: Sequence[Mapping[str, Any]]) -> tuple[str, str]:
    """Split a conversation ending in an assistant turn into (prompt_text, answer_text).

    ``prompt_text`` is everything before the last answer, ending with ``[|assistant|]``;
    ``answer_text`` is the answer followed by ``[|endofturn|]`` - the tokens a model is trained to
    produce (the newline after EOT belongs to no one: generation stops at EOS). By construction
    ``render(messages) == prompt_text + answer_text + "\n"``.
    """
    validate_messages(messages)
    if not messages or messages[-1]["role"] != "assistant":
        raise ChatFormatError("the last message must be an assistant message to split prompt and answer")
    prompt_text = render(messages[:-1], add_generation_prompt=True)
    answer_text = messages[-1]["content"] + EOT
    return prompt_text, answer_text


# ---------------------------------------------------------------------------------------------
# The token-level half: which tokens a conversation trains on
# ---------------------------------------------------------------------------------------------

TRAIN_TURNS = ("all", "last")
"""Which assistant turns carry loss: every one (default) or only the last (the others are context)."""


@dataclass(frozen=True)
class TrainedTurn:
    """One assistant turn as training sees it: ``prompt`` (no loss: the tokens since the previous
    trained answer, ending with ``[|assistant|]``) and ``answer`` (loss: the content's tokens and
    ``[|endofturn|]``)."""

    prompt: tuple[int, ...]
    answer: tuple[int, ...]


def tokenize_conversations(
    conversations: Sequence[Sequence[Mapping[str, Any]]],
    tokenizer: Any,
    *,
    eot_id: int,
    train_turns: str = "all",
) -> list[list[list[TrainedTurn]]]:
    """Token sequences of conversations ending in an assistant turn: for each conversation, its
    sequences (almost always one), each a list of `TrainedTurn`; ids = all prompts and answers in
    order, the answers alone carrying loss (`ids_and_mask`).

    Built turn by turn from token pieces, so two things hold by construction:

    - the ids before every trained answer are exactly what inference feeds at that turn, the
      tokenisation of ``render(messages[:i], add_generation_prompt=True)``;
    - every trained answer is the tokenisation of its content alone plus ``[|endofturn|]`` (what the
      model generates after that prompt), so the trained tokens of a conversation number
      sum(content tokens + 1) over its trained turns.

    ``[|endofturn|]`` is a special token, so text on either side of it tokenises independently. The
    one boundary that can merge is ``[|assistant|]`` + answer: with plain-text role markers (the real
    EXAONE tokenizer) an answer starting with ``.`` or ``(`` merges with the ``]`` before it, so an
    earlier answer read back as context tokenises differently from how it was trained. The
    conversation then continues in a new sequence whose context is tokenised as inference reads it
    (each turn still trains once). With ``train_turns="last"`` only the last answer trains; the
    earlier ones are context, tokenised as inference reads them (one sequence, as a single-turn one).

    All texts of all conversations go to the tokenizer in one batch call.
    """
    if train_turns not in TRAIN_TURNS:
        raise ChatFormatError(f"train_turns must be one of {', '.join(TRAIN_TURNS)}, got {train_turns!r}")
    texts: list[str] = []
    plans = []  # per conversation: per turn (prompt index, answer index, joined index or None)
    for messages in conversations:
        turns = assistant_turns(messages)
        plan = []
        for k, (prompt, answer) in enumerate(turns):
            last = k == len(turns) - 1
            joined = None if last else len(texts) + 2  # the turn read back as context (no EOT: special)
            plan.append((len(texts), len(texts) + 1, joined))
            texts.extend([prompt, answer] if last else [prompt, answer, prompt + answer[: -len(EOT)]])
        plans.append(plan)
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    out = []
    for plan in plans:
        sequences: list[list[TrainedTurn]] = []
        current: list[TrainedTurn] = []
        context: list[int] = []  # every turn so far as inference reads it (joined pieces + EOT)
        pending: list[int] = []  # context not yet in a sequence (untrained turns, or after a split)
        for k, (p, a, j) in enumerate(plan):
            prompt, answer = encoded[p], encoded[a]
            if not answer or answer[-1] != eot_id or answer.count(eot_id) != 1:
                raise ChatFormatError(f"assistant turn {k + 1}: the answer does not tokenise to one final {EOT}")
            trained = train_turns == "all" or j is None
            as_context = (encoded[j] + [eot_id]) if j is not None else None
            if trained:
                current.append(TrainedTurn(tuple(pending + prompt), tuple(answer)))
                pending = []
                if as_context is not None and prompt + answer != as_context:
                    # read back at the next turn, this answer merges with its "[|assistant|]": the rest
                    # continues in a new sequence whose context is tokenised as inference reads it
                    sequences.append(current)
                    current, pending = [], context + as_context
            else:
                pending += as_context
            if as_context is not None:
                context += as_context
        sequences.append(current)
        out.append(sequences)
    return out


def ids_and_mask(turns: Sequence[TrainedTurn]) -> tuple[list[int], list[bool]]:
    """(token ids, which carry loss) of one sequence of trained turns.

    >>> ids_and_mask([TrainedTurn((5, 6), (7, 2)), TrainedTurn((9,), (8, 2))])
    ([5, 6, 7, 2, 9, 8, 2], [False, False, True, True, False, True, True])
    """
    ids: list[int] = []
    mask: list[bool] = []
    for turn in turns:
        ids += turn.prompt
        ids += turn.answer
        mask += [False] * len(turn.prompt) + [True] * len(turn.answer)
    return ids, mask


def tokenize_conversation(messages: Sequence[Mapping[str, Any]], tokenizer: Any, *, eot_id: int,
                          train_turns: str = "all") -> list[tuple[list[int], list[bool]]]:
    """(ids, loss mask) of each token sequence of one conversation (see `tokenize_conversations`)."""
    [sequences] = tokenize_conversations([messages], tokenizer, eot_id=eot_id, train_turns=train_turns)
    return [ids_and_mask(turns) for turns in sequences]


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
