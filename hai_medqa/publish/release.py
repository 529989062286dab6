"""The release stage: naming (repo id, the base model's Hub id for the card), what a release folder
carries beside the weights (LICENSE, the run's training files, evaluation results, release_info.json,
the card), the adapter-only release folder, and `make_release`, which composes merge then release."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from loguru import logger

from hai_medqa.io_utils import atomic_dir, sha256_file, write_json
from hai_medqa.merge.lora import load_adapter, resolve_adapter_dir
from hai_medqa.merge.streaming import (
    DEFAULT_MAX_SHARD_BYTES,
    MergeError,
    adapter_weight_to_llama,
    check_adapter_fits,
    check_output_path,
    conversion_source,
    existing_merge_matches,
    merge_adapter,
    read_base_checkpoint,
    resolve_base,
)
from hai_medqa.publish.hub import (
    OWNER_PLACEHOLDER,
    PublishError,
    UploadPlan,
    check_repo_id,
    get_token,
    publish,
)
from hai_medqa.publish.license import REQUIRED_NAME_PREFIX, write_license
from hai_medqa.publish.model_card import write_model_card
from hai_medqa.run_folder import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    EVAL_RESULTS,
    RELEASE_INFO,
    RELEASE_TRAINING_DIR,
    RUN_FILES,
    RUN_INFO,
    TRAINING_RECORD,
    find_run_dir,
)

PROJECT_SUFFIX = "HAI-MedQA"
_RECORDED_HUB_RE = re.compile(r"^hub:(?P<id>[^@\s]+/[^@\s]+)(?:@|$)")
# Files of an adapter folder that are published with it (PEFT weights + config, tokenizer + template).
ADAPTER_RELEASE_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, "tokenizer.json", "tokenizer_config.json",
                         "special_tokens_map.json", "chat_template.jinja", "added_tokens.json", TRAINING_RECORD)


def _hub_id(text: str | None) -> str | None:
    """`text` when it is a Hub id (owner/name) and not a local path."""
    from hai_medqa.model.acquire import is_hub_id

    if not text or Path(text).expanduser().exists() or not is_hub_id(text):
        return None
    return text


def _recorded_hub_id(folder: str | Path | None) -> str | None:
    """The Hub id a converted folder was downloaded as (the model stage records 'hub:<id>@<commit>')."""
    if not folder or not Path(folder).expanduser().is_dir():
        return None
    _, source_id = conversion_source(Path(folder).expanduser())
    m = _RECORDED_HUB_RE.match(source_id or "")
    return m["id"] if m else None


def base_model_id(base: str, adapter_config: dict | None = None, explicit: str | None = None,
                  run_dir: Path | None = None, trainer_base: str | None = None) -> str | None:
    """The base model's Hub id for the card, from (first found): `explicit`; `base` when it is a Hub
    id; the download record of the base folder, of the model the training run loaded
    (run_info.json), or of the folder the adapter records; the model the trainer was asked for
    (`trainer_base`, from hai_medqa_training.json) or the adapter's record when it is a Hub id."""
    if explicit:
        return explicit
    if _hub_id(base):
        return base
    candidates: list[str | None] = [base]
    if run_dir is not None and (run_dir / RUN_INFO).is_file():
        try:
            model = json.loads((run_dir / RUN_INFO).read_text(encoding="utf-8")).get("model") or {}
            candidates.append(model.get("local_path") if isinstance(model, dict) else None)
        except (json.JSONDecodeError, AttributeError):
            pass
    recorded = (adapter_config or {}).get("base_model_name_or_path")
    candidates.append(recorded)
    for folder in candidates:
        found = _recorded_hub_id(folder)
        if found:
            return found
    return _hub_id(trainer_base) or _hub_id(recorded)


def default_repo_name(base_id: str | None, *, adapter_only: bool) -> str:
    """EXAONE-license-compliant default name: '<base name>-HAI-MedQA' (e.g.
    EXAONE-3.5-7.8B-Instruct-HAI-MedQA), '-LoRA' added for adapters."""
    name = base_id.rsplit("/", 1)[-1] if base_id else ""
    if not name.startswith(REQUIRED_NAME_PREFIX):
        name = REQUIRED_NAME_PREFIX
    name = f"{name}-{PROJECT_SUFFIX}"
    return name + "-LoRA" if adapter_only else name


