"""`python -m bluelm_jax COMMAND ...`: see bluelm_jax/cli.py.

Ctrl-C and SIGTERM are taken over before anything else is imported (see interrupts.py).
"""

if __name__ == "__main__":
    from bluelm_jax import interrupts

    interrupts.install("python -m bluelm_jax")

    import sys

    from bluelm_jax.cli import main

    sys.exit(main())
