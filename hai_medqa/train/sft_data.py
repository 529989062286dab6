"""Supervised fine-tuning data: jsonl records -> token ids with a loss mask, cached on disk.

Records in any format `hai_medqa.conversations` reads become chat messages (the system prompt
first), and `chat_format.tokenize_conversations` turns them into tokens: every assistant turn's
content and its ``[|endofturn|]`` carry loss (``train_turns: all``, the default) or only the last
turn's (``train_turns: last``); the system, user and role-marker tokens and the ``\n`` after each
``[|endofturn|]`` never do. The ids before every trained answer are exactly what inference feeds at
that turn (tests check this on the tokenizer).

Tokenisation runs once per (data, tokenizer, chat format, max_length, overlong policy, system
prompt, trained turns): the result is stored as safetensors arrays under the cache folder and reused.
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
from hai_medqa.conversations import ReadReport, iter_conversations
from hai_medqa.io_utils import atomic_dir, sha256_file, sha256_text
from hai_medqa.train.errors import TrainingDataError

IGNORE_INDEX = -100
"""Label value the loss skips (prompt, padding, filler)."""

CACHE_FORMAT_VERSION = 2  # 2: a per-token loss mask (several trained turns per sample)


@dataclass
class TokenizedDataset:
    """Samples as one flat token array; sample i is ``input_ids[offsets[i]:offsets[i+1]]``.

    ``loss_mask`` (same length as ``input_ids``, 1 = carries loss) marks every trained answer and
    its ``[|endofturn|]``; ``prompt_lengths[i]`` counts the tokens before sample i's first trained
    token. Without a mask, everything after the prompt carries loss (a single answer).
    ``source_lines[i]`` is the sample's line in the jsonl file.
    """

    input_ids: np.ndarray
    offsets: np.ndarray
    prompt_lengths: np.ndarray
    source_lines: np.ndarray
    stats: dict[str, Any] = field(default_factory=dict)
    loss_mask: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.loss_mask is None:
            mask = np.ones(len(self.input_ids), dtype=np.uint8)
            for start, n_prompt in zip(self.offsets[:-1], self.prompt_lengths, strict=True):
                mask[start:start + n_prompt] = 0
            self.loss_mask = mask

    def __len__(self) -> int:
        return len(self.prompt_lengths)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def answer_lengths(self) -> np.ndarray:
        """Tokens carrying loss in each sample (all its trained answers and their end-of-turn tokens)."""
        counts = np.concatenate([[0], np.cumsum(self.loss_mask, dtype=np.int64)])
        return counts[self.offsets[1:]] - counts[self.offsets[:-1]]

    def sample(self, i: int) -> tuple[np.ndarray, int]:
        """(token ids, prompt length) of sample i."""
        return self.input_ids[self.offsets[i]:self.offsets[i + 1]], int(self.prompt_lengths[i])

    def labels(self, i: int) -> np.ndarray:
        """Labels of sample i: the token ids, IGNORE_INDEX wherever no loss is taken."""
        ids, _ = self.sample(i)
        lab = ids.astype(np.int64)
        lab[self.loss_mask[self.offsets[i]:self.offsets[i + 1]] == 0] = IGNORE_INDEX
        return lab


def iter_sft_records(path: str | Path, stats: dict[str, Any], *, what: str = "train_file",
                     ) -> Iterator[tuple[int, list[dict]]]:
    """Stream (line number, chat messages) from a jsonl file, skipping unusable lines with a warning.

    Any format of `hai_medqa.conversations`; a record must end in an assistant answer. Streaming
    keeps memory at the token arrays even for millions of records. Counts go into `stats`
    (``records``, ``unusable_records``, ``first_problem``, ``formats``) as the file is read.
    """
    path = Path(path)
    if not path.is_file():
        raise TrainingDataError(f"{what} not found: {path}")
    report = ReadReport(str(path))

    def update() -> None:  # also when the caller stops early (max_samples)
        stats.update(records=report.records, unusable_records=report.unusable, first_problem=report.first_problem,
                     formats=dict(sorted(report.formats.items())))

    update()
    for conv in iter_conversations(path, report, purpose="train", what=what):
        update()
        yield conv.line, conv.messages
    update()


def _raise_if_unusable(path: Path, stats: dict[str, Any], n_usable: int, what: str) -> None:
    if stats["records"] == 0:
        raise TrainingDataError(f"{what} is empty: {path} (no records)")
    if n_usable == 0:
        raise TrainingDataError(f"{what} has no usable records: {path} (all {stats['unusable_records']} unusable; "
                                f"first: {stats['first_problem']})")


def read_sft_records(path: str | Path, *, what: str = "train_file") -> tuple[list[tuple[int, list[dict]]], dict]:
    """All usable (line number, chat messages) of a jsonl file, and the counts.

    Raises TrainingDataError (one line) if the file is missing, empty, or has no usable record. A usable
    record is one of `hai_medqa.conversations`' formats ending in an assistant answer; malformed JSON
    and other records are counted and reported, not fatal. The counts: ``records``,
    ``unusable_records`` and ``formats`` (usable records per format).
    """
    path = Path(path)
    if path.is_file() and path.stat().st_size == 0:
        raise TrainingDataError(f"{what} is empty: {path}")
    stats: dict[str, Any] = {}
    out = list(iter_sft_records(path, stats, what=what))
    _raise_if_unusable(path, stats, len(out), what)
    return out, {"records": stats["records"], "unusable_records": stats["unusable_records"],
                 "formats": stats["formats"]}


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
    report = ReadReport(str(path))
    for _ in iter_conversations(path, report, purpose="train", what=what, log=False):  # the full pass logs
        return
    stats = {"records": report.records, "unusable_records": report.unusable, "first_problem": report.first_problem}
    _raise_if_unusable(path, stats, 0, what)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """SHA-256 of everything about a tokenizer that changes token ids (vocab, merges, special tokens)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    extra = json.dumps({"eos": tokenizer.eos_token, "pad": tokenizer.pad_token,
                        "added": sorted(map(str, tokenizer.get_added_vocab().items()))}, ensure_ascii=False)
    return sha256_text(body + extra)


