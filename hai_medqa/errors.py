"""The base of every error the project reports to a user as one line (``error: ...``, non-zero exit).

Each stage raises its own subclass (DataError, ModelLayoutError, TrainingError, MergeError, ...), which
also keeps its standard base (ValueError or RuntimeError) so callers that catch those still work.
A script can catch `HaiMedQAError` alone and print ``error: {e}`` without a traceback; anything else is
a bug and keeps its traceback.
"""


class HaiMedQAError(Exception):
    """A problem with the user's input, files or environment, explained in one line."""
