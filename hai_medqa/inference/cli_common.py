"""Flags and error handling shared by chat.py and evaluate.py (one definition of --model/--adapter,
the generation flags, and the `error: <one line>` exit)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from loguru import logger

from hai_medqa.errors import HaiMedQAError
from hai_medqa.inference.generation import GenerationSettings


def add_model_args(p: argparse.ArgumentParser, *, model_required: bool = False) -> None:
    """--model / --revision / --adapter / --load-4bit / --dtype / --device / --attn-implementation."""
    g = p.add_argument_group("model")
    g.add_argument("--model", required=model_required,
                   help="merged model folder or Hub id (EXAONE or Llama layout). With --adapter: the base "
                        "model (default: the base recorded in the adapter's adapter_config.json)")
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


# The project's own errors (one base, see hai_medqa/errors.py) plus the file errors a path argument can raise.
USER_ERRORS: tuple[type[BaseException], ...] = (HaiMedQAError, FileNotFoundError, NotADirectoryError, PermissionError)


def run_main(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run a CLI main; user errors become ``error: <message>`` on stderr and exit status 1."""
    try:
        return main(argv)
    except USER_ERRORS as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        logger.debug(f"{type(e).__name__}: {e}")
        print(f"error: {msg}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
