"""Stop a run cleanly on SIGTERM (schedulers, spot preemption) or SIGINT (Ctrl-C).

The first signal only sets a flag: the loop finishes its optimizer step, saves a checkpoint and exits 0, so
no step is half-applied and nothing is lost. A second signal means "now": the process exits at once with the
shell's code for that signal (128 + signal number), keeping the last checkpoint written.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

SIGNALS = (signal.SIGTERM, signal.SIGINT)
_early: int | None = None  # a SIGINT that arrived before training began (see watch_early_interrupts)


def watch_early_interrupts() -> None:
    """Until training starts, Ctrl-C raises KeyboardInterrupt as usual and is also remembered, and `Preemption`
    refuses to start a run after one. Loading data runs library code that can swallow the exception (a worker
    pool's cleanup raising its own error over it, a blanket `except`); the user's Ctrl-C must stop the command
    all the same, not be followed by hours of training."""
    if threading.current_thread() is not threading.main_thread():
        return

    def remember(signum: int, frame) -> None:
        global _early
        _early = signum
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, remember)


class Preemption:
    """Context manager: while inside, SIGTERM/SIGINT request a stop; the previous handlers come back on exit."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def _handle(self, signum: int, frame) -> None:
        if self.signal is not None:
            os._exit(128 + signum)
        self.signal = signum
        print(f"\n{signal.Signals(signum).name}: finishing this step, then saving a checkpoint "
              "(send it again to exit at once)", file=sys.stderr, flush=True)

    def __enter__(self) -> Preemption:
        if _early is not None:
            raise KeyboardInterrupt  # an earlier Ctrl-C was swallowed on its way up: honour it now
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
