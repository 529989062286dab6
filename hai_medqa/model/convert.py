"""Exact, streaming conversion between EXAONE-3.5's checkpoint layout and Llama's, plus the cache.

A conversion only renames tensors, so it never decodes them: each safetensors shard is rewritten as
a new header (renamed keys, same dtypes/shapes/offsets) followed by the source's tensor bytes copied
in fixed-size chunks. Tensor data is therefore byte-identical by construction and peak memory stays
at one copy buffer - far below one shard - whatever the model size (bench/convert_memory.py).

Everything is checked before a byte is written (config keys, tensor names, shapes against the
config, shards listed in the index, truncated shards) and the output folder appears atomically, so
a failed or killed conversion leaves nothing behind.

`ensure_llama_checkpoint` is what the rest of the project calls: a Llama folder passes through
untouched, an EXAONE folder is converted once into ``$HAI_MEDQA_CACHE/converted`` (default
``~/.cache/hai_medqa/converted``) under a key derived from the source's identity.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import struct
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loguru import logger
from tqdm import tqdm

from hai_medqa.io_utils import atomic_dir, exclusive_lock, sha256_text, write_json
from hai_medqa.model.exaone_layout import (
    DEFAULT_EXAONE_CODE_REPO,
    EXAONE_MODEL_TYPE,
    LLAMA_MODEL_TYPE,
    ModelLayoutError,
    detect_layout,
    exaone_config_to_llama,
    exaone_to_llama_name,
    expected_llama_shapes,
    is_derived_buffer,
    llama_config_to_exaone,
    llama_to_exaone_name,
)

CONVERTER_VERSION = 1  # bump when the output of a conversion changes: invalidates cached copies
RECORD_FILE = "hai_medqa_conversion.json"
INDEX_FILE = "model.safetensors.index.json"
# Files copied unchanged next to the converted weights (never code: *.py is not copied).
COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                "added_tokens.json", "chat_template.jinja", "chat_template.json", "generation_config.json")
COPIED_GLOBS = ("LICENSE*", "NOTICE*")
PICKLE_GLOBS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
_COPY_CHUNK = 16 * 2**20
_MAX_HEADER = 100 * 2**20  # safetensors' own limit; a larger "header" means a corrupt file
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
                "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


@dataclass
class TensorInfo:
    """Where one tensor's bytes live inside a safetensors shard."""

    name: str
    dtype: str
    shape: list[int]
    begin: int  # offsets relative to the start of the data section
    end: int


@dataclass
class Shard:
    """A parsed safetensors header."""

    path: Path
    data_start: int
    tensors: list[TensorInfo]
    metadata: dict[str, str] | None = None


@dataclass
class Checkpoint:
    """A checkpoint folder: its config.json, shards and (optional) index."""

    folder: Path
    config: dict[str, Any]
    shards: list[Shard]
    index: dict[str, Any] | None = None
    weight_map: dict[str, str] = field(default_factory=dict)  # tensor name -> shard file name


# ---------------------------------------------------------------------------------------------
# Reading and validating
# ---------------------------------------------------------------------------------------------

