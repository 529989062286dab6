"""Merge a LoRA adapter into its base checkpoint tensor by tensor, without loading the model.

For every base tensor, in checkpoint order: weights the adapter touches are read, get
`scaling * B @ A` added in float32 and are cast back to their stored dtype; every other tensor is
copied byte for byte. Peak memory is about the largest adapted weight in float32 plus the adapter
(the whole model never sits in memory, unlike PEFT's `merge_and_unload`). Everything is checked
before the first byte is written, and the output folder appears only when complete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Literal

import torch
from loguru import logger
from tqdm import tqdm

from hai_medqa.errors import HaiMedQAError
from hai_medqa.io_utils import atomic_dir, sha256_file, write_json
from hai_medqa.merge.engine_config import make_tokenizer_config_portable, with_legacy_rope_keys
from hai_medqa.merge.lora import AdapterError, LoraAdapter, load_adapter, resolve_adapter_dir
from hai_medqa.merge.nf4 import NF4Settings, is_quantized_in_training, nf4_roundtrip
from hai_medqa.merge.safetensors_stream import (
    PlannedTensor,
    SafetensorsFormatError,
    StreamingShardWriter,
    TensorInfo,
    read_tensor,
    tensor_infos,
)
from hai_medqa.model.exaone_layout import (
    ModelLayoutError,
    detect_layout,
    exaone_config_to_llama,
    exaone_to_llama_name,
    is_derived_buffer,
    llama_config_to_exaone,
    llama_to_exaone_name,
)
from hai_medqa.model.identity import hub_reference
from hai_medqa.run_folder import (
    ADAPTER_WEIGHTS,
    MERGE_INFO,
    RUN_INFO,
    find_run_dir,
    package_versions,
)

MergeInto = Literal["original", "nf4"]
Layout = Literal["llama", "exaone"]
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # transformers' default shard size
_FLOAT_DTYPES = {"F32", "F16", "BF16", "F64"}


class MergeError(HaiMedQAError, ValueError):
    """The merge cannot be done as asked (bad base, mismatched adapter, unusable output path)."""


@dataclass
class BaseCheckpoint:
    """A local base model folder: its layout, config and every tensor keyed by its Llama name."""

    path: Path
    layout: str  # "exaone" or "llama", as stored
    config: dict  # config.json as stored
    llama_config: dict
    tensors: dict[str, TensorInfo]  # Llama name -> where the tensor is stored
    stored_names: dict[str, str] = field(default_factory=dict)  # Llama name -> name in the file


@dataclass
class MergeResult:
    """What `merge_adapter` wrote; also saved as merge_info.json in the output folder."""

    output: Path
    info: dict


def read_base_checkpoint(path: str | Path) -> BaseCheckpoint:
    """Read a base folder's config and safetensors headers (no weights) in either layout."""
    from hai_medqa.model.convert import read_checkpoint

    path = Path(path)
    try:
        ckpt = read_checkpoint(path)  # config, index, shard headers; refuses pickle-only folders
        where = str(path / "config.json")
        layout = detect_layout(ckpt.config, where)
        llama_config = exaone_config_to_llama(ckpt.config, where) if layout == "exaone" else dict(ckpt.config)
        to_llama = exaone_to_llama_name if layout == "exaone" else (lambda n: n)
        tensors: dict[str, TensorInfo] = {}
        stored: dict[str, str] = {}
        for shard in ckpt.shards:
            for name, info in tensor_infos(shard).items():
                if is_derived_buffer(name):
                    continue
                llama_name = to_llama(name)
                tensors[llama_name] = info
                stored[llama_name] = name
    except (ModelLayoutError, SafetensorsFormatError) as e:
        raise MergeError(str(e)) from None
    if "model.embed_tokens.weight" not in tensors:
        raise MergeError(f"base {path} has no token embedding: not a complete EXAONE/Llama checkpoint")
    return BaseCheckpoint(path, layout, ckpt.config, llama_config, tensors, stored)


def adapter_weight_to_llama(weight_name: str) -> str | None:
    """Llama name of a weight an adapter was trained on (adapters may use either layout)."""
    if weight_name.startswith("model.") or weight_name == "lm_head.weight":
        return weight_name
    try:
        return exaone_to_llama_name(weight_name)
    except ModelLayoutError:
        return None


