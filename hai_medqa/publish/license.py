"""The EXAONE AI Model License Agreement as it applies to what this project publishes.

The agreement (EXAONE AI Model License Agreement 1.1 - NC) requires a copy of itself to accompany
any distributed derivative. The full text ships as `LICENSE` in LG AI Research's model repositories;
`write_license` copies that file from the base model folder when it is there. When it is not (a
stand-in model, a download that skipped it), the LICENSE written is this project's notice, which
states the key terms and where the agreement lives, and the caller is told the full text is missing.
"""

from __future__ import annotations

import os
from pathlib import Path

from loguru import logger

from hai_medqa.io_utils import atomic_write_text
from hai_medqa.run_folder import LICENSE_FILE

EXAONE_LICENSE_NAME = "exaone"
EXAONE_LICENSE_URL = "https://huggingface.co/LGAI-EXAONE/EXAONE-3.5-7.8B-Instruct/blob/main/LICENSE"
REQUIRED_NAME_PREFIX = "EXAONE"  # the agreement: a modified model's name must start with "EXAONE"
LICENSE_FILENAMES = (LICENSE_FILE, "LICENSE.md", "LICENSE.txt")

EXAONE_CITATION = """@article{exaone-3.5,
  title={EXAONE 3.5: Series of Large Language Models for Real-world Use Cases},
  author={LG AI Research},
  journal={arXiv preprint arXiv:2412.04862},
  year={2024}
}"""

LICENSE_NOTICE = f"""EXAONE AI Model License Agreement 1.1 - NC: notice for this derivative model
=============================================================================

This model is a modified version ("Derivative") of an EXAONE 3.5 model by LG AI Research and is
distributed under the EXAONE AI Model License Agreement 1.1 - NC ("the Agreement"):
{EXAONE_LICENSE_URL}

NOTE: the full text of the Agreement was not found in the base model folder this model was built
from, so this file holds only this notice. The Agreement requires its full text to accompany every
distributed copy: copy the LICENSE file of the base model repository over this file before you
distribute the model.

Key terms (the Agreement's text governs; this summary does not replace it):
- Research and non-commercial use only.
- The name of a modified model must start with "EXAONE".
- A copy of the Agreement must accompany every distribution of the model or its derivatives.
- The model and its outputs may not be used to develop or improve other models.
- Publications must attribute the model and its version: EXAONE 3.5 technical report,
  arXiv:2412.04862.

The fine-tuning data is AI Hub's "초거대AI 헬스케어 질의응답" dataset, used under AI Hub's terms.
"""


def find_license_file(folder: str | os.PathLike) -> Path | None:
    """The license file of a model folder, if it has one."""
    for name in LICENSE_FILENAMES:
        candidate = Path(folder) / name
        if candidate.is_file():
            return candidate
    return None


def write_license(dest_dir: str | os.PathLike, base_dir: str | os.PathLike | None) -> bool:
    """Write `dest_dir/LICENSE`: the base model's agreement if found, else the notice.

    Returns True when the full agreement text was copied.
    """
    source = find_license_file(base_dir) if base_dir is not None else None
    if source is not None:
        atomic_write_text(Path(dest_dir) / LICENSE_FILE, source.read_text(encoding="utf-8"))
        return True
    logger.warning(
        "the base model folder has no LICENSE file; wrote a notice instead of the full EXAONE agreement. "
        "Copy the base repository's LICENSE into the output before distributing the model."
    )
    atomic_write_text(Path(dest_dir) / LICENSE_FILE, LICENSE_NOTICE)
    return False


def name_rule_problem(repo_id: str) -> str | None:
    """Why `repo_id` breaks the agreement's naming rule, or None when it complies."""
    name = repo_id.rsplit("/", 1)[-1]
    if not name.startswith(REQUIRED_NAME_PREFIX):
        return (
            f"repo name {name!r} does not start with {REQUIRED_NAME_PREFIX!r}, which the EXAONE license requires "
            "of modified models"
        )
    return None
