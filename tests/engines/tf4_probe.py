"""Run inside transformers 4.x's own environment (PYTHONPATH=<transformers-4.57.6 folder>), by
test_transformers4.py: load a model folder with plain AutoTokenizer/AutoModelForCausalLM and print,
as JSON on stdout, the version, token ids of the given texts, last-position-free full logits of the
given prompts and the chat template's renderings. Load errors are reported, not raised, so the test
can name them. Imports nothing from hai_medqa (which needs transformers 5)."""

from __future__ import annotations

import json
import sys


def main() -> None:
    request = json.loads(sys.stdin.read())
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out: dict = {"transformers": transformers.__version__}
    try:
        tok = AutoTokenizer.from_pretrained(request["folder"])
    except Exception as e:  # the check reports it
        out["tokenizer_error"] = f"{type(e).__name__}: {e}"
        tok = None
    if tok is not None:
        out["tokenizer_class"] = type(tok).__name__
        out["ids"] = [tok(t, add_special_tokens=True).input_ids for t in request["texts"]]
        out["rendered"] = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
                           for c in request["conversations"]]
    model = AutoModelForCausalLM.from_pretrained(request["folder"], dtype=torch.float32).eval()
    with torch.no_grad():
        out["logits"] = [model(torch.tensor([ids])).logits[0].tolist() for ids in request["prompt_ids"]]
        out["greedy"] = [model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                        max_new_tokens=8, do_sample=False)[0, len(ids):].tolist()
                         for ids in request["prompt_ids"]]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
