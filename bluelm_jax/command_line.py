"""Shared command-line pieces: errors as one line on stderr and an exit status (never a traceback), CPU-only setup."""

from __future__ import annotations

import signal
import sys
from typing import Callable, Optional

from bluelm_jax import interrupts


def use_cpu_quietly() -> None:
    """Runs JAX on the CPU only and silences absl's info logging (for the converters)."""
    import jax
    from absl import logging as absl_logging

    jax.config.update("jax_platforms", "cpu")
    absl_logging.set_verbosity(absl_logging.ERROR)


def one_line(e: BaseException) -> str:
    """The message of `e` on one line ("<file>: <reason>" for an OSError about a file)."""
    text = str(e) if not isinstance(e, OSError) or not e.filename else f"{e.filename}: {e.strerror}"
    return " ".join(text.split())


def run_reporting_errors(action: Callable[[], Optional[str]], known: tuple[type[BaseException], ...],
                         on_error: Optional[Callable[[], None]] = None) -> int:
    """Runs action, prints its success line: 0; `error: ...` on stderr: 1 (130 when interrupted,
    143 when terminated: see interrupts.py).

    Errors of the `known` types are reported by their message, others as an internal error;
    on_error runs first on any error but an interrupt.
    """
    try:
        message = action()
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", signal.SIGINT)  # interrupts.Interrupted, or Python's own
        print(f"error: {interrupts.describe(signum)}", file=sys.stderr, flush=True)
        interrupts.reported()
        return interrupts.exit_status(signum)
    except Exception as e:  # noqa: BLE001 - one line, never a traceback
        if on_error is not None:
            on_error()
        text = one_line(e) if isinstance(e, known) else f"internal error ({type(e).__name__}: {one_line(e)})"
        print(f"error: {text}", file=sys.stderr)
        return 1
    if message is not None:
        print(message)
    return 0
