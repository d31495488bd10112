"""How a command stops on Ctrl-C or SIGTERM: cleanly first, and within a bounded time whatever happens.

The first signal raises :class:`KeyboardInterrupt` in the main thread, so the stage records ``interrupted`` in
the manifest and the cluster this process started is closed. Closing waits on other processes (the workers and
their decoders, the scheduler), so a stop could hang on one of them; a stop that hangs leaves a user with
``kill -9`` and orphaned workers. Hence a deadline: once it passes, or at a second signal, every thread's stack
goes to stderr (what it waited on), the processes this one started are killed, and it exits 130 at once.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import signal
import sys
import threading
from collections.abc import Iterator
from types import FrameType

__all__ = ["EXIT_INTERRUPTED", "stop_now", "stop_on_signals"]

#: The exit status of an interrupted command (128 + SIGINT, as a shell reports Ctrl-C).
EXIT_INTERRUPTED = 130

_state = {"deadline_s": 60.0, "message": ""}
_stopping = threading.Event()


@contextlib.contextmanager
def stop_on_signals(deadline_s: float, message: str) -> Iterator[None]:
    """Handle SIGTERM, and SIGINT unless the process was started with it ignored (``nohup``, a background job),
    inside the block; ``kill -USR1 <pid>`` prints every thread's stack at any time.

    ``message`` (the resume advice) is printed when the deadline or a second signal ends the process. After an
    interrupt the handlers stay, so that a second signal still stops a process whose exit hangs; otherwise the
    previous ones come back (a test or notebook calling the CLI in-process keeps its own).
    """
    _state.update(deadline_s=deadline_s, message=message)
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    signal.signal(signal.SIGTERM, _on_signal)
    if previous[signal.SIGINT] is signal.default_int_handler:
        signal.signal(signal.SIGINT, _on_signal)
    dumps = hasattr(signal, "SIGUSR1")
    if dumps:
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        yield
    finally:
        if not _stopping.is_set():
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if dumps:
                faulthandler.unregister(signal.SIGUSR1)


def _on_signal(signum: int, frame: FrameType | None) -> None:
    # Handlers run in the main thread only, but a second signal may run this one again inside the first: no lock
    # (it would deadlock there); two first signals at worst start two timers.
    if _stopping.is_set():
        stop_now(f"signal {signum} again while stopping: stopping at once")
    _stopping.set()
    timer = threading.Timer(float(_state["deadline_s"]), stop_now,
                            args=(f"the cluster did not close within {_state['deadline_s']:.0f} s of the interrupt: "
                                  "stopping without it",))
    timer.daemon = True
    timer.start()
    raise KeyboardInterrupt(f"signal {signum}")


def stop_now(reason: str) -> None:
    """Print ``reason`` and every thread's stack, kill this process's children (workers, decoders), exit 130."""
    sys.stderr.write(f"{reason}; where each thread was:\n")
    sys.stderr.flush()
    faulthandler.dump_traceback(all_threads=True)
    _kill_children()
    if _state["message"]:
        sys.stderr.write(f"{_state['message']}\n")
    sys.stderr.flush()
    os._exit(EXIT_INTERRUPTED)


def _kill_children() -> None:
    import psutil  # distributed's own dependency

    try:
        children = psutil.Process().children(recursive=True)
    except psutil.Error:
        return
    for child in children:
        try:
            child.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(children, timeout=5)
