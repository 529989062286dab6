"""hai_medqa.guards: an output that is, contains or lies inside an input is refused (through
symlinks, `..` and hard links); a folder where a file is expected, and the reverse, is one line
naming the path; nothing is read or written."""

from __future__ import annotations

import os

import pytest

from hai_medqa.guards import PathError, check_input_kinds, check_output_paths


@pytest.fixture
def tree(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "q.jsonl").write_text('{"prompt": "두통"}\n', encoding="utf-8")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}", encoding="utf-8")
    return tmp_path


def _refused(inputs, outputs, match, **kw):
    with pytest.raises(PathError, match=match):
        check_output_paths(inputs, outputs, **kw)


def test_output_is_an_input(tree):
    q = tree / "data" / "q.jsonl"
    _refused({"--input": q}, {"--output": q}, r"--output .*q\.jsonl is the input --input")
    _refused({"--input": q}, {"--output": tree / "data" / ".." / "data" / "q.jsonl"}, "is the input")
    (tree / "link.jsonl").symlink_to(q)
    _refused({"--input": q}, {"--output": tree / "link.jsonl"}, "is the input")
    os.link(q, tree / "hard.jsonl")
    _refused({"--input": q}, {"--output": tree / "hard.jsonl"}, "is the input")
    assert q.read_text(encoding="utf-8") == '{"prompt": "두통"}\n'  # nothing touched


def test_output_inside_or_containing_an_input(tree):
    model = tree / "model"
    _refused({"--model": model}, {"--output": model / "answers.jsonl"}, "lies inside the input --model")
    _refused({"--model": model}, {"--output": model / "new" / "deeper" / "a.jsonl"}, "lies inside the input --model")
    (tree / "model_link").symlink_to(model, target_is_directory=True)
    _refused({"--model": model}, {"--output": tree / "model_link" / "a.jsonl"}, "lies inside")
    _refused({"--input": tree / "data" / "q.jsonl"}, {"--output-dir": tree / "data"}, "contains the input --input",
             folders={"--output-dir"})


def test_wrong_kinds_are_one_line_naming_the_path(tree):
    _refused({}, {"--output": tree / "data"}, r"--output .*data is a folder; expected a file path")
    _refused({}, {"--output-dir": tree / "data" / "q.jsonl"}, r"is a file; expected a folder", folders={"--output-dir"})
    _refused({}, {"--output": tree / "data" / "q.jsonl" / "a.jsonl"}, r"cannot be created: .*q\.jsonl is a file")
    with pytest.raises(PathError, match=r"--input .*data is a folder; expected a file"):
        check_input_kinds(files={"--input": tree / "data"})
    with pytest.raises(PathError, match=r"--model .*q\.jsonl is a file; expected a folder"):
        check_input_kinds(folders={"--model": tree / "data" / "q.jsonl"})
    check_input_kinds(files={"--input": tree / "missing.jsonl"}, folders={"--model": None})  # left to the reader


def test_two_outputs_on_one_path(tree):
    _refused({}, {"--output": tree / "out" / "a.jsonl", "--report": tree / "out" / "A.JSONL"}, "name the same path")


def test_separate_paths_pass(tree):
    check_output_paths({"--input": tree / "data" / "q.jsonl", "--model": tree / "model", "--adapter": None},
                       {"--output": tree / "out" / "a.jsonl", "--log": None})
    check_output_paths({"--data": tree / "data" / "q.jsonl"}, {"--output-dir": tree / "eval"}, folders={"--output-dir"})
