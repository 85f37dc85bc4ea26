"""Command line: convert a Hugging Face BlueLM checkpoint into a bluelm-jax (Orbax) directory.

    python -m convert.hf_to_flax --hf-dir DIR --out DIR [--dtype auto|bfloat16|float32] [--force]

The same command as the installed `bluelm-convert` script, for a checkout: the arguments
and the errors are bluelm_jax/hf/cli.py's, the conversion is bluelm_jax/hf/to_orbax.py's.
"""

import sys

if __name__ == "__main__":  # Ctrl-C and SIGTERM taken over before the heavy imports (bluelm_jax/interrupts.py)
    from bluelm_jax.hf.cli import convert_command

    sys.exit(convert_command(prog="python -m convert.hf_to_flax"))