def chat_format_fingerprint(system_prompt: str) -> str:
    """SHA-256 of how the chat format renders and splits a probe conversation (changes if the rules change)."""
    probe = [{"role": "system", "content": system_prompt}, {"role": "user", "content": "Q"},
             {"role": "assistant", "content": "A"}, {"role": "user", "content": "Q2"},
             {"role": "assistant", "content": "A2"}]
    pieces = "\x01".join(p + "\x02" + a for p, a in chat_format.assistant_turns(probe))
    return sha256_text(chat_format.render(probe) + "\x00" + pieces)


def cache_key(*, data_sha256: str, tokenizer: Any, max_length: int, overlong: str, system_prompt: str,
              max_samples: int | None, train_turns: str = "all") -> str:
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
        "train_turns": train_turns,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


@dataclass
class _Fitted:
    ids: list[int]
    mask: list[bool]
    first_trained: int
    turns: int
    dropped_turns: int
    truncated: bool


def fit_turns(turns: list[chat_format.TrainedTurn], *, max_length: int, overlong: str, eot_id: int) -> _Fitted | None:
    """The longest start of a sequence of trained turns that fits `max_length`, or None if none fits.

    Whole turns are kept in order while they fit. The first turn that does not fit is cut (its
    prompt whole, its answer shortened to end in ``[|endofturn|]``, only with ``overlong="truncate"``
    and room for one answer token) or dropped; every later turn is dropped. A prompt is never cut.
    """
    ids: list[int] = []
    mask: list[bool] = []
    kept, truncated = 0, False
    for turn in turns:
        n_prompt, n_answer = len(turn.prompt), len(turn.answer)
        room = max_length - len(ids) - n_prompt
        if n_answer <= room:
            answer = list(turn.answer)
        elif overlong == "truncate" and room >= 2:  # one answer token plus [|endofturn|]
            answer, truncated = [*turn.answer[:room - 1], eot_id], True
        else:
            break
        ids += turn.prompt
        ids += answer
        mask += [False] * n_prompt + [True] * len(answer)
        kept += 1
        if truncated:
            break
    if kept == 0:
        return None
    return _Fitted(ids, mask, len(turns[0].prompt), kept, len(turns) - kept, truncated)