def check_adapter_fits(base: BaseCheckpoint, adapter: LoraAdapter) -> None:
    """Refuse an adapter made for another model: unknown modules, wrong shapes, missing modules,
    a tokenizer larger than the base vocabulary. Raises MergeError naming the first problem."""
    where = adapter.path
    tied = bool(base.llama_config.get("tie_word_embeddings", False))
    for name, upd in adapter.updates.items():
        info = base.tensors.get(name)
        if info is None:
            if name == "lm_head.weight" and tied:
                raise MergeError(f"{where}: adapter changes lm_head, but the base ties it to the embeddings")
            raise MergeError(f"{where}: adapter module {upd.module} does not exist in base {base.path}")
        if info.dtype not in _FLOAT_DTYPES or len(info.shape) != 2:
            raise MergeError(f"{where}: adapter module {upd.module} targets a non-linear base tensor {name}")
        out_f, in_f = info.shape
        if upd.b.shape[0] != out_f or upd.a.shape[1] != in_f:
            raise MergeError(
                f"{where}: {upd.module} expects a [{upd.b.shape[0]}, {upd.a.shape[1]}] weight, base has "
                f"[{out_f}, {in_f}]: the adapter was trained on another model"
            )
    # Modules the adapter's own config says it adapts must all have weights (a truncated or edited
    # adapter would otherwise merge silently incomplete). PEFT matches names in the layout the adapter
    # was trained on, so translate before asking it.
    uses_exaone_names = adapter.trained_on_exaone_names
    missing = []
    for name, info in base.tensors.items():
        if len(info.shape) != 2 or name == "model.embed_tokens.weight" or name in adapter.updates:
            continue
        module = (llama_to_exaone_name(name) if uses_exaone_names else name).removesuffix(".weight")
        if adapter.targets_module(module):
            missing.append(module)
    if missing:
        raise MergeError(
            f"{where}: adapter config targets {len(missing)} module(s) it holds no weights for "
            f"(first: {missing[0]}): incomplete adapter or another model"
        )
    vocab = base.tensors["model.embed_tokens.weight"].shape[0]
    tok_size = _tokenizer_size(adapter.path)
    if tok_size is not None and tok_size > vocab:
        raise MergeError(
            f"{where}: the adapter's tokenizer has {tok_size} tokens but the base embedding has {vocab} rows: "
            "the adapter was trained on another model"
        )
    recorded = adapter.base_model_name_or_path
    if recorded and not _same_base(recorded, base.path):
        logger.warning(f"adapter records base {recorded!r}, merging into {base.path}; shapes match, continuing")


