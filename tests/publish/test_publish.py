"""merge_and_upload.py end to end on the tiny stand-in, with only the unreachable Hub (HfApi) mocked."""

from __future__ import annotations

import json
from pathlib import Path
from unittest import mock

import pytest

import merge_and_upload
from hai_medqa.publish import PublishError, check_repo_id, release_files

FAKE_TOKEN = "hf_FAKEtokenVALUE0123456789abcdefXYZ"


@pytest.fixture
def hub(monkeypatch):
    """HfApi replaced by a mock (the Hub is unreachable here); a fake token in HF_TOKEN."""
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    api = mock.MagicMock(name="HfApi()")
    api.whoami.return_value = {"name": "labuser"}
    factory = mock.MagicMock(name="HfApi", return_value=api)
    monkeypatch.setattr("huggingface_hub.HfApi", factory)
    return api, factory


def _all_written_text(*folders: Path) -> bytes:
    return b"".join(p.read_bytes() for f in folders for p in f.rglob("*") if p.is_file())


def test_push_sends_exactly_the_folder_with_visibility_and_no_token(licensed_base, tiny_lora_run, tmp_path,
                                                                    hub, capfd):
    api, factory = hub
    out, log = tmp_path / "merged", tmp_path / "merge.log"
    rc = merge_and_upload.main([
        "--base", str(licensed_base), "--adapter", str(tiny_lora_run / "adapter_best"), "--output", str(out),
        "--repo-id", "EXAONE-3.5-tiny-MedQA-test", "--push", "--public", "--base-model-id",
        "LGAI-EXAONE/EXAONE-3.5-7.8B-Instruct", "--log-file", str(log),
    ])
    assert rc == 0
    factory.assert_called_with(token=FAKE_TOKEN)  # the token goes to HfApi and nowhere else
    api.create_repo.assert_called_once_with(repo_id="labuser/EXAONE-3.5-tiny-MedQA-test", repo_type="model",
                                            private=False, exist_ok=True)
    kwargs = api.upload_folder.call_args.kwargs
    assert kwargs["repo_id"] == "labuser/EXAONE-3.5-tiny-MedQA-test" and Path(kwargs["folder_path"]) == out
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert sorted(kwargs["allow_patterns"]) == files
    assert {"README.md", "LICENSE", "config.json", "generation_config.json", "model.safetensors.index.json",
            "tokenizer.json", "training/resolved_config.yaml"} <= set(files)
    assert "labuser/EXAONE-3.5-tiny-MedQA-test" in (out / "README.md").read_text()
    assert (out / "LICENSE").read_text() == (licensed_base / "LICENSE").read_text()  # the full text travels
    assert "agreement is missing" not in (out / "README.md").read_text()

    captured = capfd.readouterr()
    for text in (captured.out, captured.err, log.read_text()):
        assert FAKE_TOKEN not in text
    assert FAKE_TOKEN.encode() not in _all_written_text(out)


def test_private_by_default_and_adapter_only(licensed_base, tiny_lora_run, tmp_path, hub):
    api, _ = hub
    out = tmp_path / "adapter_release"
    rc = merge_and_upload.main(["--base", str(licensed_base), "--adapter", str(tiny_lora_run), "--output", str(out),
                                "--adapter-only", "--push", "--base-model-id", "LGAI-EXAONE/EXAONE-3.5-7.8B-Instruct"])
    assert rc == 0
    assert api.create_repo.call_args.kwargs["private"] is True
    assert api.create_repo.call_args.kwargs["repo_id"] == "labuser/EXAONE-3.5-7.8B-Instruct-HAI-MedQA-LoRA"
    sent = sorted(api.upload_folder.call_args.kwargs["allow_patterns"])
    assert sent == [name for name, _ in release_files(out)]
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "LICENSE", "tokenizer.json"} <= set(sent)
    assert not any(name.endswith("model.safetensors.index.json") for name in sent)  # no merged weights
    card = (out / "README.md").read_text()
    assert "library_name: peft" in card and "PeftModel.from_pretrained" in card


def test_dry_run_lists_every_file_and_touches_no_network(tiny_exaone_dir, tiny_lora_run, tmp_path, hub, capsys):
    api, factory = hub
    out = tmp_path / "merged"
    rc = merge_and_upload.main(["--base", str(tiny_exaone_dir), "--adapter", str(tiny_lora_run), "--output", str(out),
                                "--push", "--dry-run"])
    assert rc == 0
    factory.assert_not_called()
    stdout = capsys.readouterr().out
    assert "visibility: private" in stdout
    assert "<your-hf-username>/EXAONE-HAI-MedQA" in stdout  # tiny base: no Hub id, compliant default name
    for name, size in release_files(out):
        line = next(line for line in stdout.splitlines() if line.strip().startswith(name + " "))
        if size < 1024:
            assert line.strip().endswith(f"{size} B"), line


