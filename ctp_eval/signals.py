"""Scoped SIGINT/SIGTERM handling shared by ctp-train (stop after the current step) and ctp-bench (pass the
signal on to its running step). No torch import: ctp-bench's own process stays light."""

from __future__ import annotations

import logging
import signal
import threading

logger = logging.getLogger(__name__)


class SignalScope:
    """Route SIGINT/SIGTERM to `self._handle` while the `with` block runs; the old handlers come back after it.

    Subclasses set what a signal does. Off the main thread nothing is installed (signal.signal only works there).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None  # the first signal received
        self._old: dict = {}

    def _handle(self, signum, frame) -> None:
        raise NotImplementedError

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


class StopSignals(SignalScope):
    """Turn SIGINT/SIGTERM into a flag checked between steps (a second signal stops at once)."""

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        logger.warning("%s received: checkpointing after the current step", signal.Signals(signum).name)
