"""Stopping a run to be resumed: preemption and time-limit signals become a request to stop at the next safe point.

A cluster stops a job with a signal before it kills it: SLURM sends ``SIGTERM`` (and, with ``--signal``, an earlier
``SIGUSR1``/``SIGUSR2``; submitit asks for ``SIGUSR2`` ``signal_delay_s`` seconds before the time limit). Python's
default for these is to die on the spot, losing everything since the last checkpoint. Inside :class:`StopSignals`
they only set :attr:`StopSignals.requested`; the training loop checks it between batches of updates, writes a
checkpoint and exits with :data:`RESUMABLE_EXIT_CODE`. ``Ctrl-C`` (``SIGINT``) works the same the first time; a
second ``Ctrl-C`` raises ``KeyboardInterrupt`` at once, without writing anything.

A handler that was installed before (submitit's, which requeues the job) is not lost: :meth:`StopSignals.forward`
calls it once the checkpoint is written.
"""

from __future__ import annotations

import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterable
from types import FrameType
from typing import Any

__all__ = ["RESUMABLE_EXIT_CODE", "STOP_SIGNALS", "StopSignals"]

RESUMABLE_EXIT_CODE = 75
"""Exit status of a run that stopped on a signal after writing a checkpoint: run the same command again to continue.
(``EX_TEMPFAIL`` of ``sysexits.h``: a temporary failure, the user is invited to retry.)"""

STOP_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT") if hasattr(signal, name)
)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class StopSignals:
    """Context manager: while open, ``signals`` request a stop instead of ending the process.

    Args:
        signals: the signals to catch. Defaults to :data:`STOP_SIGNALS` (``SIGTERM``, ``SIGUSR1``, ``SIGUSR2``,
            ``SIGINT``).

    Keyword Args:
        announce: called with one line when the first signal arrives. Defaults to printing it on stderr.

    Examples:
        >>> import os, signal
        >>> with StopSignals(announce=lambda line: None) as stop:
        ...     os.kill(os.getpid(), signal.SIGUSR2)
        ...     stop.requested.name
        'SIGUSR2'
    """

    def __init__(
        self, signals: Iterable[signal.Signals] = STOP_SIGNALS, *, announce: Callable[[str], None] = _say
    ) -> None:
        self.signals = tuple(signals)
        self.announce = announce
        self.requested: signal.Signals | None = None
        self._previous: dict[signal.Signals, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is not threading.main_thread():
            warnings.warn("StopSignals: not in the main thread, where Python handles signals; signals are not caught")
            return self
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        received = signal.Signals(signum)
        if self.requested is None:
            self.requested = received
            again = " (Ctrl-C again to stop at once without writing)" if received == signal.SIGINT else ""
            self.announce(
                f"{received.name} received: finishing the current batch of updates, then writing a checkpoint "
                f"and stopping{again}"
            )
        elif received == signal.SIGINT:
            raise KeyboardInterrupt
        # any other repeat (a scheduler's SIGTERM after its warning signal): the stop is already under way

    def forward(self) -> None:
        """Call the handler that was installed before for the signal that requested the stop, if it was a Python
        function (not Python's default ``Ctrl-C`` handler): under submitit that handler requeues the job, then exits.

        Call it after leaving the context, which puts that handler back, and after the checkpoint is written.
        """
        if self.requested is None or self._previous:
            return
        handler = signal.getsignal(self.requested)
        if callable(handler) and handler is not signal.default_int_handler:
            handler(self.requested, None)
