"""`--model` resolution. Only the unreachable Hub is faked: `snapshot_download` is replaced by a copy
from a local "repo" folder that honours allow_patterns the way the Hub client does."""

from __future__ import annotations

import fnmatch
import json
import shutil

import huggingface_hub
import pytest

from hai_medqa.model.acquire import ALLOW_PATTERNS, ModelAcquisitionError, resolve_model
from hai_medqa.model.convert import RECORD_FILE

COMMIT_A, COMMIT_B = "a" * 40, "b" * 40


@pytest.fixture
def fake_hub(tmp_path, monkeypatch, tiny_exaone_dir):
    """A Hub repo with EXAONE weights plus the things we must never fetch (remote code, pickles)."""
    repo = tmp_path / "hub_repo"
    shutil.copytree(tiny_exaone_dir, repo)
    (repo / "modeling_exaone.py").write_text("raise RuntimeError('remote code must never be downloaded')\n")
    (repo / "configuration_exaone.py").write_text("")
    (repo / "pytorch_model.bin").write_bytes(b"pickle")
    (repo / "LICENSE").write_text("EXAONE AI Model License Agreement 1.1 - NC\n")
    calls = []

    def snapshot_download(repo_id, revision=None, allow_patterns=None, **kwargs):
        calls.append({"repo_id": repo_id, "revision": revision, "allow_patterns": allow_patterns})
        commit = COMMIT_B if revision == "v2" else COMMIT_A
        snap = tmp_path / "hf_cache" / f"models--{repo_id.replace('/', '--')}" / "snapshots" / commit
        snap.mkdir(parents=True, exist_ok=True)
        for f in sorted(repo.iterdir()):
            if allow_patterns is None or any(fnmatch.fnmatch(f.name, p) for p in allow_patterns):
                shutil.copy2(f, snap / f.name)
        return str(snap)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return repo, calls


def test_hub_id_downloads_allow_listed_files_and_converts_once(fake_hub, tmp_path):
    repo, calls = fake_hub
    cache = tmp_path / "converted"
    out = resolve_model("LGAI-EXAONE/EXAONE-3.5-7.8B-Instruct", cache_dir=cache)
    assert calls[0]["allow_patterns"] == ALLOW_PATTERNS
    snapshot = tmp_path / "hf_cache" / "models--LGAI-EXAONE--EXAONE-3.5-7.8B-Instruct" / "snapshots" / COMMIT_A
    assert not list(snapshot.glob("*.py")) and not list(snapshot.glob("*.bin"))
    assert (snapshot / "LICENSE").is_file()
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    record = json.loads((out / RECORD_FILE).read_text())
    assert record["source_id"] == f"hub:LGAI-EXAONE/EXAONE-3.5-7.8B-Instruct@{COMMIT_A}"
    assert (out / "LICENSE").is_file() and not list(out.glob("*.py"))
    assert out.name.startswith("LGAI-EXAONE--EXAONE-3.5-7.8B-Instruct-")

    mtime = (out / RECORD_FILE).stat().st_mtime_ns
    assert resolve_model("LGAI-EXAONE/EXAONE-3.5-7.8B-Instruct", cache_dir=cache) == out
    assert (out / RECORD_FILE).stat().st_mtime_ns == mtime  # cached, not converted again
    other = resolve_model("LGAI-EXAONE/EXAONE-3.5-7.8B-Instruct", revision="v2", cache_dir=cache)
    assert other != out and calls[-1]["revision"] == "v2"


def test_pickle_only_repo_is_refused(fake_hub, tmp_path):
    repo, _ = fake_hub
    for f in repo.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(ModelAcquisitionError, match="pickle-only checkpoints are refused"):
        resolve_model("someone/pickled", cache_dir=tmp_path / "c")


def test_hub_errors_become_one_line(monkeypatch):
    import httpx2
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    response = httpx2.Response(404, request=httpx2.Request("GET", "https://huggingface.co/api/models/x/y"))
    for exc, match in ((RepositoryNotFoundError("404\nmore", response=response), "no such model repo"),
                       (GatedRepoError("403\nmore", response=response), "gated repo")):
        def raise_it(*a, _exc=exc, **k):
            raise _exc

        monkeypatch.setattr(huggingface_hub, "snapshot_download", raise_it)
        with pytest.raises(ModelAcquisitionError, match=match) as e:
            resolve_model("x/y")
        assert "\n" not in str(e.value)


def test_local_folders(tiny_exaone_dir, tiny_llama_dir, tmp_path):
    assert resolve_model(str(tiny_llama_dir)) == tiny_llama_dir
    converted = resolve_model(str(tiny_exaone_dir), cache_dir=tmp_path / "c")
    assert converted.parent == tmp_path / "c"
    with pytest.raises(ModelAcquisitionError, match="not a Hub id"):
        resolve_model(str(tmp_path / "does" / "not" / "exist"))
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ModelAcquisitionError, match="is a file"):
        resolve_model(str(tmp_path / "file.txt"))

