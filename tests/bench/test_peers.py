"""bench/peers.py and train_throughput.py --peers: arm selection, the peer environment check (a missing
package or a broken version pin skips that peer with the reason in the JSON, and the rest runs), and - where
trl can be imported - a TRL arm on the tiny model on the CPU (float32, no NF4/Liger: they need a GPU).

trl is a bench-only option, not a project requirement: the TRL test is skipped unless trl imports here or
HAI_BENCH_TRL_SITE names a folder holding it (e.g. `pip install --no-deps --target /tmp/site_trl trl==1.16.0`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))
import peers  # noqa: E402 - bench/peers.py

TRL_SITE = os.environ.get("HAI_BENCH_TRL_SITE")


def _trl_available() -> bool:
    if TRL_SITE:
        return (Path(TRL_SITE) / "trl" / "__init__.py").is_file()
    return importlib.util.find_spec("trl") is not None


def _bench(tmp_path: Path, *args: str, timeout: int = 300) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "train_throughput.py"), "--shape", "tiny",
                           "--variants", "", "--workdir", str(tmp_path / "work"), "--out", str(out), *args],
                          capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads(out.read_text(encoding="utf-8"))


def test_arms_are_selected_by_prefix_and_unknown_ones_refused(tmp_path):
    assert peers.parse_peers("trl:flex") == ["trl:flex:ckpt", "trl:flex:nockpt"]
    assert peers.parse_peers("unsloth:nockpt, trl:sdpa:ckpt,trl:sdpa") == [
        "trl:sdpa:ckpt", "trl:sdpa:nockpt", "unsloth:nockpt"]  # ARMS order, each once
    assert peers.parse_peers("all") == list(peers.ARMS) and len(peers.ARMS) == 6
    assert peers.parse_peers("") == []
    with pytest.raises(peers.PeerError, match="'trl:flash' selects no arm"):
        peers.parse_peers("trl,trl:flash")
    # counterparts: checkpointing arms against lean, the others against fast; only TRL+flex is exact
    assert {k: (a.counterpart, a.exact) for k, a in peers.ARMS.items()} == {
        "trl:flex:ckpt": ("lean", True), "trl:flex:nockpt": ("fast", True), "trl:sdpa:ckpt": ("lean", False),
        "trl:sdpa:nockpt": ("fast", False), "unsloth:ckpt": ("lean", False), "unsloth:nockpt": ("fast", False)}

    kit = tmp_path / "kit"
    kit.mkdir()
    sites = peers.parse_peer_sites([f"trl={tmp_path}"], str(kit))
    assert sites["trl"] == str(tmp_path)  # an explicit site wins over the kit
    assert sites["unsloth"].split(os.pathsep) == [str(kit / "site_unsloth"), str(kit / "site_common")]
    with pytest.raises(peers.PeerError, match="PEER=PATH"):
        peers.parse_peer_sites(["vllm=/tmp"])
    with pytest.raises(peers.PeerError, match="no such folder"):
        peers.parse_peer_sites([f"trl={tmp_path / 'absent'}"])


def test_a_missing_package_or_a_broken_pin_makes_a_skip_reason(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    info = peers.check_peer("unsloth", {"unsloth": str(empty)}, cuda=False)
    assert not info["ok"] and info["reason"].startswith("unsloth, unsloth_zoo")
    assert "not importable" in info["reason"] and "install" not in info["reason"]
    assert info["site"] == ["empty"]  # folder names only: no local paths in the JSON

    # A stand-in "trl" whose metadata pins transformers below the one this environment has: the check reads
    # the peer's own Requires-Dist, as it does for Unsloth's transformers <= 5.17.
    fake = tmp_path / "fake"
    (fake / "trl").mkdir(parents=True)
    (fake / "trl" / "__init__.py").write_text("")
    (fake / "trl-0.0.1.dist-info").mkdir()
    (fake / "trl-0.0.1.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: trl\nVersion: 0.0.1\nRequires-Dist: transformers<=4.0\n"
        "Requires-Dist: rich; extra == 'cli'\n")
    info = peers.check_peer("trl", {"trl": str(fake)}, cuda=False)
    assert not info["ok"] and "trl needs transformers<=4.0, found 5." in info["reason"], info
    assert info["versions"]["trl"] == "0.0.1"
    (fake / "trl-0.0.1.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: trl\nVersion: 0.0.1\nRequires-Dist: transformers>=4.0\n")
    assert peers.check_peer("trl", {"trl": str(fake)}, cuda=False)["ok"]


def test_a_peer_that_cannot_run_is_one_line_and_a_skipped_row(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc, report = _bench(tmp_path, "--records", "40", "--peers", "unsloth:nockpt", "--peer-site", f"unsloth={empty}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("peer unsloth: skipped (")]
    assert len(lines) == 1 and "pip" not in proc.stdout + proc.stderr
    (row,) = report["results"]
    assert row["arm"] == "unsloth:nockpt" and "not importable" in row["skipped"] and row["peer_of"] == "fast"
    assert report["peers"]["environments"]["unsloth"]["ok"] is False
    # the samples the peers would have trained on were written: the project's tokenisation of all 40 records
    assert report["data"]["peer_data"]["samples"] == 40
    assert any(ln.startswith("peer unsloth:nockpt [~fast]") and "SKIPPED" in ln for ln in proc.stdout.splitlines())


@pytest.mark.slow
@pytest.mark.skipif(not _trl_available(), reason="trl is not importable (a bench-only peer, not a project "
                    "requirement; set HAI_BENCH_TRL_SITE to a folder holding trl to run this test)")
def test_trl_arm_trains_on_the_projects_samples_on_cpu(tmp_path):
    site = ["--peer-site", f"trl={TRL_SITE}"] if TRL_SITE else []
    empty = tmp_path / "empty"
    empty.mkdir()
    proc, report = _bench(tmp_path, "--records", "60", "--warmup", "1", "--steps", "3", "--peer-tokens", "512",
                          "--peers", "trl:sdpa:nockpt,unsloth:ckpt", *site, "--peer-site", f"unsloth={empty}")
    trl, unsloth = report["results"]
    assert "skipped" in unsloth and "error" not in trl and "skipped" not in trl, trl
    assert trl["steps_timed"] == 3 and len(trl["losses"]) == 4 and len(trl["grad_norms"]) == 4
    # one BFD-packed, padding-free row per step, within the token budget and nearly full
    assert all(256 < n <= 512 for n in trl["tokens_per_step"]), trl["tokens_per_step"]
    assert trl["tokens_timed"] == sum(trl["tokens_per_step"][1:])
    assert trl["logged_tokens_timed"] == trl["tokens_timed"]  # TRL's own num_tokens agrees with the count
    assert trl["real_tokens_per_s"] > 0 and all(x == x and x > 0 for x in trl["losses"])
    cfg = trl["config"]
    assert (cfg["packing_strategy"], cfg["padding_free_used"], cfg["attn_implementation"]) == ("bfd", True, "sdpa")
    assert (cfg["lr_scheduler_type"], cfg["max_length"], cfg["lora"]["r"], cfg["lora"]["alpha"]) == (
        "constant", 512, 16, 32)
    assert cfg["data"] == "tokenized" and cfg["completion_only_loss_used"] is False  # labels come masked
    # the samples are the project's: prompt tokens carry no loss in the data the arm read
    first = json.loads((tmp_path / "work" / "peer_data.jsonl").read_text(encoding="utf-8").splitlines()[0])
    assert first["labels"][0] == -100 and first["labels"][-1] == first["input_ids"][-1]
    assert [m["role"] for m in first["prompt"] + first["completion"]] == ["system", "user", "assistant"]
    assert trl["peer_of"] == "fast" and trl["exact_equivalent"] is False
    assert any(ln.startswith("peer trl:sdpa:nockpt [~fast]") for ln in proc.stdout.splitlines())


def test_arms_side_by_side_each_get_one_gpu_and_keep_their_order(capsys, bench_module):
    tt = bench_module("train_throughput")
    code = "import os, sys; print('on', os.environ.get('CUDA_VISIBLE_DEVICES', 'all')); sys.exit(int(sys.argv[1]))"
    jobs = [{"key": i, "spec": {"name": f"arm{i}"}, "cmd": [sys.executable, "-c", code, str(rc)]}
            for i, rc in enumerate([0, 3, 0, 0, 0])]
    seen = []
    tt.run_jobs(jobs, ["0", "1"], lambda job, rc, s, gpu: seen.append((job["key"], rc, gpu)))
    assert sorted(k for k, _, _ in seen) == [0, 1, 2, 3, 4]
    assert {k: rc for k, rc, _ in seen} == {0: 0, 1: 3, 2: 0, 3: 0, 4: 0}  # a failing arm does not stop the rest
    assert {gpu for _, _, gpu in seen} <= {"0", "1"}
    out = capsys.readouterr().out.splitlines()
    # every line of an arm carries the GPU it ran on, and says so itself
    assert sorted(out) == sorted(f"[gpu{gpu}] on {gpu}" for _, _, gpu in seen)
    seen.clear()
    tt.run_jobs(jobs[:2], None, lambda job, rc, s, gpu: seen.append((job["key"], rc, gpu)))
    assert seen == [(0, 0, None), (1, 3, None)]  # one after the other, in order