def find_eval_results(run: Path | None, eval_results: str | Path | None) -> Path | None:
    """The evaluation results to publish: the given file, else RUN_DIR/eval_results.json if present."""
    if eval_results is not None:
        path = Path(eval_results)
        if not path.is_file():
            raise MergeError(f"evaluation results {path} do not exist")
        return path
    if run is not None and (run / EVAL_RESULTS).is_file():
        return run / EVAL_RESULTS
    return None


def copy_run_files(dest: Path, run: Path | None, eval_path: Path | None) -> list[str]:
    """Copy the run's config and metrics into dest/training/ and the eval results beside; return
    the names copied from the run."""
    copied = [f for f in RUN_FILES if run is not None and (run / f).is_file()]
    if copied:
        (dest / RELEASE_TRAINING_DIR).mkdir(exist_ok=True)
        for f in copied:
            shutil.copy2(run / f, dest / RELEASE_TRAINING_DIR / f)
    if eval_path is not None:
        shutil.copy2(eval_path, dest / EVAL_RESULTS)
    return copied


def add_release_files(folder: Path, *, base_dir: Path | None, adapter_dir: Path, run: Path | None,
                      eval_path: Path | None) -> dict:
    """What a merged release folder carries beside the weights: LICENSE, the run's training files
    and the trainer's record under training/, the evaluation results. Returns the facts for
    release_info.json."""
    full_license = write_license(folder, base_dir)
    copied = copy_run_files(folder, run, eval_path)
    if (adapter_dir / TRAINING_RECORD).is_file():
        (folder / RELEASE_TRAINING_DIR).mkdir(exist_ok=True)
        shutil.copy2(adapter_dir / TRAINING_RECORD, folder / RELEASE_TRAINING_DIR / TRAINING_RECORD)
    return {"full_license_text": full_license, "training_files": copied}


def build_adapter_release(
    adapter: str | Path,
    output: str | Path,
    *,
    repo_id: str,
    base_model: str,
    base: str | Path | None = None,
    run_dir: str | Path | None = None,
    eval_results: str | Path | None = None,
    overwrite: bool = False,
) -> Path:
    """Assemble an adapter-only release folder: the PEFT adapter and its tokenizer, LICENSE,
    training/ files, eval results and the model card. When `base` is a local folder the adapter is
    first checked to fit it. The folder appears only when complete."""
    lora = load_adapter(adapter, adapter_weight_to_llama)
    base_dir = Path(base).expanduser() if base is not None and Path(base).expanduser().is_dir() else None
    if base_dir is not None:
        check_adapter_fits(read_base_checkpoint(base_dir), lora)
    else:
        logger.info("base is not a local folder; the adapter's fit to it is not checked (no download)")
    run = Path(run_dir) if run_dir is not None else find_run_dir(lora.path)
    eval_path = find_eval_results(run, eval_results)
    output = Path(output)
    check_output_path(output, [lora.path] + ([base_dir] if base_dir else []), overwrite,
                      may_contain=[run] if run else [])
    with atomic_dir(output) as tmp:
        for name in ADAPTER_RELEASE_FILES:
            if (lora.path / name).is_file():
                shutil.copy2(lora.path / name, tmp / name)
        full_license = write_license(tmp, base_dir)
        copied = copy_run_files(tmp, run, eval_path)
        write_json(tmp / RELEASE_INFO, {
            "kind": "adapter",
            "adapter": str(lora.path),
            "adapter_sha256": sha256_file(lora.path / ADAPTER_WEIGHTS),
            "base_model": base_model,
            "full_license_text": full_license,
            "training_files": copied,
        })
        write_model_card(tmp, repo_id=repo_id, base_model=base_model, adapter_only=True)
    logger.info(f"wrote adapter release folder {output}")
    return output


@dataclass
class ReleaseResult:
    """What `make_release` produced: the local folder, the repo id used and the upload plan."""

    folder: Path
    repo_id: str
    plan: UploadPlan | None