def conversion_record(folder: Path) -> dict:
    """The record the model stage writes into a converted folder ({} when there is none)."""
    from hai_medqa.model.convert import RECORD_FILE

    record = folder / RECORD_FILE
    if not record.is_file():
        return {}
    try:
        data = json.loads(record.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return {}
    return data if isinstance(data, dict) else {}


def conversion_source(folder: Path) -> tuple[str | None, str | None]:
    """(source folder, source id) recorded by the model stage in a converted folder, if any."""
    record = conversion_record(folder)
    return record.get("source"), record.get("source_id")


def _same_base(recorded: str, base_dir: Path) -> bool:
    """Whether the base an adapter records (a folder, a converted copy of one, or a Hub id) is
    `base_dir` (directly, or through the model stage's conversion record)."""
    base = base_dir.resolve()
    names = {str(base)}
    src, src_id = conversion_source(base)
    names |= {n for n in (src, src_id) if n}
    rec = Path(recorded).expanduser()
    if rec.exists():
        rec_src, rec_id = conversion_source(rec)
        candidates = {str(rec.resolve())} | {n for n in (rec_src, rec_id) if n}
    else:
        candidates = {recorded}
    return any(c == n or (("/" in c) and c in n) for c in candidates for n in names)


def _tokenizer_size(folder: Path) -> int | None:
    """Number of tokens (vocabulary + added) of a tokenizer.json in `folder`, without loading it."""
    tok = folder / "tokenizer.json"
    if not tok.is_file():
        return None
    data = json.loads(tok.read_text(encoding="utf-8"))
    ids = set((data.get("model") or {}).get("vocab", {}).values()) if isinstance(
        (data.get("model") or {}).get("vocab"), dict) else set()
    ids |= {t["id"] for t in data.get("added_tokens", [])}
    return (max(ids) + 1) if ids else None


def resolve_base(base: str | Path) -> Path:
    """A local base folder as given, or a Hub model's downloaded snapshot (EXAONE layout, read as is:
    the merge renames tensors itself, so no converted copy is needed)."""
    from hai_medqa.model.acquire import download_model, is_hub_id

    path = Path(base).expanduser()
    if path.exists():
        if not path.is_dir():
            raise MergeError(f"base {path} is a file; expected a model folder or a Hub model id")
        return path
    if not is_hub_id(str(base)):
        raise MergeError(f"base {base!r} is neither an existing folder nor a Hub model id (owner/name)")
    return Path(download_model(str(base), None))


def check_output_path(output: Path, inputs: list[Path], overwrite: bool, *, may_contain: list[Path] = ()) -> None:
    """Refuse an output that is, contains or sits inside an input folder (replacing it would destroy
    the input), except inside the `may_contain` folders (RUN_DIR/merged is fine); and an existing,
    non-empty output unless `overwrite`."""
    out = output.resolve()
    for p in [*inputs, *may_contain]:
        p = p.resolve()
        inside = p in out.parents and p not in {m.resolve() for m in may_contain}
        if out == p or out in p.parents or inside:
            raise MergeError(f"output {output} overlaps the input folder {p}; choose a separate folder")
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not overwrite:
        raise MergeError(f"output {output} already exists; pass --overwrite to replace it (only after success)")


def _prepare_tokenizer(adapter_dir: Path, base_dir: Path):
    """The tokenizer to ship: the adapter's (what training used), else the base's, checked by the
    project's one tokenizer rule (which also repairs a chat template that breaks the EXAONE format)."""
    from hai_medqa.chat_format import apply_tokenizer_rule
    from hai_medqa.model.load import load_tokenizer

    source = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else base_dir
    tokenizer = load_tokenizer(source)
    ids = apply_tokenizer_rule(tokenizer, source=str(source), repair_template=True)
    return tokenizer, source, ids.eot_id, ids.pad_id


def _generation_config(base_dir: Path, bos_id: int | None, eos_id: int, pad_id: int) -> dict:
    gen: dict = {}
    base_gen = base_dir / "generation_config.json"
    if base_gen.is_file():
        gen = {k: v for k, v in json.loads(base_gen.read_text(encoding="utf-8")).items()
               if k != "transformers_version"}
    gen.update(eos_token_id=eos_id, pad_token_id=pad_id)
    if bos_id is not None:
        gen["bos_token_id"] = bos_id
    return gen


def _output_config(base: BaseCheckpoint, layout: str) -> dict:
    """The merged folder's config.json: the one place it is built (extend here, e.g. for GGUF keys)."""
    if layout == "llama":
        return with_legacy_rope_keys(base.llama_config)  # transformers 4.x, mistral.rs read these
    # Keep EXAONE's own config (key order, auto_map, embed_dropout): the base's, or the original one
    # the model stage recorded when it converted this Llama folder.
    reference = base.config if base.layout == "exaone" else conversion_record(base.path).get("source_config")
    try:
        config = llama_config_to_exaone(base.llama_config, reference=reference)
    except ModelLayoutError as e:
        raise MergeError(str(e)) from None
    return config  # auto_map already points at EXAONE's code repo (llama_config_to_exaone's code_repo)


def _shard_plan(items: list[tuple[str, TensorInfo]], max_shard_bytes: int) -> list[list[tuple[str, TensorInfo]]]:
    shards: list[list[tuple[str, TensorInfo]]] = [[]]
    size = 0
    for name, info in items:
        if shards[-1] and size + info.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, info))
        size += info.nbytes
    return shards


def _training_load_dtype(run: Path | None) -> str | None:
    """The dtype training loaded the base in (run_info.json resolved.compute_dtype), if recorded."""
    if run is None or not (run / RUN_INFO).is_file():
        return None
    try:
        info = json.loads((run / RUN_INFO).read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None
    dtype = (info.get("resolved") or {}).get("compute_dtype") if isinstance(info, dict) else None
    return dtype if isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype) else None


_FINGERPRINT_SAMPLES = 16  # evenly spaced 64 KiB reads per shard
_FINGERPRINT_SAMPLE_BYTES = 1 << 16


