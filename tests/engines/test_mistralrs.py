"""An engine independent of PyTorch and llama.cpp reproduces the merged folder's greedy output:
mistral.rs (Rust/candle, PyPI `mistralrs`) reads the Hugging Face folder itself — config.json (it needs
the legacy rope_theta key: it refused the folder before issue 16), tokenizer.json and the chat template
— and answers chat requests. Greedy tokens must equal transformers', with the same log-probabilities
(within 1e-4; F32 KV cache) and the same prompt length (the template rendered the same)."""

from __future__ import annotations

import pytest
import torch
from engines.engine_texts import CONVERSATIONS

MAX_TOKENS = 12
LOGPROB_TOL = 1e-4


@pytest.fixture(scope="module")
def runner(mistralrs, merged_release):
    import os

    os.environ["MISTRALRS_CPU_KV_F32"] = "1"  # f32 KV cache on CPU: exact comparison
    return mistralrs.Runner(which=mistralrs.Which.Plain(model_id=str(merged_release),
                                                        dtype=mistralrs.ModelDType.F32), no_paged_attn=True)


def test_mistralrs_greedy_equals_transformers(runner, mistralrs, merged_release):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(merged_release)
    model = AutoModelForCausalLM.from_pretrained(merged_release, dtype=torch.float32).eval()
    for conv in CONVERSATIONS:
        ids = tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=False)
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=MAX_TOKENS, do_sample=False, output_scores=True,
                                 return_dict_in_generate=True)
        ref = out.sequences[0, len(ids):].tolist()
        ref_lp = [torch.log_softmax(s[0].float(), -1)[t].item() for s, t in zip(out.scores, ref, strict=True)]
        res = runner.send_chat_completion_request(mistralrs.ChatCompletionRequest(
            messages=conv, model="merged", max_tokens=MAX_TOKENS, temperature=0.0, top_k=1, logprobs=True))
        assert res.usage.prompt_tokens == len(ids), conv  # the chat template rendered the same prompt
        got = res.choices[0].logprobs.content
        n = len(got)
        assert n >= 1 and [g.token for g in got] == [tok.decode([t]) for t in ref[:n]], conv
        assert max(abs(g.logprob - r) for g, r in zip(got, ref_lp, strict=False)) <= LOGPROB_TOL
        assert n == len(ref) or ref[n] == tok.eos_token_id  # stopped only where transformers stops


def test_mistralrs_refuses_the_folder_without_legacy_rope_keys(mistralrs, merged_release, tmp_path):
    """What the merge wrote before issue 16 (rope settings only in rope_parameters) is refused."""
    import json
    import shutil

    old = tmp_path / "old"
    shutil.copytree(merged_release, old)
    cfg = json.loads((old / "config.json").read_text(encoding="utf-8"))
    cfg.pop("rope_theta"), cfg.pop("rope_scaling")
    (old / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    with pytest.raises(Exception, match="rope_theta"):
        mistralrs.Runner(which=mistralrs.Which.Plain(model_id=str(old), dtype=mistralrs.ModelDType.F32),
                         no_paged_attn=True)