def tokenize_records(
    records: Iterable[tuple[int, list[dict]]],
    tokenizer: Any,
    *,
    max_length: int,
    overlong: str = "truncate",
    system_prompt: str = chat_format.DEFAULT_SYSTEM_PROMPT,
    eot_id: int | None = None,
    train_turns: str = "all",
    batch_size: int = 1024,
    desc: str = "tokenising",
) -> TokenizedDataset:
    """Tokenise chat records into a TokenizedDataset, applying the over-length policy.

    `train_turns` (``all`` | ``last``) says which assistant turns carry loss
    (`chat_format.tokenize_conversations`). Over-long samples (> max_length tokens) keep their whole
    turns that fit (`fit_turns`); with ``overlong="truncate"`` the first turn that does not fit keeps
    its prompt and a cut answer ending in ``[|endofturn|]``, with ``overlong="drop"`` it is dropped,
    and every turn after it is dropped. A prompt is never cut: a sample whose first trained turn's
    prompt leaves no room for one answer token is dropped. The counts are in ``stats``:
    ``truncated`` (samples with a cut answer), ``dropped_turns`` (trained turns that did not fit in
    kept samples), ``dropped_overlong`` / ``dropped_prompt_too_long`` (samples dropped whole under
    drop / truncate), ``split_sequences`` (extra samples where an answer read back as context
    tokenises differently, see `chat_format.tokenize_conversations`). `eot_id` is the
    ``[|endofturn|]`` id from `chat_format.apply_tokenizer_rule` (applied here when not given).
    """
    if eot_id is None:
        eot_id = chat_format.apply_tokenizer_rule(tokenizer, source="the tokenizer", repair_template=False).eot_id
    ids_parts: list[np.ndarray] = []
    mask_parts: list[np.ndarray] = []
    prompt_lengths: list[int] = []
    lines: list[int] = []
    counts = dict.fromkeys(("truncated", "dropped_overlong", "dropped_prompt_too_long", "dropped_turns",
                            "split_sequences", "trained_turns"), 0)
    records = iter(records)
    bar = tqdm(desc=desc, unit=" samples", leave=False, disable=None)  # disable=None: no bar off a terminal
    while chunk := list(itertools.islice(records, batch_size)):
        bar.update(len(chunk))
        conversations = [chat_format.with_system_prompt(m, system_prompt) for _, m in chunk]
        try:
            tokenized = chat_format.tokenize_conversations(conversations, tokenizer, eot_id=eot_id,
                                                           train_turns=train_turns)
        except chat_format.ChatFormatError as e:
            raise TrainingDataError(f"lines {chunk[0][0]}-{chunk[-1][0]}: {e}") from None
        for (lineno, _), sequences in zip(chunk, tokenized, strict=True):
            counts["split_sequences"] += len(sequences) - 1
            for turns in sequences:
                fitted = fit_turns(turns, max_length=max_length, overlong=overlong, eot_id=eot_id)
                if fitted is None:
                    counts["dropped_overlong" if overlong == "drop" else "dropped_prompt_too_long"] += 1
                    continue
                counts["truncated"] += fitted.truncated
                counts["dropped_turns"] += fitted.dropped_turns
                counts["trained_turns"] += fitted.turns
                ids_parts.append(np.asarray(fitted.ids, dtype=np.int32))
                mask_parts.append(np.asarray(fitted.mask, dtype=np.uint8))
                prompt_lengths.append(fitted.first_trained)
                lines.append(lineno)
    bar.close()
    lengths = np.asarray([len(x) for x in ids_parts], dtype=np.int64)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    input_ids = np.concatenate(ids_parts) if ids_parts else np.zeros(0, dtype=np.int32)
    loss_mask = np.concatenate(mask_parts) if mask_parts else np.zeros(0, dtype=np.uint8)
    stats = {
        "samples": len(ids_parts),
        **counts,
        "tokens": int(lengths.sum()),
        "answer_tokens": int(loss_mask.sum()),
        "max_sample_tokens": int(lengths.max()) if len(lengths) else 0,
        "train_turns": train_turns,
    }
    return TokenizedDataset(input_ids, offsets, np.asarray(prompt_lengths, dtype=np.int32),
                            np.asarray(lines, dtype=np.int32), stats, loss_mask)


def _save(ds: TokenizedDataset, folder: Path) -> None:
    save_file({"input_ids": ds.input_ids, "offsets": ds.offsets, "prompt_lengths": ds.prompt_lengths,
               "source_lines": ds.source_lines, "loss_mask": ds.loss_mask}, str(folder / "tokens.safetensors"))
    (folder / "meta.json").write_text(json.dumps(ds.stats, indent=2) + "\n", encoding="utf-8")


def _load(folder: Path) -> TokenizedDataset:
    t = load_file(str(folder / "tokens.safetensors"))
    stats = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    return TokenizedDataset(t["input_ids"], t["offsets"], t["prompt_lengths"], t["source_lines"], stats,
                            t["loss_mask"])


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
    train_turns: str = "all",
) -> TokenizedDataset:
    """Tokenised samples of a jsonl file, from the cache when the same inputs were tokenised before.

    `train_turns`: which assistant turns carry loss (``all`` | ``last``, `tokenize_records`).
    Raises TrainingDataError if the file is unusable or if no sample survives the over-length policy.
    """
    path = Path(path)
    if not path.is_file():
        raise TrainingDataError(f"{what} not found: {path}")
    prompt = chat_format.resolve_system_prompt(system_prompt)
    data_sha = sha256_file(path)
    key = cache_key(data_sha256=data_sha, tokenizer=tokenizer, max_length=max_length, overlong=overlong,
                    system_prompt=prompt, max_samples=max_samples, train_turns=train_turns)
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
                              overlong=overlong, system_prompt=prompt, eot_id=eot_id, train_turns=train_turns,
                              desc=f"tokenising {what}")
        n_usable = len(ds) + ds.stats["dropped_overlong"] + ds.stats["dropped_prompt_too_long"]
        _raise_if_unusable(path, read_stats, n_usable, what)
        ds.stats.update(records=read_stats["records"], unusable_records=read_stats["unusable_records"],
                        formats=read_stats["formats"], data_sha256=data_sha, file=str(path), cache_key=key)
        if len(ds):
            with atomic_dir(folder) as tmp:
                _save(ds, tmp)
    s = ds.stats
    logger.info(
        f"{what}: {s['samples']} samples, {s['tokens']} tokens ({s['answer_tokens']} answer, "
        f"{s['trained_turns']} trained turns, {s['train_turns']}); over max_length {max_length}: "
        f"{s['truncated']} truncated, {s['dropped_turns']} turns and "
        f"{s['dropped_overlong'] + s['dropped_prompt_too_long']} samples dropped"
    )
    if len(ds) == 0:
        raise TrainingDataError(
            f"{what} has no usable records after applying max_length={max_length} ({overlong}): {path} "
            f"({s['dropped_overlong'] + s['dropped_prompt_too_long']} samples too long)"
        )
    return ds
