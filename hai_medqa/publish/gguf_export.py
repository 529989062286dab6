"""Export a merged model folder to GGUF for llama.cpp, Ollama and LM Studio.

llama.cpp's own tooling does the format work: the `gguf` package (llama.cpp's gguf-py) writes the
file and provides the tensor-name map and its reference quantiser for q8_0; every other llama.cpp
type (q4_k_m, q5_k_m, q6_k, q4_0, ...) is made by llama.cpp's own `llama_model_quantize` through
llama-cpp-python from a lossless intermediate GGUF. Nothing here re-implements a quantiser.

What is written, as llama.cpp's converter does for a Llama checkpoint:

- architecture ``llama``; Q and K projections permuted from Hugging Face's rotate-half order to
  GGML's interleaved RoPE order; llama3 RoPE scaling as the ``rope_freqs`` tensor computed from the
  config's own factors (``rope.freq_base`` = its rope_theta);
- the byte-level BPE vocabulary with pre-tokenizer ``exaone`` (individual digits, then the GPT-2
  split; recognised from tokenizer.json's structure), merges, EOS = ``[|endofturn|]``, pad, no BOS
  added, and the folder's chat template byte for byte.

Memory: tensors are read one at a time from the safetensors shards (seek + read, no memory map) and
written straight to the file, so the process holds about one weight matrix in float32 (plus its
converted copy), whatever the model size; k-quants are made by llama.cpp from the intermediate file
on disk, tensor by tensor.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from loguru import logger
from tqdm import tqdm

from hai_medqa.chat_format import EOT
from hai_medqa.errors import HaiMedQAError
from hai_medqa.merge.engine_config import legacy_rope_keys

# Types the gguf package writes directly (llama.cpp's converter's --outtype choices).
DIRECT_TYPES = ("f32", "f16", "bf16", "q8_0")
# llama.cpp types that need an importance matrix (llama-quantize refuses them without one).
_NEEDS_IMATRIX = ("iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "q2_k_s")
_NOT_FOR_DENSE = ("mxfp4_moe", "nvfp4", "q1_0", "tq1_0", "tq2_0")  # MoE-only or ternary-model-only types
PRE_TOKENIZER_EXAONE = "exaone"
PRE_TOKENIZER_GPT2 = "gpt-2"
GGUF_ARCH = "llama"


class GGUFExportError(HaiMedQAError, ValueError):
    """The GGUF export cannot be done as asked (unknown type, unsupported model or tokenizer)."""


def _gguf():
    try:
        import gguf
    except ImportError:  # pragma: no cover - gguf is in requirements.txt
        raise GGUFExportError("the 'gguf' package is not installed: pip install -r requirements.txt") from None
    return gguf


def known_types() -> list[str]:
    """Every llama.cpp type name `export_gguf` accepts (lower case, as llama-quantize spells them)."""
    gguf = _gguf()
    names = {"f32"} | {m.name.removeprefix("MOSTLY_").lower() for m in gguf.LlamaFileType
                       if m.name.startswith("MOSTLY_")}
    return sorted(n for n in names if n not in _NEEDS_IMATRIX and n not in _NOT_FOR_DENSE)


def parse_gguf_types(spec: str | Sequence[str]) -> list[str]:
    """'f16,q8_0,Q4_K_M' -> ['f16', 'q8_0', 'q4_k_m'] (order kept, duplicates dropped); raises
    GGUFExportError naming the first unknown type and the known ones."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    known = known_types()
    for raw in items:
        name = raw.strip().lower()
        if not name:
            continue
        if name not in known:
            hint = " (needs an importance matrix)" if name in _NEEDS_IMATRIX else ""
            raise GGUFExportError(f"unknown GGUF type {raw.strip()!r}{hint}; known: {', '.join(known)}")
        if name not in out:
            out.append(name)
    if not out:
        raise GGUFExportError("no GGUF type given (e.g. --gguf f16,q8_0,q4_k_m)")
    return out