def checkpoint_fingerprint(folder: str | Path) -> str:
    """A cheap identity of a base checkpoint that names no path: SHA-256 over its config.json, and
    for each ``*.safetensors`` (name order) its name, size, header and 16 evenly spaced 64 KiB
    samples of its data. Any other checkpoint (another fine-tune of the same shape included) changes
    it; reading it costs a few MiB whatever the model size. Recorded in merge_info.json so a re-run
    recognises a finished merge of the same base without writing the base's local path there."""
    import hashlib

    folder = Path(folder)
    h = hashlib.sha256()
    config = folder / "config.json"
    if config.is_file():
        h.update(config.read_bytes())
    for path in sorted(folder.glob("*.safetensors")):
        size = path.stat().st_size
        h.update(f"{path.name}:{size}".encode())
        with open(path, "rb") as f:
            head = f.read(8)
            h.update(head)
            if len(head) == 8:
                h.update(f.read(int.from_bytes(head, "little")))
            for i in range(_FINGERPRINT_SAMPLES):
                f.seek(size * i // _FINGERPRINT_SAMPLES)
                h.update(f.read(_FINGERPRINT_SAMPLE_BYTES))
    return h.hexdigest()


def existing_merge_matches(output: str | Path, base: str | Path, adapter: str | Path, *, merge_into: str,
                           layout: str) -> bool:
    """True when `output` is a complete folder this merge already wrote from the same base (its
    `checkpoint_fingerprint`; `base` is a local folder), adapter bytes, mode and layout (so re-running
    a command after a failed upload skips the merge)."""
    info_path = Path(output) / MERGE_INFO
    if not info_path.is_file() or not Path(base).is_dir():
        return False
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
        adapter_dir = resolve_adapter_dir(adapter)
    except (json.JSONDecodeError, AdapterError):
        return False
    return (info.get("merge_into") == merge_into and info.get("layout") == layout
            and info.get("adapter_sha256") == sha256_file(adapter_dir / ADAPTER_WEIGHTS)
            and info.get("base_fingerprint") == checkpoint_fingerprint(base))


def merge_adapter(
    base: str | Path,
    adapter: str | Path,
    output: str | Path,
    *,
    merge_into: MergeInto = "original",
    layout: Layout = "llama",
    nf4: NF4Settings | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    run_dir: str | Path | None = None,
    overwrite: bool = False,
    finalize: Callable[[Path, dict], None] | None = None,
) -> MergeResult:
    """Merge a LoRA adapter into `base` and write a complete model folder at `output`.

    base: a local model folder (EXAONE or Llama layout) or a Hub id. adapter: a PEFT adapter folder
    or a training run folder. `merge_into="original"` adds the deltas to the stored weights;
    `"nf4"` first applies the NF4 round trip QLoRA training used (`nf4` settings) to every decoder
    projection, so the merged forward equals the training-time forward. `layout` picks the written
    names and config ("llama": plain transformers; "exaone": EXAONE-3.5's own). Beside the weights:
    config, generation_config (eos = [|endofturn|], pad distinct), tokenizer with chat template and
    merge_info.json. `run_dir` (default: the adapter's run folder) tells the dtype training loaded the
    base in. `finalize(tmp_dir, info)` runs on the complete folder before it appears (the publish stage
    adds the license, training files and card there). Raises MergeError/AdapterError/ChatFormatError
    before writing anything if the inputs do not fit. Merging only merges: nothing here decides what is
    released.
    """
    if merge_into not in ("original", "nf4"):
        raise MergeError(f"merge_into must be 'original' or 'nf4', got {merge_into!r}")
    if layout not in ("llama", "exaone"):
        raise MergeError(f"layout must be 'llama' or 'exaone', got {layout!r}")
    if max_shard_bytes <= 0:
        raise MergeError("max_shard_bytes must be positive")
    output = Path(output)

    # --- everything is checked before anything is written -----------------------------------
    base_dir = resolve_base(base)
    checkpoint = read_base_checkpoint(base_dir)
    lora = load_adapter(adapter, adapter_weight_to_llama)
    check_adapter_fits(checkpoint, lora)
    run = Path(run_dir) if run_dir is not None else find_run_dir(lora.path)
    if nf4 is None:
        nf4 = NF4Settings.from_project()
        trained_dtype = _training_load_dtype(run)
        if trained_dtype is not None:
            nf4 = dataclasses.replace(nf4, weight_dtype=trained_dtype)
    check_output_path(output, [base_dir, lora.path], overwrite, may_contain=[run] if run else [])
    tokenizer, tok_source, eos_id, pad_id = _prepare_tokenizer(lora.path, base_dir)
    gen_config = _generation_config(base_dir, tokenizer.bos_token_id, eos_id, pad_id)
    out_config = _output_config(checkpoint, layout)
    weight_dtypes = sorted({info.dtype for info in checkpoint.tensors.values()})

    items = list(checkpoint.tensors.items())
    out_name = (lambda n: n) if layout == "llama" else llama_to_exaone_name
    shards = _shard_plan(items, max_shard_bytes)
    n_shards = len(shards)
    total_bytes = sum(info.nbytes for _, info in items)
    logger.info(
        f"merging {len(lora.updates)} LoRA weights (r={lora.config.get('r')}, alpha={lora.config.get('lora_alpha')}) "
        f"into {base_dir} [{checkpoint.layout} layout, {', '.join(weight_dtypes)}] -> {output} "
        f"[{layout} layout, merge into {merge_into}, {n_shards} shard(s)]"
    )

    # The record travels with the weights: the base by Hub id and a content fingerprint, the adapter
    # by its bytes' hash; no local path (those are the caller's to keep).
    base_id, base_rev = hub_reference(base_dir)
    if base_id is None:
        base_id, base_rev = hub_reference(str(base))
    info = {
        "hai_medqa_merge": 2,
        "base_model": base_id,
        "base_model_revision": base_rev,
        "base_fingerprint": checkpoint_fingerprint(base_dir),
        "base_layout": checkpoint.layout,
        "adapter_sha256": sha256_file(lora.path / ADAPTER_WEIGHTS),
        "adapter_config": {
            **{k: lora.config.get(k) for k in ("r", "lora_alpha", "use_rslora", "target_modules", "rank_pattern",
                                               "alpha_pattern")},
            "base_model_name_or_path": hub_reference(lora.base_model_name_or_path)[0]},
        "adapted_weights": len(lora.updates),
        "merge_into": merge_into,
        "nf4": nf4.as_dict() if merge_into == "nf4" else None,
        "layout": layout,
        "weight_dtypes": weight_dtypes,
        "tokenizer_from": "adapter" if tok_source == lora.path else "base",
        "versions": package_versions(),
    }

    with atomic_dir(output) as tmp:
        weight_map: dict[str, str] = {}
        handles: dict[Path, BinaryIO] = {}
        files = contextlib.ExitStack()
        bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc="merging", leave=False)
        try:
            for i, shard in enumerate(shards):
                fname = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
                plan = [PlannedTensor(out_name(n), t.dtype, t.shape) for n, t in shard]
                with StreamingShardWriter(tmp / fname, plan, {"format": "pt"}) as writer:
                    for name, tinfo in shard:
                        src = handles.get(tinfo.file)
                        if src is None:
                            src = handles[tinfo.file] = files.enter_context(open(tinfo.file, "rb"))  # noqa: SIM115
                        upd = lora.updates.get(name)
                        requantize = merge_into == "nf4" and is_quantized_in_training(name)
                        if upd is None and not requantize:
                            writer.copy_raw(out_name(name), tinfo, src)
                        else:
                            weight = read_tensor(tinfo, src)
                            if requantize:
                                weight = nf4_roundtrip(weight, nf4)
                            if upd is not None:
                                # fp32 add, one rounding back to the stored dtype
                                weight = weight.float().add_(upd.delta()).to(tinfo.torch_dtype)
                            writer.write(out_name(name), weight)
                            del weight
                        weight_map[out_name(name)] = fname
                        bar.update(tinfo.nbytes)
        finally:
            bar.close()
            files.close()
        write_json(tmp / "model.safetensors.index.json",
                   {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))})
        write_json(tmp / "config.json", out_config)
        write_json(tmp / "generation_config.json", gen_config)
        tokenizer.save_pretrained(str(tmp))
        make_tokenizer_config_portable(tmp)  # a class transformers 4.x loads too
        write_json(tmp / MERGE_INFO, info)
        if finalize is not None:
            finalize(tmp, info)
    logger.info(f"wrote merged model to {output} ({total_bytes / 2**20:.1f} MiB in {n_shards} shard(s))")
    return MergeResult(output=output, info=info)

