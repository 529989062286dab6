"""Cross-engine checks (issue 16): what the project publishes, read by other engines themselves.

They need engines that are not in requirements.txt: llama-cpp-python built from its sdist, mistral.rs,
transformers 4.57.6 in its own folder, Go (to execute Ollama's template language). `make test-engines`
(and CI) provides them through .ci/engines.sh and sets HAI_ENGINE_TESTS=1; then a missing engine is a
failure. Without that variable (a plain `make test`), these tests are skipped.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REQUIRED = os.environ.get("HAI_ENGINE_TESTS") == "1"
TF4_VERSION = "4.57.6"


def pytest_collection_modifyitems(config, items):
    if REQUIRED:
        return
    skip = pytest.mark.skip(reason="engine checks run with `make test-engines` (HAI_ENGINE_TESTS=1)")
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(skip)


def engine_missing(what: str) -> None:
    """Fail (engines required) or skip (plain test run) for a missing engine."""
    msg = f"{what} is not available; run `make test-engines` (builds and caches it)"
    if REQUIRED:
        pytest.fail(msg)
    pytest.skip(msg)


def cache_dir() -> Path:
    """The engines cache .ci/engines.sh fills (outside the clone)."""
    base = os.environ.get("HAI_ENGINES_CACHE")
    if base:
        return Path(base)
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "hai_medqa" / "engines"


@pytest.fixture(scope="session")
def tf4_dir() -> Path:
    """The --target folder holding transformers 4.57.6 (+ its tokenizers/huggingface_hub pins)."""
    path = cache_dir() / f"transformers-{TF4_VERSION}"
    if not (path / ".complete").is_file():
        engine_missing(f"transformers {TF4_VERSION} ({path})")
    return path


@pytest.fixture(scope="session")
def llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        engine_missing("llama-cpp-python")
    return llama_cpp


@pytest.fixture(scope="session")
def mistralrs():
    try:
        import mistralrs
    except ImportError:
        engine_missing("mistral.rs (PyPI mistralrs)")
    return mistralrs


@pytest.fixture(scope="session")
def go_binary() -> str:
    go = shutil.which("go")
    if go is None:
        engine_missing("Go (Debian golang-go), which executes Ollama's template language")
    return go


@pytest.fixture(scope="session")
def merged_release(tiny_exaone_dir, tiny_lora_run, tmp_path_factory) -> Path:
    """The tiny model merged and packaged as merge_and_upload.py does (dry run, no network), with a
    trained system prompt recorded, as a user would publish it."""
    from hai_medqa.publish.release import make_release
    from hai_medqa.run_folder import TrainingRecord, write_training_record

    run = tmp_path_factory.mktemp("engines_run") / "run"
    shutil.copytree(tiny_lora_run, run)
    write_training_record(run / "adapter_best", TrainingRecord(
        base_model="LGAI-EXAONE/EXAONE-3.5-7.8B-Instruct", system_prompt="당신은 친절한 의료 상담 챗봇입니다."))
    out = tmp_path_factory.mktemp("engines_merged") / "EXAONE-tiny-HAI-MedQA"
    make_release(str(tiny_exaone_dir), run, out, base_model="LGAI-EXAONE/EXAONE-3.5-7.8B-Instruct")
    return out


@pytest.fixture(scope="session")
def gguf_release(merged_release, llama_cpp, tmp_path_factory) -> Path:
    """The GGUF release of the merged tiny model: f32, f16, q8_0 and llama.cpp's q4_k_m."""
    from hai_medqa.publish.gguf_release import build_gguf_release

    out = tmp_path_factory.mktemp("engines_gguf") / "EXAONE-tiny-HAI-MedQA-GGUF"
    return build_gguf_release(merged_release, "f32,f16,q8_0,q4_k_m", repo_id="someone/EXAONE-tiny-HAI-MedQA",
                              out_dir=out, progress=False)
