"""Loading a model for inference (merged folder, or base + LoRA adapter) and generating answers.

Rules every caller gets for free:
- prompts are rendered by `hai_medqa.chat_format` and tokenised without added special tokens,
  exactly as in training (`hai_medqa.train.sft_data` tokenises the prompt the same way);
- generation stops at ``[|endofturn|]`` (the tokenizer's id for it, passed explicitly), pads with a
  token distinct from it, and uses the KV cache;
- batches are LEFT padded, so every prompt ends at the same position and the first generated token
  follows the prompt directly (right padding would put pad tokens between prompt and answer);
- greedy decoding by default; a GenerationConfig is built from `GenerationSettings` alone, so the
  checkpoint's own generation_config.json cannot silently change the decoding.
"""

from __future__ import annotations

import gc
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from loguru import logger
from tqdm import tqdm

from hai_medqa.chat_format import EOT, check_tokenizer_template
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

    def generation_config(self, tokenizer):
        """A transformers GenerationConfig that stops at [|endofturn|] and pads with the pad token."""
        from transformers import GenerationConfig

        eos_id, pad_id = special_token_ids(tokenizer)
        kwargs: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": self.do_sample,
            "eos_token_id": eos_id,
            "pad_token_id": pad_id,
            "repetition_penalty": self.repetition_penalty,
            "use_cache": True,
        }
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p)
        else:  # explicit neutral values: no warnings about sampling flags in greedy mode
            kwargs.update(temperature=None, top_p=None, top_k=None)
        return GenerationConfig(**kwargs)


def special_token_ids(tokenizer) -> tuple[int, int]:
    """(eos id = id of [|endofturn|], pad id). Falls back to pad = eos with a warning: harmless for
    left-padded inference (the attention mask hides padding) although training must never do it."""
    eos_id = tokenizer.convert_tokens_to_ids(EOT)
    if eos_id is None or eos_id == tokenizer.unk_token_id:
        raise InferenceError(f"the tokenizer has no {EOT} token; it is not an EXAONE-3.5 tokenizer")
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        logger.warning("tokenizer has no pad token; padding with [|endofturn|] for inference")
        pad_id = eos_id
    return eos_id, pad_id


@dataclass
class LoadedModel:
    """A model ready to generate, its tokenizer (left padding), and how it was loaded (for records)."""

    model: Any
    tokenizer: Any
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def close(self) -> None:
        """Free the model's memory (used between the two models of ``evaluate.py --compare``)."""
        self.model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _resolve_dtype(dtype: str, device: str) -> str:
    if dtype == "auto":
        return "bfloat16" if device.startswith("cuda") else "float32"
    return dtype


def adapter_base(adapter_dir: Path) -> str | None:
    """``base_model_name_or_path`` recorded in an adapter's adapter_config.json (None if absent)."""
    try:
        cfg = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise InferenceError(f"{adapter_dir}/adapter_config.json: cannot read ({e})") from None
    return cfg.get("base_model_name_or_path") or None


