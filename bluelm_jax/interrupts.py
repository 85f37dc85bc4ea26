"""Ctrl-C (SIGINT) and SIGTERM for the command-line programs: one line on stderr, exit 130 or 143.

    from bluelm_jax import interrupts
    interrupts.install("python -m bluelm_jax: error")   # first thing, before jax is imported

Raising KeyboardInterrupt at an arbitrary point is not safe in these programs: during an
import it escapes as a traceback (or is swallowed by a gc callback), and while XLA compiles
or runs, the unwinding leaves XLA's threads in a state that crashes the interpreter's
teardown (a segmentation fault, exit 139). So `install` blocks both signals in every thread
(the threads XLA, TensorStore and Orbax start later inherit the mask) and receives them in
one watcher thread, which by default

  - removes the temporary directories of the atomic outputs being written (atomic_dir.py),
  - prints one line: "<prefix>: interrupted" (or "terminated" for SIGTERM), followed by
    what `set_hint` registered (fine-tuning: the step it can resume from),
  - ends the process at once with os._exit: 130 for SIGINT, 143 (128 + 15) for SIGTERM.

Inside `with interrupts.deferred():` the signal is instead raised as `Interrupted` (a
KeyboardInterrupt carrying its exit status) by the next call to `interrupts.check()` in the
main thread, so that the code unwinds from a known point: `atomic_directory` removes its
output after the writer threads have finished. (Raising it asynchronously is not enough:
it may land in a gc callback that swallows it.) The HF -> Orbax converter, which runs no
XLA, checks after every block it converts. If no check comes within GRACE_S seconds, or a
second signal arrives, the process ends at once as above.

This module imports only the standard library, so it can be installed before jax.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Callable, Iterator, Optional

SIGNALS = (signal.SIGINT, signal.SIGTERM)
GRACE_S = 10.0  # inside deferred(): the longest wait for check() before ending the process at once
WORDS = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated"}


def exit_status(signum: int) -> int:
    """The shell's status for a process ended by `signum`: 130 for SIGINT, 143 for SIGTERM."""
    return 128 + int(signum)


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM, raised by `check()` inside `deferred()`."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(WORDS.get(signum, "interrupted"))
        self.signum = signum

    @property
    def exit_status(self) -> int:
        return exit_status(self.signum)


class _State:
    prefix: str = "error"
    hint: Optional[Callable[[], str]] = None
    deferred_depth: int = 0
    pending: Optional[int] = None  # a signal received inside deferred(), for check() to raise
    reported: bool = False  # the interrupt line was printed (by the main thread, after unwinding)
    watcher: Optional[threading.Thread] = None


_state = _State()


def install(prefix: str = "error") -> None:
    """Receives SIGINT and SIGTERM in a watcher thread from now on (see the module docstring).

    Call it in the main thread before any other thread exists. `prefix` starts the line."""
    _state.prefix = prefix
    if _state.watcher is not None:
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    _state.watcher = threading.Thread(target=_watch, name="bluelm-jax-signals", daemon=True)
    _state.watcher.start()


def set_prefix(prefix: str) -> None:
    """The start of the interrupt line from now on, e.g. "python -m bluelm_jax generate"."""
    _state.prefix = prefix


def is_installed() -> bool:
    return _state.watcher is not None


def set_hint(hint: Optional[Callable[[], str]]) -> None:
    """`hint()` is appended to the interrupt line (e.g. "resume from step 40 ..."); None: nothing."""
    _state.hint = hint


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Within the block a signal is raised as Interrupted by the next `check()` (see the module docstring)."""
    _state.deferred_depth += 1
    try:
        yield
    finally:
        _state.deferred_depth -= 1


def check() -> None:
    """Raises Interrupted if a signal arrived inside `deferred()`; call it where unwinding is safe."""
    signum, _state.pending = _state.pending, None
    if signum is not None:
        raise Interrupted(signum)


def reported() -> None:
    """The caller printed the interrupt line: the process must not print it again when it ends."""
    _state.reported = True


def describe(signum: int) -> str:
    """What happened ("interrupted" or "terminated") and the hint if any, on one line."""
    text = WORDS.get(signum, "interrupted")
    if _state.hint is not None:
        try:
            hint = _state.hint()
        except Exception:  # noqa: BLE001 - the line must still be printed
            hint = ""
        if hint:
            text += f"; {hint}"
    return " ".join(text.split())


def _watch() -> None:
    signum = signal.sigwait(SIGNALS)
    if _state.deferred_depth > 0:
        _state.pending = signum
        timer = threading.Timer(GRACE_S, exit_now, (signum,))
        timer.daemon = True
        timer.start()
        signum = signal.sigwait(SIGNALS)  # a second signal: no more waiting
    exit_now(signum)


def exit_now(signum: int) -> None:
    """Removes the atomic outputs being written, prints the line and ends the process (no teardown)."""
    from bluelm_jax import atomic_dir

    atomic_dir.remove_unfinished()
    try:
        sys.stdout.flush()
    except Exception:  # noqa: BLE001 - a closed or broken stdout must not stop the exit
        pass
    if not _state.reported:
        os.write(2, f"{_state.prefix}: {describe(signum)}\n".encode("utf-8", "replace"))
    os._exit(exit_status(signum))
