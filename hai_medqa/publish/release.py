"""The release stage: naming (repo id, the base model's Hub id), what a release folder carries beside
the weights (LICENSE, the run's shareable training files, the evaluation bound to the model,
release_info.json, the card), the adapter-only release folder, and `make_release`, which composes
merge (hai_medqa.merge) then release.

Everything is checked before the merge starts: the repo name, the license text when uploading, and
whether the evaluation results given belong to the model being released. What is written names models
by Hub id and data by name, hash and counts; `check_no_local_paths` refuses a folder that would still
publish a local path.
"""

from __future__ import annotations

import json
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
    existing_merge_matches,
    merge_adapter,
    read_base_checkpoint,
    resolve_base,
)
from hai_medqa.model.identity import hub_reference, model_fingerprint
from hai_medqa.publish.adapter_export import export_adapter
from hai_medqa.publish.eval_binding import BoundEval, ReleasedModel, bind_all
from hai_medqa.publish.hub import (
    OWNER_PLACEHOLDER,
    PublishError,
    UploadPlan,
    check_repo_id,
    get_token,
    publish,
)
from hai_medqa.publish.license import REQUIRED_NAME_PREFIX, find_license_file, write_license
from hai_medqa.publish.model_card import write_model_card
from hai_medqa.publish.shareable import (
    check_no_local_paths,
    copy_run_file,
    local_path_needles,
    shareable_eval,
    shareable_record,
)
from hai_medqa.run_folder import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    COMPARISON_DIR,
    EVAL_RESULTS,
    LICENSE_FILE,
    RELEASE_INFO,
    RELEASE_TRAINING_DIR,
    RUN_FILES,
    RUN_INFO,
    TRAINING_RECORD,
    find_run_dir,
    read_training_record,
)

PROJECT_SUFFIX = "HAI-MedQA"
# Files of an adapter folder that are published with it as they are (tokenizer + template); the
# adapter itself goes through adapter_export, the training record through shareable_record.
ADAPTER_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                           "chat_template.jinja", "added_tokens.json")


def base_model_id(base: str, adapter_config: dict | None = None, explicit: str | None = None,
                  run_dir: Path | None = None, trainer_base: str | None = None) -> str | None:
    """The base model's Hub id for the card, from (first found): `explicit`; `base` when it is a Hub
    id; the download record of the base folder, of the model the training run loaded
    (run_info.json), or of the folder the adapter records; the model the trainer was asked for
    (`trainer_base`, from hai_medqa_training.json) or the adapter's record when it is a Hub id."""
    if explicit:
        return explicit
    candidates: list[str | None] = [base]
    if run_dir is not None and (run_dir / RUN_INFO).is_file():
        try:
            model = json.loads((run_dir / RUN_INFO).read_text(encoding="utf-8")).get("model") or {}
            if isinstance(model, dict):
                candidates += [model.get("requested"), model.get("local_path")]
        except (json.JSONDecodeError, AttributeError):
            pass
    candidates += [(adapter_config or {}).get("base_model_name_or_path"), trainer_base]
    for candidate in candidates:
        found, _ = hub_reference(candidate)
        if found:
            return found
    return None


def default_repo_name(base_id: str | None, *, adapter_only: bool) -> str:
    """EXAONE-license-compliant default name: '<base name>-HAI-MedQA' (e.g.
    EXAONE-3.5-7.8B-Instruct-HAI-MedQA), '-LoRA' added for adapters."""
    name = base_id.rsplit("/", 1)[-1] if base_id else ""
    if not name.startswith(REQUIRED_NAME_PREFIX):
        name = REQUIRED_NAME_PREFIX
    name = f"{name}-{PROJECT_SUFFIX}"
    return name + "-LoRA" if adapter_only else name


# ---------------------------------------------------------------- what a release folder carries
def find_eval_results(run: Path | None, eval_results: str | Path | list | tuple | None) -> list[Path]:
    """The evaluation results offered for the card: the given file(s), else RUN_DIR/eval_results.json
    if present."""
    if eval_results is not None:
        given = [eval_results] if isinstance(eval_results, (str, Path)) else list(eval_results)
        paths = [Path(p) for p in given]
        for path in paths:
            if not path.is_file():
                raise MergeError(f"evaluation results {path} do not exist")
        return paths
    if run is not None and (run / EVAL_RESULTS).is_file():
        return [run / EVAL_RESULTS]
    return []


