"""The EXAONE chat rules, written out by hand here and compared byte for byte."""

from __future__ import annotations

import jinja2
import pytest

from hai_medqa.chat_format import (
    DEFAULT_SYSTEM_PROMPT,
    EOT,
    EXAONE_CHAT_TEMPLATE,
    ORIGINAL_SYSTEM_PROMPT,
    SYSTEM_PROMPTS,
    ChatFormatError,
    TrainedTurn,
    assistant_turns,
    check_tokenizer_template,
    ids_and_mask,
    record_to_messages,
    render,
    resolve_system_prompt,
    split_prompt_answer,
    tokenize_conversation,
    tokenize_conversations,
)

SYS = {"role": "system", "content": "SYS"}
U1 = {"role": "user", "content": "질문"}
A1 = {"role": "assistant", "content": "답변"}
U2 = {"role": "user", "content": "추가 질문\n둘째 줄"}

# (messages, add_generation_prompt, expected text) - expected strings spelled out literally.
CASES = [
    ([U1], False, "[|system|][|endofturn|]\n[|user|]질문\n"),
    ([U1], True, "[|system|][|endofturn|]\n[|user|]질문\n[|assistant|]"),
    ([SYS, U1], True, "[|system|]SYS[|endofturn|]\n[|user|]질문\n[|assistant|]"),
    ([SYS, U1, A1], False, "[|system|]SYS[|endofturn|]\n[|user|]질문\n[|assistant|]답변[|endofturn|]\n"),
    ([U1, A1, U2], True,
     "[|system|][|endofturn|]\n[|user|]질문\n[|assistant|]답변[|endofturn|]\n[|user|]추가 질문\n둘째 줄\n[|assistant|]"),
    ([SYS, U1, A1, U2, A1], False,
     "[|system|]SYS[|endofturn|]\n[|user|]질문\n[|assistant|]답변[|endofturn|]\n"
     "[|user|]추가 질문\n둘째 줄\n[|assistant|]답변[|endofturn|]\n"),
]


@pytest.mark.parametrize(("messages", "gen", "expected"), CASES)
def test_render_follows_exaone_rules(messages, gen, expected):
    assert render(messages, add_generation_prompt=gen) == expected


@pytest.mark.parametrize(("messages", "gen", "expected"), CASES)
def test_jinja_template_renders_like_render(messages, gen, expected):
    template = jinja2.Environment().from_string(EXAONE_CHAT_TEMPLATE)
    assert template.render(messages=messages, add_generation_prompt=gen) == expected


def test_default_system_prompt_asks_and_points_to_care_without_prescribing():
    # issue 14: the original prompt asked the model to "refine the diagnosis and prescription", against the
    # disclaimer; the default asks follow-up questions, points to care and to 119, and prescribes nothing
    assert "진단과 처방을 구체화" not in DEFAULT_SYSTEM_PROMPT
    assert "물어보세요" in DEFAULT_SYSTEM_PROMPT and "진료를 권하세요" in DEFAULT_SYSTEM_PROMPT
    assert "처방하지 말고" in DEFAULT_SYSTEM_PROMPT and "119" in DEFAULT_SYSTEM_PROMPT
    assert ORIGINAL_SYSTEM_PROMPT == ("당신은 친절하고 신뢰할 수 있는 한국어 의료 상담 챗봇입니다. "
                                      "질문이 모호할 경우 추가 질문을 하여 진단과 처방을 구체화하세요.")


def test_system_prompts_by_name():
    assert SYSTEM_PROMPTS == {"default": DEFAULT_SYSTEM_PROMPT, "original": ORIGINAL_SYSTEM_PROMPT}
    assert resolve_system_prompt("original") == ORIGINAL_SYSTEM_PROMPT
    assert resolve_system_prompt("default", trained="너는 의사다") == DEFAULT_SYSTEM_PROMPT
    assert resolve_system_prompt("너는 의사다") == "너는 의사다"  # any other text is the prompt itself
    assert resolve_system_prompt(None, trained=ORIGINAL_SYSTEM_PROMPT) == ORIGINAL_SYSTEM_PROMPT
    assert record_to_messages({"instruction": "q", "output": "a"}, "original")[0]["content"] == ORIGINAL_SYSTEM_PROMPT


