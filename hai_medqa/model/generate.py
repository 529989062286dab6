"""Generating answers with a loaded model, shared by training's sample answers and chat/evaluation.

Rules every caller gets for free:
- prompts are rendered by `hai_medqa.chat_format` and tokenised without added special tokens,
  exactly as in training;
- generation stops at ``[|endofturn|]`` (the tokenizer's id for it, passed explicitly), pads with a
  token distinct from it, and uses the KV cache;
- batches are LEFT padded, so every prompt ends at the same position and the first generated token
  follows the prompt directly (right padding would put pad tokens between prompt and answer);
- greedy decoding by default; a GenerationConfig is built from `GenerationSettings` alone, so the
  checkpoint's own generation_config.json cannot silently change the decoding;
- an optional `stop()` (training's signal flag) ends generation at the next token and starts no
  further batch; the batch it cut is not returned (its answers are incomplete).

Loading (merged folder, or base + adapter) is the inference stage's (`hai_medqa.inference.generation`).
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from tqdm import tqdm

from hai_medqa.chat_format import ChatTokenIds, apply_tokenizer_rule
from hai_medqa.errors import HaiMedQAError


class InferenceError(HaiMedQAError, ValueError):
    """A user-fixable problem loading a model or generating (bad flags, missing folders, inputs)."""


@dataclass
class GenerationSettings:
    """Decoding settings; recorded verbatim in outputs (eval_results.json ``generation``).

    ``temperature == 0`` means greedy decoding (the default, for reproducibility); top_p only applies
    when sampling. ``seed`` seeds torch before each generate call, so sampled runs repeat too.
    """

    max_new_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise InferenceError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise InferenceError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InferenceError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise InferenceError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @property
    def do_sample(self) -> bool:
        return self.temperature > 0

    def to_dict(self) -> dict[str, Any]:
        """Settings plus the derived decoding mode, for results files."""
        return {**asdict(self), "do_sample": self.do_sample}

    def generation_config(self, tokens: ChatTokenIds | Any):
        """A transformers GenerationConfig that stops at [|endofturn|] and pads with the pad token.

        `tokens`: the ids of `chat_token_ids` (or a tokenizer, whose ids are looked up here)."""
        from transformers import GenerationConfig

        ids = tokens if isinstance(tokens, ChatTokenIds) else chat_token_ids(tokens)
        kwargs: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": self.do_sample,
            "eos_token_id": ids.eot_id,
            "pad_token_id": ids.pad_id,
            "repetition_penalty": self.repetition_penalty,
            "use_cache": True,
        }
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p)
        else:  # explicit neutral values: no warnings about sampling flags in greedy mode
            kwargs.update(temperature=None, top_p=None, top_k=None)
        return GenerationConfig(**kwargs)


def chat_token_ids(tokenizer, source: str = "the tokenizer") -> ChatTokenIds:
    """The project's one tokenizer rule (`chat_format.apply_tokenizer_rule`) as inference applies it:
    [|endofturn|] must exist and padding must use another token (else a ChatFormatError naming
    `source`); a chat template that differs from `chat_format.render` is only warned about, since
    prompts are rendered by chat_format, never by the template."""
    return apply_tokenizer_rule(tokenizer, source=source, repair_template=False)


@dataclass
class LoadedModel:
    """A model ready to generate, its tokenizer (left padding), and how it was loaded (for records)."""

    model: Any
    tokenizer: Any
    info: dict[str, Any] = field(default_factory=dict)
    token_ids: ChatTokenIds | None = None

    def __post_init__(self) -> None:
        if self.token_ids is None:
            self.token_ids = chat_token_ids(self.tokenizer)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def max_positions(self) -> int | None:
        """The longest sequence (prompt + answer) the model takes: its config's max_position_embeddings."""
        config = getattr(self.model, "config", None)
        value = getattr(config, "max_position_embeddings", None)
        return int(value) if value else None

    def close(self) -> None:
        """Free the model's memory (used between the two models of ``evaluate.py --compare``)."""
        self.model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


