"""data/provenance.py on the bundled consultation sample: recognised by its bytes (it has no preprocess
report), wherever the copy lies; a changed copy claims nothing. The card's data section says so."""

from __future__ import annotations

import shutil

from hai_medqa.data.provenance import CONSULTATION_SAMPLE, data_provenance
from hai_medqa.data.schema import BUNDLED_CONSULTATION_SAMPLE
from hai_medqa.io_utils import sha256_file
from hai_medqa.train.adapter_folder import describe_training_data


def test_bundled_consultation_sample_is_recognised_by_its_bytes(tmp_path):
    train = BUNDLED_CONSULTATION_SAMPLE / "train.jsonl"
    records = sum(1 for line in train.read_text(encoding="utf-8").splitlines() if line.strip())
    copy = tmp_path / "mine.jsonl"
    shutil.copy(train, copy)
    for path in (train, copy):
        prov = data_provenance(path)
        assert (prov["source"], prov["split"], prov["report"]) == (CONSULTATION_SAMPLE, "train", False)
        assert prov["records"] == records and prov["sha256"] == sha256_file(train) and prov["file"] == path.name
    assert data_provenance(BUNDLED_CONSULTATION_SAMPLE / "val.jsonl")["split"] == "validation"

    with open(copy, "a", encoding="utf-8") as f:
        f.write('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}\n')
    changed = data_provenance(copy)
    assert (changed["source"], changed["split"], changed["records"]) == (None, None, records + 1)

    text = describe_training_data({"train": data_provenance(train), "validation": None})
    assert "**train**: `train.jsonl`" in text and "bundled consultation sample" in text and "split `train`" in text
    assert "synthetic" not in text and "AI Hub 초거대AI" not in text
    assert "source is not stated" in describe_training_data({"train": changed})
