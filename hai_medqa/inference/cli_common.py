"""Flags shared by chat.py and evaluate.py: one definition of --model/--adapter, the generation
flags and --system-prompt, and the model's identity recorded in resumable outputs. (Errors and
interrupts: `hai_medqa.cli.run_cli`, used by every entry point.)"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from hai_medqa.inference.generation import GenerationSettings


def add_model_args(p: argparse.ArgumentParser, *, model_required: bool = False) -> None:
    """--model / --revision / --adapter / --load-4bit / --dtype / --device / --attn-implementation."""
    g = p.add_argument_group("model")
    g.add_argument("--model", required=model_required,
                   help="merged model folder or Hub id (EXAONE or Llama layout). With --adapter: the base "
                        "model (default: the base recorded with the adapter: its Hub id in adapter_config.json, "
                        "else, for a local base, the --model of its training run's run_info.json)")
    g.add_argument("--revision", help="Hub revision (branch, tag or commit) of --model")
    g.add_argument("--adapter", help="LoRA adapter folder, or a training run folder (uses adapter_best/, "
                                     "else adapter_last/)")
    g.add_argument("--load-4bit", action="store_true",
                   help="load the base weights in 4-bit NF4 (bitsandbytes), as in QLoRA training")
    g.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                   help="compute dtype (auto: bfloat16 on GPU, float32 on CPU)")
    g.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda if available)")
    g.add_argument("--attn-implementation", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"])


def add_generation_args(p: argparse.ArgumentParser, *, max_new_tokens: int = 512) -> None:
    """Decoding flags; greedy unless --temperature > 0."""
    g = p.add_argument_group("generation (greedy by default, for reproducibility)")
    g.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; > 0 samples")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (only when sampling)")
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0, help="seeds sampling (and the evaluation sample choice)")
    g.add_argument("--batch-size", type=int, default=8, help="prompts per generate() call")


def settings_from_args(args: argparse.Namespace) -> GenerationSettings:
    return GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed)


def add_system_prompt_arg(p: argparse.ArgumentParser | argparse._ArgumentGroup, *, what: str) -> None:
    """--system-prompt, default None = "not given" (then the prompt training recorded for the model)."""
    p.add_argument("--system-prompt", default=None,
                   help=f"system prompt {what} ('' for none; 'original' = the original project's prompt, "
                        "'default' = the project's; default: the prompt the model was trained with, "
                        "from the training record beside the adapter or in the release's training/ folder, "
                        "else the project's Korean medical prompt)")


def local_path(path: str | None) -> Path | None:
    """`path` when it names something on this machine (a --model may also be a Hub id), else None."""
    if path is None:
        return None
    local = Path(path).expanduser()
    return local if local.exists() else None


def model_identity(args: argparse.Namespace, model: str | None, adapter_dir: Path | None) -> dict[str, Any]:
    """What a resumed run must share with the interrupted one to give the same answers (absolute
    paths for local folders, so a different working directory still matches)."""
    local = local_path(model)
    return {
        "model": str(local.resolve()) if local is not None else model,
        "revision": args.revision,
        "adapter": str(adapter_dir.resolve()) if adapter_dir is not None else None,
        "quantize_4bit": args.load_4bit,
        "dtype": args.dtype,
        "attn_implementation": args.attn_implementation,
    }
