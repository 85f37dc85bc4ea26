"""The PyTorch reference of BlueLM, and random-weight checkpoints in Hugging Face layout (in memory
or written to a directory: `write_hf_checkpoint`).

The reference is the transformers library's LLaMA (code we did not write) plus BlueLM's
embedding LayerNorm, hooked onto the embedding module so that it also applies to
generated tokens; for ntkmixed, the rotary inverse frequencies are replaced with ones
computed here in torch from the published formula (independently of bluelm_jax.rope).
bench/decode.py times it; the tests (tests/hf_reference.py) check bluelm-jax against it.
torch and transformers are never run-time dependencies of bluelm_jax.
"""

from __future__ import annotations

import json
import math
import os
import shutil

import numpy as np

from bluelm_jax.config import BlueLMConfig
from bluelm_jax.params import hf_tensors, set_path

QK_STD = 0.08  # larger than 0.02 so that attention is far from uniform and RoPE errors show
STD = 0.02


def random_hf_weights(config: BlueLMConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Every tensor of a BlueLM checkpoint of this config, float32, in PyTorch layout."""
    rng = np.random.default_rng(seed)
    weights = {}
    for t in hf_tensors(config):
        if t.hf_name.endswith(("norm.weight", "layer_norm.weight")):
            w = 1.0 + 0.1 * rng.standard_normal(t.hf_shape)
        elif t.hf_name.endswith(".bias"):
            w = 0.1 * rng.standard_normal(t.hf_shape)
        else:
            std = QK_STD if t.hf_name.endswith(("q_proj.weight", "k_proj.weight")) else STD
            w = std * rng.standard_normal(t.hf_shape)
        weights[t.hf_name] = w.astype(np.float32)
    return weights


def params_from_hf(config: BlueLMConfig, weights: dict[str, np.ndarray]) -> dict:
    """Our parameter tree from in-memory Hugging Face tensors, through params.hf_tensors."""
    import jax.numpy as jnp

    tree: dict = {}
    for t in hf_tensors(config):
        w = weights[t.hf_name].T if t.transpose else weights[t.hf_name]
        set_path(tree, t.path, jnp.asarray(np.ascontiguousarray(w)))
    return tree


def ntkmixed_inv_freq_torch(head_dim: int, theta: float, factor: float, power: float):
    """BlueLM's ntkmixed inverse frequencies, written in torch float32 as the release computes them."""
    import torch

    a = math.log(factor) / (head_dim / 2) ** power
    base = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    return base / torch.exp(a * torch.arange(1, head_dim // 2 + 1, dtype=torch.float32) ** power)


def reference_model(config: BlueLMConfig, weights: dict[str, np.ndarray]):
    """transformers LlamaForCausalLM, float32, eager attention, with BlueLM's embedding LayerNorm."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    scaling = config.rope_scaling
    if scaling is not None and scaling.kind != "ntkmixed":
        rope_parameters = {"rope_type": scaling.kind, "factor": scaling.factor, "rope_theta": config.rope_theta}
    else:
        rope_parameters = {"rope_type": "default", "rope_theta": config.rope_theta}
    llama_config = LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, max_position_embeddings=config.context_length,
        rms_norm_eps=config.rms_norm_eps, rope_parameters=rope_parameters, tie_word_embeddings=False,
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id,
        attention_bias=False, mlp_bias=False,
    )
    llama_config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config).float().eval()
    state = {n: torch.from_numpy(w) for n, w in weights.items() if not n.startswith("model.embed_layer_norm.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and not [m for m in missing if "rotary" not in m], (missing, unexpected)

    if config.use_stable_embedding:
        ln = torch.nn.LayerNorm(config.hidden_size, eps=config.rms_norm_eps)
        ln.weight.data = torch.from_numpy(weights["model.embed_layer_norm.weight"]).clone()
        ln.bias.data = torch.from_numpy(weights["model.embed_layer_norm.bias"]).clone()
        model.embed_layer_norm = ln
        model.model.embed_tokens.register_forward_hook(lambda module, inputs, output: ln(output))

    if scaling is not None and scaling.kind == "ntkmixed":
        rotary = model.model.rotary_emb
        freq = ntkmixed_inv_freq_torch(config.head_dim, config.rope_theta, scaling.factor, scaling.power)
        rotary.inv_freq = freq.clone()
        rotary.original_inv_freq = freq.clone()
        model._bluelm_inv_freq = freq.clone()
    return model


def assert_reference_rope_intact(model) -> None:
    """The ntkmixed table must survive until after use (transformers may recompute it)."""
    import torch

    expected = getattr(model, "_bluelm_inv_freq", None)
    if expected is not None:
        rotary = model.model.rotary_emb
        assert rotary.inv_freq.dtype == torch.float32
        assert torch.equal(rotary.inv_freq, expected), "the reference's ntkmixed inv_freq was overwritten"


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
