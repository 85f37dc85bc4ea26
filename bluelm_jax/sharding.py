"""Device meshes and the sharding rules of every parameter, the KV cache and the activations.

Mesh axes (any subset, in this order):

    data     batch rows (data parallel): the KV cache, tokens and logits are split by row
    fsdp     the hidden ("embed") dim of the weights, for training later; batch rows too
    tensor   attention heads, MLP features and the vocabulary (Megatron-style)

Every weight carries its logical axes (declared in params.py, and the `out_sharding`
metadata of the module's parameters); `logical_to_mesh` is the one rule that maps them to a
PartitionSpec through RULES, and every other helper (`param_spec` of a path, shardings of
a whole tree, placing a host tree) goes through it. A dimension is split only when its
unit count (heads, KV heads, features, vocabulary rows) is divisible by the mesh axis; otherwise it stays
replicated on that axis, so any mesh works for any config.

Activations are constrained inside the model with `constrain`, which reads the mesh set
by `jax.set_mesh(mesh)` (`with use(mesh):`) and does nothing without one.

Batches: `batch_mesh` is the mesh of a training run (its rows must divide over data x
fsdp), `batch_sharding` and `put_batch` place host batches by rows, each device receiving
only its own.
"""

from __future__ import annotations

import contextlib
import math
import re
import sys
from typing import Iterable, Optional, Sequence, Union

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bluelm_jax.config import BlueLMConfig
from bluelm_jax.params import KERNEL, PathT, Quantization, flatten, leaf_axes, leaves, path_name, set_path

DATA, FSDP, TENSOR = "data", "fsdp", "tensor"
AXES = (DATA, FSDP, TENSOR)
BATCH = (DATA, FSDP)  # mesh axes that split batch rows

# Logical dim -> mesh axis (None: replicated).
RULES: dict[str, Optional[str]] = {
    "vocab": TENSOR, "heads": TENSOR, "kv_heads": TENSOR, "mlp": TENSOR,
    "embed": FSDP, "norm": None,
}


class MeshError(ValueError):
    """A mesh description that cannot be built on the devices present."""


# --------------------------------------------------------------------------- meshes


def parse_mesh(spec: str) -> dict[str, int]:
    """"data=2,tensor=4" -> {"data": 2, "tensor": 4}; one size may be -1 (the rest of the devices)."""
    if not isinstance(spec, str) or not spec.strip():
        raise MeshError("empty mesh description (expected e.g. 'data=2,tensor=4')")
    sizes: dict[str, int] = {}
    for part in spec.split(","):
        m = re.fullmatch(r"\s*([a-z]+)\s*[=:]\s*(-1|\d+)\s*", part)
        if not m:
            raise MeshError(f"bad mesh axis {part.strip()!r} in {spec!r} (expected NAME=SIZE, e.g. 'data=2,tensor=4')")
        name, size = m.group(1), int(m.group(2))
        if name not in AXES:
            raise MeshError(f"unknown mesh axis {name!r} in {spec!r} (known: {', '.join(AXES)})")
        if name in sizes:
            raise MeshError(f"mesh axis {name!r} given twice in {spec!r}")
        if size == 0:
            raise MeshError(f"mesh axis {name!r} has size 0 in {spec!r}")
        sizes[name] = size
    if list(sizes.values()).count(-1) > 1:
        raise MeshError(f"at most one mesh axis may be -1 in {spec!r}")
    return sizes


