"""The release stage (hai_medqa.publish.release): what a release folder carries beside the merged weights."""

from __future__ import annotations

import json

from hai_medqa.publish.release import make_release


def test_release_side_files(tiny_exaone_dir, tiny_lora_run, tmp_path):
    out = tmp_path / "out"
    make_release(str(tiny_exaone_dir), tiny_lora_run, out)  # merge, then the release's files
    assert "EXAONE" in (out / "LICENSE").read_text()
    assert sorted(p.name for p in (out / "training").iterdir()) == ["resolved_config.yaml", "run_info.json",
                                                                     "summary.json"]
    info = json.loads((out / "merge_info.json").read_text())
    assert info["adapted_weights"] == 21 and info["layout"] == "llama" and info["base_layout"] == "exaone"
    release = json.loads((out / "release_info.json").read_text())
    assert release["kind"] == "merged" and release["full_license_text"] is False
    assert (out / "README.md").is_file()
