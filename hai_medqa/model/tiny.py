"""Random-weight stand-ins in EXAONE-3.5's own layout, for offline tests, the demo and GPU benchmarks.

`build_tiny_exaone` makes, in about a second on CPU, a checkpoint shaped like the real download:
EXAONE config keys, EXAONE tensor names, several safetensors shards with an index, and a tiny
byte-level BPE tokenizer (trained on the bundled AI Hub sample) carrying EXAONE's special tokens and
chat template. Every later stage is tested from it through the real conversion path.

`build_exaone_checkpoint` emits the real shapes too ("2.4b", "7.8b", "32b"; random bf16), generating
weights tensor by tensor and writing shard by shard, so even the 32B shape never sits in memory whole.

CLI::

    python -m hai_medqa.model.tiny outputs/tiny_exaone            # tiny, untied
    python -m hai_medqa.model.tiny outputs/tiny_tied --tied
    python -m hai_medqa.model.tiny /scratch/exaone78 --shape 7.8b --device cuda --max-shard-gb 4
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from loguru import logger
from safetensors.torch import save_file
from tqdm import tqdm

from hai_medqa.chat_format import EOT, EXAONE_CHAT_TEMPLATE
from hai_medqa.data.sample_builder import SAMPLE_DIR  # noqa: E402 - the bundled sample lives in one place
from hai_medqa.io_utils import atomic_dir, write_json
from hai_medqa.model.exaone_layout import (
    ModelLayoutError,
    exaone_config_to_llama,
    exaone_to_llama_name,
    expected_llama_shapes,
    llama_to_exaone_name,
)

# EXAONE-3.5's special tokens, in id order ([PAD] 0, [BOS] 1 as in the real vocabulary).
SPECIAL_TOKENS = ["[PAD]", "[BOS]", "[EOS]", "[UNK]", "[|system|]", "[|user|]", "[|assistant|]", EOT]
PAD_TOKEN, BOS_TOKEN, UNK_TOKEN = "[PAD]", "[BOS]", "[UNK]"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt")

_EXAONE_COMMON: dict[str, Any] = {
    "activation_function": "silu",
    "architectures": ["ExaoneForCausalLM"],
    "attention_dropout": 0.0,
    "auto_map": {
        "AutoConfig": "configuration_exaone.ExaoneConfig",
        "AutoModelForCausalLM": "modeling_exaone.ExaoneForCausalLM",
    },
    "bos_token_id": 1,
    "embed_dropout": 0.0,
    "eos_token_id": 361,
    "initializer_range": 0.02,
    "layer_norm_epsilon": 1e-05,
    "max_position_embeddings": 32768,
    "model_type": "exaone",
    "num_key_value_heads": 8,
    "pad_token_id": 0,
    "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 1000000.0,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "vocab_size": 102400,
}

# Shapes by name. The 7.8B values mirror the real config.json; 2.4B/32B follow the public configs.
SHAPES: dict[str, dict[str, Any]] = {
    "7.8b": {**_EXAONE_COMMON, "hidden_size": 4096, "num_layers": 32, "num_attention_heads": 32,
             "head_dim": 128, "intermediate_size": 14336, "tie_word_embeddings": False},
    "2.4b": {**_EXAONE_COMMON, "hidden_size": 2560, "num_layers": 30, "num_attention_heads": 32,
             "head_dim": 80, "intermediate_size": 7168, "tie_word_embeddings": True},
    "32b": {**_EXAONE_COMMON, "hidden_size": 5120, "num_layers": 64, "num_attention_heads": 40,
            "head_dim": 128, "intermediate_size": 27392, "tie_word_embeddings": False},
    # Dims bitsandbytes NF4 handles on CPU. rope_theta and the llama3 window are small on purpose so
    # that RoPE scaling changes logits at the short lengths tests use (a dropped factor is visible).
    "tiny": {**_EXAONE_COMMON, "hidden_size": 64, "num_layers": 3, "num_attention_heads": 4,
             "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 128, "tie_word_embeddings": False,
             "max_position_embeddings": 1024, "rope_theta": 1000.0, "torch_dtype": "float32",
             "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                              "original_max_position_embeddings": 32, "rope_type": "llama3"}},
}
# Weight std for random init. The tiny model uses a large one so attention scores are O(1) and RoPE
# (hence any rope mapping mistake) visibly moves the logits; real shapes use initializer_range.
_TINY_INIT_STD = 0.125

_FALLBACK_CORPUS = [
    "두통이 자주 생기는데 어떤 검사를 받아야 하나요?",
    "고혈압 환자는 식이 조절을 어떻게 해야 하나요? 염분 섭취를 줄이고 규칙적으로 운동하세요.",
    "감기에 걸렸을 때 항생제를 먹어야 하나요? 바이러스 감염에는 항생제가 효과가 없습니다.",
    "당뇨병의 초기 증상은 갈증, 잦은 소변, 체중 감소 등이 있습니다.",
    "천식 발작이 오면 흡입기를 사용하고 증상이 지속되면 응급실을 방문하세요.",
    "위염 예방을 위해 자극적인 음식과 과음을 피하는 것이 좋습니다.",
    "Headache, fever and cough are common symptoms. 진료과: 신경과, 내과, 소아청소년과.",
]


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------

def _record_texts(obj: Any) -> list[str]:
    """Human text of an AI Hub question/answer record (not ids or participant codes)."""
    if not isinstance(obj, dict):
        return []
    texts = [obj.get("question"), obj.get("disease_category"), obj.get("intention")]
    for key in ("answer", "disease_name"):
        texts.extend(_strings_in(obj.get(key)))
    texts.extend(_strings_in(obj.get("department")))
    return [t for t in texts if isinstance(t, str) and t.strip()]


def _strings_in(obj: Any) -> Iterator[str]:
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _strings_in(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings_in(v)


def sample_corpus(sample_dir: Path = SAMPLE_DIR) -> list[str]:
    """Text of the bundled AI Hub sample's JSON files (sorted traversal); a small built-in Korean
    medical corpus when the sample is absent or holds no text."""
    texts: list[str] = []
    if sample_dir.is_dir():
        for path in sorted(sample_dir.rglob("*.json")):
            try:
                texts.extend(_record_texts(json.loads(path.read_text(encoding="utf-8-sig"))))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                continue  # tolerate a user-supplied folder with unreadable files
    return texts or list(_FALLBACK_CORPUS)


def build_tokenizer(out_dir: str | Path, *, vocab_size: int = 1024, texts: list[str] | None = None) -> Path:
    """Train a byte-level BPE tokenizer with EXAONE's special tokens and chat template into `out_dir`.

    Writes tokenizer.json, vocab.json + merges.txt, tokenizer_config.json (GPT2Tokenizer class, EOS
    ``[|endofturn|]``, pad ``[PAD]``, chat template) and special_tokens_map.json, like the real repo.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from hai_medqa.chat_format import DEFAULT_SYSTEM_PROMPT

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    corpus = (texts if texts is not None else sample_corpus()) + [DEFAULT_SYSTEM_PROMPT]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.save(str(out_dir / "tokenizer.json"))
    tok.model.save(str(out_dir))  # vocab.json + merges.txt, as the real repo ships them

    added = {str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                        "single_word": False, "special": True} for t in SPECIAL_TOKENS}
    write_json(out_dir / "tokenizer_config.json", {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "bos_token": BOS_TOKEN,
        "chat_template": EXAONE_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOT,
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": PAD_TOKEN,
        "tokenizer_class": "GPT2Tokenizer",
        "unk_token": UNK_TOKEN,
    })
    write_json(out_dir / "special_tokens_map.json", {
        "bos_token": BOS_TOKEN, "eos_token": EOT, "pad_token": PAD_TOKEN, "unk_token": UNK_TOKEN,
    })
    return out_dir


