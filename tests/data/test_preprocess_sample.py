"""The bundled sample: shipped bytes == builder output, realistic layout, clean, and preprocessing it is
deterministic and the same from the folder as from the zip, for every pairing mode."""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path

import pytest

from hai_medqa.data import run_preprocess
from hai_medqa.fixtures.aihub_sample import (
    SAMPLE_DIR,
    TRAIN_LABEL_ROOT,
    VALIDATION_LABEL_ROOT,
    check_sample,
    sample_files,
)
from hai_medqa.io_utils import iter_jsonl, sha256_file

TL = SAMPLE_DIR / TRAIN_LABEL_ROOT
VL = SAMPLE_DIR / VALIDATION_LABEL_ROOT


def test_shipped_sample_equals_the_builder_output():
    assert check_sample() == []
    assert sample_files() == sample_files()  # the builder itself is deterministic


def test_zips_hold_exactly_the_folder_files():
    for label_root, zip_name in ((TL, "TL.zip"), (VL, "VL.zip")):
        on_disk = {
            p.relative_to(label_root).as_posix(): p.read_bytes() for p in label_root.rglob("*") if p.is_file()
        }
        with zipfile.ZipFile(SAMPLE_DIR / zip_name) as zf:
            in_zip = {i.filename: zf.read(i) for i in zf.infolist() if not i.is_dir()}
            assert {i.filename.split("/")[0] for i in zf.infolist()} == {"1.질문", "2.답변"}
        assert in_zip == on_disk


def test_sample_looks_like_the_real_data():
    files = sorted(p for p in SAMPLE_DIR.rglob("*.json"))
    assert sum(p.stat().st_size for p in SAMPLE_DIR.rglob("*") if p.is_file()) < 2_000_000
    categories, diseases, intentions, departments = set(), set(), set(), []
    for path in files:
        rel = path.relative_to(SAMPLE_DIR).parts
        role_at = rel.index("1.질문") if "1.질문" in rel else rel.index("2.답변")
        category, disease, intention, name = rel[role_at + 1 :]  # exactly three folder levels
        obj = json.loads(path.read_text(encoding="utf-8"))
        assert obj["fileName"] + ".json" == name
        assert (obj["disease_category"], obj["disease_name"]["kor"], obj["intention"]) == (
            category,
            disease,
            intention,
        )
        if rel[role_at] == "1.질문":
            assert re.fullmatch(r"HC-Q-\d{7}", obj["fileName"]) and obj["question"].strip()
            assert isinstance(obj["participantsInfo"]["history"], bool)
        else:
            assert re.fullmatch(r"HC-A-\d{8}", obj["fileName"])
            assert all(obj["answer"][k].strip() for k in ("intro", "body", "conclusion"))
            departments += obj["department"]
        categories.add(category)
        diseases.add(disease)
        intentions.add(intention)
    assert len(categories) >= 5
    assert {"공기가슴증(기흉)", "HIV 감염", "제2형 당뇨병"} <= diseases
    assert "식이, 생활" in intentions
    assert any("\n" in d for d in departments)


def _question_count(label_root):
    return sum(1 for _ in (label_root / "1.질문").rglob("*.json"))


def test_sample_preprocesses_cleanly_into_the_expected_sizes(sample_jsonl):
    for split, label_root, low, high in (("train", TL, 150, 300), ("validation", VL, 30, 60)):
        report = json.loads(Path(f"{sample_jsonl[split]}.report.json").read_text(encoding="utf-8"))
        assert report["skipped"] == {}
        assert report["folders"]["paired"] == report["folders"]["total"]
        # round_robin: one record per question, nothing lost
        assert report["records"]["written"] == _question_count(label_root)
        assert low <= report["records"]["written"] <= high
    train = {(r["disease"], r["intention"], r["instruction"]) for _, r in iter_jsonl(sample_jsonl["train"])}
    val = {
        (r["disease"], r["intention"], r["instruction"]) for _, r in iter_jsonl(sample_jsonl["validation"])
    }
    assert not train & val  # validation questions are not training questions


@pytest.mark.parametrize(("pairing", "cap"), [("round_robin", None), ("cover", None), ("cross", 6)])
def test_folder_and_zip_give_byte_identical_output(tmp_path, pairing, cap):
    outs = []
    for name, source in (("folder", TL), ("zip", SAMPLE_DIR / "TL.zip")):
        out = tmp_path / f"{name}.jsonl"
        report = run_preprocess(
            [source], out, pairing=pairing, max_pairs_per_folder=cap, seed=3, progress=False
        )
        assert report["output_sha256"] == sha256_file(out)
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    assert outs[0].count(b"\n") > 0


def test_cover_and_cross_counts_follow_from_folder_sizes(tmp_path):
    sizes = []
    for q_dir in sorted(p for p in (TL / "1.질문").glob("*/*/*")):
        a_dir = TL / "2.답변" / q_dir.relative_to(TL / "1.질문")
        sizes.append((len(list(q_dir.glob("*.json"))), len(list(a_dir.glob("*.json")))))
    cover = run_preprocess([TL], tmp_path / "cover.jsonl", pairing="cover", progress=False)
    cross = run_preprocess(
        [TL], tmp_path / "cross.jsonl", pairing="cross", max_pairs_per_folder=6, progress=False
    )
    assert cover["records"]["paired"] == sum(max(q, a) for q, a in sizes)
    assert cover["answers"]["unused"] == 0
    assert cross["records"]["paired"] == sum(min(q * a, 6) for q, a in sizes)


def test_same_seed_same_bytes_other_seed_other_pairs(tmp_path):
    a = run_preprocess([TL], tmp_path / "a.jsonl", seed=7, progress=False)
    b = run_preprocess([TL], tmp_path / "b.jsonl", seed=7, progress=False)
    c = run_preprocess([TL], tmp_path / "c.jsonl", seed=8, progress=False)
    assert a["output_sha256"] == b["output_sha256"] != c["output_sha256"]
    # a different seed changes which answer a question gets, never which questions are kept
    ids = [[r["question_id"] for _, r in iter_jsonl(tmp_path / f"{n}.jsonl")] for n in "ac"]
    assert ids[0] == ids[1]


def test_drop_intro_removes_the_first_paragraph(tmp_path):
    run_preprocess([VL], tmp_path / "with.jsonl", progress=False)
    run_preprocess([VL], tmp_path / "without.jsonl", drop_intro=True, progress=False)
    with_intro = [r for _, r in iter_jsonl(tmp_path / "with.jsonl")]
    without = [r for _, r in iter_jsonl(tmp_path / "without.jsonl")]
    assert len(with_intro) == len(without)
    for full, short in zip(with_intro, without, strict=True):
        assert full["output"].count("\n\n") == 2 and short["output"].count("\n\n") == 1
        assert full["output"].endswith(short["output"])
