"""Finding the data: label-root folders, TL/VL and dataset-root search, zips, and their errors."""

from __future__ import annotations

import json
import shutil
import unicodedata
import zipfile
from pathlib import Path

import pytest

from hai_medqa.data import run_preprocess
from hai_medqa.data.read import discover_sources
from hai_medqa.data.schema import DataError

LEAF = "호흡기질환/천식/증상"


def _label_root(root: Path, *, q_dir: str = "1.질문", text: str = "천식 증상은 어떤가요?") -> Path:
    """A minimal label root: one question and one answer in one leaf folder."""
    q = root / q_dir / LEAF / "HC-Q-0000001.json"
    a = root / "2.답변" / LEAF / "HC-A-00000001.json"
    q.parent.mkdir(parents=True)
    a.parent.mkdir(parents=True)
    q.write_text(
        json.dumps({"fileName": "HC-Q-0000001", "question": text}, ensure_ascii=False), encoding="utf-8"
    )
    a.write_text(
        json.dumps(
            {"fileName": "HC-A-00000001", "answer": {"body": "쌕쌕거림과 기침이 나타납니다."}},
            ensure_ascii=False,
        ),
        encoding="utf-8",
    )
    return root


def _zip_of(label_root: Path, zip_path: Path) -> Path:
    with zipfile.ZipFile(zip_path, "w") as zf:
        for path in sorted(label_root.rglob("*.json")):
            zf.write(path, path.relative_to(label_root).as_posix())
    return zip_path


def _dataset_root(tmp_path: Path) -> Path:
    """3.개방데이터/1.데이터/{Training,Validation}/02.라벨링데이터/{TL,VL} + a raw-data folder."""
    base = tmp_path / "3.개방데이터" / "1.데이터"
    _label_root(base / "Training" / "02.라벨링데이터" / "TL")
    _label_root(base / "Validation" / "02.라벨링데이터" / "VL", text="천식은 어떤 증상인가요?")
    _label_root(base / "Training" / "01.원천데이터" / "TS")  # raw data: must never be read as labels
    return tmp_path / "3.개방데이터"


def test_label_root_folder_is_used_as_is(tmp_path):
    root = _label_root(tmp_path / "TL")
    sources, ignored = discover_sources([root])
    assert [(s.kind, s.path) for s in sources] == [("folder", root)] and ignored == []


def test_labelling_folder_is_searched(tmp_path):
    base = tmp_path / "02.라벨링데이터"
    _label_root(base / "TL")
    sources, _ = discover_sources([base])
    assert [s.path for s in sources] == [base / "TL"]


def test_dataset_root_needs_a_split_and_skips_raw_data(tmp_path):
    root = _dataset_root(tmp_path)
    with pytest.raises(DataError, match="both Training and Validation.*--split"):
        discover_sources([root])
    sources, ignored = discover_sources([root], split="validation")
    assert [s.path.name for s in sources] == ["VL"]
    reasons = " ".join(i["reason"] for i in ignored)
    assert "원천데이터" in reasons and "not part of --split validation" in reasons


def test_zip_input_and_zip_found_by_search(tmp_path):
    tl = _label_root(tmp_path / "extract" / "TL")
    holder = tmp_path / "02.라벨링데이터"
    holder.mkdir()
    zip_path = _zip_of(tl, holder / "TL.zip")
    assert [(s.kind, s.path) for s in discover_sources([zip_path])[0]] == [("zip", zip_path)]
    assert [(s.kind, s.path) for s in discover_sources([holder])[0]] == [("zip", zip_path)]
    # an extracted TL/ next to TL.zip wins, and the report says why the zip was not used
    shutil.copytree(tl, holder / "TL")
    sources, ignored = discover_sources([holder])
    assert [(s.kind, s.path) for s in sources] == [("folder", holder / "TL")]
    assert ignored[0]["path"] == str(zip_path) and "using the folder" in ignored[0]["reason"]


def test_nfd_named_question_folder_is_recognised(tmp_path):
    root = _label_root(tmp_path / "TL", q_dir=unicodedata.normalize("NFD", "1.질문"))
    assert [s.path for s in discover_sources([tmp_path])[0]] == [root]
    report = run_preprocess([root], tmp_path / "out.jsonl", progress=False)
    assert report["records"]["written"] == 1 and report["folders"]["paired"] == 1


def test_same_input_twice_is_read_once(tmp_path):
    root = _label_root(tmp_path / "TL")
    (tmp_path / "elsewhere").mkdir()
    sources, ignored = discover_sources([root, tmp_path / "elsewhere" / ".." / "TL"])
    assert len(sources) == 1 and "already given" in ignored[0]["reason"]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p / "missing", "input not found"),
        (lambda p: (p / "notes.txt", (p / "notes.txt").write_text("x"))[0], "not a zip archive"),
        (lambda p: (p / "empty", (p / "empty").mkdir())[0], "no AI Hub label data"),
    ],
)
def test_unusable_inputs_are_one_line_errors(tmp_path, make, message):
    with pytest.raises(DataError, match=message) as info:
        discover_sources([make(tmp_path)])
    assert "\n" not in str(info.value)


def test_unknown_split_is_an_error(tmp_path):
    with pytest.raises(DataError, match="unknown split"):
        discover_sources([_label_root(tmp_path / "TL")], split="test")


def test_files_larger_than_one_read_are_read_whole(tmp_path):
    root = _label_root(tmp_path / "TL")
    body = "가" * 50_000 + "끝"  # 150 KB of UTF-8: more than one 64 KiB read
    answer = next((root / "2.답변").rglob("*.json"))
    answer.write_text(json.dumps({"answer": {"body": body}}, ensure_ascii=False), encoding="utf-8")
    out = tmp_path / "out.jsonl"
    run_preprocess([root], out, progress=False)
    assert json.loads(out.read_text(encoding="utf-8"))["output"] == body
