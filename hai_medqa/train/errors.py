"""User-facing training errors: each carries one line that says what is wrong and where.

The CLI prints ``error: <message>`` and exits non-zero; no traceback for problems the user can fix.
(The preprocessing stage's own input error is `hai_medqa.data.schema.DataError`.)
"""

from __future__ import annotations

from hai_medqa.errors import HaiMedQAError


class TrainingError(HaiMedQAError, RuntimeError):
    """A training run cannot start or continue (bad data, non-finite loss, out of memory, ...)."""


class TrainingDataError(TrainingError, ValueError):
    """A training or validation file that cannot be used (missing, empty, no usable records)."""


class NonFiniteLossError(TrainingError):
    """The loss or the gradient norm became NaN or infinite."""