def _tokenizer_size(tokenizer_dir: Path) -> int:
    data = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    ids = list(data["model"]["vocab"].values()) + [t["id"] for t in data.get("added_tokens", [])]
    return max(ids) + 1


def _token_id(tokenizer_dir: Path, token: str) -> int:
    data = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    for t in data.get("added_tokens", []):
        if t["content"] == token:
            return t["id"]
    return data["model"]["vocab"][token]


# ---------------------------------------------------------------------------------------------
# Checkpoint
# ---------------------------------------------------------------------------------------------

def resolve_shape(shape: dict | str) -> dict[str, Any]:
    """An EXAONE config dict for a shape name ("tiny", "2.4b", "7.8b", "32b") or a dict of overrides
    on top of the 7.8B config."""
    if isinstance(shape, str):
        key = shape.lower().removeprefix("exaone-3.5-").removesuffix("-instruct")
        if key not in SHAPES:
            raise ModelLayoutError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
        return copy.deepcopy(SHAPES[key])
    return {**copy.deepcopy(SHAPES["7.8b"]), **copy.deepcopy(shape)}


def _dtype_of(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ModelLayoutError(f"unknown dtype {name!r}")
    return dtype


def build_exaone_checkpoint(
    out_dir: str | Path,
    shape: dict | str = "tiny",
    *,
    tokenizer_dir: str | Path | None = None,
    seed: int = 0,
    max_shard_bytes: int = 4 * 2**30,
    device: str = "cpu",
    dtype: str | None = None,
    tied: bool | None = None,
    init_std: float | None = None,
    norm_noise: float = 0.1,
) -> Path:
    """Write a random-weight checkpoint in EXAONE-3.5's layout to `out_dir` and return it.

    Tensors are generated one at a time (seeded, on `device`) in the real checkpoint's order and
    flushed to a new shard whenever the next one would exceed `max_shard_bytes`, so memory stays near
    one shard. `tokenizer_dir` files are copied in and, for the tiny shape, set the vocabulary size.
    Norm weights are 1 + `norm_noise` * N(0, 1) so a swapped norm is detectable. The folder appears
    atomically (complete or not at all).
    """
    config = resolve_shape(shape)
    if tied is not None:
        config["tie_word_embeddings"] = tied
    if dtype is not None:
        config["torch_dtype"] = dtype
    if tokenizer_dir is not None:
        tokenizer_dir = Path(tokenizer_dir)
        if config["vocab_size"] < _tokenizer_size(tokenizer_dir) or shape == "tiny":
            config["vocab_size"] = _tokenizer_size(tokenizer_dir)
        if shape == "tiny":  # EOS of the tiny vocabulary, not the real id 361
            config["eos_token_id"] = _token_id(tokenizer_dir, EOT)
            config["bos_token_id"] = _token_id(tokenizer_dir, BOS_TOKEN)
            config["pad_token_id"] = _token_id(tokenizer_dir, PAD_TOKEN)
    torch_dtype = _dtype_of(config["torch_dtype"])
    std = init_std if init_std is not None else (_TINY_INIT_STD if shape == "tiny" else config["initializer_range"])
    llama_config = exaone_config_to_llama(config, where=f"shape {shape!r}")
    shapes = expected_llama_shapes(llama_config)
    # The real checkpoint's order: embeddings, layer by layer, final norm, lm_head.
    names = [llama_to_exaone_name(n) for n in shapes]
    names.sort(key=lambda n: (n != "transformer.wte.weight", n.startswith(("transformer.ln_f", "lm_head")),
                              _layer_index(n), n))

    gen = torch.Generator(device=device).manual_seed(seed)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        shard_files: list[list[str]] = []
        current: dict[str, torch.Tensor] = {}
        current_bytes = 0
        total_bytes = 0

        def flush() -> None:
            nonlocal current, current_bytes
            if current:
                save_file(current, str(tmp / f"shard-{len(shard_files)}.tmp"), metadata={"format": "pt"})
                shard_files.append(list(current))
                current, current_bytes = {}, 0

        for name in tqdm(names, desc=f"building EXAONE {shape if isinstance(shape, str) else 'custom'}",
                         unit="tensor", disable=len(names) < 200):
            shp = shapes[exaone_to_llama_name(name)]
            if len(shp) == 1:  # RMSNorm weight
                t = 1.0 + norm_noise * torch.randn(shp, generator=gen, device=device, dtype=torch.float32)
            else:
                t = std * torch.randn(shp, generator=gen, device=device, dtype=torch.float32)
            t = t.to(torch_dtype).cpu().contiguous()
            nbytes = t.numel() * t.element_size()
            if current and current_bytes + nbytes > max_shard_bytes:
                flush()
            current[name] = t
            current_bytes += nbytes
            total_bytes += nbytes
        flush()

        n = len(shard_files)
        weight_map: dict[str, str] = {}
        for i, tensor_names in enumerate(shard_files):
            final = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            (tmp / f"shard-{i}.tmp").rename(tmp / final)
            weight_map.update(dict.fromkeys(tensor_names, final))
        if n > 1:
            write_json(tmp / "model.safetensors.index.json",
                       {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))})
        write_json(tmp / "config.json", dict(sorted(config.items())))  # sorted like the real file
        write_json(tmp / "generation_config.json", {
            "bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"],
            "pad_token_id": config["pad_token_id"],
        })
        if tokenizer_dir is not None:
            for fname in TOKENIZER_FILES:
                if (tokenizer_dir / fname).exists():
                    shutil.copy2(tokenizer_dir / fname, tmp / fname)
        logger.info(f"built random EXAONE-layout checkpoint {out_dir} ({n} shard(s), {total_bytes / 2**20:.1f} MiB)")
    return out_dir


