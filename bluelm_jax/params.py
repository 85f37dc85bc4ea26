"""The parameter table: one declaration per weight, and everything derived from it.

The parameters are the state of the module tree in model.py (`nnx.split(model)[1]` as a
plain nested dict), named as the PyTorch model names its modules. Each weight is declared
once below with its logical axes; its shape, its Hugging Face name, whether it is
transposed, its sharding (sharding.py's RULES) and the LoRA targets (lora.py) all follow:

    model/embed_tokens/embedding                 [vocab, hidden]       ("vocab", "embed")
    model/embed_layer_norm/weight, /bias         [hidden]              (when use_stable_embedding)
    model/layers/{i}/input_layernorm/weight      [hidden]
    model/layers/{i}/self_attn/q_proj/kernel     [hidden, heads * head_dim]
    model/layers/{i}/self_attn/k_proj/kernel     [hidden, kv_heads * head_dim]   (v_proj alike)
    model/layers/{i}/self_attn/o_proj/kernel     [heads * head_dim, hidden]
    model/layers/{i}/post_attention_layernorm/weight  [hidden]
    model/layers/{i}/mlp/gate_proj/kernel        [hidden, intermediate]          (up_proj alike)
    model/layers/{i}/mlp/down_proj/kernel        [intermediate, hidden]
    model/norm/weight                            [hidden]
    lm_head/kernel                               [hidden, vocab]

`{i}` is an int key (layer index). The Hugging Face name is the path joined with dots, the
last part renamed: `kernel` (an `nnx.Linear` weight, stored [in, out]) becomes `weight`
transposed (PyTorch stores [out, in]), `embedding` (`nnx.Embed`) becomes `weight`. The
Orbax checkpoint stores the same paths (model.layers.3.self_attn.q_proj.kernel).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterator, Union

from bluelm_jax.config import BlueLMConfig

PathT = tuple[Union[str, int], ...]

LAYERS = ("model", "layers")  # the per-layer weights live under model/layers/{i}/


@dataclasses.dataclass(frozen=True)
class Weight:
    """One declared weight: its path (below a layer for per-layer weights) and logical axes."""

    path: tuple[str, ...]
    axes: tuple[str, ...]  # one logical dim per array dim; sizes from `dim_size`, mesh axes from sharding.RULES

    @property
    def transpose(self) -> bool:
        """PyTorch stores a Linear weight [out, in], we store it [in, out]."""
        return self.path[-1] == "kernel"


# Weights outside the layers; the embedding LayerNorm only when config.use_stable_embedding.
TOP_WEIGHTS: tuple[Weight, ...] = (
    Weight(("model", "embed_tokens", "embedding"), ("vocab", "embed")),
    Weight(("model", "embed_layer_norm", "weight"), ("norm",)),
    Weight(("model", "embed_layer_norm", "bias"), ("norm",)),
    Weight(("model", "norm", "weight"), ("norm",)),
    Weight(("lm_head", "kernel"), ("embed", "vocab")),
)

# The weights of one decoder layer.
LAYER_WEIGHTS: tuple[Weight, ...] = (
    Weight(("input_layernorm", "weight"), ("norm",)),
    Weight(("self_attn", "q_proj", "kernel"), ("embed", "heads")),
    Weight(("self_attn", "k_proj", "kernel"), ("embed", "kv_heads")),
    Weight(("self_attn", "v_proj", "kernel"), ("embed", "kv_heads")),
    Weight(("self_attn", "o_proj", "kernel"), ("heads", "embed")),
    Weight(("post_attention_layernorm", "weight"), ("norm",)),
    Weight(("mlp", "gate_proj", "kernel"), ("embed", "mlp")),
    Weight(("mlp", "up_proj", "kernel"), ("embed", "mlp")),
    Weight(("mlp", "down_proj", "kernel"), ("mlp", "embed")),
)

# The per-layer projections by their short name (q_proj, ..., down_proj): the LoRA targets.
LAYER_PROJECTIONS: dict[str, Weight] = {w.path[-2]: w for w in LAYER_WEIGHTS if w.transpose}

# Buffers some checkpoints carry that are recomputed, never loaded.
IGNORED_HF_TENSORS = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


def dim_size(dim: str, c: BlueLMConfig) -> int:
    """The size of logical dim `dim` (the projections' head dims are heads x head_dim)."""
    return {"vocab": c.vocab_size, "embed": c.hidden_size, "norm": c.hidden_size,
            "heads": c.num_attention_heads * c.head_dim, "kv_heads": c.num_key_value_heads * c.head_dim,
            "mlp": c.intermediate_size}[dim]


def shape_of(weight: Weight, c: BlueLMConfig) -> tuple[int, ...]:
    return tuple(dim_size(d, c) for d in weight.axes)


def layer_weight(path: tuple[str, ...]) -> Weight:
    """The declaration of the per-layer weight at `path` (e.g. ("self_attn", "q_proj", "kernel"))."""
    for w in LAYER_WEIGHTS:
        if w.path == tuple(path):
            return w
    raise KeyError(f"no per-layer weight {path_name(path)}")


def top_weight(path: tuple[str, ...]) -> Weight:
    for w in TOP_WEIGHTS:
        if w.path == tuple(path):
            return w
    raise KeyError(f"no weight {path_name(path)}")


def weights(c: BlueLMConfig) -> Iterator[tuple[PathT, Weight]]:
    """(full path, declaration) of every weight of a model of config `c`, in model order."""
    for w in TOP_WEIGHTS[:3]:
        if w.path[1] != "embed_layer_norm" or c.use_stable_embedding:
            yield w.path, w
    for i in range(c.num_hidden_layers):
        for w in LAYER_WEIGHTS:
            yield (*LAYERS, i, *w.path), w
    for w in TOP_WEIGHTS[3:]:
        yield w.path, w


def weight_at(path: PathT) -> Weight:
    """The declaration of the weight at full path `path`; KeyError if there is none."""
    path = tuple(path)
    if path[:2] == LAYERS and len(path) > 2 and isinstance(path[2], int):
        return layer_weight(path[3:])
    return top_weight(path)


def param_shapes(c: BlueLMConfig) -> dict:
    """The parameter tree with shape tuples as leaves."""
    tree: dict = {}
    for path, w in weights(c):
        set_path(tree, path, shape_of(w, c))
    return tree


def hf_name(path: PathT) -> str:
    """The Hugging Face state-dict name of the weight at `path` (kernel/embedding -> weight)."""
    *head, leaf = (str(p) for p in path)
    return ".".join([*head, "weight" if leaf in ("kernel", "embedding") else leaf])


@dataclasses.dataclass(frozen=True)
class HFTensor:
    """One tensor of a Hugging Face checkpoint and the leaf it becomes."""

    hf_name: str
    hf_shape: tuple[int, ...]  # as stored by PyTorch
    path: PathT  # leaf in the parameter tree
    transpose: bool  # PyTorch Linear [out, in] -> ours [in, out]


def hf_tensors(c: BlueLMConfig) -> Iterator[HFTensor]:
    """Every tensor a Hugging Face BlueLM checkpoint of this config must hold."""
    for path, w in weights(c):
        shape = shape_of(w, c)
        yield HFTensor(hf_name(path), shape[::-1] if w.transpose else shape, path, w.transpose)


def get_path(tree: dict, path: PathT):
    for key in path:
        tree = tree[key]
    return tree


def set_path(tree: dict, path: PathT, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def flatten(tree: dict, prefix: PathT = ()) -> Iterator[tuple[PathT, object]]:
    """(path, leaf) pairs of a nested dict, in sorted key order (layer indices numerically)."""
    for key in sorted(tree, key=lambda k: (isinstance(k, str), k)):
        value = tree[key]
        if isinstance(value, dict):
            yield from flatten(value, prefix + (key,))
        else:
            yield prefix + (key,), value


def path_name(path: PathT) -> str:
    """"model/layers/3/self_attn/q_proj/kernel"."""
    return "/".join(str(p) for p in path)
