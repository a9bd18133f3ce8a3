"""Time budget of the device suite: one global clock, per-part alarms, child processes with
deadlines, and a log that every part (and every child process) writes to.

Example:
    >>> clock = Clock(10.0, reserve_s=2.0)
    >>> 7.9 < clock.left() <= 8.0
    True
    >>> with alarm(5.0) as state:
    ...     pass
    >>> state.fired
    False
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

__all__ = ["AlarmState", "BudgetExceeded", "ChildResult", "Clock", "Log", "alarm", "run_child"]


class BudgetExceeded(BaseException):
    """Raised by :func:`alarm` when a part runs past its time (a BaseException, so that the
    ``except Exception`` of the code under it does not swallow it)."""


class Clock:
    """Seconds left of the suite's budget ``budget_s`` minus ``reserve_s`` (kept for the end)."""

    def __init__(self, budget_s: float, reserve_s: float = 0.0, *,
                 start: float | None = None) -> None:
        if budget_s <= 0:
            raise ValueError(f"Clock: budget_s must be positive, got {budget_s!r}")
        self.start = time.monotonic() if start is None else float(start)  # time.monotonic()
        self.budget_s = float(budget_s)
        self.reserve_s = float(reserve_s)

    def elapsed(self) -> float:
        """Seconds since the suite started."""
        return time.monotonic() - self.start

    def left(self) -> float:
        """Seconds left for parts (the reserve excluded); may be negative."""
        return self.budget_s - self.reserve_s - self.elapsed()


class AlarmState:
    """Whether an :func:`alarm` has fired (code such as TorchScript may re-raise the
    :class:`BudgetExceeded` as a ``RuntimeError``; this flag still tells)."""

    fired = False


@contextmanager
def alarm(seconds: float) -> Iterator[AlarmState]:
    """Raise :class:`BudgetExceeded` in the main thread after ``seconds`` (SIGALRM)."""
    state = AlarmState()

    def handler(signum: int, frame: object) -> None:
        state.fired = True
        raise BudgetExceeded(f"time budget of {seconds:.1f} s exceeded")

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, max(float(seconds), 0.01))
    try:
        yield state
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


class Log:
    """Lines to stdout and to ``path`` (flushed at once, so a killed run keeps its log)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.file: TextIO = self.path.open("a", encoding="utf-8")

    def __call__(self, text: str = "", *, echo: bool = True) -> None:
        stamp = time.strftime("%H:%M:%S")
        for line in str(text).splitlines() or [""]:
            self.file.write(f"[{stamp}] {line}\n")
        self.file.flush()
        if echo:
            print(text, flush=True)

    def close(self) -> None:
        self.file.close()


class ChildResult:
    """Exit status of a child process (``None`` if it was stopped), seconds, output tail."""

    def __init__(self, returncode: int | None, seconds: float, tail: str) -> None:
        self.returncode = returncode
        self.seconds = seconds
        self.tail = tail

    @property
    def timed_out(self) -> bool:
        return self.returncode is None


def run_child(cmd: Sequence[str], *, timeout_s: float, log: Log, cwd: Path,
              env: dict[str, str] | None = None) -> ChildResult:
    """Run ``cmd`` in its own process group; its output goes to the log (not echoed).

    After ``timeout_s`` the whole group gets SIGTERM, then SIGKILL 5 s later.
    """
    log(f"$ {' '.join(cmd)}   (deadline {timeout_s:.0f} s)")
    out_path = log.path.with_suffix(".child")
    start = time.monotonic()
    with out_path.open("w", encoding="utf-8") as out:
        proc = subprocess.Popen(list(cmd), cwd=cwd, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code: int | None = proc.wait(timeout=max(timeout_s, 0.1))
        except subprocess.TimeoutExpired:
            code = None
        finally:  # also when an alarm interrupts the wait: no child outlives its part
            if proc.poll() is None:
                _kill_group(proc)
    seconds = time.monotonic() - start
    text = out_path.read_text(encoding="utf-8", errors="replace")
    out_path.unlink()
    log(text.rstrip("\n"), echo=False)
    state = "stopped at its deadline" if code is None else f"exit status {code}"
    log(f"  ({state} after {seconds:.1f} s)")
    return ChildResult(code, seconds, text[-2000:])


def _kill_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue
    print(f"child {proc.pid} did not stop", file=sys.stderr)
