"""Supervised fine-tuning data: jsonl records -> token ids with the prompt masked, cached on disk.

Each record becomes chat messages (system prompt, user = instruction, assistant = output) rendered
by `hai_medqa.chat_format`. The prompt (everything up to and including ``[|assistant|]``) and the
answer (answer text + ``[|endofturn|]``) are tokenised separately and concatenated; the loss sees
only the answer tokens. Because both pieces end in a special token, the concatenation tokenises
exactly like the rendered text (tests check this).

Tokenisation runs once per (data, tokenizer, chat format, max_length, overlong policy, system
prompt): the result is stored as safetensors arrays under the cache folder and reused.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from loguru import logger
from safetensors.numpy import load_file, save_file
from tqdm import tqdm

from hai_medqa import chat_format
from hai_medqa.io_utils import atomic_dir, sha256_file, sha256_text
from hai_medqa.train.errors import TrainingDataError

IGNORE_INDEX = -100
"""Label value the loss skips (prompt, padding, filler)."""

CACHE_FORMAT_VERSION = 1
_MAX_WARNINGS = 5


@dataclass
class TokenizedDataset:
    """Samples as one flat token array; sample i is ``input_ids[offsets[i]:offsets[i+1]]``.

    The first ``prompt_lengths[i]`` tokens of a sample are prompt (no loss); the rest is the answer
    ending in ``[|endofturn|]``. ``source_lines[i]`` is the sample's line in the jsonl file.
    """

    input_ids: np.ndarray
    offsets: np.ndarray
    prompt_lengths: np.ndarray
    source_lines: np.ndarray
    stats: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.prompt_lengths)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def answer_lengths(self) -> np.ndarray:
        return self.lengths - self.prompt_lengths

    def sample(self, i: int) -> tuple[np.ndarray, int]:
        """(token ids, prompt length) of sample i."""
        return self.input_ids[self.offsets[i]:self.offsets[i + 1]], int(self.prompt_lengths[i])

    def labels(self, i: int) -> np.ndarray:
        """Labels of sample i: the token ids with the prompt replaced by IGNORE_INDEX."""
        ids, n_prompt = self.sample(i)
        lab = ids.astype(np.int64)
        lab[:n_prompt] = IGNORE_INDEX
        return lab


def _parse_line(line: str) -> list[dict]:
    """Chat messages of one jsonl line; ValueError/ChatFormatError say why it is unusable."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg})") from None
    messages = chat_format.record_to_messages(record, system_prompt="")
    if messages[-1]["role"] != "assistant":
        raise chat_format.ChatFormatError("the last message is not an assistant answer")
    return messages


def iter_sft_records(path: str | Path, stats: dict[str, Any], *, what: str = "train_file",
                     ) -> Iterator[tuple[int, list[dict]]]:
    """Stream (line number, chat messages) from a jsonl file, skipping unusable lines with a warning.

    Streaming keeps memory at the token arrays even for millions of records. Counts go into `stats`
    (``records``, ``unusable_records``, ``first_problem``) as the file is read.
    """
    path = Path(path)
    if not path.is_file():
        raise TrainingDataError(f"{what} not found: {path}")
    stats.update(records=0, unusable_records=0, first_problem=None)
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            stats["records"] += 1
            try:
                messages = _parse_line(line)
            except (ValueError, chat_format.ChatFormatError) as e:
                stats["unusable_records"] += 1
                problem = f"{path}:{lineno}: {e}"
                stats["first_problem"] = stats["first_problem"] or problem
                if stats["unusable_records"] <= _MAX_WARNINGS:
                    logger.warning(f"skipping record: {problem}")
                elif stats["unusable_records"] == _MAX_WARNINGS + 1:
                    logger.warning(f"further unusable records in {path} are counted, not listed")
                continue
            yield lineno, messages


def _raise_if_unusable(path: Path, stats: dict[str, Any], n_usable: int, what: str) -> None:
    if stats["records"] == 0:
        raise TrainingDataError(f"{what} is empty: {path} (no records)")
    if n_usable == 0:
        raise TrainingDataError(f"{what} has no usable records: {path} (all {stats['unusable_records']} unusable; "
                                f"first: {stats['first_problem']})")


def read_sft_records(path: str | Path, *, what: str = "train_file") -> tuple[list[tuple[int, list[dict]]], dict]:
    """All usable (line number, chat messages) of a jsonl file, and the counts.

    Raises TrainingDataError (one line) if the file is missing, empty, or has no usable record. A usable
    record has a non-empty string ``instruction`` and ``output`` (or a ``messages`` list ending in an
    assistant turn); malformed JSON and other records are counted and reported, not fatal.
    """
    path = Path(path)
    if path.is_file() and path.stat().st_size == 0:
        raise TrainingDataError(f"{what} is empty: {path}")
    stats: dict[str, Any] = {}
    out = list(iter_sft_records(path, stats, what=what))
    _raise_if_unusable(path, stats, len(out), what)
    return out, {"records": stats["records"], "unusable_records": stats["unusable_records"]}