def _file_type(name: str) -> int:
    gguf = _gguf()
    return int(gguf.LlamaFileType.ALL_F32 if name == "f32" else gguf.LlamaFileType[f"MOSTLY_{name.upper()}"])


def gguf_file_name(basename: str, type_name: str) -> str:
    """'EXAONE-…-HAI-MedQA', 'q4_k_m' -> 'EXAONE-…-HAI-MedQA-Q4_K_M.gguf' (the Hub's usual naming)."""
    return f"{basename}-{type_name.upper()}.gguf"


# ------------------------------------------------------------------------------------------------
# Reading the merged folder
# ------------------------------------------------------------------------------------------------

@dataclass
class SourceModel:
    """A model folder ready to export: its Llama config, tensors in checkpoint order, tokenizer."""

    path: Path
    config: dict
    tensors: list[tuple[str, Any]]  # (Llama name, safetensors TensorInfo)
    tokenizer: dict  # tokenizer.json
    tokenizer_config: dict
    chat_template: str | None


def read_source_model(folder: str | Path) -> SourceModel:
    """Read a merged (or any Llama/EXAONE-layout) folder's config, tensor headers and tokenizer
    files; no weights are loaded. Raises GGUFExportError naming the missing or unsupported part."""
    from hai_medqa.merge.streaming import MergeError, read_base_checkpoint

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise GGUFExportError(f"{folder}: no config.json; expected a merged model folder")
    try:
        ckpt = read_base_checkpoint(folder)
    except MergeError as e:
        raise GGUFExportError(str(e)) from None
    config = ckpt.llama_config
    if config.get("model_type") != "llama":
        raise GGUFExportError(f"{folder}/config.json: model_type {config.get('model_type')!r} is not a Llama model")
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key):
            raise GGUFExportError(f"{folder}/config.json: {key} is set; EXAONE-3.5 has no biases")
    if not (folder / "tokenizer.json").is_file():
        raise GGUFExportError(f"{folder}: no tokenizer.json (the byte-level BPE vocabulary GGUF needs)")
    tokenizer = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    tc_path = folder / "tokenizer_config.json"
    tok_config = json.loads(tc_path.read_text(encoding="utf-8")) if tc_path.is_file() else {}
    template = tok_config.get("chat_template")
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if not isinstance(template, (str, type(None))):
        raise GGUFExportError(f"{folder}: several named chat templates; expected one EXAONE template")
    return SourceModel(folder, config, list(ckpt.tensors.items()), tokenizer, tok_config, template)


# ------------------------------------------------------------------------------------------------
# Tokenizer
# ------------------------------------------------------------------------------------------------

def _is_gpt2_byte_level(pt: dict) -> bool:
    return (pt.get("type") == "ByteLevel" and not pt.get("add_prefix_space", False)
            and pt.get("use_regex", True))


def detect_pre_tokenizer(tokenizer: dict, where: str = "tokenizer.json") -> str:
    """llama.cpp's pre-tokenizer name for a tokenizer.json: ``exaone`` for EXAONE's
    ``Sequence[Digits(individual_digits), ByteLevel]``, ``gpt-2`` for a plain GPT-2 byte-level split.
    Anything else is refused: llama.cpp would split the text differently from training."""
    model = tokenizer.get("model") or {}
    if model.get("type") != "BPE":
        raise GGUFExportError(f"{where}: model type {model.get('type')!r}; expected byte-level BPE")
    pt = tokenizer.get("pre_tokenizer") or {}
    if _is_gpt2_byte_level(pt):
        return PRE_TOKENIZER_GPT2
    parts = pt.get("pretokenizers") if pt.get("type") == "Sequence" else None
    if (parts and len(parts) == 2 and parts[0].get("type") == "Digits" and parts[0].get("individual_digits")
            and _is_gpt2_byte_level(parts[1])):
        return PRE_TOKENIZER_EXAONE
    raise GGUFExportError(f"{where}: pre-tokenizer {json.dumps(pt)[:120]} is neither EXAONE's (digits, then "
                          "GPT-2 byte-level) nor GPT-2's; llama.cpp would tokenise differently from training")


