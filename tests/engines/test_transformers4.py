"""transformers 4.57.6 (llama.cpp's converter pins it; many servers still run 4.x), in its own
environment, reads the merged folder exactly as transformers 5 does: same token ids, same rendered
chat template, logits within 1e-4, same greedy continuation. The same check run on the folder as
the merge wrote it before issue 16 (no legacy RoPE keys, tokenizer class TokenizersBackend) fails."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from engines.engine_texts import CONVERSATIONS, TEXTS, prompts

PROBE = Path(__file__).with_name("tf4_probe.py")
LOGIT_TOL = 1e-4


def transformers4_problems(folder: Path, tf4_dir: Path) -> tuple[list[str], dict]:
    """Every way transformers 4.x (run from `tf4_dir`) reads `folder` differently from transformers 5."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    prompt_ids = [tok(p).input_ids for p in prompts()]
    ref_ids = [tok(t).input_ids for t in TEXTS]
    ref_rendered = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in CONVERSATIONS]
    with torch.no_grad():
        ref_logits = [model(torch.tensor([ids])).logits[0].numpy() for ids in prompt_ids]
        ref_greedy = [model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                     max_new_tokens=8, do_sample=False)[0, len(ids):].tolist() for ids in prompt_ids]
    env = {**os.environ, "PYTHONPATH": str(tf4_dir), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TRANSFORMERS_VERBOSITY": "error"}
    request = {"folder": str(folder), "texts": TEXTS, "conversations": CONVERSATIONS, "prompt_ids": prompt_ids}
    proc = subprocess.run([sys.executable, str(PROBE)], input=json.dumps(request), capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["transformers"] == "4.57.6", got["transformers"]  # really the other environment
    problems = []
    if "tokenizer_error" in got:
        problems.append(f"tokenizer does not load: {got['tokenizer_error'][:200]}")
    else:
        problems += [f"token ids differ for {t!r}" for t, a, b in zip(TEXTS, got["ids"], ref_ids, strict=True) if a != b]
        problems += [f"chat template renders differently: {a!r} vs {b!r}"
                     for a, b in zip(got["rendered"], ref_rendered, strict=True) if a != b]
    diff = max(float(np.abs(np.asarray(a) - b).max()) for a, b in zip(got["logits"], ref_logits, strict=True))
    if diff > LOGIT_TOL:
        problems.append(f"logits differ by up to {diff:.3g} (> {LOGIT_TOL})")
    if got["greedy"] != ref_greedy:
        problems.append("greedy continuations differ")
    return problems, {"max_logit_diff": diff, "tokenizer_class": got.get("tokenizer_class")}


def test_transformers4_reads_the_merged_folder_like_transformers5(merged_release, tf4_dir):
    problems, facts = transformers4_problems(merged_release, tf4_dir)
    assert problems == []
    assert facts["tokenizer_class"] == "PreTrainedTokenizerFast"
    print(f"transformers 4.57.6 vs 5: max |logit diff| {facts['max_logit_diff']:.3g}")


def test_the_check_fails_on_the_folder_as_written_before_issue_16(merged_release, tf4_dir, tmp_path):
    """The folder without the legacy keys and with transformers 5's tokenizer class, i.e. what the
    merge wrote before: transformers 4.57.6 cannot load the tokenizer and runs the wrong RoPE."""
    old = tmp_path / "old"
    shutil.copytree(merged_release, old)
    cfg = json.loads((old / "config.json").read_text(encoding="utf-8"))
    cfg.pop("rope_theta")
    cfg.pop("rope_scaling")
    (old / "config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    tcfg = json.loads((old / "tokenizer_config.json").read_text(encoding="utf-8"))
    tcfg["tokenizer_class"] = "TokenizersBackend"
    (old / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2), encoding="utf-8")
    problems, facts = transformers4_problems(old, tf4_dir)
    assert any(p.startswith("tokenizer does not load") for p in problems), problems
    assert any(p.startswith("logits differ") for p in problems), problems
    assert facts["max_logit_diff"] > 0.1
