"""Stopping a run cleanly on Ctrl-C / SIGTERM: finish the step, save, exit 130 / 143 as shells expect."""

from __future__ import annotations

import os
import signal
import threading
import time


class GracefulStop:
    """Turn the first SIGINT/SIGTERM into a request the training loop polls; a second Ctrl-C stops at once.

        with GracefulStop() as stop:
            for step in ...:
                ...one optimizer step...
                if stop.requested:
                    save_checkpoint(...); print the resume command
                    raise Stopped(stop.signum)   # the CLI exits 130 for SIGINT, 143 for SIGTERM

    The first signal only sets `requested` and `signum` (and writes one line to stderr). A second SIGINT
    raises KeyboardInterrupt wherever the loop is, which is safe because checkpoints are renamed into
    place only when complete. Repeats that are not a person pressing Ctrl-C again are ignored: under
    `accelerate launch` a Ctrl-C reaches each worker twice within milliseconds (from the terminal, and
    forwarded by the torchrun agent), so a SIGINT less than `repeat_after` seconds after the first does
    not count, and neither does any further SIGTERM (the agent's shutdown sends that). A signal the
    parent set to SIG_IGN (e.g. SIGINT for `cmd &` in a script) stays ignored. Previous handlers come
    back on exit.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM), notice: bool = True,
                 repeat_after: float = 1.0):
        self.signals = tuple(signals)
        self.notice = notice
        self.repeat_after = repeat_after
        self.requested = False
        self.signum: int | None = None
        self._first_at = 0.0
        self._previous: dict[int, object] = {}

    @property
    def exit_code(self) -> int:
        """128 + the signal number (130 for SIGINT, 143 for SIGTERM); 0 when no stop was requested."""
        return 128 + self.signum if self.signum is not None else 0

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("GracefulStop must be entered in the main thread: Python runs signal handlers there")
        for s in self.signals:
            previous = signal.getsignal(s)
            if previous is signal.SIG_IGN:
                continue
            self._previous[s] = previous
            signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> bool:
        for s, previous in self._previous.items():
            # None means a handler installed outside Python; the default is the closest we can restore.
            signal.signal(s, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()
        return False

    def _handle(self, signum: int, frame) -> None:
        now = time.monotonic()
        if self.requested:
            if signum == signal.SIGINT and now - self._first_at >= self.repeat_after:
                raise KeyboardInterrupt
            return
        self.requested, self.signum, self._first_at = True, signum, now
        if self.notice:
            name = signal.Signals(signum).name
            again = "; press Ctrl-C again to stop at once" if signal.SIGINT in self._previous else ""
            # os.write, not print: a handler that runs inside another write to stderr must not re-enter it.
            os.write(2, f"\n{name}: finishing this step and saving a checkpoint{again}\n".encode())
