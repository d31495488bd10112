"""A command stops within a bounded time on Ctrl-C/SIGTERM (jungletrap.interrupt): a cleanup that hangs, or a second
signal, ends the process with exit 130, the stacks of what it waited on and no child left running. Each case runs
in a real subprocess that really hangs."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

import psutil

from jungletrap.interrupt import stop_on_signals

#: A command whose cleanup hangs after the interrupt: it starts a child, reports the child's pid, then waits for a
#: signal; on KeyboardInterrupt it "cleans up" by sleeping forever in a function named for the dump.
HANGING_CLEANUP = textwrap.dedent("""
    import subprocess, sys, time
    from jungletrap.interrupt import stop_on_signals

    def close_the_cluster_forever():
        print("interrupted", flush=True)  # in here, so that a signal landing in print finds this frame too
        time.sleep(600)

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)  # an orphan must not hold the test's pipes open
    with stop_on_signals(float(sys.argv[1]), "resume: run the same command again"):
        try:
            print(child.pid, flush=True)  # the signal may land while print returns: inside the try
            time.sleep(600)
        except KeyboardInterrupt:
            close_the_cluster_forever()
""")


def _start(deadline_s: float, sigint: str = "default") -> tuple[subprocess.Popen[str], int]:
    handler = signal.SIG_IGN if sigint == "ignored" else signal.SIG_DFL

    def child_signals() -> None:
        signal.signal(signal.SIGINT, handler)

    proc = subprocess.Popen([sys.executable, "-c", HANGING_CLEANUP, str(deadline_s)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=child_signals)
    assert proc.stdout is not None
    return proc, int(proc.stdout.readline())


def _finish(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    return proc.returncode, out, err


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_cleanup_that_hangs_past_the_deadline_ends_with_130_stacks_and_no_child() -> None:
    proc, child = _start(deadline_s=2.0)
    proc.send_signal(signal.SIGTERM)
    code, out, err = _finish(proc)
    assert code == 130, err
    assert "interrupted" in out
    assert "did not close within 2 s of the interrupt" in err
    assert "close_the_cluster_forever" in err  # the stack says where it hung
    assert "resume: run the same command again" in err
    assert _gone(child)


def test_a_second_signal_stops_at_once() -> None:
    proc, child = _start(deadline_s=300.0)
    proc.send_signal(signal.SIGINT)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "interrupted"
    started = time.monotonic()
    proc.send_signal(signal.SIGINT)
    code, _, err = _finish(proc)
    assert code == 130, err
    assert time.monotonic() - started < 30  # not the 300 s deadline
    assert "again while stopping: stopping at once" in err and "close_the_cluster_forever" in err
    assert _gone(child)


def test_sigint_ignored_at_start_stays_ignored() -> None:
    """A job started with Ctrl-C ignored (``nohup``, ``&`` in a script) ignores SIGINT; SIGTERM still stops it."""
    proc, _ = _start(deadline_s=2.0, sigint="ignored")
    proc.send_signal(signal.SIGINT)
    time.sleep(1.0)
    assert proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    code, out, _ = _finish(proc)
    assert code == 130 and "interrupted" in out


def test_the_handlers_are_given_back_when_nothing_was_interrupted() -> None:
    """A notebook or test calling the CLI in-process keeps its own handlers afterwards."""
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    with stop_on_signals(60.0, "resume"):
        assert signal.getsignal(signal.SIGTERM) is not before[signal.SIGTERM]
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_sigusr1_prints_the_stacks_and_the_command_goes_on() -> None:
    proc, _ = _start(deadline_s=2.0)
    proc.send_signal(signal.SIGUSR1)
    time.sleep(1.0)
    assert proc.poll() is None  # a diagnostic, not a stop
    proc.send_signal(signal.SIGTERM)
    code, _, err = _finish(proc)
    assert code == 130
    before_the_stop = err.split("did not close within")[0]
    assert "most recent call first" in before_the_stop and "in <module>" in before_the_stop
