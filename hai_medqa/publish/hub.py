"""Upload a release folder to the Hugging Face Hub, or print exactly what would be uploaded.

The token comes from `HF_TOKEN` or the stored `hf auth login` (huggingface_hub's own lookup) and is
handed to `HfApi` only; it is never printed, logged or written, and any message from the Hub is
scrubbed of it before it reaches the user. Uploads go through `HfApi.upload_folder`, which in
huggingface_hub 2.x is the resumable, multi-commit Xet pipeline (it replaced `upload_large_folder`):
re-running the same command after a network failure resumes without re-sending uploaded data.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from loguru import logger

from hai_medqa.errors import HaiMedQAError
from hai_medqa.publish.license import name_rule_problem

_REPO_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".png", ".jpg")
OWNER_PLACEHOLDER = "<your-hf-username>"


class PublishError(HaiMedQAError, RuntimeError):
    """The upload cannot be done as asked (bad repo id, license name rule, no token, network failure)."""


@dataclass
class UploadPlan:
    """What an upload sends: the repo, its visibility and every file (relative path, bytes)."""

    repo_id: str
    private: bool
    folder: Path
    files: list[tuple[str, int]]

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)

    def describe(self) -> str:
        """Human-readable listing (what --dry-run prints)."""
        lines = [
            f"repo:       {self.repo_id}",
            f"visibility: {'private' if self.private else 'public'}",
            f"folder:     {self.folder}",
            f"files:      {len(self.files)} ({_human(self.total_bytes)})",
        ]
        width = max((len(p) for p, _ in self.files), default=0)
        lines += [f"  {p.ljust(width)}  {_human(s):>10}" for p, s in self.files]
        return "\n".join(lines)


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def release_files(folder: str | os.PathLike) -> list[tuple[str, int]]:
    """(relative posix path, size) of every file under `folder`, sorted; hidden entries (.cache,
    editor files) are skipped, as the Hub upload would skip them too."""
    folder = Path(folder)
    out = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if p.is_file() and not any(part.startswith(".") for part in rel.parts):
            out.append((rel.as_posix(), p.stat().st_size))
    return out


def check_repo_id(repo_id: str, *, allow_noncompliant_name: bool = False) -> None:
    """Refuse malformed ids and, unless explicitly allowed, names that break the EXAONE naming rule."""
    parts = repo_id.split("/")
    if len(parts) > 2 or not all(_REPO_NAME_RE.match(p) for p in parts if p != OWNER_PLACEHOLDER) or "" in parts:
        raise PublishError(f"repo id {repo_id!r} is not a valid Hub id (expected NAME or OWNER/NAME)")
    problem = name_rule_problem(repo_id)
    if problem and not allow_noncompliant_name:
        raise PublishError(f"{problem}; rename it or pass --allow-noncompliant-name if you really must")
    if problem:
        logger.warning(f"{problem}; continuing because --allow-noncompliant-name was given")


def get_token() -> str | None:
    """The Hub token from HF_TOKEN or the stored login (never printed)."""
    from huggingface_hub import get_token as hf_get_token

    return hf_get_token()


def _scrub(text: str, token: str | None) -> str:
    return text.replace(token, "***") if token else text


def _check_no_token_in_files(plan: UploadPlan, token: str | None) -> None:
    """Refuse to upload a text file that contains the token (e.g. a config that recorded the environment)."""
    if not token:
        return
    needle = token.encode()
    for rel, size in plan.files:
        if rel.endswith(_WEIGHT_SUFFIXES) or size > 64 << 20:
            continue
        if needle in (plan.folder / rel).read_bytes():
            raise PublishError(f"{plan.folder / rel} contains your Hub token; remove it before uploading")


def publish(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = True,
    dry_run: bool = False,
    allow_noncompliant_name: bool = False,
    commit_message: str = "Upload HAI MedQA model",
    api=None,
) -> UploadPlan:
    """Create `repo_id` (private unless `private=False`) and upload every file of `folder`.

    `repo_id` without an owner ("EXAONE-…") is completed with the token's user name. With
    `dry_run` nothing touches the network: the plan (repo id, visibility, files and sizes) is
    printed and returned. Network failures raise PublishError; the local folder is never modified.
    `api` is an `HfApi`-like object (tests pass a mock; the Hub is unreachable there).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise PublishError(f"upload folder {folder} does not exist")
    check_repo_id(repo_id, allow_noncompliant_name=allow_noncompliant_name)
    files = release_files(folder)
    if not files:
        raise PublishError(f"upload folder {folder} is empty")

    if dry_run:
        if "/" not in repo_id:
            repo_id = f"{OWNER_PLACEHOLDER}/{repo_id}"
        plan = UploadPlan(repo_id, private, folder, files)
        print("dry run: nothing is sent to the Hub\n" + plan.describe(), flush=True)
        return plan

    token = get_token()
    if not token:
        raise PublishError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (the token is never printed)")
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    try:
        if "/" not in repo_id:
            repo_id = f"{api.whoami()['name']}/{repo_id}"
        plan = UploadPlan(repo_id, private, folder, files)
        _check_no_token_in_files(plan, token)
        logger.info(f"uploading {len(files)} files ({_human(plan.total_bytes)}) to {repo_id} "
                    f"({'private' if private else 'public'})")
        url = api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(
            repo_id=repo_id,
            repo_type="model",
            folder_path=str(folder),
            allow_patterns=[rel for rel, _ in files],
            commit_message=commit_message,
        )
    except PublishError:
        raise
    except Exception as e:  # network/HTTP/auth errors of any kind: one scrubbed line, local files intact
        msg = _scrub(f"{type(e).__name__}: {e}".splitlines()[0], token)
        raise PublishError(
            f"upload to {repo_id} failed ({msg}); the local folder {folder} is intact, re-run the same command "
            "to resume"
        ) from None
    logger.info(f"uploaded to {getattr(url, 'url', None) or f'https://huggingface.co/{repo_id}'}")
    return plan
