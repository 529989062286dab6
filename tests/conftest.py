"""Shared pytest fixtures. Expensive stand-ins (tiny checkpoints, tokenizers) are built once per
session into a temporary folder and reused by every test that asks for them."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


# --- tiny EXAONE stand-ins (owner: model / H2) ------------------------------------------------
# Built once per session in EXAONE-3.5's own layout; stages reach the Llama layout through the real
# conversion path (hai_medqa.model.load / ensure_llama_checkpoint).


@pytest.fixture(scope="session", autouse=True)
def _hai_medqa_cache(tmp_path_factory) -> Path:
    """Keep converted checkpoints out of the user's ~/.cache during tests."""
    import os

    cache = tmp_path_factory.mktemp("hai_medqa_cache")
    old = os.environ.get("HAI_MEDQA_CACHE")
    os.environ["HAI_MEDQA_CACHE"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("HAI_MEDQA_CACHE", None)
    else:
        os.environ["HAI_MEDQA_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_exaone_dir(tmp_path_factory) -> Path:
    """Tiny random EXAONE-layout checkpoint (untied, >= 2 shards) with tokenizer + chat template."""
    from hai_medqa.model.tiny import build_tiny_exaone

    return build_tiny_exaone(tmp_path_factory.mktemp("tiny_exaone") / "model", tied=False, seed=0)


@pytest.fixture(scope="session")
def tiny_exaone_tied_dir(tmp_path_factory) -> Path:
    """Tied-embedding variant (no lm_head.weight), like EXAONE-3.5-2.4B."""
    from hai_medqa.model.tiny import build_tiny_exaone

    return build_tiny_exaone(tmp_path_factory.mktemp("tiny_exaone_tied") / "model", tied=True, seed=0)


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_exaone_dir) -> Path:
    """The tiny EXAONE checkpoint converted to Llama layout (cached conversion)."""
    from hai_medqa.model.convert import ensure_llama_checkpoint

    return ensure_llama_checkpoint(tiny_exaone_dir)
