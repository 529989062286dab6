"""SFT tokenisation: answer-only labels on every assistant turn, over-length policy, on-disk cache, bad input
files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hai_medqa import chat_format
from hai_medqa.train import sft_data
from hai_medqa.train.errors import TrainingDataError
from hai_medqa.train.sft_data import (
    IGNORE_INDEX,
    check_sft_file,
    load_tokenized,
    read_sft_records,
    tokenize_records,
)

RECORDS = [
    {"instruction": "두통이 자주 생기는데 어떻게 예방하나요?", "output": "규칙적인 수면과 충분한 수분 섭취가 도움이 됩니다.",
     "category": "응급질환", "disease": "두통", "intention": "예방"},
    {"instruction": "감기 증상은 무엇인가요?", "output": "콧물, 기침, 인후통이 흔합니다.\n열이 나면 쉬세요."},
    {"messages": [{"role": "user", "content": "열이 나요"}, {"role": "assistant", "content": "언제부터인가요?"},
                  {"role": "user", "content": "어제부터요"}, {"role": "assistant", "content": "해열제를 드세요."}]},
]


@pytest.fixture(scope="module")
def tokenizer(tiny_exaone_dir):
    from hai_medqa.model.load import load_tokenizer

    return load_tokenizer(tiny_exaone_dir)


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def _encode(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_labels_are_exactly_the_answers_and_eots(tmp_path, tokenizer):
    records, _ = read_sft_records(write_jsonl(tmp_path / "t.jsonl", RECORDS))
    ds = tokenize_records(records, tokenizer, max_length=4096, system_prompt=chat_format.DEFAULT_SYSTEM_PROMPT)
    answers = [["규칙적인 수면과 충분한 수분 섭취가 도움이 됩니다."], ["콧물, 기침, 인후통이 흔합니다.\n열이 나면 쉬세요."],
               ["언제부터인가요?", "해열제를 드세요."]]
    eot = tokenizer.convert_tokens_to_ids(chat_format.EOT)
    for i, turns in enumerate(answers):
        ids, n_prompt = ds.sample(i)
        labels = ds.labels(i)
        assert (labels[:n_prompt] == IGNORE_INDEX).all()
        unmasked = labels[labels != IGNORE_INDEX]
        # every assistant turn trains: its content tokens and its [|endofturn|], nothing else
        assert unmasked.tolist() == [t for a in turns for t in _encode(tokenizer, a) + [eot]]
        assert int(ds.answer_lengths[i]) == len(unmasked)
        # the prompt ends with the generation prompt; the sample tokenises like the whole rendered text
        assert tokenizer.decode(ids[:n_prompt].tolist()).endswith("[|assistant|]")
        messages = chat_format.record_to_messages(RECORDS[i])
        full = chat_format.render(messages)[: -1]  # drop the newline after the final [|endofturn|]
        assert ids.tolist() == _encode(tokenizer, full)
    assert ds.stats["trained_turns"] == 4 and ds.stats["answer_tokens"] == int(ds.answer_lengths.sum())


def test_multi_turn_trains_every_assistant_turn(tmp_path, tokenizer):
    """Issue 14: 10 two-answer records trained only the last answers. Trained tokens must be the sum over every
    assistant turn of (content tokens + 1 end-of-turn), and the ids before each answer what inference feeds."""
    rows = [{"messages": [{"role": "user", "content": f"배가 아파요 {i}"},
                          {"role": "assistant", "content": "복통은 어떤 부위에 발생하나요?"},
                          {"role": "user", "content": "오른쪽 아랫배요"},
                          {"role": "assistant", "content": f"외과 진료를 받아 보세요. {i}번"}]} for i in range(10)]
    records, _ = read_sft_records(write_jsonl(tmp_path / "multi.jsonl", rows))
    ds = tokenize_records(records, tokenizer, max_length=4096)
    eot = tokenizer.convert_tokens_to_ids(chat_format.EOT)
    expected = sum(len(_encode(tokenizer, m["content"])) + 1 for r in rows for m in r["messages"]
                   if m["role"] == "assistant")
    assert ds.stats["answer_tokens"] == int(ds.answer_lengths.sum()) == expected
    assert ds.stats["trained_turns"] == 20 and len(ds) == 10
    for i, row in enumerate(rows):
        ids, labels = ds.sample(i)[0].tolist(), ds.labels(i).tolist()
        messages = chat_format.with_system_prompt(row["messages"], None)
        for j in (2, 4):  # the two assistant turns, after the system prompt
            before = _encode(tokenizer, chat_format.render(messages[:j], add_generation_prompt=True))
            answer = _encode(tokenizer, messages[j]["content"]) + [eot]
            assert ids[:len(before)] == before  # what chat.py feeds at that turn
            assert labels[len(before):len(before) + len(answer)] == answer
        # the newline after each [|endofturn|] and every user/system token carry no loss
        assert sum(lab != IGNORE_INDEX for lab in labels) == sum(len(_encode(tokenizer, messages[j]["content"])) + 1
                                                                  for j in (2, 4))

    last = tokenize_records(records, tokenizer, max_length=4096, train_turns="last")
    assert last.stats["answer_tokens"] == sum(len(_encode(tokenizer, r["messages"][-1]["content"])) + 1 for r in rows)
    assert np.array_equal(last.input_ids, ds.input_ids)  # the same ids, only the mask differs


def test_single_turn_samples_are_unchanged(sample_jsonl, tokenizer):
    """The preprocessed AI Hub sample (single-turn) tokenises exactly as before issue 14: the rendered prompt and
    the answer + [|endofturn|] tokenised apart, the loss on the answer alone."""
    records, _ = read_sft_records(sample_jsonl["train"])
    ds = tokenize_records(records, tokenizer, max_length=512)
    eot = tokenizer.convert_tokens_to_ids(chat_format.EOT)
    kept = 0
    for line, messages in records:
        prompt, answer = chat_format.split_prompt_answer(chat_format.with_system_prompt(messages, None))
        p_ids, a_ids = _encode(tokenizer, prompt), _encode(tokenizer, answer)
        if len(p_ids) + len(a_ids) > 512:
            if 512 - len(p_ids) < 2:
                continue  # the old rule: dropped
            a_ids = a_ids[:512 - len(p_ids) - 1] + [eot]  # the old truncation rule
        i = kept
        assert int(ds.source_lines[i]) == line
        assert ds.sample(i)[0].tolist() == p_ids + a_ids and int(ds.prompt_lengths[i]) == len(p_ids)
        assert ds.labels(i).tolist() == [IGNORE_INDEX] * len(p_ids) + a_ids
        kept += 1
    assert kept == len(ds) and ds.stats["split_sequences"] == 0


def test_overlong_truncates_answer_never_prompt(tmp_path, tokenizer):
    long = {"instruction": "당뇨병 식이 요법을 알려주세요.", "output": "채소와 통곡물을 드세요. " * 60}
    records, _ = read_sft_records(write_jsonl(tmp_path / "t.jsonl", [RECORDS[0], long]))
    full = tokenize_records(records, tokenizer, max_length=100_000)
    n_prompt_long = full.sample(1)[1]
    max_length = max(n_prompt_long + 20, int(full.lengths[0]))
    assert full.lengths[1] > max_length >= full.lengths[0]
    eot = tokenizer.convert_tokens_to_ids(chat_format.EOT)

    cut = tokenize_records(records, tokenizer, max_length=max_length, overlong="truncate")
    assert cut.stats["truncated"] == 1 and cut.stats["dropped_overlong"] == 0 and len(cut) == 2
    ids, n_prompt = cut.sample(1)
    assert len(ids) == max_length and n_prompt == n_prompt_long
    assert ids[:n_prompt].tolist() == full.sample(1)[0][:n_prompt].tolist()  # prompt intact
    assert ids[-1] == eot and ids[-2] == full.sample(1)[0][max_length - 2]  # answer prefix, then EOT
    assert cut.sample(0)[0].tolist() == full.sample(0)[0].tolist()  # short sample untouched

    dropped = tokenize_records(records, tokenizer, max_length=max_length, overlong="drop")
    assert len(dropped) == 1 and dropped.stats["dropped_overlong"] == 1 and dropped.stats["truncated"] == 0

    tiny = tokenize_records(records, tokenizer, max_length=n_prompt_long + 1, overlong="truncate")
    assert tiny.stats["dropped_prompt_too_long"] >= 1  # no room for one answer token + EOT: dropped, not cut


def test_overlong_multi_turn_keeps_whole_turns_and_cuts_or_drops_the_rest(tmp_path, tokenizer):
    rec = {"messages": [{"role": "user", "content": "배가 아파요"},
                        {"role": "assistant", "content": "복통은 어떤 부위에 발생하나요?"},
                        {"role": "user", "content": "오른쪽 아랫배요"},
                        {"role": "assistant", "content": "충수염일 수 있습니다. " * 30},
                        {"role": "user", "content": "고마워요"},
                        {"role": "assistant", "content": "몸조심하세요."}]}
    records, _ = read_sft_records(write_jsonl(tmp_path / "t.jsonl", [rec]))
    eot = tokenizer.convert_tokens_to_ids(chat_format.EOT)
    full = tokenize_records(records, tokenizer, max_length=100_000)
    ids, mask = full.sample(0)[0].tolist(), full.loss_mask[full.offsets[0]:full.offsets[1]].tolist()
    # answer spans [start, end) in the full sample
    spans, start = [], None
    for k, m in enumerate([*mask, 0]):
        if m and start is None:
            start = k
        elif not m and start is not None:
            spans.append((start, k))
            start = None
    assert len(spans) == 3
    (s1, e1), (s2, e2), _ = spans
    n = s2 + 20  # turn 1 whole, turn 2's prompt whole and 19 answer tokens + [|endofturn|]

    cut = tokenize_records(records, tokenizer, max_length=n, overlong="truncate")
    c_ids = cut.sample(0)[0].tolist()
    assert len(c_ids) == n and c_ids[:-1] == ids[:n - 1] and c_ids[-1] == eot  # prompts whole, answer cut + EOT
    assert cut.labels(0).tolist()[s2:] == ids[s2:n - 1] + [eot]
    assert (cut.stats["truncated"], cut.stats["dropped_turns"], cut.stats["trained_turns"]) == (1, 1, 2)

    dropped = tokenize_records(records, tokenizer, max_length=n, overlong="drop")
    assert dropped.sample(0)[0].tolist() == ids[:e1]  # only the whole first turn
    assert (dropped.stats["truncated"], dropped.stats["dropped_turns"], dropped.stats["dropped_overlong"]) == (0, 2, 0)

    no_room = tokenize_records(records, tokenizer, max_length=s2 + 1, overlong="truncate")  # turn 2: no answer room
    assert no_room.sample(0)[0].tolist() == ids[:e1] and no_room.stats["dropped_turns"] == 2
    for overlong, key in (("truncate", "dropped_prompt_too_long"), ("drop", "dropped_overlong")):
        none = tokenize_records(records, tokenizer, max_length=s1 + 1, overlong=overlong)  # a prompt is never cut
        assert len(none) == 0 and none.stats[key] == 1


def test_cache_hit_skips_tokenising_and_key_tracks_inputs(tmp_path, tokenizer, monkeypatch):
    data = write_jsonl(tmp_path / "train.jsonl", RECORDS)
    calls = []
    real = sft_data.tokenize_records
    monkeypatch.setattr(sft_data, "tokenize_records", lambda *a, **k: calls.append(1) or real(*a, **k))
    kw = {"max_length": 512, "overlong": "truncate", "system_prompt": None, "cache_dir": tmp_path / "cache"}
    first = load_tokenized(data, tokenizer, **kw)
    second = load_tokenized(data, tokenizer, **kw)
    assert len(calls) == 1
    assert np.array_equal(first.input_ids, second.input_ids) and np.array_equal(first.offsets, second.offsets)
    assert np.array_equal(first.prompt_lengths, second.prompt_lengths)
    load_tokenized(data, tokenizer, **{**kw, "max_length": 256})  # another max_length: new entry
    load_tokenized(data, tokenizer, **{**kw, "system_prompt": "다른 프롬프트"})  # another system prompt
    last = load_tokenized(data, tokenizer, **kw, train_turns="last")  # other trained turns
    assert np.array_equal(last.input_ids, first.input_ids) and not np.array_equal(last.loss_mask, first.loss_mask)
    assert np.array_equal(load_tokenized(data, tokenizer, **kw).loss_mask, first.loss_mask)  # the mask is cached
    write_jsonl(data, RECORDS[:2])  # changed data
    changed = load_tokenized(data, tokenizer, **kw)
    assert len(calls) == 5 and len(changed) == 2
    assert len(list((tmp_path / "cache").iterdir())) == 5


@pytest.mark.parametrize(("rows", "message"), [
    (None, r"train_file not found: .*missing\.jsonl"),
    ([], r"train_file is empty"),
    (["", "  "], r"train_file is empty: .* \(no records\)"),
    ([{"question": "q", "answer": "a"}, {"instruction": "q"}],
     r"train_file has no usable records: .*bad\.jsonl \(all 2 unusable; first: .*bad\.jsonl:1: a \{\"question\"\} "
     r"record has no answer to train on or score; expected \{\"instruction\", \"output\"\} \(project\)"),
    ([{"answer": "a"}], r"bad\.jsonl:1: unknown record format \(keys: answer\); expected \{\"instruction\""),
    ([{"messages": [{"role": "user", "content": "q"}]}],
     r"bad\.jsonl:1: messages record: the last message is a user message; training and evaluation need"),
    (["{not json", {"instruction": "", "output": "a"}], r"no usable records: .*bad\.jsonl:1: not valid JSON"),
])
def test_bad_files_give_one_clear_error(tmp_path, rows, message):
    name = "missing.jsonl" if rows is None else "bad.jsonl"
    path = tmp_path / name
    if rows is not None:
        write_jsonl(path, rows) if rows else path.write_bytes(b"")
    for check in (lambda: check_sft_file(path), lambda: read_sft_records(path)):
        with pytest.raises(TrainingDataError, match=message) as e:
            check()
        assert "\n" not in str(e.value)


def test_unusable_records_are_skipped_and_counted(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "mixed.jsonl", [RECORDS[0], {"instruction": "q"}, "{broken", RECORDS[1]])
    records, stats = read_sft_records(path)
    assert [line for line, _ in records] == [1, 4]
    assert stats == {"records": 4, "unusable_records": 2, "formats": {"project": 2}}


def test_val_file_with_nothing_left_after_max_length(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "val.jsonl", RECORDS[:2])
    with pytest.raises(TrainingDataError, match=r"val_file has no usable records after applying max_length=8 \(drop\)"):
        load_tokenized(path, tokenizer, max_length=8, overlong="drop", system_prompt=None,
                       cache_dir=tmp_path / "c", what="val_file")
