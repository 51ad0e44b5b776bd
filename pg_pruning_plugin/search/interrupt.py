"""Ctrl-C during a search: the step under way finishes, its state is saved, then the search stops.

Python raises ``KeyboardInterrupt`` wherever the main thread is when SIGINT arrives; inside a
finalizer or a callback it is printed as "Exception ignored" and lost, and the run goes on. Within
:func:`stop_after_step` the first SIGINT only records the request, which the loop reads between
steps; a second one raises at once, as usual.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from ..core import distributed


@contextmanager
def stop_after_step() -> Iterator[Callable[[], bool]]:
    """Yield ``requested()``: True once SIGINT arrived inside the block (the caller stops at its next check).

    The previous SIGINT handler is restored on exit. Outside the main thread, under a process group
    (every rank must stop after the same step, which one rank's signal cannot promise) or where SIGINT
    is not Python's default handler (an embedding application owns it), SIGINT is left alone and
    ``requested()`` stays False.
    """
    usable = (threading.current_thread() is threading.main_thread() and not distributed.is_distributed()
              and signal.getsignal(signal.SIGINT) is signal.default_int_handler)
    if not usable:
        yield lambda: False
        return
    pending = threading.Event()

    def on_sigint(signum, frame) -> None:
        if pending.is_set():  # the second Ctrl-C: stop now
            raise KeyboardInterrupt
        pending.set()

    signal.signal(signal.SIGINT, on_sigint)
    try:
        yield pending.is_set
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
