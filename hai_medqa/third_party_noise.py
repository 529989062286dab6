"""Third-party console lines the project causes and the user can do nothing about, filtered at their
source (installed by ``hai_medqa/__init__.py``, so before any library is imported). Each filter
matches one exact message; everything else still shows. What remains: docs/training.md ("Console").

- bitsandbytes, on CPUs with AVX512-BF16, tries to fetch an optional CPU kernel from the Hugging
  Face Hub through the ``kernels`` package at import time and, when that package is absent, logs
  "Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'. Please
  make sure you already `pip install kernels`". The project does not use it (it would download and
  run compiled code from the Hub; bitsandbytes' own CPU path computes the same), so the line only
  tells users to install something they do not need. Only that case is hidden: a ``kernels`` that
  is installed and fails still reports.
- transformers 5 deprecates ``PreTrainedModel.is_gradient_checkpointing``; PEFT's
  ``get_peft_model`` (called by the project when it adds LoRA) still reads it, so every run printed
  a FutureWarning about a call neither the user nor the project makes.
"""

from __future__ import annotations

import logging
import warnings

BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
BNB_KERNELS_MESSAGE = "Failed to load CPU gemm_4bit_forward from kernels-community"
GRADIENT_CHECKPOINTING_WARNING = r"`is_gradient_checkpointing` is deprecated"


class _MissingKernelsPackage(logging.Filter):
    """Drop bitsandbytes' "pip install kernels" line when the cause is that `kernels` is not installed."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(BNB_KERNELS_MESSAGE):
            return True
        args = record.args if isinstance(record.args, tuple) else (record.args,)
        missing = [a for a in args if isinstance(a, ModuleNotFoundError) and a.name == "kernels"]
        return not missing


_installed = False


def install() -> None:
    """Install the filters (idempotent)."""
    global _installed
    if _installed:
        return
    logging.getLogger(BNB_CPU_LOGGER).addFilter(_MissingKernelsPackage())
    warnings.filterwarnings("ignore", message=GRADIENT_CHECKPOINTING_WARNING, category=FutureWarning,
                            module=r"transformers\.modeling_utils")
    _installed = True
