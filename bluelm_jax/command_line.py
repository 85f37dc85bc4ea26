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


EXIT_ERROR, EXIT_USAGE = 1, 2


def run_reporting_errors(action: Callable[[], Optional[str]], known: tuple[type[BaseException], ...],
                         on_error: Optional[Callable[[], None]] = None, prog: Optional[str] = None,
                         usage: tuple[type[BaseException], ...] = ()) -> int:
    """Runs action, prints its success line: 0; `[prog: ]error: ...` on stderr: 1 (2 for the
    `usage` errors, 130 when interrupted, 143 when terminated: see interrupts.py).

    Errors of the `known` (and `usage`) types are reported by their message, others as an
    internal error, so that a bug does not pass for bad input; on_error runs first on any
    error but an interrupt. A closed stdout (`... | head`) ends the command quietly.
    """
    lead = f"{prog}: error" if prog else "error"
    try:
        message = action()
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", signal.SIGINT)  # interrupts.Interrupted, or Python's own
        print(f"{prog + ': ' if prog else 'error: '}{interrupts.describe(signum)}", file=sys.stderr, flush=True)
        interrupts.reported()
        return interrupts.exit_status(signum)
    except BrokenPipeError:
        return EXIT_ERROR
    except Exception as e:  # noqa: BLE001 - one line, never a traceback
        if on_error is not None:
            on_error()
        if isinstance(e, usage + known):
            text = one_line(e)
        else:
            text = f"internal error ({type(e).__name__}: {one_line(e)})"
        print(f"{lead}: {text}", file=sys.stderr)
        return EXIT_USAGE if isinstance(e, usage) else EXIT_ERROR
    if message is not None:
        print(message)
    return 0
