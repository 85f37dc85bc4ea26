"""`python -m bluelm_jax COMMAND ...`: see bluelm_jax/cli.py."""

import sys

from bluelm_jax.cli import main

if __name__ == "__main__":
    sys.exit(main())