def test_record_to_messages_single_turn_with_and_without_system():
    rec = {"instruction": "두통이 있어요", "output": "휴식하세요", "category": "응급질환"}
    assert record_to_messages(rec) == [
        {"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
        {"role": "user", "content": "두통이 있어요"},
        {"role": "assistant", "content": "휴식하세요"},
    ]
    # One meaning of "none" everywhere (issue 12): None = not given = the default; "" = no system prompt.
    assert record_to_messages(rec, system_prompt=None) == record_to_messages(rec)
    no_sys = record_to_messages(rec, system_prompt="")
    assert [m["role"] for m in no_sys] == ["user", "assistant"]
    assert render(no_sys).startswith("[|system|][|endofturn|]\n[|user|]두통이 있어요\n")


def test_record_to_messages_multi_turn_keeps_own_system():
    rec = {"messages": [SYS, U1, A1]}
    assert record_to_messages(rec) == [SYS, U1, A1]
    rec = {"messages": [U1, A1]}
    assert record_to_messages(rec, system_prompt="S")[0] == {"role": "system", "content": "S"}


def test_split_prompt_answer_concatenates_back_to_render():
    messages = [SYS, U1, A1, U2, {"role": "assistant", "content": "마지막 답"}]
    prompt, answer = split_prompt_answer(messages)
    assert prompt.endswith("[|assistant|]")
    assert answer == "마지막 답" + EOT
    assert prompt + answer + "\n" == render(messages)
    assert prompt == render(messages[:-1], add_generation_prompt=True)


@pytest.mark.parametrize(("bad", "match"), [
    ({"output": "a"}, "'instruction'"),
    ({"instruction": "  ", "output": "a"}, "instruction"),
    ({"instruction": "q", "output": 3}, "output"),
    ({"messages": []}, "empty"),
    ({"messages": [{"role": "bot", "content": "x"}]}, "role 'bot'"),
    ({"messages": [U1, SYS]}, "only the first"),
    ("not a dict", "JSON object"),
])
def test_bad_records_give_one_clear_error(bad, match):
    with pytest.raises(ChatFormatError, match=match) as e:
        record_to_messages(bad)
    assert "\n" not in str(e.value)


def test_split_needs_final_assistant():
    with pytest.raises(ChatFormatError, match="last message"):
        split_prompt_answer([SYS, U1])


def test_check_tokenizer_template_flags_each_problem(tiny_exaone_dir):
    from hai_medqa.model.load import load_tokenizer

    tok = load_tokenizer(tiny_exaone_dir)
    assert check_tokenizer_template(tok) == []
    # LLaMA-Factory style template without the empty system turn: a train/serve mismatch
    tok.chat_template = EXAONE_CHAT_TEMPLATE.replace("{{ '[|system|][|endofturn|]\\n' }}", "")
    problems = check_tokenizer_template(tok)
    assert len(problems) == 1 and "renders differently" in problems[0]
    tok.chat_template = None
    assert any("no chat_template" in p for p in check_tokenizer_template(tok))

    tok = load_tokenizer(tiny_exaone_dir)
    tok.pad_token = EOT
    assert any("pad_token equals eos_token" in p for p in check_tokenizer_template(tok))
    tok = load_tokenizer(tiny_exaone_dir)
    tok.eos_token = "[EOS]"
    assert any("eos_token is '[EOS]'" in p for p in check_tokenizer_template(tok))


# ------------------------------------------------------------------ several turns, text and tokens
CONSULT = [
    {"role": "user", "content": "배가 아파요"},
    {"role": "assistant", "content": "복통은 어떤 부위에 발생하나요?"},
    {"role": "user", "content": "오른쪽 아랫배요.\n열도 나요."},
    {"role": "assistant", "content": "충수염일 수 있으니 오늘 진료를 받으세요."},
    {"role": "user", "content": "고마워요"},
    {"role": "assistant", "content": "몸조심하세요."},
]


def _assistant_indices(messages):
    return [i for i, m in enumerate(messages) if m["role"] == "assistant"]


@pytest.mark.parametrize("messages", [[U1, A1], [SYS, U1, A1], CONSULT, [SYS, *CONSULT], [U1, A1, A1]])
def test_assistant_turns_cut_the_rendered_text_at_each_answer(messages):
    pairs = assistant_turns(messages)
    assert len(pairs) == len(_assistant_indices(messages))
    assert "".join(p + a for p, a in pairs) + "\n" == render(messages)
    done = ""
    for (prompt, answer), i in zip(pairs, _assistant_indices(messages), strict=True):
        done += prompt
        assert done == render(messages[:i], add_generation_prompt=True)  # what inference renders at that turn
        assert answer == messages[i]["content"] + EOT
        done += answer
    assert "".join(p + a for p, a in pairs[:-1]) + pairs[-1][0] == split_prompt_answer(messages)[0]
    assert all(p.startswith("\n[|") for p, _ in pairs[1:])  # the newline after [|endofturn|] opens the next piece


@pytest.fixture(scope="module")
def tiny_tok(tiny_exaone_dir):
    from hai_medqa.model.load import load_tokenizer

    return load_tokenizer(tiny_exaone_dir)


def _encode(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def _check_every_turn(tok, messages, sequences, train_turns="all"):
    """Each trained answer: the ids before it are the tokenisation of the rendered prefix (what inference
    feeds), its ids are its content's alone plus [|endofturn|]; every assistant turn trains exactly once."""
    eot = tok.convert_tokens_to_ids(EOT)
    trained_at = []  # (ids before the answer, answer ids) in order
    for turns in sequences:
        ids: list[int] = []
        for t in turns:
            ids += t.prompt
            trained_at.append((list(ids), list(t.answer)))
            ids += t.answer
    indices = _assistant_indices(messages)
    if train_turns == "last":
        indices = indices[-1:]
    assert len(trained_at) == len(indices)
    for (before, answer), i in zip(trained_at, indices, strict=True):
        assert before == _encode(tok, render(messages[:i], add_generation_prompt=True))
        assert answer == _encode(tok, messages[i]["content"]) + [eot]


@pytest.mark.parametrize("train_turns", ["all", "last"])
def test_tokens_before_every_trained_answer_are_what_inference_feeds(tiny_tok, train_turns):
    eot = tiny_tok.convert_tokens_to_ids(EOT)
    for messages in ([SYS, U1, A1], [SYS, *CONSULT], CONSULT):
        [sequences] = tokenize_conversations([messages], tiny_tok, eot_id=eot, train_turns=train_turns)
        assert len(sequences) == 1
        _check_every_turn(tiny_tok, messages, sequences, train_turns)
        [(ids, mask)] = tokenize_conversation(messages, tiny_tok, eot_id=eot, train_turns=train_turns)
        # the whole sequence is the rendered conversation without its final newline
        assert ids == _encode(tiny_tok, render(messages)[:-1])
        trained = [t for t, m in zip(ids, mask, strict=True) if m]
        answers = [m for m in messages if m["role"] == "assistant"]
        if train_turns == "last":
            answers = answers[-1:]
        # trained tokens: every (chosen) answer's content tokens and its [|endofturn|], nothing else
        assert trained == [t for m in answers for t in _encode(tiny_tok, m["content"]) + [eot]]
        newline_after_eot = [i + 1 for i, t in enumerate(ids[:-1]) if t == eot]
        assert newline_after_eot and not any(mask[i] for i in newline_after_eot)


def test_single_turn_tokens_are_the_prompt_then_the_answer(tiny_tok):
    """One answer: the same ids and mask as tokenising split_prompt_answer's two texts (as before issue 14)."""
    eot = tiny_tok.convert_tokens_to_ids(EOT)
    messages = [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}, U1, A1]
    prompt, answer = split_prompt_answer(messages)
    for mode in ("all", "last"):
        [(ids, mask)] = tokenize_conversation(messages, tiny_tok, eot_id=eot, train_turns=mode)
        assert ids == _encode(tiny_tok, prompt) + _encode(tiny_tok, answer)
        assert mask == [False] * len(_encode(tiny_tok, prompt)) + [True] * len(_encode(tiny_tok, answer))


def _plain_marker_tokenizer():
    """A byte-level BPE like the real EXAONE tokenizer: GPT-2 pre-tokenizer, role markers as plain text (only
    [|endofturn|] is special), trained so that ']' merges with a following '(' or '.'."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [render(c) for c in ([U1, A1], CONSULT)] * 3 + ["[|assistant|](참고) [|assistant|]. 끝"] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=600, special_tokens=["[PAD]", "[BOS]", EOT],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOT, pad_token="[PAD]", bos_token="[BOS]")


def test_an_answer_that_merges_with_its_role_marker_continues_in_a_new_sequence():
    tok = _plain_marker_tokenizer()
    eot = tok.convert_tokens_to_ids(EOT)
    # the trap is real: the role marker is several tokens, and its "]" merges with a following "(" or "."
    assert len(_encode(tok, "[|assistant|]")) > 1
    for start in ("(", "."):
        assert _encode(tok, "[|assistant|]" + start) != _encode(tok, "[|assistant|]") + _encode(tok, start)
    messages = [U1, {"role": "assistant", "content": "(참고) 답변"}, U2, {"role": "assistant", "content": "끝"},
                {"role": "user", "content": "또"}, {"role": "assistant", "content": ". 마지막"}]
    # tokenising the whole conversation at once would train other ids than the model generates
    assert _encode(tok, render(messages)[:-1])[:len(_encode(tok, render(messages[:1], add_generation_prompt=True)))] \
        != _encode(tok, render(messages[:1], add_generation_prompt=True))
    [sequences] = tokenize_conversations([messages], tok, eot_id=eot)
    assert len(sequences) == 2  # split after the first answer (its "](" merges when read back as context)
    assert [len(s) for s in sequences] == [1, 2]  # the last answer ". 마지막" is never context: no split after it
    _check_every_turn(tok, messages, sequences)
    # without the guard a single sequence would break the prefix property: the second turn's context differs
    naive = list(sequences[0][0].prompt) + list(sequences[0][0].answer) + _encode(tok, assistant_turns(messages)[1][0])
    assert naive != _encode(tok, render(messages[:3], add_generation_prompt=True))
    [last_only] = tokenize_conversations([messages], tok, eot_id=eot, train_turns="last")
    assert len(last_only) == 1
    _check_every_turn(tok, messages, last_only, "last")


def test_ids_and_mask_and_bad_requests(tiny_tok):
    assert ids_and_mask([TrainedTurn((5,), (7, 2))]) == ([5, 7, 2], [False, True, True])
    eot = tiny_tok.convert_tokens_to_ids(EOT)
    with pytest.raises(ChatFormatError, match="train_turns must be one of all, last"):
        tokenize_conversations([[U1, A1]], tiny_tok, eot_id=eot, train_turns="first")
    with pytest.raises(ChatFormatError, match="last message"):
        tokenize_conversations([[U1]], tiny_tok, eot_id=eot)
    with pytest.raises(ChatFormatError, match="one final"):
        tokenize_conversations([[U1, {"role": "assistant", "content": "a" + EOT + "b"}]], tiny_tok, eot_id=eot)
