"""SFT tokenisation: answer-only labels, over-length policy, on-disk cache, bad input files."""

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


def test_labels_are_exactly_the_answer_and_eot(tmp_path, tokenizer):
    records, _ = read_sft_records(write_jsonl(tmp_path / "t.jsonl", RECORDS))
    ds = tokenize_records(records, tokenizer, max_length=4096, system_prompt=chat_format.DEFAULT_SYSTEM_PROMPT)
    answers = ["규칙적인 수면과 충분한 수분 섭취가 도움이 됩니다.", "콧물, 기침, 인후통이 흔합니다.\n열이 나면 쉬세요.",
               "해열제를 드세요."]
    for i, answer in enumerate(answers):
        ids, n_prompt = ds.sample(i)
        labels = ds.labels(i)
        assert (labels[:n_prompt] == IGNORE_INDEX).all()
        unmasked = labels[labels != IGNORE_INDEX]
        assert tokenizer.decode(unmasked.tolist(), skip_special_tokens=False) == answer + chat_format.EOT
        # the prompt ends with the generation prompt; splitting tokenises like the whole rendered text
        assert tokenizer.decode(ids[:n_prompt].tolist()).endswith("[|assistant|]")
        messages = chat_format.record_to_messages(RECORDS[i])
        full = chat_format.render(messages)[: -1]  # drop the newline after the final [|endofturn|]
        assert ids.tolist() == tokenizer(full, add_special_tokens=False)["input_ids"]
    # the multi-turn record: only the last answer carries loss; the earlier one is context
    ids, n_prompt = ds.sample(2)
    assert "언제부터인가요?" in tokenizer.decode(ids[:n_prompt].tolist())


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
    write_jsonl(data, RECORDS[:2])  # changed data
    changed = load_tokenized(data, tokenizer, **kw)
    assert len(calls) == 4 and len(changed) == 2
    assert len(list((tmp_path / "cache").iterdir())) == 4


@pytest.mark.parametrize(("rows", "message"), [
    (None, r"train_file not found: .*missing\.jsonl"),
    ([], r"train_file is empty"),
    (["", "  "], r"train_file is empty: .* \(no records\)"),
    ([{"question": "q", "answer": "a"}, {"instruction": "q"}],
     r"train_file has no usable records: .*bad\.jsonl \(all 2 unusable; first: .*bad\.jsonl:1: record lacks 'instruction' and 'output'"),
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
    assert stats == {"records": 4, "unusable_records": 2}


def test_val_file_with_nothing_left_after_max_length(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "val.jsonl", RECORDS[:2])
    with pytest.raises(TrainingDataError, match=r"val_file has no usable records after applying max_length=8 \(drop\)"):
        load_tokenized(path, tokenizer, max_length=8, overlong="drop", system_prompt=None,
                       cache_dir=tmp_path / "c", what="val_file")