def load_for_inference(
    model: str | None,
    adapter: str | None = None,
    *,
    revision: str | None = None,
    quantize_4bit: bool = False,
    dtype: str = "auto",
    device: str | None = None,
    attn_implementation: str | None = "sdpa",
) -> LoadedModel:
    """Load a merged model folder / Hub id, optionally with a LoRA adapter on top, ready to generate.

    `model` follows the project's ``--model`` convention (Hub id or local folder, EXAONE or Llama
    layout; see `hai_medqa.model.acquire.resolve_model`). `adapter` is a PEFT folder or a training run
    folder (its adapter_best/, else adapter_last/). Without `model`, the adapter's recorded base is
    used. The tokenizer comes from the adapter folder when it carries one (that is what training
    used), else from the model.
    """
    from hai_medqa.merge.lora import resolve_adapter_dir
    from hai_medqa.model.acquire import resolve_model
    from hai_medqa.model.load import load_causal_lm, load_tokenizer

    adapter_dir = resolve_adapter_dir(adapter) if adapter else None
    if model is None:
        if adapter_dir is None:
            raise InferenceError("give --model (a merged folder or Hub id) and/or --adapter")
        model = adapter_base(adapter_dir)
        if model is None:
            raise InferenceError(f"{adapter_dir}: adapter_config.json records no base model; pass --model")
        logger.info(f"base model from the adapter's config: {model}")
    device = device or _default_device()
    dtype = _resolve_dtype(dtype, device)
    folder = resolve_model(model, revision)
    tok_source = adapter_dir if adapter_dir is not None and (adapter_dir / "tokenizer_config.json").is_file() else folder
    tokenizer = load_tokenizer(tok_source)
    tokenizer.padding_side = "left"
    for problem in check_tokenizer_template(tokenizer):
        logger.warning(f"tokenizer ({tok_source}): {problem}")
    device_map = {"": device} if (quantize_4bit or device != "cpu") else None
    lm = load_causal_lm(folder, quantize_4bit=quantize_4bit, dtype=dtype, device_map=device_map,
                        attn_implementation=attn_implementation)
    if adapter_dir is not None:
        from peft import PeftModel

        lm = PeftModel.from_pretrained(lm, str(adapter_dir), is_trainable=False)
    lm.eval()
    info = {
        "model": model,
        "revision": revision,
        "adapter": str(adapter_dir) if adapter_dir else None,
        "resolved_model_dir": str(folder),
        "quantize_4bit": quantize_4bit,
        "dtype": dtype,
        "device": device,
        "attn_implementation": attn_implementation,
    }
    logger.info(f"loaded {model}" + (f" + adapter {adapter_dir}" if adapter_dir else "") +
                f" ({'4-bit NF4, ' if quantize_4bit else ''}{dtype}, {device})")
    return LoadedModel(lm, tokenizer, info)


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


@torch.inference_mode()
def generate_ids(
    lm: LoadedModel,
    prompts: Sequence[str],
    settings: GenerationSettings,
    *,
    batch_size: int = 8,
    progress: bool = False,
    stream: Callable[[str], None] | None = None,
) -> list[list[int]]:
    """Generated token ids per rendered prompt (text ending in ``[|assistant|]``), in input order.

    Each list ends with the EOS id when the model stopped by itself (no padding). Prompts are batched
    longest-first (less padding; the order is restored afterwards) and left padded. `stream`
    (one prompt only) receives text pieces as they are generated.
    """
    if not prompts:
        return []
    if batch_size < 1:
        raise InferenceError(f"batch_size must be >= 1, got {batch_size}")
    if stream is not None and len(prompts) != 1:
        raise InferenceError("streaming works on one prompt at a time")
    tokenizer = lm.tokenizer
    tokenizer.padding_side = "left"
    eos_id, _ = special_token_ids(tokenizer)
    gen_config = settings.generation_config(tokenizer)
    encoded = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    results: list[list[int]] = [[] for _ in prompts]
    device = lm.device
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc="generating", unit="batch", disable=not progress):
        enc = tokenizer.pad({"input_ids": [encoded[i] for i in batch]}, padding=True, return_tensors="pt")
        enc = {k: v.to(device) for k, v in enc.items()}
        if settings.do_sample:
            torch.manual_seed(settings.seed)
        streamer = TextSink(tokenizer, stream) if stream is not None else None
        out = lm.model.generate(**enc, generation_config=gen_config, streamer=streamer)
        for i, row in zip(batch, out[:, enc["input_ids"].shape[1] :].tolist(), strict=True):
            # after a row's EOS, generate() fills it with padding until the batch is done: cut there
            results[i] = row[: row.index(eos_id) + 1] if eos_id in row else row
    return results


def generate(
    lm: LoadedModel,
    prompts: Sequence[str],
    settings: GenerationSettings,
    *,
    batch_size: int = 8,
    progress: bool = False,
    stream: Callable[[str], None] | None = None,
) -> list[str]:
    """Answer text per rendered prompt, in input order: `generate_ids` decoded without special
    tokens and stripped of surrounding whitespace."""
    ids = generate_ids(lm, prompts, settings, batch_size=batch_size, progress=progress, stream=stream)
    return [lm.tokenizer.decode(x, skip_special_tokens=True).strip() for x in ids]
