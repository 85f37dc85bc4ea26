"""Random-weight BlueLM checkpoints written in Hugging Face layout, for the tests.

The in-memory weights and the PyTorch reference model are bench/reference.py's (the
benchmarks use them too); this module adds the writing of a checkpoint directory.
Test-only: torch and transformers are never run-time dependencies.
"""

from __future__ import annotations

import json
import math
import os
import shutil

from bench.reference import (assert_reference_rope_intact, ntkmixed_inv_freq_torch,  # noqa: F401 (re-exported)
                             params_from_hf, random_hf_weights, reference_model)
from bluelm_jax.config import BlueLMConfig


def write_hf_checkpoint(directory: str, config: BlueLMConfig, tokenizer_model: str | None, seed: int = 0,
                        num_shards: int = 2, fmt: str = "safetensors", dtype: str = "float32") -> str:
    """Writes config.json, the weights (sharded with an index when num_shards > 1) and tokenizer.model.

    fmt: "safetensors" or "bin" (PyTorch pickles); dtype: "float32" or "bfloat16".
    """
    import torch

    os.makedirs(directory, exist_ok=True)
    hf_config = config.to_hf_dict()
    hf_config["torch_dtype"] = dtype
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    if tokenizer_model is not None:
        shutil.copy(tokenizer_model, os.path.join(directory, "tokenizer.model"))

    weights = random_hf_weights(config, seed)
    names = list(weights)
    per_shard = math.ceil(len(names) / num_shards)
    groups = [names[i:i + per_shard] for i in range(0, len(names), per_shard)]
    if fmt == "safetensors":
        from safetensors.torch import save_file
        pattern, single, index_name = "model-{:05d}-of-{:05d}.safetensors", "model.safetensors", "model.safetensors.index.json"
    elif fmt == "bin":
        pattern, single, index_name = "pytorch_model-{:05d}-of-{:05d}.bin", "pytorch_model.bin", "pytorch_model.bin.index.json"
    else:
        raise ValueError(f"unknown format {fmt!r}")
    weight_map = {}
    for i, group in enumerate(groups):
        filename = single if len(groups) == 1 else pattern.format(i + 1, len(groups))
        tensors = {n: torch.from_numpy(weights[n]).to(getattr(torch, dtype)) for n in group}
        path = os.path.join(directory, filename)
        if fmt == "safetensors":
            save_file(tensors, path, metadata={"format": "pt"})
        else:
            torch.save(tensors, path)
        weight_map.update({n: filename for n in group})
    if len(groups) > 1:
        with open(os.path.join(directory, index_name), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=2)
    return directory