def default_mesh_shape(num_devices: int, config: Optional[BlueLMConfig] = None,
                       devices_per_process: Optional[int] = None) -> dict[str, int]:
    """Tensor parallelism over as many devices as the heads allow (within one process/host),
    data parallelism over the rest."""
    local = devices_per_process or num_devices
    tensor = 1
    for t in range(1, local + 1):
        if local % t or num_devices % t:
            continue
        if config is None or (config.num_key_value_heads % t == 0 and config.num_attention_heads % t == 0):
            tensor = t
    return {DATA: num_devices // tensor, TENSOR: tensor}


def make_mesh(spec: Union[None, str, dict] = None, devices: Optional[Sequence] = None,
              config: Optional[BlueLMConfig] = None) -> Mesh:
    """A mesh over `devices` (default: all) from "data=2,tensor=4", a dict, or None (the default).

    Axes are kept in the order data, fsdp, tensor (tensor innermost: neighbouring devices,
    within a host). A mesh smaller than the devices given takes the first ones it needs and
    says so in one line on stderr (in one process only: across processes every device must
    take part).
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if spec is None:
        sizes = default_mesh_shape(n, config, n // max(1, jax.process_count()))
    else:
        sizes = parse_mesh(spec) if isinstance(spec, str) else dict(spec)
    known = math.prod(s for s in sizes.values() if s != -1)
    if -1 in sizes.values():
        if n % known:
            raise MeshError(f"mesh {format_mesh(sizes)}: {n} devices are not a multiple of {known}")
        sizes = {k: (n // known if s == -1 else s) for k, s in sizes.items()}
    needed = math.prod(sizes.values())
    if needed > n:
        raise MeshError(f"mesh {format_mesh(sizes)} needs {needed} devices, {n} present")
    if needed < n:
        if jax.process_count() > 1:
            raise MeshError(f"mesh {format_mesh(sizes)} uses {needed} of {n} devices; with several processes "
                            f"a mesh must use every device")
        print(f"note: mesh {format_mesh(sizes)} uses the first {needed} of the {n} devices", file=sys.stderr)
        devices = devices[:needed]
    names = tuple(a for a in AXES if a in sizes)
    shape = tuple(sizes[a] for a in names)
    types = (jax.sharding.AxisType.Auto,) * len(names)
    try:
        return jax.make_mesh(shape, names, axis_types=types, devices=devices)
    except (ValueError, NotImplementedError, AssertionError):  # odd device topologies
        return Mesh(np.asarray(devices).reshape(shape), names, axis_types=types)


def format_mesh(mesh: Union[Mesh, dict]) -> str:
    """"data=2,tensor=4"."""
    sizes = dict(mesh.shape) if isinstance(mesh, Mesh) else mesh
    return ",".join(f"{k}={v}" for k, v in sizes.items())


def check_batch_split(batch_size: int, sizes: dict) -> None:
    """MeshError unless `batch_size` rows divide over the data x fsdp devices of a mesh of these sizes."""
    rows = math.prod(sizes.get(axis, 1) for axis in BATCH)
    if batch_size % rows:
        raise MeshError(f"batch_size {batch_size} is not divisible by the {rows} batch shards "
                        f"(data x fsdp) of mesh {format_mesh(sizes)}")


def batch_mesh(spec: Union[None, str, dict], batch_size: int) -> Mesh:
    """The mesh of a run over batches of `batch_size` rows (training): `make_mesh(spec)`, or for
    None a 1-D "data" mesh of as many devices as divide batch_size; MeshError unless the rows
    divide over its data x fsdp devices."""
    if spec is None:
        devices = jax.devices()
        n = max(d for d in range(1, len(devices) + 1) if batch_size % d == 0)
        mesh = make_mesh({DATA: n}, devices[:n])
    else:
        mesh = make_mesh(spec)
    check_batch_split(batch_size, dict(mesh.shape))
    return mesh


@contextlib.contextmanager
def use(mesh: Optional[Mesh]):
    """Sets `mesh` as the ambient mesh of jit and `constrain` (no-op for None)."""
    if mesh is None:
        yield None
        return
    with jax.set_mesh(mesh):
        yield mesh


# --------------------------------------------------------------------------- specs


def _axis_sizes(mesh) -> dict[str, int]:
    return dict(mesh.shape)


def _fits(mesh_axes, units: int, sizes: dict[str, int]):
    """mesh_axes (a name, a tuple of names or None) restricted to those present that divide `units`."""
    if mesh_axes is None:
        return None
    names = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
    kept, total = [], 1
    for name in names:
        if name in sizes and sizes[name] > 1 and units % (total * sizes[name]) == 0:
            kept.append(name)
            total *= sizes[name]
    if not kept:
        return None
    return kept[0] if len(kept) == 1 else tuple(kept)


def _units(config: BlueLMConfig) -> dict[str, int]:
    """How many indivisible units each logical dim has (a head is never split)."""
    return {"vocab": config.vocab_size, "heads": config.num_attention_heads,
            "kv_heads": config.num_key_value_heads, "mlp": config.intermediate_size,
            "embed": config.hidden_size, "norm": config.hidden_size}


def logical_to_mesh(logical: Sequence[Optional[str]], config: BlueLMConfig, mesh) -> P:
    """THE rule: the PartitionSpec on `mesh` of a weight with these logical axes.

    `logical` is a weight's axes as declared in params.py, e.g. the P("embed", "heads") that
    `nnx.get_partition_spec` reads from the module's metadata. Each logical dim goes to its
    mesh axis in RULES, kept only when the axis is in the mesh and divides the dim's units
    (a head is never split); otherwise that dim stays replicated, so any mesh works for any
    config.
    """
    sizes, units = _axis_sizes(mesh), _units(config)
    return P(*(None if name is None else _fits(RULES[name], units[name], sizes) for name in logical))


def param_spec(path: PathT, config: BlueLMConfig, mesh, ndim: Optional[int] = None) -> P:
    """The PartitionSpec of parameter `path` (e.g. ("model", "layers", 0, "self_attn", "q_proj", "kernel")).

    embed_tokens [vocab, hidden]: P(tensor, fsdp); lm_head [hidden, vocab]: P(fsdp, tensor);
    q/k/v_proj [hidden, heads*head_dim]: P(fsdp, tensor) (whole heads per device);
    o_proj: P(tensor, fsdp); gate/up_proj: P(fsdp, tensor); down_proj: P(tensor, fsdp);
    norms and the embedding LayerNorm: replicated (see `logical_to_mesh`).
    """
    try:
        logical = leaf_axes(path, ndim)  # ndim tells int8's from int4's scale (params.Quantization)
    except KeyError:
        raise KeyError(f"no sharding rule for parameter {path_name(path)}") from None
    return logical_to_mesh(logical, config, mesh)


def param_specs(config: BlueLMConfig, mesh, quantization: Optional[Quantization] = None) -> dict:
    """The parameter tree (KERNEL layout, quantized by `quantization`) with PartitionSpecs as leaves."""
    tree: dict = {}
    for leaf in leaves(config, KERNEL, quantization):
        set_path(tree, leaf.path, logical_to_mesh(leaf.axes, config, mesh))
    return tree


def param_shardings(config: BlueLMConfig, mesh: Mesh, quantization: Optional[Quantization] = None) -> dict:
    """The parameter tree with NamedShardings as leaves (for jit and Orbax restore)."""
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), param_specs(config, mesh, quantization),
                        is_leaf=lambda x: isinstance(x, P))


def transposed_sharding(sharding: jax.sharding.Sharding) -> jax.sharding.Sharding:
    """The sharding of the transpose of a 2-D array placed by `sharding` (its mesh axes swapped)."""
    if isinstance(sharding, NamedSharding):
        spec = (*sharding.spec, *(None,) * (2 - len(sharding.spec)))  # [rows, cols]
        return NamedSharding(sharding.mesh, P(*spec[::-1]))
    return sharding  # one device (or fully replicated): the transpose lives where the array does


def put(x, sharding: NamedSharding) -> jax.Array:
    """Places a host array (the same global value on every process) by `sharding`; each device
    receives only its slice, copied from the host one shard at a time."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def batch_sharding(mesh: Mesh, batch_size: int) -> NamedSharding:
    """[batch, ...] arrays: rows over the data and fsdp axes (`batch_spec`)."""
    return NamedSharding(mesh, batch_spec(mesh, batch_size))


def put_batch(batch, sharding: NamedSharding):
    """A pytree of host [batch, ...] arrays placed by `sharding`, each device receiving only its rows."""
    return jax.tree.map(lambda x: put(x, sharding), batch)


def shard_params(params: dict, config: BlueLMConfig, mesh: Mesh) -> dict:
    """Places a parameter tree (host or device arrays) on `mesh` by `param_spec`."""
    out: dict = {}
    for path, leaf in flatten(params):
        sharding = NamedSharding(mesh, param_spec(path, config, mesh, np.ndim(leaf)))
        if isinstance(leaf, jax.Array) and leaf.is_fully_addressable:
            set_path(out, path, jax.device_put(leaf, sharding))
        else:
            set_path(out, path, put(leaf, sharding))
    return out


def batch_spec(mesh, batch: int, *rest: Optional[str]) -> P:
    """[batch, ...] arrays (tokens, positions, start): rows on data (and fsdp) when they divide."""
    return P(_fits(BATCH, batch, _axis_sizes(mesh)), *rest)


# --------------------------------------------------------------------------- activations

# Logical layouts of the activations the model constrains.
ACTIVATIONS: dict[str, tuple[Optional[str], ...]] = {
    "hidden": ("batch", None, None),  # [batch, seq, hidden]
    "logits": ("batch", None, "vocab"),  # [batch, seq, vocab]
    "kv_cache": ("batch", "kv_heads", None, None),  # one layer's [batch, kv_heads, max_len, head_dim]
    "kv_scale": ("batch", "kv_heads", None),  # an int8 cache's scales of one layer: [batch, kv_heads, max_len]
}
_ACTIVATION_RULES = {"batch": BATCH, "vocab": TENSOR, "kv_heads": TENSOR, "heads": TENSOR}


def activation_spec(kind: str, shape: Sequence[int], mesh) -> P:
    """The PartitionSpec of activation `kind` (see ACTIVATIONS) of this shape on `mesh`."""
    sizes = _axis_sizes(mesh)
    return P(*(_fits(_ACTIVATION_RULES.get(name), n, sizes) if name else None
               for name, n in zip(ACTIVATIONS[kind], shape)))


def constrain(x: jax.Array, kind: str) -> jax.Array:
    """with_sharding_constraint by `activation_spec` under the ambient mesh; identity without one."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, activation_spec(kind, x.shape, mesh))


# --------------------------------------------------------------------------- host side


def to_host(x: jax.Array) -> np.ndarray:
    """The global value of `x` as numpy on every process (gathers shards held by other hosts)."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def describe(params: dict) -> Iterable[str]:
    """One line per parameter: path, global shape, PartitionSpec, per-device shard shape."""
    for path, leaf in flatten(params):
        sharding = getattr(leaf, "sharding", None)
        spec = getattr(sharding, "spec", None)
        shard = sharding.shard_shape(leaf.shape) if sharding is not None else leaf.shape
        yield f"{path_name(path):47s} {str(tuple(leaf.shape)):22s} {str(spec):34s} shard {tuple(shard)}"
