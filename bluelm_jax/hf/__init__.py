"""Hugging Face checkpoints: reading them, converting them to Orbax, and exporting back.

    reader.py     a checkpoint directory (safetensors or PyTorch pickles), one tensor at a time
    to_orbax.py   Hugging Face -> a converted bluelm-jax directory, or parameters in memory
    to_hf.py      parameters or a converted directory (+ LoRA adapter) -> Hugging Face
    cli.py        the command lines: bluelm-convert and bluelm-export

Names, shapes and transposes come from the parameter table (params.py) in both directions.
"""