class TextSink:
    """A transformers streamer that writes decoded text as it is generated (batch size 1).

    Decodes all generated ids each step and emits only the new suffix, holding back a trailing
    U+FFFD: byte-level BPE can split one Hangul syllable (3 UTF-8 bytes) over several tokens.
    """

    def __init__(self, tokenizer, write: Callable[[str], None]):
        self.tokenizer = tokenizer
        self.write = write
        self._ids: list[int] = []
        self._emitted = 0
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate() first hands over the prompt
            self._prompt_seen = True
            return
        self._ids.extend(value.reshape(-1).tolist())
        text = self.tokenizer.decode(self._ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return
        self._flush(text)

    def end(self) -> None:
        self._flush(self.tokenizer.decode(self._ids, skip_special_tokens=True))

    def _flush(self, text: str) -> None:
        if len(text) > self._emitted:
            self.write(text[self._emitted :])
            self._emitted = len(text)


def stop_criteria(stop: Callable[[], bool]):
    """A transformers StoppingCriteriaList that ends every row at the next token once `stop()` is true
    (checked once per generated token, on the host: a flag read, no device sync of its own)."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class _StopWhen(StoppingCriteria):
        def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
            # transformers ANDs "not done" per row: a bool per row, all True ends the batch
            return torch.full((input_ids.shape[0],), bool(stop()), device=input_ids.device, dtype=torch.bool)

    return StoppingCriteriaList([_StopWhen()])


def batch_plan(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Which prompts go together: longest first (less padding), `batch_size` per batch.

    A pure function of the prompt lengths, so a resumed run rebuilds exactly the batches of the
    first run (batch composition can move low-order bits of the logits; greedy answers stay equal).

    >>> batch_plan([3, 9, 5, 9], 2)
    [[1, 3], [2, 0]]
    """
    if batch_size < 1:
        raise InferenceError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@torch.inference_mode()
def iter_generate_ids(
    lm: LoadedModel,
    prompts: Sequence[str],
    settings: GenerationSettings,
    *,
    batch_size: int = 8,
    skip: Callable[[int], bool] | None = None,
    progress: bool = False,
    stream: Callable[[str], None] | None = None,
    stop: Callable[[], bool] | None = None,
) -> Iterator[list[tuple[int, list[int]]]]:
    """Generate batch by batch (`batch_plan`), yielding ``[(prompt index, generated ids), ...]`` per batch.

    Each id list ends with the EOS id when the model stopped by itself (no padding). Batches whose
    every prompt `skip` accepts are not generated (a resumed run); a batch with any prompt left is
    generated whole, so its answers are those of an uninterrupted run. `stream` (one prompt only)
    receives text pieces as they are generated. `stop` (e.g. training's "a signal arrived"): checked
    before each batch and after every generated token; once true the iteration ends without yielding
    the batch it cut short, so whatever was yielded is complete (callers ask `stop()` themselves
    whether everything was answered).
    """
    if not prompts:
        return
    if stream is not None and len(prompts) != 1:
        raise InferenceError("streaming works on one prompt at a time")
    tokenizer = lm.tokenizer
    tokenizer.padding_side = "left"
    eos_id = lm.token_ids.eot_id
    gen_config = settings.generation_config(lm.token_ids)
    encoded = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    batches = batch_plan([len(e) for e in encoded], batch_size)
    todo = [b for b in batches if skip is None or not all(skip(i) for i in b)]
    device = lm.device
    criteria = stop_criteria(stop) if stop is not None else None
    for batch in tqdm(todo, desc="generating", unit="batch", disable=not progress):
        if stop is not None and stop():
            return
        enc = tokenizer.pad({"input_ids": [encoded[i] for i in batch]}, padding=True, return_tensors="pt")
        enc = {k: v.to(device) for k, v in enc.items()}
        if settings.do_sample:
            torch.manual_seed(settings.seed)
        streamer = TextSink(tokenizer, stream) if stream is not None else None
        out = lm.model.generate(**enc, generation_config=gen_config, streamer=streamer, stopping_criteria=criteria)
        if stop is not None and stop():  # cut short (or may have been): not a complete answer
            return
        rows = out[:, enc["input_ids"].shape[1] :].tolist()
        # after a row's EOS, generate() fills it with padding until the batch is done: cut there
        yield [(i, row[: row.index(eos_id) + 1] if eos_id in row else row) for i, row in zip(batch, rows, strict=True)]


def generate_ids(
    lm: LoadedModel,
    prompts: Sequence[str],
    settings: GenerationSettings,
    *,
    batch_size: int = 8,
    progress: bool = False,
    stream: Callable[[str], None] | None = None,
    stop: Callable[[], bool] | None = None,
) -> list[list[int]]:
    """Generated token ids per rendered prompt (text ending in ``[|assistant|]``), in input order
    (`iter_generate_ids` collected; prompts batched longest-first and left padded). With `stop`, a
    prompt left unanswered when it turned true gets ``[]`` (a finished answer has at least one id)."""
    if batch_size < 1:
        raise InferenceError(f"batch_size must be >= 1, got {batch_size}")
    results: list[list[int]] = [[] for _ in prompts]
    for batch in iter_generate_ids(lm, prompts, settings, batch_size=batch_size, progress=progress, stream=stream,
                                   stop=stop):
        for i, ids in batch:
            results[i] = ids
    return results


def decode_answer(lm: LoadedModel, ids: Sequence[int]) -> str:
    """An answer's text: generated ids decoded without special tokens, surrounding whitespace stripped."""
    return lm.tokenizer.decode(list(ids), skip_special_tokens=True).strip()


def generate(
    lm: LoadedModel,
    prompts: Sequence[str],
    settings: GenerationSettings,
    *,
    batch_size: int = 8,
    progress: bool = False,
    stream: Callable[[str], None] | None = None,
    stop: Callable[[], bool] | None = None,
) -> list[str]:
    """Answer text per rendered prompt, in input order: `generate_ids` decoded by `decode_answer`
    (with `stop`: see `generate_ids`; check `stop()` afterwards to know whether all were answered)."""
    ids = generate_ids(lm, prompts, settings, batch_size=batch_size, progress=progress, stream=stream, stop=stop)
    return [decode_answer(lm, x) for x in ids]
