"""LoRA: low-rank adapters on the projections, y = x W + (alpha / rank) * dropout(x) A B.

Adapters are a pytree {"a": {name: [layers, in, rank]}, "b": {name: [layers, rank, out]}}
for the target projections (q/k/v/o = q_proj/k_proj/v_proj/o_proj, gate/up/down =
gate_proj/up_proj/down_proj). A starts random (Kaiming-uniform like PEFT), B at zero, so a
fresh adapter leaves the model unchanged. Only the adapters are trained and saved:

    <dir>/adapter_config.json   {"format": "bluelm-jax-lora", rank, alpha, dropout, targets, base_model}
    <dir>/params/               Orbax tree {"a": ..., "b": ...}

`merge` folds them into the base weights (W + scale * A B) for export or fast decoding.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from bluelm_jax.atomic_dir import atomic_directory
from bluelm_jax.checkpoint import finishing_orbax_tasks
from bluelm_jax.config import BlueLMConfig
from bluelm_jax.model import Adapters
from bluelm_jax.params import LAYER_PROJECTIONS, LAYERS, get_path, set_path, shape_of

PROJECTIONS = tuple(LAYER_PROJECTIONS)  # q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj
TARGET_ALIASES = {name.removesuffix("_proj"): name for name in PROJECTIONS}
ADAPTER_CONFIG = "adapter_config.json"
FORMAT_NAME = "bluelm-jax-lora"


class LoraError(ValueError):
    """Bad LoRA settings or an unreadable adapter directory; the message is one line."""


def parse_targets(spec: str | tuple | list) -> tuple[str, ...]:
    """("q_proj", ...) from "q,k,v,o" / "all" / names; LoraError on an unknown one."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    items = [s.strip() for s in items if s.strip()]
    if items == ["all"]:
        return PROJECTIONS
    out = []
    for s in items:
        name = TARGET_ALIASES.get(s, s)
        if name not in PROJECTIONS:
            raise LoraError(f"unknown LoRA target {s!r} (choose from q,k,v,o,gate,up,down or all)")
        if name not in out:
            out.append(name)
    if not out:
        raise LoraError("no LoRA targets given")
    return tuple(n for n in PROJECTIONS if n in out)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")

    def __post_init__(self):
        object.__setattr__(self, "targets", parse_targets(self.targets))
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise LoraError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if not self.alpha > 0:
            raise LoraError(f"LoRA alpha must be positive, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise LoraError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def init(key: jax.Array, config: BlueLMConfig, lora: LoraConfig, dtype=jnp.float32) -> dict:
    """Fresh adapters: A ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT's Kaiming-uniform), B = 0."""
    layers = config.num_hidden_layers
    a, b = {}, {}
    for i, name in enumerate(lora.targets):
        d_in, d_out = shape_of(LAYER_PROJECTIONS[name], config)
        bound = 1.0 / math.sqrt(d_in)
        a[name] = jax.random.uniform(jax.random.fold_in(key, i), (layers, d_in, lora.rank), dtype, -bound, bound)
        b[name] = jnp.zeros((layers, lora.rank, d_out), dtype)
    return {"a": a, "b": b}


def as_adapters(tree: dict, lora: LoraConfig, dropout_key: Optional[jax.Array] = None) -> Adapters:
    """The model's Adapters for a tree {"a", "b"}; dropout only when a key is given (training)."""
    if dropout_key is None or lora.dropout == 0.0:
        return Adapters(tree["a"], tree["b"], jnp.float32(lora.scale))
    return Adapters(tree["a"], tree["b"], jnp.float32(lora.scale), lora.dropout, dropout_key)


def merge(params: dict, tree: dict, lora: LoraConfig) -> dict:
    """Base params with W <- W + scale * A B on each target (in float32, cast back to W's dtype).

    Returns a new tree; the arrays of untouched weights are shared with `params`."""
    merged = jax.tree.map(lambda x: x, params)  # new dicts, same arrays
    for name in tree["a"]:
        path = LAYER_PROJECTIONS[name].path
        for i in range(tree["a"][name].shape[0]):
            w = get_path(params, (*LAYERS, i, *path))
            delta = jnp.matmul(tree["a"][name][i].astype(jnp.float32), tree["b"][name][i].astype(jnp.float32),
                               precision=jax.lax.Precision.HIGHEST)
            set_path(merged, (*LAYERS, i, *path), (w.astype(jnp.float32) + lora.scale * delta).astype(w.dtype))
    return merged


def num_parameters(tree: dict) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


# ------------------------------------------------------------------ save / load


def save(directory: str | os.PathLike, tree: dict, lora: LoraConfig, base_model: str = "") -> None:
    """Writes adapter_config.json and params/ into a new directory `directory` (atomically)."""
    import orbax.checkpoint as ocp

    with atomic_directory(directory, force=True) as tmp:
        with finishing_orbax_tasks(), ocp.PyTreeCheckpointer() as ckptr:
            ckptr.save(os.path.join(tmp, "params"), jax.device_get(tree))
        meta = {"format": FORMAT_NAME, "rank": lora.rank, "alpha": lora.alpha, "dropout": lora.dropout,
                "targets": list(lora.targets), "base_model": base_model}
        with open(os.path.join(tmp, ADAPTER_CONFIG), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)
            f.write("\n")


def is_adapter_dir(directory: str | os.PathLike) -> bool:
    return os.path.isfile(os.path.join(directory, ADAPTER_CONFIG))


def load(directory: str | os.PathLike, config: BlueLMConfig) -> tuple[dict, LoraConfig, str]:
    """(adapter tree, LoraConfig, base model path) of an adapter directory; LoraError on bad input."""
    import orbax.checkpoint as ocp

    directory = os.path.abspath(os.fspath(directory))
    path = os.path.join(directory, ADAPTER_CONFIG)
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
        if meta.get("format") != FORMAT_NAME:
            raise LoraError(f"{path}: format is not {FORMAT_NAME!r}")
        lora = LoraConfig(int(meta["rank"]), float(meta["alpha"]), float(meta.get("dropout", 0.0)),
                          tuple(meta["targets"]))
    except FileNotFoundError:
        raise LoraError(f"{directory}: not a LoRA adapter directory (no {ADAPTER_CONFIG})") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        if isinstance(e, LoraError):
            raise
        raise LoraError(f"{path}: unreadable ({type(e).__name__}: {e})") from None
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])),
                          jax.eval_shape(lambda: init(jax.random.key(0), config, lora)))
    try:
        with finishing_orbax_tasks(), ocp.PyTreeCheckpointer() as ckptr:
            tree = ckptr.restore(os.path.join(directory, "params"),
                                 args=ocp.args.PyTreeRestore(item=target,
                                                             restore_args=ocp.checkpoint_utils.construct_restore_args(target)))
    except Exception as e:  # noqa: BLE001 - orbax raises many types for a damaged or mismatched directory
        raise LoraError(f"{directory}: adapters do not match the model ({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None
    return tree, lora, meta.get("base_model", "")
