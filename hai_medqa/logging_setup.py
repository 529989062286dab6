"""One place that configures loguru for every script: a console sink that cooperates with tqdm
progress bars, and an optional log file."""

from __future__ import annotations

import sys
from pathlib import Path

from loguru import logger
from tqdm import tqdm

FILE_ONLY = "file_only"
"""A record bound with ``logger.bind(file_only=True)`` goes to the log file only (tracebacks that
the console already summarised in one line)."""

_configured = False


def setup_logging(log_file: str | Path | None = None, level: str = "INFO") -> None:
    """Route loguru to stderr (through tqdm.write, so bars are not broken) and optionally to a file."""
    global _configured
    logger.remove()
    logger.add(
        lambda msg: tqdm.write(msg, end="", file=sys.stderr),
        level=level,
        colorize=sys.stderr.isatty(),
        format="<green>{time:HH:mm:ss}</green> | <level>{level: <7}</level> | {message}",
        filter=lambda record: not record["extra"].get(FILE_ONLY),
    )
    if log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        logger.add(str(log_file), level="DEBUG", encoding="utf-8", enqueue=False)
    _configured = True


def is_configured() -> bool:
    """True once `setup_logging` ran (before that, loguru's default sink prints everything)."""
    return _configured
