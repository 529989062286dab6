"""Data stage: AI Hub healthcare QA label trees -> instruction records (schema, read, pair, preprocess)."""

from .preprocess import run_preprocess
from .schema import RECORD_FIELDS, DataError

__all__ = ["RECORD_FIELDS", "DataError", "run_preprocess"]
