"""SIGINT/SIGTERM/SIGHUP during training: finish the step, save a checkpoint, exit with EXIT_INTERRUPTED.

    with StopSignals() as stop:
        ...
        if stop.requested(runtime):   # every process stops at the same step boundary
            save; return "interrupted"

The checkpoint must be written within seconds whatever the run is doing: torchrun's agent (under
``accelerate launch``) and SLURM (KillWait) send SIGKILL 30 s after SIGTERM. A step is short, but an
evaluation or the sample answers can take a minute on a large model, so those check the flag as they
go: the evaluation every round through `requested` (a collective: every process leaves together),
the sample answers, which rank 0 generates alone, every token through `seen` (local, no collective).

A second Ctrl-C raises KeyboardInterrupt at once (abort without saving). The previous handlers come
back when the block ends (outside training, `hai_medqa.cli.run_cli` turns the same signals into an
interrupt). Outside the main thread (no handlers can be set) nothing is installed.
"""

from __future__ import annotations

import contextlib
import signal
from typing import Any

from loguru import logger

from hai_medqa.cli import STOP_SIGNALS

EXIT_INTERRUPTED = 75
"""Exit code after a signal's checkpoint (EX_TEMPFAIL: "try again", i.e. run with --resume)."""

_SIGNALS = (signal.SIGINT, *STOP_SIGNALS)  # Ctrl-C, a scheduler's SIGTERM, a closed terminal's SIGHUP


class StopSignals:
    """Records SIGINT/SIGTERM/SIGHUP instead of dying mid-step (see module docstring)."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        for sig in _SIGNALS:
            with contextlib.suppress(ValueError):  # not the main thread: leave handlers alone
                self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now
        self.received = signum
        logger.warning(f"received {signal.Signals(signum).name}: saving a checkpoint after this step (an evaluation "
                       "or sample answers under way stop at once), then exiting (Ctrl-C again to abort without saving)")

    def seen(self) -> bool:
        """Whether this process received a signal (local: no collective; cheap enough for every token)."""
        return self.received is not None

    def describe(self) -> str:
        """The signal for a log line: ``SIGTERM``, or ``a signal to another process`` on a process that
        only learned of it through `requested`."""
        return signal.Signals(self.received).name if self.received is not None else "a signal to another process"

    def requested(self, runtime: Any) -> bool:
        """Whether any process received a signal (a collective under several processes: every process
        must call it at the same point, and all get the same answer)."""
        return runtime.any_process(self.seen())
