"""A generated tree with every quirk the real data has (or might have): exact record and skip
counts, folder == zip, and zips whose names carry no UTF-8 flag."""

from __future__ import annotations

import json
import os
import unicodedata
import zipfile
from pathlib import Path

import pytest

from hai_medqa.data import run_preprocess
from hai_medqa.data.read import ANSWER, QUESTION
from hai_medqa.io_utils import iter_jsonl

F1 = ("호흡기질환", "공기가슴증(기흉)", "증상")
F2 = ("순환기질환", "고혈압", "식이, 생활")  # question side written with NFD folder names
F3 = ("소화기질환", "위식도 역류질환", "치료")  # questions only
F4 = ("뇌신경정신질환", "편두통", "예방")  # answers only
F5 = ("기타", "두통")  # two levels deep
F6 = ("감염성질환", "HIV 감염", "진단", "추가")  # four levels deep
F7 = ("유방내분비질환", "제2형 당뇨병", "약물")  # two questions with the same text
F8 = ("근골격질환", "무릎 골관절염", "운동")  # valid questions, only a broken answer
F9 = ("기타", "빈 폴더", "정의")  # nothing valid


def _q(qid: str, text, folder: tuple[str, ...]) -> dict:
    return {
        "fileName": qid,
        "disease_category": folder[0],
        "disease_name": {"kor": folder[1], "eng": ""},
        "intention": folder[-1],
        "question": text,
    }


def _a(aid: str, intro="", body="", conclusion="", department=("내과",)) -> dict:
    return {
        "fileName": aid,
        "department": list(department),
        "answer": {"intro": intro, "body": body, "conclusion": conclusion},
    }


class TreeWriter:
    def __init__(self, root: Path):
        self.root = root

    def folder(self, role: str, key: tuple[str, ...], nfd: bool = False) -> Path:
        parts = [unicodedata.normalize("NFD", p) for p in key] if nfd else list(key)
        path = self.root.joinpath("1.질문" if role == QUESTION else "2.답변", *parts)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def json(self, role, key, name, obj, nfd=False, bom=False):
        data = json.dumps(obj, ensure_ascii=False).encode("utf-8")
        (self.folder(role, key, nfd) / name).write_bytes((b"\xef\xbb\xbf" if bom else b"") + data)

    def raw(self, role, key, name, data: bytes):
        (self.folder(role, key) / name).write_bytes(data)