def _layer_index(exaone_name: str) -> int:
    parts = exaone_name.split(".")
    return int(parts[2]) if exaone_name.startswith("transformer.h.") else -1


def build_tiny_exaone(out_dir: str | Path, *, tied: bool = False, seed: int = 0) -> Path:
    """Tiny random EXAONE-layout checkpoint (3 layers, hidden 64) with its tokenizer, in >= 2 shards.

    `tied=True` gives the 2.4B-style variant without ``lm_head.weight``. Deterministic for a seed.
    """
    out_dir = Path(out_dir)
    tok_dir = out_dir.parent / f".{out_dir.name}.tokenizer"
    try:
        build_tokenizer(tok_dir)
        # ~1/3 of the weights per shard: several shards, like the real download.
        return build_exaone_checkpoint(out_dir, "tiny", tokenizer_dir=tok_dir, seed=seed, tied=tied,
                                       max_shard_bytes=160 * 1024)
    finally:
        shutil.rmtree(tok_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    from hai_medqa.logging_setup import setup_logging

    p = argparse.ArgumentParser(
        prog="python -m hai_medqa.model.tiny",
        description="Build a random-weight checkpoint in EXAONE-3.5's layout (tiny with tokenizer, or a real shape).",
    )
    p.add_argument("out_dir", help="folder to create (replaced atomically if it exists)")
    p.add_argument("--shape", default="tiny", help=f"one of: {', '.join(SHAPES)} (default: tiny)")
    p.add_argument("--tied", action="store_true", help="tie embeddings (no lm_head), like the 2.4B model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="where random weights are generated (cuda is much faster)")
    p.add_argument("--max-shard-gb", type=float, default=4.0, help="shard size limit for non-tiny shapes")
    p.add_argument("--tokenizer-dir", help="copy tokenizer files from here (non-tiny shapes)")
    args = p.parse_args(argv)
    setup_logging()
    try:
        if args.shape == "tiny":
            path = build_tiny_exaone(args.out_dir, tied=args.tied, seed=args.seed)
        else:
            path = build_exaone_checkpoint(
                args.out_dir, args.shape, tokenizer_dir=args.tokenizer_dir, seed=args.seed, device=args.device,
                max_shard_bytes=int(args.max_shard_gb * 2**30), tied=True if args.tied else None,
            )
    except (ModelLayoutError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
