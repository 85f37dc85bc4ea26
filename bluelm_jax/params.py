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

Projections have two layouts (`LAYOUTS`). KERNEL, above, is the canonical one: checkpoints,
training, LoRA and accelerators use it. WEIGHT stores each projection as PyTorch does,
`.../q_proj/weight` [out, in] with its axes reversed (`Weight.in_layout`): `load()` picks it
for bfloat16 weights under float32 compute on CPU, where XLA's bfloat16 dot reads it about
twice as fast (model.TorchLinear). A tree's layout shows in its names (`layout_of`).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterator, Union

from bluelm_jax.config import BlueLMConfig

PathT = tuple[Union[str, int], ...]

KERNEL = "kernel"  # projections stored [in, out] (nnx.Linear): checkpoints, training, accelerators
WEIGHT = "weight"  # projections stored [out, in] (torch.nn.Linear): bfloat16 inference on CPU
LAYOUTS = (KERNEL, WEIGHT)


def check_layout(layout: str) -> str:
    """`layout`, or a ValueError naming the layouts."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown projection layout {layout!r} (one of {', '.join(LAYOUTS)})")
    return layout

LAYERS = ("model", "layers")  # the per-layer weights live under model/layers/{i}/


@dataclasses.dataclass(frozen=True)
class Weight:
    """One declared weight: its path (below a layer for per-layer weights) and logical axes."""

    path: tuple[str, ...]
    axes: tuple[str, ...]  # one logical dim per array dim; sizes from `dim_size`, mesh axes from sharding.RULES

    @property
    def transpose(self) -> bool:
        """PyTorch stores a Linear weight [out, in], the KERNEL layout stores it [in, out]."""
        return self.path[-1] == KERNEL

    def in_layout(self, layout: str) -> "Weight":
        """This declaration as stored in `layout`: a projection in the WEIGHT layout is
        `.../weight` with its axes reversed; everything else is unchanged."""
        if check_layout(layout) == WEIGHT and self.transpose:
            return Weight((*self.path[:-1], WEIGHT), self.axes[::-1])
        return self


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
PROJECTIONS = frozenset([*LAYER_PROJECTIONS, "lm_head"])  # the modules whose weight has two layouts

# Buffers some checkpoints carry that are recomputed, never loaded.
IGNORED_HF_TENSORS = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


def dim_size(dim: str, c: BlueLMConfig) -> int:
    """The size of logical dim `dim` (the projections' head dims are heads x head_dim)."""
    return {"vocab": c.vocab_size, "embed": c.hidden_size, "norm": c.hidden_size,
            "heads": c.num_attention_heads * c.head_dim, "kv_heads": c.num_key_value_heads * c.head_dim,
            "mlp": c.intermediate_size}[dim]


def shape_of(weight: Weight, c: BlueLMConfig) -> tuple[int, ...]:
    return tuple(dim_size(d, c) for d in weight.axes)


def _declared(table: tuple[Weight, ...], path: tuple) -> Weight | None:
    """The declaration of `path` in `table`, in either layout (a WEIGHT-layout projection too)."""
    path = tuple(path)
    for w in table:
        for layout in LAYOUTS:
            if w.in_layout(layout).path == path:
                return w.in_layout(layout)
    return None


def layer_weight(path: tuple[str, ...]) -> Weight:
    """The declaration of the per-layer weight at `path` (e.g. ("self_attn", "q_proj", "kernel"))."""
    found = _declared(LAYER_WEIGHTS, path)
    if found is None:
        raise KeyError(f"no per-layer weight {path_name(path)}")
    return found


def top_weight(path: tuple[str, ...]) -> Weight:
    found = _declared(TOP_WEIGHTS, path)
    if found is None:
        raise KeyError(f"no weight {path_name(path)}")
    return found


def weights(c: BlueLMConfig, layout: str = KERNEL) -> Iterator[tuple[PathT, Weight]]:
    """(full path, declaration) of every weight of a model of config `c` stored in `layout`, in model order."""
    for w in TOP_WEIGHTS[:3]:
        if w.path[1] != "embed_layer_norm" or c.use_stable_embedding:
            yield w.path, w
    for i in range(c.num_hidden_layers):
        for w in LAYER_WEIGHTS:
            w = w.in_layout(layout)
            yield (*LAYERS, i, *w.path), w
    for w in TOP_WEIGHTS[3:]:
        w = w.in_layout(layout)
        yield w.path, w


def weight_at(path: PathT) -> Weight:
    """The declaration of the weight at full path `path`; KeyError if there is none."""
    path = tuple(path)
    if path[:2] == LAYERS and len(path) > 2 and isinstance(path[2], int):
        return layer_weight(path[3:])
    return top_weight(path)


def param_shapes(c: BlueLMConfig, layout: str = KERNEL) -> dict:
    """The parameter tree (in `layout`) with shape tuples as leaves."""
    tree: dict = {}
    for path, w in weights(c, layout):
        set_path(tree, path, shape_of(w, c))
    return tree


def path_in(path: PathT, layout: str) -> PathT:
    """The path of leaf `path` (of either layout) in `layout`: a projection's last name is the layout."""
    path = tuple(path)
    if len(path) >= 2 and path[-2] in PROJECTIONS and path[-1] in LAYOUTS:
        return (*path[:-1], check_layout(layout))
    return path


def layout_of(params: dict) -> str:
    """The projection layout of a parameter tree, read from its names (lm_head/kernel or lm_head/weight)."""
    return WEIGHT if WEIGHT in params["lm_head"] else KERNEL


def require_kernel_layout(params: dict, purpose: str) -> None:
    """A ValueError unless `params` are in the KERNEL layout, which `purpose` needs."""
    if layout_of(params) != KERNEL:
        raise ValueError(f"{purpose} needs the parameters in the kernel layout ([in, out]), these are in the "
                         f"weight layout ([out, in], picked for bfloat16 on CPU): load with layout='kernel' or "
                         f"convert them with bluelm_jax.layout.to_layout(params, 'kernel')")


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
    transpose: bool  # PyTorch Linear [out, in] -> ours [in, out] (KERNEL layout)


def hf_tensors(c: BlueLMConfig, layout: str = KERNEL) -> Iterator[HFTensor]:
    """Every tensor a Hugging Face BlueLM checkpoint of this config must hold, and its leaf in `layout`."""
    for path, w in weights(c, layout):
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