def build_quirk_tree(root: Path, *, special_files: bool = True) -> Path:
    """The tree the expectations below are written for. special_files adds a broken symlink and a
    FIFO, which a zip cannot hold."""
    t = TreeWriter(root)
    Q, A = QUESTION, ANSWER
    # F1: 3 valid questions among 12 files, 2 valid answers among 7
    t.json(Q, F1, "HC-Q-0000001.json", _q("HC-Q-0000001", "기흉의 증상은 무엇인가요?", F1))
    t.json(Q, F1, "HC-Q-0000002.json", _q("HC-Q-0000002", "숨이  차고\t가슴이 아파요 ", F1), bom=True)
    t.json(Q, F1, "HC-Q-0000003.json", {"question": "기흉이면 숨이 차나요?"})  # no fileName, no metadata
    full = json.dumps(_q("HC-Q-0000004", "잘린 파일", F1), ensure_ascii=False).encode()
    t.raw(Q, F1, "HC-Q-0000004.json", full[: len(full) // 2])  # truncated
    t.json(Q, F1, "HC-Q-0000005.json", _q("HC-Q-0000005", 123, F1))  # wrong type
    t.json(Q, F1, "HC-Q-0000006.json", {"fileName": "HC-Q-0000006"})  # missing key
    t.json(Q, F1, "HC-Q-0000007.json", _q("HC-Q-0000007", " \n\t ", F1))  # empty after normalising
    t.raw(Q, F1, "HC-Q-0000008.json", b'{"question": "\xff\xfe"}')  # not UTF-8
    t.raw(Q, F1, "HC-Q-0000009.json", b"[1, 2]")  # not an object
    t.raw(Q, F1, "notes.txt", "메모".encode())
    t.raw(Q, F1, ".DS_Store", b"\x00\x01")
    (t.folder(Q, F1) / "HC-Q-0000012.json").mkdir()  # a folder with a .json name: an empty subfolder
    if special_files:
        os.symlink(root / "nowhere.json", t.folder(Q, F1) / "HC-Q-0000010.json")  # broken symlink
        os.mkfifo(t.folder(Q, F1) / "HC-Q-0000011.json")  # would block forever if opened
    t.json(
        A,
        F1,
        "HC-A-00000001.json",
        _a("HC-A-00000001", "기흉 증상입니다.", "갑자기 가슴이 아프고 숨이 찹니다.", "병원에 가세요."),
    )
    t.json(A, F1, "HC-A-00000002.json", _a("HC-A-00000002", "", "한쪽 가슴 통증이 흔합니다.", None))
    t.json(A, F1, "HC-A-00000003.json", _a("HC-A-00000003", " ", "\n", ""))  # empty
    t.json(A, F1, "HC-A-00000004.json", {"fileName": "HC-A-00000004", "answer": "문자열 답변"})  # wrong type
    t.json(A, F1, "HC-A-00000005.json", {"answer": {"intro": 5, "body": "b"}})  # wrong type inside
    t.json(A, F1, "HC-A-00000006.json", {"fileName": "HC-A-00000006"})  # missing key
    t.json(A, F1, "HC-A-00000007.json", {"answer": {}})  # none of the parts
    # F2: NFD folder names on the question side must still meet the NFC answer folders
    for i in range(1, 4):
        t.json(
            Q,
            F2,
            f"HC-Q-000002{i}.json",
            _q(f"HC-Q-000002{i}", f"고혈압에 좋은 음식 {i}가지는?", F2),
            nfd=True,
        )
    for i in range(1, 3):
        t.json(
            A,
            F2,
            f"HC-A-0000002{i}.json",
            _a(f"HC-A-0000002{i}", body=f"싱겁게 드세요 ({i}).", department=("순환기내과\n가정의학과",)),
        )
    for i in range(1, 3):
        t.json(Q, F3, f"HC-Q-000003{i}.json", _q(f"HC-Q-000003{i}", f"역류질환 치료 {i}", F3))
        t.json(A, F4, f"HC-A-0000004{i}.json", _a(f"HC-A-0000004{i}", body=f"편두통 예방 {i}"))
        t.json(Q, F5, f"HC-Q-000005{i}.json", _q(f"HC-Q-000005{i}", f"두통 질문 {i}", F5))
    t.json(A, F5, "HC-A-00000051.json", _a("HC-A-00000051", body="두통 답변"))
    t.json(Q, F6, "HC-Q-0000061.json", _q("HC-Q-0000061", "HIV 검사는 어떻게 하나요?", F6))
    t.json(A, F6, "HC-A-00000061.json", _a("HC-A-00000061", body="선별 검사 후 확진 검사를 합니다."))
    for i, text in enumerate(["약은 언제 먹나요?", "약은 언제 먹나요?", "약을 끊어도 되나요?"], 1):
        t.json(Q, F7, f"HC-Q-000007{i}.json", _q(f"HC-Q-000007{i}", text, F7))
    t.json(A, F7, "HC-A-00000071.json", _a("HC-A-00000071", body="의사와 상의하세요."))
    for i in range(1, 3):
        t.json(Q, F8, f"HC-Q-000008{i}.json", _q(f"HC-Q-000008{i}", f"무릎 운동 {i}", F8))
    t.raw(A, F8, "HC-A-00000081.json", b'{"answer": {"body": "x"')  # truncated
    t.raw(Q, F9, "HC-Q-0000091.json", b'"just a string"')  # not an object
    return root


# Expectations for build_quirk_tree, worked out by hand from the files above.
EXPECTED_SKIPS = {  # reason: (questions, answers)
    "malformed_json": (1, 1),
    "wrong_type": (1, 2),
    "missing_key": (1, 2),
    "empty_text": (1, 1),
    "not_utf8": (1, 0),
    "not_object": (2, 0),
    "not_json_file": (1, 0),
    "hidden_file": (1, 0),
    "not_regular_file": (2, 0),
}
EXPECTED_FOLDERS = {"total": 9, "paired": 5, "questions_only": 2, "answers_only": 1, "no_valid_files": 1}
# F1 3 + F2 3 + F5 2 + F6 1 + F7 3 pairs; F7's two same-text questions share the only answer.
EXPECTED_RECORDS = {"paired": 12, "duplicates_removed": 1, "written": 11}


@pytest.fixture
def quirk_tree(tmp_path) -> Path:
    return build_quirk_tree(tmp_path / "TL")


def test_quirk_tree_exact_counts(quirk_tree, tmp_path):
    out = tmp_path / "out.jsonl"
    report = run_preprocess([quirk_tree], out, progress=False)
    assert report["records"] == EXPECTED_RECORDS
    assert report["folders"] == EXPECTED_FOLDERS
    skips = {k: (v["questions"], v["answers"]) for k, v in report["skipped"].items()}
    assert skips == EXPECTED_SKIPS
    assert report["files"] == {"seen": 42, "read": 38}
    assert report["questions"] == {"valid": 16, "in_folders_without_answers": 4}
    assert report["answers"]["valid"] == 9
    # every skip names the offending file
    assert any("HC-Q-0000004.json" in e for e in report["skipped"]["malformed_json"]["examples"])
    assert any("HC-Q-0000011.json" in e for e in report["skipped"]["not_regular_file"]["examples"])
    # the report on disk is the returned one
    assert json.loads(Path(f"{out}.report.json").read_text(encoding="utf-8"))["records"] == EXPECTED_RECORDS

    records = [r for _, r in iter_jsonl(out)]
    assert len(records) == 11
    by_folder = {}
    for r in records:
        by_folder.setdefault((r["category"], r["disease"], r["intention"]), []).append(r)
    f1 = by_folder[F1]
    assert {r["question_id"] for r in f1} == {
        "HC-Q-0000001",
        "HC-Q-0000002",
        "HC-Q-0000003",
    }  # id from file name
    assert {r["answer_id"] for r in f1} == {"HC-A-00000001", "HC-A-00000002"}  # used evenly: 2 + 1
    assert "숨이 차고 가슴이 아파요" in {r["instruction"] for r in f1}  # BOM file read, whitespace normalised
    assert {r["output"] for r in f1} >= {"한쪽 가슴 통증이 흔합니다."}  # empty intro/None conclusion skipped
    f2 = by_folder[F2]  # NFD question folders paired with NFC answer folders
    assert len(f2) == 3 and f2[0]["department"] == ["순환기내과", "가정의학과"]
    assert len(by_folder[("감염성질환", "HIV 감염", "추가")]) == 1  # depth 4: labels from the question file
    assert len(by_folder[F7]) == 2
    assert all(unicodedata.is_normalized("NFC", json.dumps(r, ensure_ascii=False)) for r in records)


def _zip_tree(root: Path, zip_path: Path) -> Path:
    """Zip every regular file and folder under `root` with names as they are on disk (NFD included)."""
    with zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for dirpath, dirnames, filenames in sorted(os.walk(root)):
            for name in sorted(dirnames):
                zf.write(Path(dirpath, name), Path(dirpath, name).relative_to(root).as_posix() + "/")
            for name in sorted(filenames):
                path = Path(dirpath, name)
                if path.is_file():
                    zf.write(path, path.relative_to(root).as_posix())
    return zip_path


def test_zip_gives_the_same_output_as_the_folder(tmp_path):
    root = build_quirk_tree(tmp_path / "TL", special_files=False)
    zip_path = _zip_tree(root, tmp_path / "TL.zip")
    with zipfile.ZipFile(zip_path) as zf:  # the zip really holds NFD names
        assert any(n != unicodedata.normalize("NFC", n) for n in zf.namelist())
    by_folder = run_preprocess([root], tmp_path / "folder.jsonl", progress=False)
    by_zip = run_preprocess([zip_path], tmp_path / "zip.jsonl", progress=False)
    assert (tmp_path / "folder.jsonl").read_bytes() == (tmp_path / "zip.jsonl").read_bytes()
    expected_skips = {k: v for k, v in EXPECTED_SKIPS.items() if k != "not_regular_file"}
    for report in (by_folder, by_zip):
        assert report["records"] == EXPECTED_RECORDS
        assert report["folders"] == EXPECTED_FOLDERS
        assert {k: (v["questions"], v["answers"]) for k, v in report["skipped"].items()} == expected_skips


def _zip_without_utf8_flag(files: dict[str, bytes], zip_path: Path, encoding: str) -> Path:
    """A zip whose entry names are `encoding` bytes with the UTF-8 flag unset, as old Windows and
    Korean archivers write them. zipfile always sets the flag for non-ASCII names, so write ASCII
    placeholders of the same byte length and patch the name bytes in afterwards."""
    encoded = {name: name.encode(encoding) for name in files}
    placeholders = {
        name: f"@{i:06d}".ljust(len(raw), "#").encode() for i, (name, raw) in enumerate(encoded.items())
    }
    with zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(placeholders[name].decode(), data)
    blob = zip_path.read_bytes()
    for name, placeholder in placeholders.items():
        assert blob.count(placeholder) == 2  # local header + central directory
        blob = blob.replace(placeholder, encoded[name])
    zip_path.write_bytes(blob)
    return zip_path


@pytest.mark.parametrize("encoding", ["cp949", "utf-8"])
def test_zip_names_without_utf8_flag_are_decoded(tmp_path, aihub_sample_dir, encoding):
    tl = aihub_sample_dir / "3.개방데이터/1.데이터/Validation/02.라벨링데이터/VL"
    files = {p.relative_to(tl).as_posix(): p.read_bytes() for p in sorted(tl.rglob("*.json"))}
    zip_path = _zip_without_utf8_flag(files, tmp_path / "VL.zip", encoding)
    with zipfile.ZipFile(zip_path) as zf:
        assert not any(i.flag_bits & 0x800 for i in zf.infolist())
        assert "1.질문" not in zf.namelist()[0]  # zipfile alone shows mojibake
    run_preprocess([tl], tmp_path / "folder.jsonl", progress=False)
    report = run_preprocess([zip_path], tmp_path / "zip.jsonl", progress=False)
    assert report["skipped"] == {}
    assert (tmp_path / "folder.jsonl").read_bytes() == (tmp_path / "zip.jsonl").read_bytes()


def test_files_outside_the_qa_tree_in_a_zip_are_reported(tmp_path, aihub_sample_dir):
    zip_path = tmp_path / "TL.zip"
    with zipfile.ZipFile(aihub_sample_dir / "VL.zip") as src, zipfile.ZipFile(zip_path, "w") as dst:
        for info in src.infolist():
            dst.writestr(info, src.read(info))
        dst.writestr("README.txt", "설명")
        dst.writestr("__MACOSX/1.질문/._HC-Q-0000001.json", b"\x00")
        n_questions = sum(1 for n in src.namelist() if n.startswith("1.질문/") and n.endswith(".json"))
    report = run_preprocess([zip_path], tmp_path / "out.jsonl", progress=False)
    assert report["skipped"]["outside_qa_tree"]["count"] == 1
    assert report["skipped"]["hidden_file"]["count"] == 1
    assert report["records"]["written"] == n_questions
