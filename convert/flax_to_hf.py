"""Command line: export a bluelm-jax (Orbax) directory back to the Hugging Face layout.

    python -m convert.flax_to_hf --ckpt DIR --out DIR [--adapter DIR] [--dtype auto|bfloat16|float16|float32]
                                 [--max-shard-size 5GB] [--force]

The same command as the installed `bluelm-export` script, for a checkout: the arguments and
the errors are bluelm_jax/hf/cli.py's, the export is bluelm_jax/hf/to_hf.py's.
"""

import sys

if __name__ == "__main__":  # Ctrl-C and SIGTERM taken over before the heavy imports (bluelm_jax/interrupts.py)
    from bluelm_jax.hf.cli import export_command

    sys.exit(export_command(prog="python -m convert.flax_to_hf"))