def vocabulary(tokenizer: dict, vocab_size: int, where: str = "tokenizer.json") -> tuple[list[str], list[int]]:
    """(token texts by id, llama.cpp token types) for `vocab_size` rows, as llama.cpp's converter
    lists them: byte-level vocabulary entries NORMAL, special added tokens CONTROL, other added tokens
    USER_DEFINED (raw text), unused embedding rows ``[PAD<id>]`` UNUSED."""
    gguf = _gguf()
    by_id: dict[int, tuple[str, int]] = {}
    for text, i in (tokenizer.get("model") or {}).get("vocab", {}).items():
        by_id[int(i)] = (text, gguf.TokenType.NORMAL)
    for added in tokenizer.get("added_tokens", []):
        kind = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
        by_id[int(added["id"])] = (added["content"], kind)
    if not by_id:
        raise GGUFExportError(f"{where}: empty vocabulary")
    if max(by_id) >= vocab_size:
        raise GGUFExportError(f"{where}: token id {max(by_id)} does not fit the model's {vocab_size} embedding rows")
    texts, types = [], []
    for i in range(vocab_size):
        text, kind = by_id.get(i, (f"[PAD{i}]", gguf.TokenType.UNUSED))
        texts.append(text)
        types.append(int(kind))
    return texts, types


def _token_id(tokenizer: dict, content: str | None) -> int | None:
    if not content:
        return None
    for added in tokenizer.get("added_tokens", []):
        if added.get("content") == content:
            return int(added["id"])
    i = (tokenizer.get("model") or {}).get("vocab", {}).get(content)
    return int(i) if i is not None else None


def _special(tok_config: dict, key: str) -> str | None:
    value = tok_config.get(key)
    return value.get("content") if isinstance(value, dict) else value


def _add_tokenizer(writer, src: SourceModel, vocab_size: int) -> dict[str, Any]:
    gguf = _gguf()
    where = str(src.path / "tokenizer.json")
    pre = detect_pre_tokenizer(src.tokenizer, where)
    normalizer = (src.tokenizer.get("normalizer") or {}).get("type")
    if normalizer not in (None, "NFKC"):
        raise GGUFExportError(f"{where}: normalizer {normalizer!r} is not supported (EXAONE uses NFKC)")
    texts, types = vocabulary(src.tokenizer, vocab_size, where)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(texts)
    writer.add_token_types(types)
    # Merges, in tokenizer.json's either format, through llama.cpp's own reader.
    special = gguf.SpecialVocab(src.path, load_merges=True, special_token_types=(), n_vocab=vocab_size)
    if not special.merges:
        raise GGUFExportError(f"{where}: no BPE merges")
    writer.add_token_merges(special.merges)
    ids = {}
    eos = _token_id(src.tokenizer, EOT)
    if eos is None:
        raise GGUFExportError(f"{where}: no {EOT} token: not an EXAONE tokenizer")
    ids["eos"] = eos
    for kind in ("bos", "unk", "pad"):
        tid = _token_id(src.tokenizer, _special(src.tokenizer_config, f"{kind}_token"))
        if tid is not None:
            ids[kind] = tid
    if ids.get("pad") == eos:
        raise GGUFExportError(f"{where}: pad token equals {EOT}; generation could not tell padding from the end")
    writer.add_eos_token_id(eos)
    writer.add_eot_token_id(eos)  # the end of a turn is the end of generation
    for kind in ("bos", "unk", "pad"):
        if kind in ids:
            getattr(writer, f"add_{kind}_token_id")(ids[kind])
    # EXAONE's template emits no BOS and the tokenizer adds none; say so explicitly (llama.cpp would
    # otherwise decide by itself).
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    if src.chat_template is None:
        raise GGUFExportError(f"{src.path}: no chat template; Ollama and LM Studio need it in the GGUF")
    writer.add_chat_template(src.chat_template)
    return {"pre_tokenizer": pre, "normalizer": normalizer, "token_ids": ids, "tokens": len(texts)}


