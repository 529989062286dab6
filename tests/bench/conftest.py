"""Shared by the bench tests: the bench scripts are files, not a package, so they are loaded by path."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture
def bench_module():
    """`bench_module("plot_throughput")` -> bench/plot_throughput.py loaded as a module."""
    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    return load