def read_config(folder: str | Path) -> dict[str, Any]:
    """config.json of a checkpoint folder; ModelLayoutError if missing or not a JSON object."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelLayoutError(f"{folder}: not a folder")
    path = folder / "config.json"
    if not path.is_file():
        raise ModelLayoutError(f"{path}: missing (a checkpoint folder needs config.json)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLayoutError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ModelLayoutError(f"{path}: expected a JSON object")
    return config


def read_safetensors_header(path: Path) -> Shard:
    """Parse a safetensors header without touching tensor data; checks the file is long enough."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) != 8:
                raise ModelLayoutError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", raw_len)
            if n > _MAX_HEADER or n + 8 > size:
                raise ModelLayoutError(f"{path}: not a safetensors file (header length {n} is impossible)")
            header = json.loads(f.read(n))
    except OSError as e:
        raise ModelLayoutError(f"{path}: cannot read ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ModelLayoutError(f"{path}: corrupt safetensors header") from None
    metadata = header.pop("__metadata__", None)
    tensors = []
    for name, info in header.items():
        try:
            begin, end = (int(x) for x in info["data_offsets"])
            tensors.append(TensorInfo(name, str(info["dtype"]), [int(d) for d in info["shape"]], begin, end))
        except (KeyError, TypeError, ValueError):
            raise ModelLayoutError(f"{path}: corrupt safetensors header entry for {name!r}") from None
    tensors.sort(key=lambda t: t.begin)
    data_start = 8 + n
    data_len = max((t.end for t in tensors), default=0)
    if data_start + data_len > size:
        raise ModelLayoutError(
            f"{path}: truncated (header promises {data_len} bytes of tensor data, file holds {size - data_start})"
        )
    return Shard(path, data_start, tensors, metadata)


def find_weight_files(folder: Path) -> tuple[list[Path], dict[str, Any] | None]:
    """The safetensors shards of a folder (from the index when there is one) and the parsed index.

    Refuses pickle-only checkpoints (``*.bin``/``*.pt``): loading them can execute arbitrary code.
    """
    index_path = folder / INDEX_FILE
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
            weight_map = index["weight_map"]
            assert isinstance(weight_map, dict)
        except (json.JSONDecodeError, KeyError, AssertionError, UnicodeDecodeError):
            raise ModelLayoutError(f"{index_path}: not a valid safetensors index (needs a 'weight_map' object)") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (folder / f).is_file()]
        if missing:
            raise ModelLayoutError(f"{index_path}: lists shard {missing[0]!r}, which is missing from {folder}"
                                   + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        return [folder / f for f in files], index
    files = sorted(folder.glob("*.safetensors"))
    files = [f for f in files if not f.name.startswith("adapter_")]
    if files:
        return files, None
    pickles = sorted(p.name for g in PICKLE_GLOBS for p in folder.glob(g))
    if pickles:
        raise ModelLayoutError(
            f"{folder}: only pickle weights ({', '.join(pickles[:3])}); refusing to load them (they can run code). "
            "Use a revision with *.safetensors weights"
        )
    raise ModelLayoutError(f"{folder}: no *.safetensors weights found")


def read_checkpoint(folder: str | Path) -> Checkpoint:
    """Parse config.json, the index and every shard header of `folder` (no tensor data is read)."""
    folder = Path(folder)
    config = read_config(folder)
    files, index = find_weight_files(folder)
    shards = [read_safetensors_header(p) for p in files]
    weight_map: dict[str, str] = {}
    for shard in shards:
        for t in shard.tensors:
            if t.name in weight_map:
                raise ModelLayoutError(f"{folder}: tensor {t.name!r} appears in both {weight_map[t.name]} and {shard.path.name}")
            weight_map[t.name] = shard.path.name
    if index is not None:
        for name, fname in sorted(index["weight_map"].items()):
            if weight_map.get(name) != fname:
                raise ModelLayoutError(f"{folder / INDEX_FILE}: lists {name!r} in {fname}, but {fname} does not contain it")
    return Checkpoint(folder, config, shards, index, weight_map)


def _validate_tensors(ckpt: Checkpoint, rename: Callable[[str], str], llama_config: Mapping[str, Any],
                      source_is_llama: bool) -> None:
    """Every source tensor must map to a known name with the shape the config implies, every expected
    tensor must be present, and byte sizes must agree with dtype x shape."""
    try:
        expected = expected_llama_shapes(llama_config)
    except KeyError as e:
        raise ModelLayoutError(f"{ckpt.folder / 'config.json'}: missing required key {e}") from None
    seen: set[str] = set()
    for shard in ckpt.shards:
        for t in shard.tensors:
            if is_derived_buffer(t.name):
                continue
            try:
                target = rename(t.name)
            except ModelLayoutError as e:
                raise ModelLayoutError(f"{shard.path}: {e}") from None
            llama_name = t.name if source_is_llama else target
            want = expected.get(llama_name)
            if want is None and llama_name == "lm_head.weight":  # tied checkpoint that still ships lm_head
                want = expected["model.embed_tokens.weight"]
            if want is None:  # e.g. layer index >= num_layers
                raise ModelLayoutError(f"{shard.path}: tensor {t.name!r} does not fit config.json "
                                       f"({llama_config['num_hidden_layers']} layers)")
            if tuple(t.shape) != tuple(want):
                raise ModelLayoutError(f"{shard.path}: tensor {t.name!r} has shape {list(t.shape)}, "
                                       f"config.json implies {list(want)}")
            width = _DTYPE_BYTES.get(t.dtype)
            if width is None:
                raise ModelLayoutError(f"{shard.path}: tensor {t.name!r} has unsupported dtype {t.dtype}")
            n = 1
            for d in t.shape:
                n *= d
            if t.end - t.begin != n * width:
                raise ModelLayoutError(f"{shard.path}: tensor {t.name!r} byte range does not match its shape/dtype")
            seen.add(llama_name)
    missing = sorted(set(expected) - seen)
    if missing:
        shown = [llama_to_exaone_name(m) if not source_is_llama else m for m in missing[:3]]
        raise ModelLayoutError(f"{ckpt.folder}: missing tensor(s) {', '.join(shown)}"
                               + (f" and {len(missing) - 3} more" if len(missing) > 3 else ""))


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------

def _rewrite_shard(shard: Shard, out_path: Path, rename: Callable[[str], str]) -> int:
    """Write `shard` to `out_path` with renamed tensors; tensor bytes are copied, never decoded.
    Returns the number of tensor bytes written."""
    kept = [t for t in shard.tensors if not is_derived_buffer(t.name)]
    header: dict[str, Any] = {"__metadata__": shard.metadata or {"format": "pt"}}
    offset = 0
    for t in kept:
        size = t.end - t.begin
        header[rename(t.name)] = {"dtype": t.dtype, "shape": t.shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # keep the data section 8-byte aligned, as safetensors does
    buffer = memoryview(bytearray(_COPY_CHUNK))  # one reused buffer: memory stays flat
    with open(shard.path, "rb", buffering=0) as src, open(out_path, "wb", buffering=0) as dst:
        dst.write(struct.pack("<Q", len(raw)) + raw)
        contiguous = all(a.end == b.begin for a, b in zip(kept, kept[1:], strict=False))
        spans = [(kept[0].begin, kept[-1].end)] if kept and contiguous else [(t.begin, t.end) for t in kept]
        for begin, end in spans:
            src.seek(shard.data_start + begin)
            remaining = end - begin
            while remaining:
                n = src.readinto(buffer[: min(_COPY_CHUNK, remaining)])
                if not n:
                    raise ModelLayoutError(f"{shard.path}: truncated while copying")
                written = 0
                while written < n:  # raw writes may be partial
                    written += dst.write(buffer[written:n])
                remaining -= n
        os.fsync(dst.fileno())
    return offset


def _copy_side_files(src: Path, dst: Path) -> list[str]:
    copied = []
    names = {p.name for g in COPIED_GLOBS for p in src.glob(g) if p.is_file()} | {
        n for n in COPIED_FILES if (src / n).is_file()}
    for name in sorted(names):
        shutil.copy2(src / name, dst / name)
        copied.append(name)
    return copied


def _check_destination(src: Path, dst: Path, overwrite: bool) -> None:
    if dst.resolve() == src.resolve():
        raise ModelLayoutError(f"{dst}: output folder must differ from the input folder")
    if dst.exists() and any(dst.iterdir()) and not overwrite:
        raise ModelLayoutError(f"{dst}: already exists and is not empty (pass overwrite=True / --overwrite)")


def _convert(src: Path, dst: Path, *, direction: str, target_config: dict[str, Any], ckpt: Checkpoint,
             rename: Callable[[str], str], record_extra: dict[str, Any]) -> Path:
    total_shards = len(ckpt.shards)
    with atomic_dir(dst) as tmp:
        total = 0
        new_map: dict[str, str] = {}
        for shard in tqdm(ckpt.shards, desc=f"converting {direction}", unit="shard", disable=total_shards < 2):
            total += _rewrite_shard(shard, tmp / shard.path.name, rename)
            new_map.update({rename(t.name): shard.path.name for t in shard.tensors if not is_derived_buffer(t.name)})
        if ckpt.index is not None:
            metadata = dict(ckpt.index.get("metadata") or {})
            metadata["total_size"] = total
            write_json(tmp / INDEX_FILE, {"metadata": metadata, "weight_map": dict(sorted(new_map.items()))})
        write_json(tmp / "config.json", target_config)
        copied = _copy_side_files(src, tmp)
        write_json(tmp / RECORD_FILE, {
            "converter": "hai_medqa.model.convert",
            "converter_version": CONVERTER_VERSION,
            "direction": direction,
            "source": str(src.resolve()),
            **record_extra,
            "source_config": ckpt.config,
            "shards": {s.path.name: (tmp / s.path.name).stat().st_size for s in ckpt.shards},
            "copied_files": copied,
        })
    logger.info(f"converted {direction}: {src} -> {dst} ({total_shards} shard(s), {total / 2**30:.2f} GiB)")
    return dst


def convert_exaone_to_llama(src: str | Path, dst: str | Path, *, overwrite: bool = False,
                            source_id: str | None = None) -> Path:
    """Convert an EXAONE-3.5-layout checkpoint folder into a Llama-layout folder at `dst`.

    The result loads with ``AutoModelForCausalLM.from_pretrained(dst)`` and no remote code. Tokenizer
    files, generation_config.json and LICENSE are copied unchanged; ``hai_medqa_conversion.json``
    records the source and its original config. Raises ModelLayoutError for any bad input.
    """
    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    ckpt = read_checkpoint(src)
    where = str(src / "config.json")
    layout = detect_layout(ckpt.config, where)
    if layout != EXAONE_MODEL_TYPE:
        raise ModelLayoutError(f"{where}: expected an EXAONE-3.5 checkpoint (model_type 'exaone'), found '{layout}'")
    llama_config = exaone_config_to_llama(ckpt.config, where)
    _validate_tensors(ckpt, exaone_to_llama_name, llama_config, source_is_llama=False)
    _check_destination(src, dst, overwrite)
    return _convert(src, dst, direction="exaone->llama", target_config=llama_config, ckpt=ckpt,
                    rename=exaone_to_llama_name, record_extra={"source_id": source_id})


def convert_llama_to_exaone(src: str | Path, dst: str | Path, *, overwrite: bool = False,
                            reference_config: Mapping[str, Any] | str | Path | None = None) -> Path:
    """Convert a Llama-layout folder (e.g. a merged fine-tune) back into EXAONE-3.5's own layout.

    `reference_config` (a dict or a path to the original EXAONE config.json) supplies EXAONE-only
    values and key order; by default it is taken from the folder's ``hai_medqa_conversion.json``
    when the folder came from `convert_exaone_to_llama`.
    """
    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    ckpt = read_checkpoint(src)
    where = str(src / "config.json")
    layout = detect_layout(ckpt.config, where)
    if layout != LLAMA_MODEL_TYPE:
        raise ModelLayoutError(f"{where}: expected a Llama checkpoint (model_type 'llama'), found '{layout}'")
    reference, code_repo = _load_reference(src, reference_config)
    exaone_config = llama_config_to_exaone(ckpt.config, reference, where, code_repo=code_repo)
    _validate_tensors(ckpt, llama_to_exaone_name, ckpt.config, source_is_llama=True)
    _check_destination(src, dst, overwrite)
    return _convert(src, dst, direction="llama->exaone", target_config=exaone_config, ckpt=ckpt,
                    rename=llama_to_exaone_name, record_extra={"reference_config_used": reference is not None})


def _load_reference(src: Path, reference: Mapping[str, Any] | str | Path | None
                    ) -> tuple[dict[str, Any] | None, str]:
    """(original EXAONE config or None, Hub repo whose modeling code the export's auto_map names)."""
    record_data: dict[str, Any] = {}
    record = src / RECORD_FILE
    if record.is_file():
        try:
            record_data = json.loads(record.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            logger.warning(f"{record}: unreadable, exporting without the original EXAONE config")
    source_id = str(record_data.get("source_id") or "")
    code_repo = source_id[4:].split("@")[0] if source_id.startswith("hub:") else DEFAULT_EXAONE_CODE_REPO
    if isinstance(reference, Mapping):
        return dict(reference), code_repo
    if reference is not None:
        ref_path = Path(reference).expanduser()
        ref_path = ref_path / "config.json" if ref_path.is_dir() else ref_path
        try:
            ref = json.loads(ref_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise ModelLayoutError(f"{ref_path}: cannot read reference config ({e})") from None
        if not isinstance(ref, dict) or ref.get("model_type") != EXAONE_MODEL_TYPE:
            raise ModelLayoutError(f"{reference}: reference config is not an EXAONE config")
        return ref, code_repo
    if record_data.get("direction") == "exaone->llama" and isinstance(record_data.get("source_config"), dict):
        return record_data["source_config"], code_repo
    return None, code_repo


# ---------------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------------

def cache_root() -> Path:
    """Root of converted copies: ``$HAI_MEDQA_CACHE/converted`` or ``~/.cache/hai_medqa/converted``."""
    base = os.environ.get("HAI_MEDQA_CACHE")
    return (Path(base).expanduser() if base else Path.home() / ".cache" / "hai_medqa") / "converted"


def local_source_identity(folder: Path) -> str:
    """Identity of a local checkpoint: resolved path, config/index content, shard names, sizes, mtimes.

    Cheap (no hashing of weights) yet changes whenever a shard is replaced or edited.
    """
    folder = folder.resolve()
    parts = [f"local:{folder}", sha256_text((folder / "config.json").read_text(encoding="utf-8"))]
    if (folder / INDEX_FILE).is_file():
        parts.append(sha256_text((folder / INDEX_FILE).read_text(encoding="utf-8")))
    for p in sorted(folder.glob("*.safetensors")):
        st = p.stat()
        parts.append(f"{p.name}:{st.st_size}:{st.st_mtime_ns}")
    return "\n".join(parts)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "--", text).strip("-")[:80] or "model"


def ensure_llama_checkpoint(path: str | Path, *, source_id: str | None = None, name: str | None = None,
                            cache_dir: str | Path | None = None) -> Path:
    """A Llama-layout folder for `path`: the folder itself if it is already Llama, else a cached
    conversion of the EXAONE folder (converted on first use, reused afterwards).

    `source_id` identifies the source for the cache key (e.g. ``hub:<repo>@<commit>``); local folders
    default to `local_source_identity`. `name` labels the cache folder (default: the folder name).
    """
    folder = Path(path).expanduser()
    config = read_config(folder)
    layout = detect_layout(config, str(folder / "config.json"))
    if layout == LLAMA_MODEL_TYPE:
        find_weight_files(folder)  # refuse pickle-only / weightless folders with a clear message
        return folder
    key = source_id or local_source_identity(folder)
    digest = sha256_text(f"v{CONVERTER_VERSION}\n{key}")[:16]
    target = (Path(cache_dir).expanduser() if cache_dir else cache_root()) / f"{_slug(name or folder.name)}-{digest}"
    target.parent.mkdir(parents=True, exist_ok=True)
    # One conversion per target at a time: two runs started together (or side by side on two GPUs) would
    # otherwise both convert, and the later one's rename would fail on, or replace, the folder the earlier
    # one is already loading. The second waits, then finds the first's result.
    with exclusive_lock(target.parent / f".{target.name}.lock",
                        waiting=f"waiting for another process converting into {target}"):
        if (target / RECORD_FILE).is_file() and (target / "config.json").is_file():
            logger.info(f"using cached Llama-layout conversion {target}")
            return target
        logger.info(f"converting EXAONE checkpoint {folder} to Llama layout (cached at {target})")
        return convert_exaone_to_llama(folder, target, overwrite=True, source_id=key)


def _main(argv: list[str] | None = None) -> int:
    from hai_medqa.logging_setup import setup_logging

    p = argparse.ArgumentParser(
        prog="python -m hai_medqa.model.convert",
        description="Convert a checkpoint folder EXAONE-3.5 layout <-> Llama layout (direction from config.json's "
                    "model_type). Exact: tensors are copied byte for byte, shard by shard.",
    )
    p.add_argument("src", help="checkpoint folder (model_type 'exaone' or 'llama')")
    p.add_argument("dst", help="output folder (created atomically)")
    p.add_argument("--reference-config", help="llama->exaone: the original EXAONE config.json to restore")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty dst")
    args = p.parse_args(argv)
    setup_logging()
    layout = detect_layout(read_config(args.src), str(Path(args.src) / "config.json"))
    if layout == EXAONE_MODEL_TYPE:
        out = convert_exaone_to_llama(args.src, args.dst, overwrite=args.overwrite)
    else:
        out = convert_llama_to_exaone(args.src, args.dst, overwrite=args.overwrite,
                                      reference_config=args.reference_config)
    print(out)
    return 0


def main(argv: list[str] | None = None) -> int:
    """CLI: convert a checkpoint folder between EXAONE-3.5 and Llama layouts (direction detected);
    errors and interrupts as every entry point (`hai_medqa.cli.run_cli`)."""
    from hai_medqa.cli import run_cli

    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
