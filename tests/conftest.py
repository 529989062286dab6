"""Shared pytest fixtures. Expensive stand-ins (tiny checkpoints, tokenizers) are built once per
session into a temporary folder and reused by every test that asks for them."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT
