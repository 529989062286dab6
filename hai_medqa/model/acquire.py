"""`--model` resolution shared by every script: a Hub id (+ revision) or a local folder -> a local
Llama-layout folder.

For a Hub id only config, tokenizer, license and ``*.safetensors`` files are downloaded (never the
repo's Python code, never pickle weights); an EXAONE-layout download is then converted once and
cached under a key made of the repo id and the exact commit, so a second run does no work.
Access tokens are left to huggingface_hub (HF_TOKEN / `hf auth login`) and never printed.
"""

from __future__ import annotations

import re
from pathlib import Path

from loguru import logger

from hai_medqa.model.convert import ensure_llama_checkpoint
from hai_medqa.model.exaone_layout import ModelLayoutError

DEFAULT_MODEL = "LGAI-EXAONE/EXAONE-3.5-7.8B-Instruct"
ALLOW_PATTERNS = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "LICENSE*",
    "*.safetensors",
    "model.safetensors.index.json",
]
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")


class ModelAcquisitionError(ModelLayoutError):
    """The model could not be found or downloaded."""


def is_hub_id(model: str) -> bool:
    """True for strings shaped like ``owner/name`` (checked only after the local path test)."""
    return bool(_HUB_ID_RE.match(model))


def download_model(repo_id: str, revision: str | None = None) -> Path:
    """Download the allow-listed files of a Hub model repo (or reuse the HF cache); return the snapshot."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        path = snapshot_download(repo_id=repo_id, revision=revision, allow_patterns=ALLOW_PATTERNS)
    except GatedRepoError:
        raise ModelAcquisitionError(f"{repo_id}: gated repo; accept its license on the Hub and log in "
                                    "(`hf auth login` or HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise ModelAcquisitionError(f"{repo_id}: revision {revision!r} not found on the Hub") from None
    except RepositoryNotFoundError:
        raise ModelAcquisitionError(f"{repo_id}: no such model repo on the Hub (or no access to it)") from None
    except LocalEntryNotFoundError:
        raise ModelAcquisitionError(f"{repo_id}: not in the local HF cache and the Hub is unreachable "
                                    "(offline? pass a local folder to --model instead)") from None
    except OSError as e:
        first_line = (str(e).splitlines() or [""])[0]
        raise ModelAcquisitionError(f"{repo_id}: download failed ({type(e).__name__}: {first_line})") from None
    path = Path(path)
    if not any(path.glob("*.safetensors")):
        raise ModelAcquisitionError(
            f"{repo_id}@{revision or 'main'}: no *.safetensors weights; pickle-only checkpoints are refused "
            "(they can execute code when loaded)"
        )
    return path


def resolve_model(model: str = DEFAULT_MODEL, revision: str | None = None, *,
                  cache_dir: str | Path | None = None) -> Path:
    """Return a local Llama-layout folder for `model` (Hub id or local folder).

    Local folders are used in place when already Llama, else converted into the cache. Hub ids are
    downloaded with allow patterns (config, tokenizer, LICENSE, safetensors only) and converted when
    they are in EXAONE layout; the cache key is ``hub:<repo>@<commit>``. A repo with only pickle
    weights is refused.
    """
    local = Path(model).expanduser()
    if local.exists():
        if revision:
            logger.warning(f"--revision {revision} ignored: {model} is a local folder")
        if not local.is_dir():
            raise ModelAcquisitionError(f"{model}: is a file; --model takes a checkpoint folder or a Hub id")
        return ensure_llama_checkpoint(local, cache_dir=cache_dir)
    if not is_hub_id(model):
        raise ModelAcquisitionError(f"{model}: no such local folder, and not a Hub id of the form owner/name")
    snapshot = download_model(model, revision)
    # snapshot_download returns .../snapshots/<commit>; the commit makes the cache key exact.
    commit = snapshot.name if _COMMIT_RE.match(snapshot.name) else None
    source_id = f"hub:{model}@{commit}" if commit else None
    logger.info(f"{model}: snapshot {commit or snapshot}")
    return ensure_llama_checkpoint(snapshot, source_id=source_id, name=model.replace("/", "--"), cache_dir=cache_dir)
