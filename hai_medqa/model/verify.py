"""Check, once, that the converted Llama model computes what the original EXAONE model computes.

Needs Hugging Face Hub access and a machine that holds the model (it cannot run in the offline
project sandbox). The original runs through LG's remote modeling code, which is the one place this
project executes downloaded code, so it demands an explicit ``--trust-remote-code``.

    python -m hai_medqa.model.verify --trust-remote-code                      # both, one process
    # remote code broken on your transformers version? split it over two environments:
    python -m hai_medqa.model.verify --trust-remote-code --stage original --logits-file ref.pt
    python -m hai_medqa.model.verify --stage converted --logits-file ref.pt

Prints the largest absolute logit difference per prompt and overall, and whether the greedy next
tokens agree. Exit status 0 when the overall difference is within --max-diff, 1 otherwise.
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch

from hai_medqa.chat_format import DEFAULT_SYSTEM_PROMPT, render
from hai_medqa.model.acquire import ALLOW_PATTERNS, DEFAULT_MODEL, download_model, is_hub_id, resolve_model
from hai_medqa.model.exaone_layout import ModelLayoutError
from hai_medqa.model.load import as_dtype, load_causal_lm, load_tokenizer

DEFAULT_PROMPTS = [
    "두통이 자주 있는데 어떤 검사를 받아야 하나요?",
    "고혈압 환자가 피해야 할 음식은 무엇인가요?",
    "What are the early symptoms of diabetes?",
]


def build_inputs(tokenizer, prompts: list[str]) -> list[torch.Tensor]:
    """Token ids of each prompt rendered as a chat turn with generation prompt (no padding)."""
    texts = [render([{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}, {"role": "user", "content": p}],
                    add_generation_prompt=True) for p in prompts]
    return [torch.tensor([tokenizer(t, add_special_tokens=False)["input_ids"]]) for t in texts]


@torch.inference_mode()
def compute_logits(model, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Float32 CPU logits for each input (batch 1, so no padding can differ between the models)."""
    device = next(model.parameters()).device
    return [model(input_ids=ids.to(device)).logits[0].float().cpu() for ids in inputs]


def compare_logits(reference: list[torch.Tensor], converted: list[torch.Tensor]) -> dict:
    """Largest absolute difference per prompt and overall, and greedy-token agreement."""
    if len(reference) != len(converted):
        raise ModelLayoutError(f"{len(reference)} reference logits vs {len(converted)} converted")
    per_prompt, agree, total = [], 0, 0
    for a, b in zip(reference, converted, strict=True):
        if a.shape != b.shape:
            raise ModelLayoutError(f"logit shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
        per_prompt.append(float((a - b).abs().max()))
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        total += a.shape[0]
    return {"max_abs_diff": max(per_prompt), "per_prompt": per_prompt, "argmax_agreement": agree / total}


def _load_original(model: str, revision: str | None, dtype: torch.dtype, device: str):
    from transformers import AutoModelForCausalLM

    folder = Path(model).expanduser()
    if not folder.is_dir():
        if not is_hub_id(model):
            raise ModelLayoutError(f"{model}: not a local folder or Hub id")
        from huggingface_hub import snapshot_download

        download_model(model, revision)  # weights via the project path (shared HF cache)
        folder = Path(snapshot_download(model, revision=revision, allow_patterns=[*ALLOW_PATTERNS, "*.py"]))
    return AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=True, dtype=dtype,
                                                device_map=device, use_safetensors=True)


def _main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m hai_medqa.model.verify",
        description="Compare the original EXAONE model (remote code) with its Llama conversion: prints the "
                    "largest logit difference on a few prompts. Needs Hub access and the model's memory; it "
                    "cannot run in the offline sandbox where this project is tested.",
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help="Hub id or local EXAONE-layout folder")
    p.add_argument("--revision", default=None)
    p.add_argument("--dtype", default="float32", help="float32 (default, exact comparison) or bfloat16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--prompts", nargs="+", default=DEFAULT_PROMPTS)
    p.add_argument("--max-diff", type=float, default=1e-2,
                   help="exit 1 above this (float32 default 1e-2: op-order noise only; a layout or rope error gives >> 1; bf16: ~0.5)")
    p.add_argument("--stage", choices=("both", "original", "converted"), default="both")
    p.add_argument("--logits-file", help="original stage: save reference logits here; converted: read them")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="required to load the original model (runs LG's modeling code from the Hub)")
    args = p.parse_args(argv)
    if args.stage != "converted" and not args.trust_remote_code:
        raise ModelLayoutError("loading the original EXAONE model runs its Hub code: pass --trust-remote-code")
    if args.stage != "both" and not args.logits_file:
        raise ModelLayoutError(f"--stage {args.stage} needs --logits-file")
    dtype = as_dtype(args.dtype)
    llama_dir = resolve_model(args.model, args.revision)
    tokenizer = load_tokenizer(llama_dir)
    if args.stage == "converted":
        saved = torch.load(args.logits_file, weights_only=True)
        inputs, reference = saved["input_ids"], saved["logits"]
    else:
        inputs = build_inputs(tokenizer, args.prompts)
        original = _load_original(args.model, args.revision, dtype, args.device)
        reference = compute_logits(original, inputs)
        del original
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if args.stage == "original":
            torch.save({"input_ids": inputs, "logits": reference}, args.logits_file)
            print(f"saved reference logits of {len(inputs)} prompt(s) to {args.logits_file}")
            return 0
    converted = load_causal_lm(llama_dir, dtype=dtype, device_map=args.device, attn_implementation="eager")
    result = compare_logits(reference, compute_logits(converted, inputs))
    for i, d in enumerate(result["per_prompt"]):
        print(f"prompt {i}: max |logit diff| = {d:.3e}")
    print(f"overall max |logit diff| = {result['max_abs_diff']:.3e}; "
          f"greedy next-token agreement = {result['argmax_agreement']:.2%}")
    ok = result["max_abs_diff"] <= args.max_diff
    print("OK: the conversion matches the original" if ok else f"MISMATCH: above --max-diff {args.max_diff}")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    """Exit 0: the conversion matches; 1: mismatch; 2: an error (one line; `hai_medqa.cli.run_cli`)."""
    from hai_medqa.cli import run_cli

    return run_cli(_main, argv, error_exit=2)


if __name__ == "__main__":
    sys.exit(main())
