"""Which system prompt chat.py and evaluate.py use: the one the model was trained with, unless the
user says otherwise.

Training records its system prompt beside every adapter (`run_folder.TRAINING_RECORD`), and a
release carries that record in ``training/``. The rule (`chat_format.resolve_system_prompt`):

- ``--system-prompt TEXT`` (``''`` for none) always wins;
- else the prompt recorded for what is served: the adapter's record with ``--adapter``, else the
  model folder's (a merged release; for a Hub id the record is fetched alone, never the weights);
- else the project's `DEFAULT_SYSTEM_PROMPT`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from loguru import logger

from hai_medqa.chat_format import resolve_system_prompt
from hai_medqa.run_folder import RELEASE_TRAINING_DIR, TRAINING_RECORD, trained_system_prompt


@dataclass(frozen=True)
class SystemPromptChoice:
    """The prompt to use and where it came from (recorded in results, shown in the log)."""

    prompt: str
    source: str  # "--system-prompt", "training record in <folder>", or "project default"

    def describe(self) -> str:
        """``system prompt (training record in runs/x/adapter_best): "너는 ..."``, for the log."""
        shown = json.dumps(self.prompt, ensure_ascii=False) if self.prompt else "(none: empty system turn)"
        if len(shown) > 120:
            shown = shown[:117] + '..."'
        return f"system prompt ({self.source}): {shown}"


def _hub_record_prompt(repo_id: str, revision: str | None) -> tuple[str | None, str | None]:
    """The trained prompt of a Hub release: downloads ``training/hai_medqa_training.json`` alone."""
    from hai_medqa.model.acquire import is_hub_id

    if not is_hub_id(repo_id):
        return None, None
    try:
        from huggingface_hub import hf_hub_download

        path = Path(hf_hub_download(repo_id, f"{RELEASE_TRAINING_DIR}/{TRAINING_RECORD}", revision=revision))
    except Exception as e:  # no record in the repo, offline, gated: the default applies
        logger.debug(f"{repo_id}: no training record fetched ({type(e).__name__})")
        return None, None
    prompt = trained_system_prompt(path.parents[1])
    return (prompt, f"hub:{repo_id}") if prompt is not None else (None, None)


def trained_prompt(model: str | None, adapter_dir: str | Path | None,
                   revision: str | None = None) -> tuple[str | None, str | None]:
    """(prompt recorded by training, the folder or repo it was found in) for what is served:
    the adapter's with an adapter, else the model's; (None, None) when there is no record."""
    if adapter_dir is not None:
        prompt = trained_system_prompt(adapter_dir)
        return (prompt, str(adapter_dir)) if prompt is not None else (None, None)
    if model is None:
        return None, None
    local = Path(model).expanduser()
    if local.exists():
        prompt = trained_system_prompt(local)
        return (prompt, str(local)) if prompt is not None else (None, None)
    return _hub_record_prompt(model, revision)


def choose_system_prompt(explicit: str | None, model: str | None, adapter_dir: str | Path | None,
                         revision: str | None = None) -> SystemPromptChoice:
    """The system prompt for serving or evaluating `model` (+ `adapter_dir`); `explicit` is the
    ``--system-prompt`` value (None = not given)."""
    if explicit is not None:
        return SystemPromptChoice(resolve_system_prompt(explicit), "--system-prompt")
    trained, where = trained_prompt(model, adapter_dir, revision)
    source = f"training record in {where}" if trained is not None else "project default"
    return SystemPromptChoice(resolve_system_prompt(None, trained), source)
