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
- Liger (profiles lean/fast on a GPU) tries, besides its Triton kernels, optional backends for
  other hardware (``_cutedsl``: NVIDIA's CuTe DSL; ``_ascend``: Huawei NPUs) and logs "Backend impl
  ... could not be imported ... Install it with `pip install nvidia-cutlass-dsl`" when their extra
  packages are absent. Its Triton kernels, which the project uses, are unaffected; only those two
  optional backends' import failures are hidden.
- transformers 5 deprecates ``PreTrainedModel.is_gradient_checkpointing``; PEFT's
  ``get_peft_model`` (called by the project when it adds LoRA) still reads it, so every run printed
  a FutureWarning about a call neither the user nor the project makes.
"""

from __future__ import annotations

import logging
import warnings

BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
BNB_KERNELS_MESSAGE = "Failed to load CPU gemm_4bit_forward from kernels-community"
LIGER_REGISTRY_LOGGER = "liger_kernel.backends.registry"
LIGER_OPTIONAL_BACKENDS = ("liger_kernel.ops.backends._cutedsl.", "liger_kernel.ops.backends._ascend.")
GRADIENT_CHECKPOINTING_WARNING = r"`is_gradient_checkpointing` is deprecated"


class _MissingKernelsPackage(logging.Filter):
    """Drop bitsandbytes' "pip install kernels" line when the cause is that `kernels` is not installed."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(BNB_KERNELS_MESSAGE):
            return True
        args = record.args if isinstance(record.args, tuple) else (record.args,)
        missing = [a for a in args if isinstance(a, ModuleNotFoundError) and a.name == "kernels"]
        return not missing


class _LigerOptionalBackend(logging.Filter):
    """Drop Liger's "could not be imported" line for its optional non-Triton backends only."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith("Backend impl '%s' for op '%s' could not be imported"):
            return True
        args = record.args if isinstance(record.args, tuple) else ()
        return not (args and isinstance(args[0], str) and args[0].startswith(LIGER_OPTIONAL_BACKENDS))


_installed = False


def install() -> None:
    """Install the filters (idempotent)."""
    global _installed
    if _installed:
        return
    logging.getLogger(BNB_CPU_LOGGER).addFilter(_MissingKernelsPackage())
    logging.getLogger(LIGER_REGISTRY_LOGGER).addFilter(_LigerOptionalBackend())
    warnings.filterwarnings("ignore", message=GRADIENT_CHECKPOINTING_WARNING, category=FutureWarning,
                            module=r"transformers\.modeling_utils")
    _installed = True
