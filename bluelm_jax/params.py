"""The parameter tree: its names, shapes, and how each leaf maps to a Hugging Face tensor.

Parameters are a plain nested dict of arrays. Per-layer weights are stacked on a leading
layer axis so that the model scans over layers (one compiled layer body, any depth).
Projection matrices are stored `[in, out]` (Hugging Face/PyTorch stores `[out, in]`):

    embed_tokens                        [vocab, hidden]
    embed_layer_norm/weight, /bias      [hidden]           (when use_stable_embedding)
    layers/input_layernorm              [layers, hidden]
    layers/q_proj                       [layers, hidden, heads * head_dim]
    layers/k_proj, layers/v_proj        [layers, hidden, kv_heads * head_dim]
    layers/o_proj                       [layers, heads * head_dim, hidden]
    layers/post_attention_layernorm     [layers, hidden]
    layers/gate_proj, layers/up_proj    [layers, hidden, intermediate]
    layers/down_proj                    [layers, intermediate, hidden]
    norm                                [hidden]
    lm_head                             [hidden, vocab]

For inference, `unstack_layers` turns `layers` into a list of per-layer dicts with the same
leaf names (no layer axis); training, sharding and export use the stacked layout.

This module is the single place where these names live; the converters in `convert/`
and the sharding rules use it.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterator, Optional

from bluelm_jax.config import BlueLMConfig

PathT = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class HFTensor:
    """One tensor of a Hugging Face checkpoint and the leaf it becomes."""

    hf_name: str
    hf_shape: tuple[int, ...]  # as stored by PyTorch
    path: PathT  # leaf in the parameter tree
    layer: Optional[int]  # index on the stacked layer axis, or None
    transpose: bool  # PyTorch Linear [out, in] -> ours [in, out]


# per-layer leaf -> (Hugging Face name inside model.layers.{i}., is a Linear weight)
_LAYER_LEAVES: dict[str, tuple[str, bool]] = {
    "input_layernorm": ("input_layernorm.weight", False),
    "q_proj": ("self_attn.q_proj.weight", True),
    "k_proj": ("self_attn.k_proj.weight", True),
    "v_proj": ("self_attn.v_proj.weight", True),
    "o_proj": ("self_attn.o_proj.weight", True),
    "post_attention_layernorm": ("post_attention_layernorm.weight", False),
    "gate_proj": ("mlp.gate_proj.weight", True),
    "up_proj": ("mlp.up_proj.weight", True),
    "down_proj": ("mlp.down_proj.weight", True),
}

# Buffers some checkpoints carry that are recomputed, never loaded.
IGNORED_HF_TENSORS = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


def _layer_leaf_shapes(c: BlueLMConfig) -> dict[str, tuple[int, ...]]:
    """Per-layer leaf shapes in our [in, out] layout (without the layer axis)."""
    h, i, q, kv = c.hidden_size, c.intermediate_size, c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    return {
        "input_layernorm": (h,), "q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
        "post_attention_layernorm": (h,), "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h),
    }


def param_shapes(c: BlueLMConfig) -> dict:
    """The parameter tree with shape tuples as leaves."""
    L = c.num_hidden_layers
    tree: dict = {
        "embed_tokens": (c.vocab_size, c.hidden_size),
        "layers": {k: (L, *s) for k, s in _layer_leaf_shapes(c).items()},
        "norm": (c.hidden_size,),
        "lm_head": (c.hidden_size, c.vocab_size),
    }
    if c.use_stable_embedding:
        tree["embed_layer_norm"] = {"weight": (c.hidden_size,), "bias": (c.hidden_size,)}
    return tree


def hf_tensors(c: BlueLMConfig) -> Iterator[HFTensor]:
    """Every tensor a Hugging Face BlueLM checkpoint of this config must hold."""
    h = c.hidden_size
    yield HFTensor("model.embed_tokens.weight", (c.vocab_size, h), ("embed_tokens",), None, False)
    if c.use_stable_embedding:
        yield HFTensor("model.embed_layer_norm.weight", (h,), ("embed_layer_norm", "weight"), None, False)
        yield HFTensor("model.embed_layer_norm.bias", (h,), ("embed_layer_norm", "bias"), None, False)
    shapes = _layer_leaf_shapes(c)
    for layer in range(c.num_hidden_layers):
        for leaf, (suffix, is_linear) in _LAYER_LEAVES.items():
            shape = shapes[leaf][::-1] if is_linear else shapes[leaf]
            yield HFTensor(f"model.layers.{layer}.{suffix}", shape, ("layers", leaf), layer, is_linear)
    yield HFTensor("model.norm.weight", (h,), ("norm",), None, False)
    yield HFTensor("lm_head.weight", (c.vocab_size, h), ("lm_head",), None, True)


def get_path(tree: dict, path: PathT):
    for key in path:
        tree = tree[key]
    return tree


def set_path(tree: dict, path: PathT, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def flatten(tree: dict, prefix: PathT = ()) -> Iterator[tuple[PathT, object]]:
    """(path, leaf) pairs of a nested dict, in sorted key order."""
    for key in sorted(tree):
        value = tree[key]
        if isinstance(value, dict):
            yield from flatten(value, prefix + (key,))
        else:
            yield prefix + (key,), value


def unstack_layers(params: dict) -> dict:
    """The per-layer layout: params["layers"] becomes a list of dicts, one buffer per weight.

    Takes `params` over: its stacked leaves are split and dropped one at a time, so the peak
    is one leaf more than the parameters themselves (when nothing else refers to them).
    """
    stacked = params.pop("layers")
    num_layers = len(next(iter(stacked.values())))
    per_layer: list[dict] = [{} for _ in range(num_layers)]
    for name in list(stacked):
        leaf = stacked.pop(name)
        for i in range(num_layers):
            per_layer[i][name] = leaf[i]
        del leaf
    return {**params, "layers": per_layer}