# ------------------------------------------------------------------------------------------------
# Tensors
# ------------------------------------------------------------------------------------------------

def llama3_rope_factors(config: dict) -> np.ndarray | None:
    """Per-frequency divisors llama.cpp applies for llama3 RoPE scaling (its ``rope_freqs`` tensor),
    from the config's own factors; None without llama3 scaling. Same arithmetic as transformers'
    llama3 rope init and llama.cpp's converter: inv_freq_scaled = inv_freq / factor_i."""
    rope = legacy_rope_keys(config)
    scaling = rope.get("rope_scaling")
    if not scaling:
        return None
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind != "llama3":
        raise GGUFExportError(f"RoPE scaling type {kind!r} is not supported for GGUF export (EXAONE uses llama3)")
    base = float(rope["rope_theta"])
    dim = int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])
    factor = float(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_ctx = float(scaling["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    out = []
    for i in range(0, dim, 2):
        freq = 1.0 / (base ** (i / dim))
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def _permute_qk(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """Hugging Face's rotate-half row order -> GGML's interleaved RoPE order (llama.cpp's converter)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def _tensor_type(gguf_name: str, shape: tuple[int, ...], outtype: str):
    """GGML type of one tensor for a direct `outtype`: norms and rope_freqs stay F32 (as llama.cpp's
    converter keeps them); a q8_0 row length that is not a multiple of the block size falls back to F16."""
    gguf = _gguf()
    q = gguf.GGMLQuantizationType
    if len(shape) < 2 or gguf_name.endswith("_norm.weight") or gguf_name == "rope_freqs.weight" or outtype == "f32":
        return q.F32
    if outtype == "q8_0":
        block = gguf.GGML_QUANT_SIZES[q.Q8_0][0]
        return q.Q8_0 if shape[-1] % block == 0 else q.F16
    return {"f16": q.F16, "bf16": q.BF16}[outtype]


def _encode(data: np.ndarray, qtype) -> np.ndarray:
    gguf = _gguf()
    q = gguf.GGMLQuantizationType
    if qtype == q.F32:
        return np.ascontiguousarray(data, dtype=np.float32)
    if qtype == q.F16:
        return np.ascontiguousarray(data.astype(np.float16))
    return gguf.quants.quantize(np.ascontiguousarray(data, dtype=np.float32), qtype)  # BF16, Q8_0: llama.cpp's own


@dataclass
class _PlannedTensor:
    gguf_name: str
    shape: tuple[int, ...]
    qtype: Any
    source: Any  # safetensors TensorInfo, or an ndarray for computed tensors (rope_freqs)
    permute: tuple[int, int | None] | None = None


def _plan_tensors(src: SourceModel, outtype: str) -> list[_PlannedTensor]:
    gguf = _gguf()
    cfg = src.config
    n_layers = int(cfg["num_hidden_layers"])
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    n_head, n_kv = int(cfg["num_attention_heads"]), int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"])
    plan: list[_PlannedTensor] = []
    factors = llama3_rope_factors(cfg)
    if factors is not None:
        plan.append(_PlannedTensor("rope_freqs.weight", factors.shape, gguf.GGMLQuantizationType.F32, factors))
    for name, info in src.tensors:
        gname = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise GGUFExportError(f"{src.path}: tensor {name} has no llama.cpp name; not a plain Llama checkpoint")
        shape = tuple(info.shape)
        permute = None
        if name.endswith("self_attn.q_proj.weight"):
            permute = (n_head, n_head)
        elif name.endswith("self_attn.k_proj.weight"):
            permute = (n_head, n_kv)
        plan.append(_PlannedTensor(gname, shape, _tensor_type(gname, shape, outtype), info, permute))
    return plan


def _byte_shape(shape: tuple[int, ...], qtype) -> tuple[int, ...]:
    gguf = _gguf()
    q = gguf.GGMLQuantizationType
    if qtype in (q.F32, q.F16):
        return shape
    return gguf.quant_shape_to_byte_shape(shape, qtype)


def _nbytes(shape: tuple[int, ...], qtype) -> int:
    gguf = _gguf()
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    return math.prod(shape[:-1]) * (shape[-1] // block) * type_size


def _read(planned: _PlannedTensor, files: dict[Path, BinaryIO], stack: contextlib.ExitStack) -> np.ndarray:
    from hai_medqa.merge.safetensors_stream import read_tensor

    if isinstance(planned.source, np.ndarray):
        return planned.source
    info = planned.source
    f = files.get(info.file)
    if f is None:
        f = files[info.file] = stack.enter_context(open(info.file, "rb"))  # noqa: SIM115
    data = read_tensor(info, f).float().numpy()  # bf16/f16 -> f32 exactly
    if planned.permute is not None:
        data = _permute_qk(data, *planned.permute)
    return data


def _metadata(writer, src: SourceModel, outtype: str, name: str) -> dict:
    gguf = _gguf()
    cfg = src.config
    rope = legacy_rope_keys(cfg)
    head_dim = int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_license("other")
    writer.add_license_name("exaone")
    writer.add_license_link("LICENSE")
    writer.add_context_length(int(cfg["max_position_embeddings"]))
    writer.add_embedding_length(int(cfg["hidden_size"]))
    writer.add_block_count(int(cfg["num_hidden_layers"]))
    writer.add_feed_forward_length(int(cfg["intermediate_size"]))
    writer.add_head_count(int(cfg["num_attention_heads"]))
    writer.add_head_count_kv(int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"]))
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(cfg["rms_norm_eps"]))
    writer.add_vocab_size(int(cfg["vocab_size"]))
    writer.add_file_type(_file_type(outtype))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    return {"rope_theta": rope.get("rope_theta"), "rope_scaling": rope.get("rope_scaling"), "head_dim": head_dim}


def write_gguf(src: SourceModel, dest: str | Path, outtype: str, *, name: str, progress: bool = True) -> dict:
    """Write `src` as one GGUF file of a direct type (f32, f16, bf16, q8_0) at `dest`, tensor by
    tensor. Returns what was written (types, tokenizer facts) for the release record."""
    gguf = _gguf()
    if outtype not in DIRECT_TYPES:
        raise GGUFExportError(f"{outtype!r} is not written directly; use export_gguf")
    dest = Path(dest)
    plan = _plan_tensors(src, outtype)
    writer = gguf.GGUFWriter(path=None, arch=GGUF_ARCH)
    facts = _metadata(writer, src, outtype, name)
    facts["tokenizer"] = _add_tokenizer(writer, src, int(src.config["vocab_size"]))
    for t in plan:
        byte_shape = _byte_shape(t.shape, t.qtype)
        dtype = {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16}.get(
            t.qtype, np.uint8)
        writer.add_tensor_info(t.gguf_name, byte_shape, np.dtype(dtype), _nbytes(t.shape, t.qtype),
                               raw_dtype=None if dtype is not np.uint8 else t.qtype)
    total = sum(_nbytes(t.shape, t.qtype) for t in plan)
    with contextlib.ExitStack() as stack:
        writer.write_header_to_file(path=dest)
        stack.callback(writer.close)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        files: dict[Path, BinaryIO] = {}
        bar = stack.enter_context(tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                                       desc=f"GGUF {outtype}", leave=False, disable=not progress))
        for t in plan:
            data = _encode(_read(t, files, stack), t.qtype)
            writer.write_tensor_data(data)
            bar.update(data.nbytes)
            del data
    counts: dict[str, int] = {}
    for t in plan:
        counts[t.qtype.name] = counts.get(t.qtype.name, 0) + 1
    facts["tensor_types"] = dict(sorted(counts.items()))
    return facts


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise GGUFExportError(
            "k-quants and the other llama.cpp types are made by llama.cpp's own quantiser through "
            "llama-cpp-python, which is not installed: `pip install llama-cpp-python` (or "
            "`bash .ci/build_llama_cpp.sh` for the portable CPU build CI uses); f32, f16, bf16 and q8_0 "
            "need only the gguf package") from None
    return llama_cpp


def quantize_gguf(src: str | Path, dest: str | Path, type_name: str, *, threads: int | None = None) -> None:
    """Quantise a GGUF file with llama.cpp's own `llama_model_quantize` (as `llama-quantize` does)."""
    llama_cpp = _llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = _file_type(type_name)
    params.nthread = threads or os.cpu_count() or 1
    params.allow_requantize = False
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dest).encode(), ctypes.byref(params))
    if rc != 0 or not Path(dest).is_file():
        raise GGUFExportError(f"llama.cpp could not quantise {Path(src).name} to {type_name} (code {rc})")


def _lossless_type(src: SourceModel) -> str:
    """The direct type that holds the source weights exactly (input to llama.cpp's quantiser)."""
    dtypes = {info.dtype for _, info in src.tensors if len(info.shape) == 2}
    if dtypes <= {"BF16"}:
        return "bf16"
    if dtypes <= {"F16"}:
        return "f16"
    return "f32"


@contextlib.contextmanager
def _partial(path: Path) -> Iterator[Path]:
    """A hidden temporary name beside `path`, renamed to it only on success."""
    tmp = path.with_name(f".{path.name}.partial")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def export_gguf(model_dir: str | Path, out_dir: str | Path, types: str | Sequence[str], *, basename: str,
                progress: bool = True) -> list[dict]:
    """Write one GGUF file per type into the existing folder `out_dir` (``<basename>-<TYPE>.gguf``).

    f32/f16/bf16/q8_0 are written directly from the safetensors shards; other llama.cpp types are
    quantised by llama.cpp from a lossless intermediate GGUF (kept only when asked for as well).
    Returns one record per file: name, type, bytes, tensor types, tokenizer facts.
    """
    type_list = parse_gguf_types(types)
    src = read_source_model(model_dir)
    out_dir = Path(out_dir)
    needs_quantizer = [t for t in type_list if t not in DIRECT_TYPES]
    if needs_quantizer:
        _llama_cpp()  # refuse before writing anything
    records: list[dict] = []
    facts_by_type: dict[str, dict] = {}
    for t in [t for t in type_list if t in DIRECT_TYPES]:
        path = out_dir / gguf_file_name(basename, t)
        logger.info(f"writing {path.name}")
        with _partial(path) as tmp:
            facts_by_type[t] = write_gguf(src, tmp, t, name=basename, progress=progress)
        records.append({"file": path.name, "type": t, "bytes": path.stat().st_size, **facts_by_type[t]})
    if needs_quantizer:
        lossless = _lossless_type(src)
        inter = out_dir / gguf_file_name(basename, lossless)
        keep = lossless in type_list
        ctx = contextlib.nullcontext(inter) if keep else _scratch(out_dir / f".{basename}.intermediate.gguf")
        with ctx as inter_path:
            if not keep:
                logger.info(f"writing a {lossless} intermediate for llama.cpp's quantiser")
                facts_by_type[lossless] = write_gguf(src, inter_path, lossless, name=basename, progress=progress)
            for t in needs_quantizer:
                path = out_dir / gguf_file_name(basename, t)
                logger.info(f"quantising {path.name} with llama.cpp")
                with _partial(path) as tmp:
                    quantize_gguf(inter_path, tmp, t)
                records.append({"file": path.name, "type": t, "bytes": path.stat().st_size,
                                "quantized_from": lossless, "tokenizer": facts_by_type[lossless]["tokenizer"]})
    order = {t: i for i, t in enumerate(type_list)}
    return sorted(records, key=lambda r: order[r["type"]])


@contextlib.contextmanager
def _scratch(path: Path) -> Iterator[Path]:
    try:
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
