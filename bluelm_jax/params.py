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

# The leaves of a quantized projection (`Quantization`), always [out, in] like PyTorch's weight.
QVALUE, SCALE, OFFSET = "qvalue", "scale", "offset"
QUANTIZED_LEAVES = (QVALUE, SCALE, OFFSET)
QUANTIZATION_KINDS = ("int8", "int4")
INT4_GROUP = 128  # int4 inputs per scale by default


@dataclasses.dataclass(frozen=True)
class Quantization:
    """How a tree's projections are quantized (weight-only; activations stay float).

    Every layer projection, and `lm_head` with `lm_head`, replaces its one float leaf by:

        int8: qvalue int8 [out, in],        scale float32 [out]            w = q * scale
        int4: qvalue int8 [out, in / 2],    scale float32 [in / group, out] w = q * scale (+ offset)
              (two signed nibbles a byte, quantize.pack_int4's order), and with `offsets`
              offset float32 [in / group, out]: GPTQ/AWQ zero points folded in.

    Quantized leaves are [out, in] whatever the layout of the float leaves: a row is an
    output channel, so a converter quantizes a PyTorch tensor's row blocks as they stream
    and the CPU products dequantize blocks of output channels (quantize.py). A tree's
    quantization shows in its leaves (`quantization_of`).
    """

    kind: str  # "int8" or "int4"
    group: int | None = None  # int4: inputs per scale (default INT4_GROUP); None for int8
    lm_head: bool = False  # quantize the head too
    offsets: bool = False  # int4 only: an offset leaf per group (GPTQ/AWQ zero points)

    def __post_init__(self):
        if self.kind not in QUANTIZATION_KINDS:
            raise ValueError(f"unknown quantization {self.kind!r} (one of {', '.join(QUANTIZATION_KINDS)})")
        if self.kind == "int8":
            if self.offsets:
                raise ValueError("int8 quantization has no offsets")
            object.__setattr__(self, "group", None)
        elif self.group is None:
            object.__setattr__(self, "group", INT4_GROUP)
        elif isinstance(self.group, bool) or not isinstance(self.group, int) or self.group < 2 or self.group % 2:
            raise ValueError(f"int4 group must be an even integer >= 2, got {self.group!r}")

    def covers(self, path: PathT) -> bool:
        """Whether the projection leaf (or module) at `path` is quantized: every layer projection, and lm_head
        with `lm_head`."""
        path = tuple(path)
        name = path[-2] if path and path[-1] in (*LAYOUTS, *QUANTIZED_LEAVES) else (path[-1] if path else None)
        return name in LAYER_PROJECTIONS or (name == "lm_head" and self.lm_head)

    def leaves(self, weight: Weight, c: BlueLMConfig) -> dict[str, tuple[tuple[int, ...], tuple, str]]:
        """name -> (shape, logical axes, dtype) of the leaves replacing the declared [in, out] `weight`.
        Scales follow their weight's output axis; int4's group axis is replicated (None)."""
        n_in, n_out = shape_of(weight, c)
        in_axis, out_axis = weight.axes
        if self.kind == "int8":
            return {QVALUE: ((n_out, n_in), (out_axis, in_axis), "int8"), SCALE: ((n_out,), (out_axis,), "float32")}
        if n_in % self.group:
            raise ValueError(f"int4 groups of {self.group} inputs do not divide the input size {n_in} of "
                             f"{path_name(weight.path)}")
        groups = ((n_in // self.group, n_out), (None, out_axis), "float32")
        found = {QVALUE: ((n_out, n_in // 2), (out_axis, in_axis), "int8"), SCALE: groups}
        return {**found, OFFSET: groups} if self.offsets else found

    def describe(self) -> dict:
        """The JSON form stored in a converted directory's metadata (`from_json` reads it)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, value: dict) -> "Quantization":
        return cls(**value)


def int4_group(c: BlueLMConfig) -> int:
    """INT4_GROUP, or for a model whose input sizes it does not divide (the default model's 704),
    the largest power of two below it that divides them all."""
    group = INT4_GROUP
    while group > 2 and (c.hidden_size % group or c.intermediate_size % group
                         or (c.num_attention_heads * c.head_dim) % group):
        group //= 2
    return group


def as_quantization(value: "Quantization | str | None", c: BlueLMConfig) -> "Quantization | None":
    """None, a Quantization, or its kind as a string ("int8", "int4": groups of `int4_group(c)`)."""
    if value is None or isinstance(value, Quantization):
        return value
    if value == "int4":
        return Quantization(value, int4_group(c))
    if isinstance(value, str):
        return Quantization(value)
    raise ValueError(f"quantize must be None, 'int8', 'int4' or a Quantization, got {value!r}")


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


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One leaf of a parameter tree: its path, shape, logical axes (None: replicated) and, for a
    quantized leaf, its fixed dtype (None: the tree's parameter dtype)."""

    path: PathT
    shape: tuple[int, ...]
    axes: tuple
    dtype: str | None = None


def leaves(c: BlueLMConfig, layout: str = KERNEL, quantization: Quantization | None = None) -> Iterator[Leaf]:
    """Every leaf of a model of config `c`, its float projections in `layout` and the projections
    `quantization` covers replaced by their quantized leaves, in model order."""
    for path, w in weights(c, layout):
        if quantization is not None and quantization.covers(path):
            kernel = weight_at(path_in(path, KERNEL))
            for name, (shape, axes, dtype) in quantization.leaves(kernel, c).items():
                yield Leaf((*path[:-1], name), shape, axes, dtype)
        else:
            yield Leaf(path, shape_of(w, c), w.axes)


def param_shapes(c: BlueLMConfig, layout: str = KERNEL, quantization: Quantization | None = None) -> dict:
    """The parameter tree (in `layout`, quantized by `quantization`) with shape tuples as leaves."""
    tree: dict = {}
    for leaf in leaves(c, layout, quantization):
        set_path(tree, leaf.path, leaf.shape)
    return tree


def leaf_axes(path: PathT, ndim: int) -> tuple:
    """The logical axes of the leaf at `path` with `ndim` dims: its declaration's, or for a quantized
    leaf those `Quantization.leaves` gives it (int8's scale has 1 dim, int4's 2)."""
    path = tuple(path)
    if path and path[-1] in QUANTIZED_LEAVES:
        in_axis, out_axis = weight_at((*path[:-1], KERNEL)).axes
        if path[-1] == QVALUE:
            return out_axis, in_axis
        return (out_axis,) if ndim == 1 else (None, out_axis)
    return weight_at(path).axes


def quantization_of(params: dict) -> Quantization | None:
    """The quantization of a parameter tree, read from its leaves (layer 0's q_proj and lm_head), or None."""
    q_proj = params.get("model", {}).get("layers", {}).get(0, {}).get("self_attn", {}).get("q_proj", {})
    if QVALUE not in q_proj:  # float projections (or a tree of another layout, which its checks refuse)
        return None
    if q_proj[SCALE].ndim == 1:
        return Quantization("int8", lm_head=QVALUE in params["lm_head"])
    group = 2 * q_proj[QVALUE].shape[1] // q_proj[SCALE].shape[0]
    return Quantization("int4", group, lm_head=QVALUE in params["lm_head"], offsets=OFFSET in q_proj)


def path_in(path: PathT, layout: str) -> PathT:
    """The path of leaf `path` (of either layout) in `layout`: a projection's last name is the layout.
    (Quantized leaves have one orientation and keep their path.)"""
    path = tuple(path)
    if len(path) >= 2 and path[-2] in PROJECTIONS and path[-1] in LAYOUTS:
        return (*path[:-1], check_layout(layout))
    return path


def layout_of(params: dict) -> str:
    """The projection layout of a parameter tree, read from its names (lm_head/kernel or lm_head/weight;
    a quantized lm_head counts as KERNEL: then no float projection is left)."""
    return WEIGHT if WEIGHT in params["lm_head"] else KERNEL


def require_kernel_layout(params: dict, purpose: str) -> None:
    """A ValueError unless `params` are float projections in the KERNEL layout, which `purpose` needs."""
    quantization = quantization_of(params)
    if quantization is not None:
        raise ValueError(f"{purpose} needs float projections, these are {quantization.kind} (load the model "
                         f"without quantize=, from a checkpoint converted without --quantize)")
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
