"""The one wrapper every entry point runs its ``main`` through: the same exit codes and messages for
user errors, interrupts and bugs, whichever script the user started.

    import sys
    from hai_medqa.cli import run_cli

    if __name__ == "__main__":
        sys.exit(run_cli(main))          # main(argv: list[str] | None) -> int

What the user sees:

- a user error (`USER_ERRORS`: every `HaiMedQAError` of every stage, and `OSError` such as a missing
  file, a folder where a file was expected, a full disk) -> ``error: <first line>`` on stderr, exit 1
  (`error_exit`); the full traceback goes to the log file only (``setup_logging(log_file)``);
- Ctrl-C (SIGINT), SIGTERM or SIGHUP -> ``interrupted by <signal>[: <what was kept>]`` on stderr and
  exit 128 + signal number (130, 143, 129), or `interrupt_exit`. While `main` runs, SIGTERM and
  SIGHUP raise `Interrupted` (a KeyboardInterrupt) exactly as Ctrl-C does, so the same ``finally``
  blocks and atomic writers clean up for all three. `main` says what it kept by adding a note to the
  exception on its way out: ``except KeyboardInterrupt as e: e.add_note("12 answers kept in X"); raise``;
- anything else is a bug: re-raised with its traceback (which the log file gets too).

argparse's own ``SystemExit`` (``--help``, usage errors: exit 2) passes through untouched.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence

from loguru import logger

from hai_medqa.errors import HaiMedQAError
from hai_medqa.logging_setup import FILE_ONLY, is_configured

USER_ERRORS: tuple[type[BaseException], ...] = (HaiMedQAError, OSError)
"""What a user can fix from the message alone: the project's errors (one base, hai_medqa/errors.py)
and the operating system's (missing path, permission, folder where a file was expected, disk full)."""

STOP_SIGNALS: tuple[signal.Signals, ...] = tuple(
    s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)) if s is not None)
"""Signals that stop a run like Ctrl-C (what job schedulers and closed terminals send)."""


class Interrupted(KeyboardInterrupt):
    """A stop request that arrived as a signal: ``Interrupted(signal.SIGTERM)``.

    A KeyboardInterrupt, so code that cleans up after Ctrl-C cleans up after SIGTERM too; code that
    treats Ctrl-C as "stop this step only" (the chat REPL) checks `signum` and lets the others through.
    """

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal_name(signum))
        self.signum = int(signum)


def signal_name(signum: int) -> str:
    """``signal_name(15)`` -> ``'SIGTERM'``."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def interrupt_signal(exc: BaseException) -> int:
    """The signal behind a KeyboardInterrupt: its `signum` for `Interrupted`, else SIGINT (Ctrl-C)."""
    return int(getattr(exc, "signum", signal.SIGINT))


def _raise_interrupted(signum: int, _frame) -> None:
    raise Interrupted(signum)


@contextlib.contextmanager
def signals_raise(signals: Sequence[int] = STOP_SIGNALS) -> Iterator[None]:
    """While the block runs, each of `signals` raises `Interrupted` in the main thread; the previous
    handlers come back afterwards. A signal the process was started ignoring stays ignored (``nohup``
    must keep working), and outside the main thread this is a no-op (Python only delivers there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    try:
        for sig in signals:
            if signal.getsignal(sig) == signal.SIG_IGN:
                continue
            previous[sig] = signal.signal(sig, _raise_interrupted)
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_cli(
    main: Callable[[list[str] | None], int],
    argv: list[str] | None = None,
    *,
    error_exit: int = 1,
    interrupt_exit: int | None = None,
    user_errors: tuple[type[BaseException], ...] = USER_ERRORS,
    stop_signals: Sequence[int] = STOP_SIGNALS,
) -> int:
    """Run ``main(argv)`` and turn what it raises into the project's exit codes and one-line messages.

    `error_exit`: the exit status of a user error (1; a tool whose 1 means something else picks
    another). `interrupt_exit`: one exit status for every interrupt instead of 128 + signal number.
    `stop_signals`: the signals turned into `Interrupted` while `main` runs (pass ``()`` when `main`
    installs its own handlers for the whole run).
    """
    try:
        with signals_raise(stop_signals):
            return main(argv)
    except user_errors as e:
        text = str(e).strip()
        message = text.splitlines()[0] if text else type(e).__name__
        _log_to_file(e, f"user error ({type(e).__name__})")
        print(f"error: {message}", file=sys.stderr, flush=True)
        return error_exit
    except KeyboardInterrupt as e:
        signum = interrupt_signal(e)
        notes = [n for n in getattr(e, "__notes__", ()) if n]
        what = "Ctrl-C (SIGINT)" if signum == signal.SIGINT else signal_name(signum)
        message = f"interrupted by {what}" + (f": {'; '.join(notes)}" if notes else "")
        _log_to_file(None, message)
        lead = "\n" if signum == signal.SIGINT and sys.stderr.isatty() else ""  # after the echoed ^C
        print(lead + message, file=sys.stderr, flush=True)
        return interrupt_exit if interrupt_exit is not None else 128 + signum
    except Exception as e:  # a bug: keep the traceback (and put it in the log file too)
        _log_to_file(e, f"unexpected {type(e).__name__}")
        raise


def _log_to_file(e: BaseException | None, message: str) -> None:
    """`message` (with `e`'s traceback) for the log file only: the console already has its one line."""
    if is_configured():
        logger.bind(**{FILE_ONLY: True}).opt(exception=e).debug(message)