def check_sft_file(path: str | Path | None, *, what: str = "train_file") -> None:
    """Fail fast (before any model is fetched or loaded) if a jsonl file cannot give a single sample.

    Reads only until the first usable record, so it is cheap on good files; `read_sft_records` does
    the full pass later.
    """
    if path is None:
        raise TrainingDataError(f"{what} is not set")
    path = Path(path)
    if not path.is_file():
        raise TrainingDataError(f"{what} not found: {path}")
    if path.stat().st_size == 0:
        raise TrainingDataError(f"{what} is empty: {path}")
    first_problem = None
    n = 0
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            n += 1
            try:
                _parse_line(line)
                return
            except (ValueError, chat_format.ChatFormatError) as e:
                first_problem = first_problem or f"{path}:{lineno}: {e}"
    if n == 0:
        raise TrainingDataError(f"{what} is empty: {path} (no records)")
    raise TrainingDataError(f"{what} has no usable records: {path} (all {n} unusable; first: {first_problem})")


def _with_system_prompt(messages: list[dict], system_prompt: str | None) -> list[dict]:
    # Same rule as chat_format.record_to_messages: the record's own system message wins.
    if system_prompt and messages[0]["role"] != "system":
        return [{"role": "system", "content": system_prompt}, *messages]
    return messages


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """SHA-256 of everything about a tokenizer that changes token ids (vocab, merges, special tokens)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    extra = json.dumps({"eos": tokenizer.eos_token, "pad": tokenizer.pad_token,
                        "added": sorted(map(str, tokenizer.get_added_vocab().items()))}, ensure_ascii=False)
    return sha256_text(body + extra)


def chat_format_fingerprint(system_prompt: str) -> str:
    """SHA-256 of how the chat format renders a probe conversation (changes if the rules change)."""
    probe = [{"role": "system", "content": system_prompt}, {"role": "user", "content": "Q"},
             {"role": "assistant", "content": "A"}]
    return sha256_text(chat_format.render(probe) + "\x00" + "".join(chat_format.split_prompt_answer(probe)))


def cache_key(*, data_sha256: str, tokenizer: Any, max_length: int, overlong: str, system_prompt: str,
              max_samples: int | None) -> str:
    """The key a tokenised file is cached under; any input that changes the tokens changes it."""
    parts = {
        "format": CACHE_FORMAT_VERSION,
        "data": data_sha256,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "chat_format": chat_format_fingerprint(system_prompt),
        "max_length": max_length,
        "overlong": overlong,
        "system_prompt": system_prompt,
        "max_samples": max_samples,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def tokenize_records(
    records: Iterable[tuple[int, list[dict]]],
    tokenizer: Any,
    *,
    max_length: int,
    overlong: str = "truncate",
    system_prompt: str = chat_format.DEFAULT_SYSTEM_PROMPT,
    eot_id: int | None = None,
    batch_size: int = 1024,
    desc: str = "tokenising",
) -> TokenizedDataset:
    """Tokenise chat records into a TokenizedDataset, applying the over-length policy.

    Over-long samples (prompt + answer > max_length): with ``overlong="truncate"`` the answer is cut
    so the sample fits, its last token staying ``[|endofturn|]``; a prompt that leaves no room for at
    least one answer token is dropped. With ``overlong="drop"`` every over-long sample is dropped.
    The counts are in ``stats``. `eot_id` is the ``[|endofturn|]`` id from
    `chat_format.apply_tokenizer_rule` (applied here when not given).
    """
    if eot_id is None:
        eot_id = chat_format.apply_tokenizer_rule(tokenizer, source="the tokenizer", repair_template=False).eot_id
    ids_parts: list[np.ndarray] = []
    prompt_lengths: list[int] = []
    lines: list[int] = []
    truncated = dropped_overlong = dropped_prompt_too_long = 0
    records = iter(records)
    bar = tqdm(desc=desc, unit=" samples", leave=False, disable=None)  # disable=None: no bar off a terminal
    while chunk := list(itertools.islice(records, batch_size)):
        bar.update(len(chunk))
        pairs = [chat_format.split_prompt_answer(_with_system_prompt(m, system_prompt)) for _, m in chunk]
        prompts = tokenizer([p for p, _ in pairs], add_special_tokens=False)["input_ids"]
        answers = tokenizer([a for _, a in pairs], add_special_tokens=False)["input_ids"]
        for (lineno, _), p_ids, a_ids in zip(chunk, prompts, answers, strict=True):
            if not a_ids or a_ids[-1] != eot_id:
                raise TrainingDataError(f"line {lineno}: the answer does not tokenise to end in {chat_format.EOT}")
            if len(p_ids) + len(a_ids) > max_length:
                room = max_length - len(p_ids)
                if overlong == "drop":
                    dropped_overlong += 1
                    continue
                if room < 2:  # need one answer token plus [|endofturn|]
                    dropped_prompt_too_long += 1
                    continue
                a_ids = a_ids[:room - 1] + [eot_id]
                truncated += 1
            ids_parts.append(np.asarray(p_ids + a_ids, dtype=np.int32))
            prompt_lengths.append(len(p_ids))
            lines.append(lineno)
    bar.close()
    lengths = np.asarray([len(x) for x in ids_parts], dtype=np.int64)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    input_ids = np.concatenate(ids_parts) if ids_parts else np.zeros(0, dtype=np.int32)
    stats = {
        "samples": len(ids_parts),
        "truncated": truncated,
        "dropped_overlong": dropped_overlong,
        "dropped_prompt_too_long": dropped_prompt_too_long,
        "tokens": int(lengths.sum()),
        "answer_tokens": int(lengths.sum() - sum(prompt_lengths)),
        "max_sample_tokens": int(lengths.max()) if len(lengths) else 0,
    }
    return TokenizedDataset(input_ids, offsets, np.asarray(prompt_lengths, dtype=np.int32),
                            np.asarray(lines, dtype=np.int32), stats)


def _save(ds: TokenizedDataset, folder: Path) -> None:
    save_file({"input_ids": ds.input_ids, "offsets": ds.offsets, "prompt_lengths": ds.prompt_lengths,
               "source_lines": ds.source_lines}, str(folder / "tokens.safetensors"))
    (folder / "meta.json").write_text(json.dumps(ds.stats, indent=2) + "\n", encoding="utf-8")


def _load(folder: Path) -> TokenizedDataset:
    t = load_file(str(folder / "tokens.safetensors"))
    stats = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    return TokenizedDataset(t["input_ids"], t["offsets"], t["prompt_lengths"], t["source_lines"], stats)


def load_tokenized(
    path: str | Path,
    tokenizer: Any,
    *,
    max_length: int,
    overlong: str,
    system_prompt: str | None,
    cache_dir: str | Path,
    max_samples: int | None = None,
    what: str = "train_file",
    eot_id: int | None = None,
) -> TokenizedDataset:
    """Tokenised samples of a jsonl file, from the cache when the same inputs were tokenised before.

    Raises TrainingDataError if the file is unusable or if no sample survives the over-length policy.
    """
    path = Path(path)
    if not path.is_file():
        raise TrainingDataError(f"{what} not found: {path}")
    prompt = chat_format.resolve_system_prompt(system_prompt)
    data_sha = sha256_file(path)
    key = cache_key(data_sha256=data_sha, tokenizer=tokenizer, max_length=max_length, overlong=overlong,
                    system_prompt=prompt, max_samples=max_samples)
    folder = Path(cache_dir) / f"{path.stem}-{key[:20]}"
    if (folder / "tokens.safetensors").is_file() and (folder / "meta.json").is_file():
        ds = _load(folder)
        logger.info(f"{what}: tokenisation cache hit ({len(ds)} samples) at {folder}")
    else:
        if path.stat().st_size == 0:
            raise TrainingDataError(f"{what} is empty: {path}")
        logger.info(f"{what}: tokenising {path}")
        read_stats: dict[str, Any] = {}
        records = iter_sft_records(path, read_stats, what=what)
        ds = tokenize_records(itertools.islice(records, max_samples), tokenizer, max_length=max_length,
                              overlong=overlong, system_prompt=prompt, eot_id=eot_id,
                              desc=f"tokenising {what}")
        n_usable = len(ds) + ds.stats["dropped_overlong"] + ds.stats["dropped_prompt_too_long"]
        _raise_if_unusable(path, read_stats, n_usable, what)
        ds.stats.update(records=read_stats["records"], unusable_records=read_stats["unusable_records"],
                        data_sha256=data_sha, file=str(path), cache_key=key)
        if len(ds):
            with atomic_dir(folder) as tmp:
                _save(ds, tmp)
    s = ds.stats
    logger.info(
        f"{what}: {s['samples']} samples, {s['tokens']} tokens ({s['answer_tokens']} answer); over max_length "
        f"{max_length}: {s['truncated']} truncated, {s['dropped_overlong'] + s['dropped_prompt_too_long']} dropped"
    )
    if len(ds) == 0:
        raise TrainingDataError(
            f"{what} has no usable records after applying max_length={max_length} ({overlong}): {path} "
            f"({s['dropped_overlong'] + s['dropped_prompt_too_long']} samples too long)"
        )
    return ds