def copy_run_files(dest: Path, run: Path | None) -> list[str]:
    """Copy the run's config and metrics into dest/training/ as their shareable versions; return
    the names copied."""
    copied = [f for f in RUN_FILES if run is not None and (run / f).is_file()]
    if copied:
        (dest / RELEASE_TRAINING_DIR).mkdir(exist_ok=True)
        run_info = None
        if (run / RUN_INFO).is_file():
            try:
                run_info = json.loads((run / RUN_INFO).read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                run_info = None
        for f in copied:
            copy_run_file(run / f, dest / RELEASE_TRAINING_DIR / f, run_info if isinstance(run_info, dict) else None)
    return copied


def write_evaluations(dest: Path, bound: list[BoundEval]) -> list[dict]:
    """The model's own results as eval_results.json, other models' (only when asked for) under
    comparison/, all as shareable copies; returns their entries for release_info.json."""
    own = [b for b in bound if b.own]
    if len(own) > 1:
        raise PublishError(f"{len(own)} evaluation files measured this model ({', '.join(str(b.path) for b in own)}); "
                           "give one")
    shutil.rmtree(dest / COMPARISON_DIR, ignore_errors=True)  # a re-run replaces what an earlier one added
    (dest / EVAL_RESULTS).unlink(missing_ok=True)
    entries = []
    for i, b in enumerate(bound):
        if b.own:
            rel = EVAL_RESULTS
        else:
            label = "".join(c if c.isalnum() or c in "-_" else "-" for c in str(b.results.get("model") or "model"))
            rel = f"{COMPARISON_DIR}/{i + 1:02d}-{label}.json"
            (dest / COMPARISON_DIR).mkdir(exist_ok=True)
        write_json(dest / rel, shareable_eval(b.results))
        entries.append({"file": rel, "own": b.own, "measured": b.whose})
    return entries


def add_release_files(folder: Path, *, kind: str, base_dir: Path | None, adapter_dir: Path, run: Path | None,
                      evaluations: list[BoundEval], base_model: str | None, base_revision: str | None,
                      repo_id: str, card_base: str) -> dict:
    """Everything a release folder carries beside the weights: LICENSE, the run's training files and
    the trainer's record under training/ (shareable copies), the evaluations, release_info.json and
    the card. Returns release_info."""
    full_license = write_license(folder, base_dir)
    copied = copy_run_files(folder, run)
    record = read_training_record(adapter_dir)
    if record is not None:
        (folder / RELEASE_TRAINING_DIR).mkdir(exist_ok=True)
        write_json(folder / RELEASE_TRAINING_DIR / TRAINING_RECORD, shareable_record(record))
    info = {
        "kind": kind,
        "base_model": base_model,
        "base_model_revision": base_revision,
        "adapter_sha256": sha256_file(adapter_dir / ADAPTER_WEIGHTS),
        "full_license_text": full_license,
        "training_files": copied,
        "evaluations": write_evaluations(folder, evaluations),
    }
    write_json(folder / RELEASE_INFO, info)
    write_model_card(folder, repo_id=repo_id, base_model=card_base, adapter_only=kind == "adapter")
    return info


def build_adapter_release(
    adapter: str | Path,
    output: str | Path,
    *,
    repo_id: str,
    base_model: str,
    base: str | Path | None = None,
    run_dir: str | Path | None = None,
    evaluations: list[BoundEval] = (),
    base_hub_id: str | None = None,
    base_revision: str | None = None,
    license_dir: Path | None = None,
    overwrite: bool = False,
) -> Path:
    """Assemble an adapter-only release folder: the adapter under EXAONE's module names (and its
    Llama-named original in llama/), both naming the base by Hub id; its tokenizer, LICENSE,
    training/ files, evaluations and the card. When `base` is a local folder the adapter is first
    checked to fit it. The folder appears only when complete."""
    lora = load_adapter(adapter, adapter_weight_to_llama)
    base_dir = Path(base).expanduser() if base is not None and Path(base).expanduser().is_dir() else None
    if base_dir is not None:
        check_adapter_fits(read_base_checkpoint(base_dir), lora)
    else:
        logger.info("base is not a local folder; the adapter's fit to it is not checked (no download)")
    run = Path(run_dir) if run_dir is not None else find_run_dir(lora.path)
    output = Path(output)
    check_output_path(output, [lora.path] + ([base_dir] if base_dir else []), overwrite,
                      may_contain=[run] if run else [])
    with atomic_dir(output) as tmp:
        export_adapter(lora.path, tmp, base_model=base_hub_id, revision=base_revision)
        for name in ADAPTER_TOKENIZER_FILES:
            if (lora.path / name).is_file():
                shutil.copy2(lora.path / name, tmp / name)
        add_release_files(tmp, kind="adapter", base_dir=license_dir or base_dir, adapter_dir=lora.path, run=run,
                          evaluations=list(evaluations), base_model=base_hub_id, base_revision=base_revision,
                          repo_id=repo_id, card_base=base_model)
        check_no_local_paths(tmp, local_path_needles(lora.path, run, base_dir, output))
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


def _hub_license_dir(base_id: str | None, revision: str | None) -> Path | None:
    """The folder holding the base repo's LICENSE, downloaded alone (adapter-only releases do not
    need the weights); None when it cannot be had (offline, no such file)."""
    if not base_id:
        return None
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(base_id, LICENSE_FILE, revision=revision)).parent
    except Exception as e:  # offline, gated, missing: the release then says the text is missing
        logger.warning(f"could not fetch {base_id}'s {LICENSE_FILE} ({type(e).__name__})")
        return None


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
    eval_results: str | Path | list | None = None,
    include_foreign_eval: bool = False,
    allow_missing_license: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
    api=None,
) -> ReleaseResult:
    """The whole last stage: merge (or package the adapter), add the release's files and card, then
    upload (`push`) or print the upload plan (`dry_run`). Checked before the merge starts: the license
    name rule, the full license text when uploading (`allow_missing_license` overrides; the card then
    says the copy is missing), and that the evaluation results belong to the model being released
    (`include_foreign_eval` shows other models' results labelled as such). Re-running after a failed
    upload reuses the finished merge instead of merging again."""
    if repo_id:  # the license name rule first: nothing else is worth doing for a refused name
        check_repo_id(repo_id, allow_noncompliant_name=allow_noncompliant_name)
    adapter_dir = resolve_adapter_dir(adapter)
    adapter_config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    run = Path(run_dir) if run_dir is not None else find_run_dir(adapter_dir)
    record = read_training_record(adapter_dir)
    base_id = base_model_id(base, adapter_config, base_model, run, record.base_model if record else None)
    online = push and not dry_run
    if base_id is None:
        if online:
            raise PublishError("cannot tell the base model's Hub id (needed in the card); pass --base-model-id")
        card_base = Path(base).name
        logger.warning(f"base model Hub id unknown; the card names the base {card_base!r} (pass --base-model-id)")
    else:
        card_base = base_id
    repo_id = resolve_repo_id(repo_id, base_id, adapter_only=adapter_only, online=online,
                              allow_noncompliant_name=allow_noncompliant_name)

    # --- the base: a local folder to merge into (or to check the adapter against), and its license
    local_base = Path(base).expanduser() if Path(base).expanduser().is_dir() else None
    base_dir = local_base if adapter_only else resolve_base(base)
    ref_id, revision = hub_reference(base_dir) if base_dir is not None else (None, None)
    if ref_id is None:
        ref_id, revision = hub_reference(base)
    if ref_id != base_id:  # the card's base came from --base-model-id or a record, not from this folder
        revision = record.base_model_revision if record is not None and record.base_model == base_id else None
    license_dir = base_dir if base_dir is not None else _hub_license_dir(base_id, revision)
    if license_dir is None or find_license_file(license_dir) is None:
        if online and not allow_missing_license:
            raise PublishError(
                "the base model folder has no LICENSE file: the EXAONE license requires its full text with every "
                "copy; add the base repository's LICENSE to the base folder, or pass --allow-missing-license "
                "(the card then says the copy is missing)")
        logger.warning("no full EXAONE license text for this release; LICENSE will hold a notice and the card will "
                       "say the copy is missing")

    # --- the evaluations: the model's own, or another model's (refused unless asked for)
    output = Path(output)
    reuse = (not adapter_only and not overwrite
             and existing_merge_matches(output, base_dir, adapter_dir, merge_into=merge_into, layout=layout))
    released = ReleasedModel(adapter_fingerprint=model_fingerprint(adapter_dir), base_model=base_id,
                             merge_into=None if adapter_only else merge_into,
                             merged_fingerprint=(lambda: model_fingerprint(output)) if reuse else None)
    evaluations = bind_all(find_eval_results(run, eval_results), released, include_foreign=include_foreign_eval)
    for b in evaluations:
        logger.info(f"evaluation {b.path}: {'shown as this model' if b.own else 'shown as another model'}'s "
                    f"results ({b.whose})")

    def release_files(folder: Path) -> None:
        add_release_files(folder, kind="merged", base_dir=base_dir, adapter_dir=adapter_dir, run=run,
                          evaluations=evaluations, base_model=base_id, base_revision=revision, repo_id=repo_id,
                          card_base=card_base)
        check_no_local_paths(folder, local_path_needles(base, base_dir, adapter_dir, run, output))

    if adapter_only:
        build_adapter_release(adapter_dir, output, repo_id=repo_id, base_model=card_base, base=base, run_dir=run_dir,
                              evaluations=evaluations, base_hub_id=base_id, base_revision=revision,
                              license_dir=license_dir, overwrite=overwrite)
    elif reuse:
        logger.info(f"{output} already holds this merge; reusing it (pass --overwrite to merge again)")
        release_files(output)
    else:
        merge_adapter(
            base_dir, adapter_dir, output, merge_into=merge_into, layout=layout, max_shard_bytes=max_shard_bytes,
            run_dir=run_dir, overwrite=overwrite, finalize=lambda tmp, _info: release_files(tmp),
        )
    plan = None
    if push or dry_run:
        plan = publish(output, repo_id, private=private, dry_run=not online,
                       allow_noncompliant_name=allow_noncompliant_name, api=api)
    return ReleaseResult(output, repo_id, plan)
