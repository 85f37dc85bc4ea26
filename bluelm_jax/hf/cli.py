"""The converters' command lines: `bluelm-convert` (Hugging Face -> Orbax) and `bluelm-export` (back).

    bluelm-convert --hf-dir DIR --out DIR [--dtype auto|bfloat16|float32] [--quantize int8|int4]
                   [--force] [--no-progress]
    bluelm-export --ckpt DIR --out DIR [--adapter DIR] [--dtype auto|bfloat16|float16|float32]
                  [--max-shard-size 5GB] [--force]

From a checkout, `python -m convert.hf_to_flax` and `python -m convert.flax_to_hf` are the
same commands. `convert_command` and `export_command` are the installed scripts' entry
points: they take over Ctrl-C and SIGTERM (interrupts.py) before jax is imported, then run
`convert_main` or `export_main`, which parse the arguments and report bad input as one line
on stderr with exit status 1 (an interrupted conversion removes its output: 130 or 143).
This module imports only the standard library and interrupts.py at the top.
"""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

from bluelm_jax import interrupts
from bluelm_jax.command_line import run_reporting_errors, use_cpu_quietly

CONVERT_PROG, EXPORT_PROG = "bluelm-convert", "bluelm-export"


def convert_main(argv: Optional[Sequence[str]] = None, prog: str = CONVERT_PROG) -> int:
    """Hugging Face checkpoint -> converted bluelm-jax directory (hf/to_orbax.py); the exit status."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Convert a Hugging Face BlueLM checkpoint (safetensors or pytorch_model*.bin) into a "
                    "bluelm-jax Orbax directory, streaming one tensor at a time.")
    parser.add_argument("--hf-dir", required=True,
                        help="Hugging Face directory (config.json, weights, tokenizer.model), or a Hub repo id "
                             "such as vivo-ai/BlueLM-7B-Chat (fetched into the Hugging Face cache)")
    parser.add_argument("--out", required=True, help="output directory (created atomically)")
    parser.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float32"),
                        help="parameter dtype (default auto: bfloat16 or float32 as stored; float16 -> float32)")
    parser.add_argument("--quantize", default=None, choices=("int8", "int4"),
                        help="store the projections quantized (weight-only): int8 per output channel, or int4 in "
                             "groups of 128 inputs; embeddings, norms and lm_head keep --dtype")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    use_cpu_quietly()  # conversion never needs an accelerator
    from bluelm_jax import checkpoint, hub
    from bluelm_jax.config import ConfigError
    from bluelm_jax.hf.reader import CheckpointFormatError
    from bluelm_jax.hf.to_orbax import ConversionError, convert_hf_to_flax

    known = (ConversionError, CheckpointFormatError, ConfigError, checkpoint.CheckpointError, hub.HubError, OSError)

    def convert() -> str:
        with interrupts.deferred():  # raised between blocks: the writers finish, the output is removed
            return convert_hf_to_flax(args.hf_dir, args.out, args.dtype, args.force,
                                      progress=not args.no_progress, quantize=args.quantize).line()

    return run_reporting_errors(convert, known)


def export_main(argv: Optional[Sequence[str]] = None, prog: str = EXPORT_PROG) -> int:
    """Converted bluelm-jax directory (+ LoRA adapter) -> Hugging Face directory (hf/to_hf.py); the exit status."""
    from bluelm_jax.hf.to_hf import EXPORT_DTYPES  # numpy and the parameter table, no jax

    parser = argparse.ArgumentParser(
        prog=prog,
        description="Export a bluelm-jax Orbax checkpoint (from the converter or from fine-tuning) to a Hugging "
                    "Face directory: config.json, safetensors, tokenizer.model.")
    parser.add_argument("--ckpt", required=True, help="converted bluelm-jax directory (bluelm_jax.json, params/)")
    parser.add_argument("--out", required=True, help="output Hugging Face directory (created atomically)")
    parser.add_argument("--adapter", default=None, help="LoRA adapter directory to merge into the weights")
    parser.add_argument("--dtype", default="auto", choices=("auto",) + EXPORT_DTYPES,
                        help="dtype of the written tensors (default auto: as stored in the checkpoint)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (default 5GB)")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    args = parser.parse_args(argv)

    use_cpu_quietly()  # export never needs an accelerator
    from bluelm_jax import checkpoint
    from bluelm_jax.config import ConfigError
    from bluelm_jax.hf.to_hf import ExportError, export_checkpoint, parse_size
    from bluelm_jax.lora import LoraError

    def export() -> str:
        out = export_checkpoint(args.ckpt, args.out, args.adapter, args.dtype, parse_size(args.max_shard_size),
                                args.force)
        return f"exported {args.ckpt} -> {out}"

    return run_reporting_errors(export, (ExportError, ConfigError, checkpoint.CheckpointError, LoraError, OSError))


def convert_command(prog: str = CONVERT_PROG) -> int:
    """The `bluelm-convert` script: the interrupt watcher first, then `convert_main` on sys.argv."""
    interrupts.install()
    return convert_main(prog=prog)


def export_command(prog: str = EXPORT_PROG) -> int:
    """The `bluelm-export` script: the interrupt watcher first, then `export_main` on sys.argv."""
    interrupts.install()
    return export_main(prog=prog)