def resolve_repo_id(repo_id: str | None, base_id: str | None, *, adapter_only: bool, online: bool,
                    allow_noncompliant_name: bool = False) -> str:
    """The full repo id: given or the license-compliant default, checked against the naming rule,
    with the owner filled from the token when `online` (else a placeholder, for dry runs)."""
    repo_id = repo_id or default_repo_name(base_id, adapter_only=adapter_only)
    check_repo_id(repo_id, allow_noncompliant_name=allow_noncompliant_name)
    if "/" in repo_id:
        return repo_id
    if not online:
        return f"{OWNER_PLACEHOLDER}/{repo_id}"
    token = get_token()
    if not token:
        raise PublishError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (the token is never printed)")
    from huggingface_hub import HfApi

    try:
        return f"{HfApi(token=token).whoami()['name']}/{repo_id}"
    except Exception as e:  # network/auth: one line, without the token
        raise PublishError(f"cannot ask the Hub who you are ({type(e).__name__}); check the network and token") from None


def make_release(
    base: str,
    adapter: str | Path,
    output: str | Path,
    *,
    merge_into: str = "original",
    layout: str = "llama",
    repo_id: str | None = None,
    push: bool = False,
    private: bool = True,
    adapter_only: bool = False,
    dry_run: bool = False,
    allow_noncompliant_name: bool = False,
    base_model: str | None = None,
    run_dir: str | Path | None = None,
    eval_results: str | Path | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
    api=None,
) -> ReleaseResult:
    """The whole last stage: merge (or package the adapter), write the card, then upload (`push`) or
    print the upload plan (`dry_run`). Names and the license rule are checked before the merge starts.
    Re-running after a failed upload reuses the finished folder instead of merging again."""
    if repo_id:  # the license name rule first: nothing else is worth doing for a refused name
        check_repo_id(repo_id, allow_noncompliant_name=allow_noncompliant_name)
    adapter_dir = resolve_adapter_dir(adapter)
    adapter_config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    run = Path(run_dir) if run_dir is not None else find_run_dir(adapter_dir)
    trainer_record = adapter_dir / TRAINING_RECORD
    trainer_base = None
    if trainer_record.is_file():
        try:
            trainer_base = json.loads(trainer_record.read_text(encoding="utf-8")).get("base_model")
        except (json.JSONDecodeError, AttributeError):
            trainer_base = None
    base_id = base_model_id(base, adapter_config, base_model, run, trainer_base if isinstance(trainer_base, str) else None)
    online = push and not dry_run
    if base_id is None:
        if online:
            raise PublishError("cannot tell the base model's Hub id (needed in the card); pass --base-model-id")
        base_id = Path(base).name
        logger.warning(f"base model Hub id unknown; the card names the base {base_id!r} (pass --base-model-id)")
    repo_id = resolve_repo_id(repo_id, base_id, adapter_only=adapter_only, online=online,
                              allow_noncompliant_name=allow_noncompliant_name)

    output = Path(output)
    if adapter_only:
        build_adapter_release(adapter_dir, output, repo_id=repo_id, base_model=base_id, base=base,
                              run_dir=run_dir, eval_results=eval_results, overwrite=overwrite)
    elif not overwrite and existing_merge_matches(output, base, adapter_dir, merge_into=merge_into, layout=layout):
        logger.info(f"{output} already holds this merge; reusing it (pass --overwrite to merge again)")
        write_model_card(output, repo_id=repo_id, base_model=base_id)
    else:
        base_dir = resolve_base(base)
        eval_path = find_eval_results(run, eval_results)

        def finalize(tmp: Path, _info: dict) -> None:  # the release's files, added before the folder appears
            facts = add_release_files(tmp, base_dir=base_dir, adapter_dir=adapter_dir, run=run, eval_path=eval_path)
            write_json(tmp / RELEASE_INFO, {"kind": "merged", "base_model": base_id, **facts})
            write_model_card(tmp, repo_id=repo_id, base_model=base_id)

        merge_adapter(
            base, adapter_dir, output, merge_into=merge_into, layout=layout, max_shard_bytes=max_shard_bytes,
            run_dir=run_dir, overwrite=overwrite, finalize=finalize,
        )
    plan = None
    if push or dry_run:
        plan = publish(output, repo_id, private=private, dry_run=not online,
                       allow_noncompliant_name=allow_noncompliant_name, api=api)
    return ReleaseResult(output, repo_id, plan)
