"""bench/plot_throughput.py: merges a shape's benchmark JSONs into one picture, refuses mixed shapes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def _write(path: Path, shape: str, *results: dict) -> Path:
    path.write_text(json.dumps({"shape": shape, "device": "test GPU", "results": list(results)}), encoding="utf-8")
    return path


def _result(name: str, profile: str, tok_s: float) -> dict:
    return {"name": name, "profile": profile, "real_tokens_per_s": tok_s, "peak_reserved_gib": 9.5,
            "losses": [10.0, 5.0, 1.0]}


def test_files_of_one_shape_merge_and_the_png_is_written(tmp_path, bench_module):
    mod = bench_module("plot_throughput")
    a = _write(tmp_path / "a.json", "7.8b", _result("baseline", "seed-style", 1000), _result("auto", "fast", 9000))
    b = _write(tmp_path / "b.json", "7.8b", _result("auto", "fast", 12000), _result("plain", "plain", 3000))
    shape, _, results = mod.load_results([a, b])
    assert shape == "7.8b"
    assert list(results) == ["baseline", "auto", "plain"]
    assert results["auto"]["real_tokens_per_s"] == 12000  # the later file wins
    out = mod.plot([a, b], tmp_path / "plots" / "t.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.parent.glob(".*.tmp"))


def test_mixed_shapes_and_unreadable_files_are_refused(tmp_path, bench_module):
    mod = bench_module("plot_throughput")
    a = _write(tmp_path / "a.json", "7.8b", _result("lean", "lean", 9000))
    b = _write(tmp_path / "b.json", "2.4b", _result("lean", "lean", 13000))
    with pytest.raises(SystemExit, match="mix model shapes"):
        mod.load_results([a, b])
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(SystemExit, match="bad.json"):
        mod.load_results([bad])
