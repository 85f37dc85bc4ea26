"""`python -m bluelm_jax COMMAND ...`: see bluelm_jax/cli.py.

Ctrl-C and SIGTERM are taken over before anything else is imported (`cli.command`, which
imports only the standard library first; see interrupts.py).
"""

if __name__ == "__main__":
    import sys

    from bluelm_jax.cli import PROG, command

    sys.exit(command(PROG))