def test_name_rule_refused_before_any_work(licensed_base, tiny_lora_run, tmp_path, hub, capsys):
    out = tmp_path / "merged"
    args = ["--base", str(licensed_base), "--adapter", str(tiny_lora_run), "--output", str(out),
            "--repo-id", "labuser/MedQA-ko-7.8B", "--push"]
    assert merge_and_upload.main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "EXAONE" in err and err.count("\n") == 1  # one line, no traceback
    assert not out.exists()
    hub[0].create_repo.assert_not_called()
    # An explicit override is possible (and logged); then the upload goes ahead.
    assert merge_and_upload.main(args + ["--allow-noncompliant-name", "--base-model-id", "x/EXAONE-base"]) == 0
    hub[0].upload_folder.assert_called_once()

    with pytest.raises(PublishError, match="not a valid Hub id"):
        check_repo_id("a/b/EXAONE-x")
    check_repo_id("someone/EXAONE-3.5-7.8B-Instruct-HAI-MedQA")


def test_network_error_is_one_line_and_leaves_folder_intact(licensed_base, tiny_lora_run, tmp_path, hub, capfd):
    api, _ = hub
    api.upload_folder.side_effect = ConnectionError(f"connection reset while sending (Authorization: {FAKE_TOKEN})")
    out = tmp_path / "merged"
    args = ["--base", str(licensed_base), "--adapter", str(tiny_lora_run), "--output", str(out), "--push",
            "--base-model-id", "LGAI-EXAONE/EXAONE-3.5-7.8B-Instruct"]
    assert merge_and_upload.main(args) == 1
    captured = capfd.readouterr()
    assert "error: upload to labuser/EXAONE-3.5-7.8B-Instruct-HAI-MedQA failed" in captured.err
    assert "intact" in captured.err and FAKE_TOKEN not in captured.err + captured.out
    before = {name: size for name, size in release_files(out)}
    shard = next(out.glob("model-*.safetensors"))
    mtime = shard.stat().st_mtime_ns

    # Re-running the same command resumes: the finished merge is reused, only the upload repeats.
    api.upload_folder.side_effect = None
    assert merge_and_upload.main(args) == 0
    assert shard.stat().st_mtime_ns == mtime
    assert {name for name, _ in release_files(out)} == set(before)
    assert api.upload_folder.call_count == 2


def test_push_refused_without_the_full_license_text(tiny_exaone_dir, tiny_lora_run, tmp_path, hub, capfd):
    """The EXAONE license must accompany every copy: without its text in the base folder --push stops
    with one line (also in --log-file) before anything is written; --allow-missing-license uploads and
    the card says the copy is missing."""
    api, _ = hub
    out, log = tmp_path / "merged", tmp_path / "merge.log"
    args = ["--base", str(tiny_exaone_dir), "--adapter", str(tiny_lora_run), "--output", str(out), "--push",
            "--base-model-id", "LGAI-EXAONE/EXAONE-3.5-7.8B-Instruct", "--log-file", str(log)]
    assert merge_and_upload.main(args) == 1
    err = capfd.readouterr().err
    assert err.startswith("error: the base model folder has no LICENSE file") and err.count("\n") == 1
    assert err.strip() in log.read_text(encoding="utf-8")  # the failure line reaches the log file too
    assert not out.exists()
    api.create_repo.assert_not_called()

    assert merge_and_upload.main(args + ["--allow-missing-license"]) == 0
    api.upload_folder.assert_called_once()
    assert "full text of the agreement is missing" in (out / "README.md").read_text(encoding="utf-8")
    assert json.loads((out / "release_info.json").read_text())["full_license_text"] is False


def test_token_found_in_a_file_blocks_upload(tiny_exaone_dir, tiny_lora_run, tmp_path, hub):
    from hai_medqa.publish import publish

    folder = tmp_path / "rel"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"env": {"HF_TOKEN": FAKE_TOKEN}}))
    with pytest.raises(PublishError, match="contains your Hub token") as e:
        publish(folder, "me/EXAONE-x")
    assert FAKE_TOKEN not in str(e.value)
    hub[0].upload_folder.assert_not_called()


def test_missing_token_is_a_clear_error(tmp_path, monkeypatch):
    from hai_medqa.publish import publish

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # no stored login either
    (tmp_path / "rel").mkdir()
    (tmp_path / "rel" / "README.md").write_text("x")
    with pytest.raises(PublishError, match="HF_TOKEN"):
        publish(tmp_path / "rel", "me/EXAONE-x")


def test_shard_size_argument():
    import argparse

    assert merge_and_upload.parse_size("5GB") == 5 * 10**9
    assert merge_and_upload.parse_size("512MiB") == 512 * 2**20
    assert merge_and_upload.parse_size("1000") == 1000
    with pytest.raises(argparse.ArgumentTypeError):
        merge_and_upload.parse_size("five gigs")
