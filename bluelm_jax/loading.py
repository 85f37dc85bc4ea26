"""The one public entry for loading: `load(path)` of a converted Orbax dir or a Hugging Face dir."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from bluelm_jax import checkpoint, hub
from bluelm_jax import params as P
from bluelm_jax.config import BlueLMConfig
from bluelm_jax.layout import inference_layout
from bluelm_jax.sharding import transposed_sharding
from bluelm_jax.model import BlueLMForCausalLM, build, forward
from bluelm_jax.quantize import quantize_leaf
from bluelm_jax.params import flatten, get_path, set_path

TokenIds = Union[Sequence[Sequence[int]], np.ndarray, jax.Array]


def default_compute_dtype() -> jnp.dtype:
    """float32 on CPU, bfloat16 on GPU/TPU."""
    return jnp.dtype(jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16)


@dataclasses.dataclass
class BlueLM:
    """A loaded model: config, tokenizer, parameters, and the dtype its products run in.

    `params` is the state of the module tree as a plain dict (see params.py), its projections
    in the KERNEL or the WEIGHT layout (`layout`); `module` is the Flax NNX module holding
    those same arrays: `model.module.model.layers[3].self_attn.q_proj`."""

    config: BlueLMConfig
    tokenizer: Any  # bluelm_jax.tokenizer.BlueLMTokenizer
    params: dict
    compute_dtype: jnp.dtype
    path: str = ""
    mesh: Any = None  # the jax.sharding.Mesh the parameters are sharded over (load(..., mesh=)), or None

    @property
    def param_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.params["model"]["embed_tokens"]["embedding"].dtype)

    @property
    def layout(self) -> str:
        """How the projections are stored: params.KERNEL [in, out] or params.WEIGHT [out, in]."""
        return P.layout_of(self.params)

    @property
    def quantization(self) -> Optional[P.Quantization]:
        """How the projections are quantized (params.Quantization), or None."""
        return P.quantization_of(self.params)

    @property
    def module(self) -> BlueLMForCausalLM:
        """The BlueLMForCausalLM module tree over `params` (built on each access; no copy)."""
        return build(self.config, self.params, self.compute_dtype)

    def logits(self, token_ids: TokenIds, positions: Optional[Any] = None) -> jax.Array:
        """Float32 logits [batch, seq, vocab] of a batch of token id lists (right-padded) or an int array.

        Attention is causal; positions [batch, seq] default to 0 .. seq-1 on every row.
        """
        tokens = _as_batch(token_ids, self.config.pad_token_id)  # [batch, seq]
        if tokens.size and not 0 <= int(tokens.min()) <= int(tokens.max()) < self.config.vocab_size:
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size}), got "
                             f"{int(tokens.min())}..{int(tokens.max())}")
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        positions = jnp.asarray(positions, jnp.int32)
        if positions.shape != tokens.shape:
            raise ValueError(f"positions must have the shape of the token ids {tokens.shape}, got {positions.shape}")
        logits, _ = _forward_jit(self.params, tokens, positions, self.config,
                                 compute_dtype=jnp.dtype(self.compute_dtype))
        return logits

    def __repr__(self) -> str:
        n = sum(int(np.prod(shape)) for _, shape in P.flatten(P.param_shapes(self.config)))  # as if float
        layout = " (weight layout: projections [out, in])" if self.layout == P.WEIGHT else ""
        quantization = self.quantization
        if quantization is not None:
            layout += f", {quantization.kind} projections"
        return (f"BlueLM({self.path!r}, {n:,} parameters, params {self.param_dtype.name}{layout}, "
                f"compute {jnp.dtype(self.compute_dtype).name})")


def _as_batch(token_ids: TokenIds, pad_id: int) -> jax.Array:
    """[batch, seq] int32 from an array or from lists of ids (shorter lists padded on the right)."""
    if isinstance(token_ids, (np.ndarray, jax.Array)):
        tokens = jnp.asarray(token_ids, jnp.int32)
        if tokens.ndim != 2:
            raise ValueError(f"token ids must be [batch, seq], got shape {tokens.shape}")
        return tokens
    rows = [list(r) for r in token_ids]
    if not rows or not all(rows):
        raise ValueError("token ids must be a non-empty batch of non-empty lists")
    width = max(len(r) for r in rows)
    return jnp.asarray([r + [pad_id] * (width - len(r)) for r in rows], jnp.int32)


_forward_jit = jax.jit(forward, static_argnames=("config", "compute_dtype"))


def load(path: str | os.PathLike, dtype: Any = None, compute_dtype: Any = None,
         shardings: checkpoint.Shardings = None, mesh: Any = None, layout: Optional[str] = None,
         quantize: "P.Quantization | str | None" = None, dequantize: bool = False) -> BlueLM:
    """Loads a converted bluelm-jax directory, or a Hugging Face directory (converted in memory),
    or a Hugging Face Hub repo id such as "vivo-ai/BlueLM-7B-Chat" (`hub.resolve`).

    dtype: parameter dtype (default: as converted; for a Hugging Face dir, bfloat16 or float32
    as stored). compute_dtype: default float32 on CPU, bfloat16 on GPU/TPU. shardings: None
    (first device), one Sharding, or a tree of Shardings shaped like the parameters.
    mesh: a jax.sharding.Mesh (e.g. `sharding.make_mesh("data=2,tensor=4")`): the parameters are
    restored straight into the shards of `sharding.param_spec` (replaces `shardings`).
    layout: how projections are stored (params.py): "kernel" [in, out] for training, or
    "weight" [out, in]; default "weight" for bfloat16 weights under float32 compute on CPU
    (its bfloat16 products are about twice as fast there), else "kernel" (`layout.inference_layout`).
    quantize: "int8", "int4" or a params.Quantization: weight-only quantized projections
    (quantize.py), each quantized as it is read (from a Hugging Face dir, a block of output
    channels at a time), so no float copy of the model is ever held. A directory converted
    with `--quantize` loads quantized as stored. A GPTQ or AWQ 4-bit checkpoint (its
    config.json has a quantization_config) loads into the int4 format with its zero points
    (hf/quantized.py), or with `dequantize` into float projections (quantized by `quantize`
    if given).
    Host memory peaks at about the parameters' bytes plus a few read blocks: leaves are read
    one at a time into their shards (see `checkpoint.read_leaf`), transposed block by block
    into the WEIGHT layout.
    """
    path = hub.resolve(path)
    if not os.path.isdir(path):
        raise checkpoint.CheckpointError(f"{path}: not a directory")
    config = BlueLMConfig.from_json_file(os.path.join(path, checkpoint.CONFIG_FILE))
    tokenizer_file = os.path.join(path, checkpoint.TOKENIZER_FILE)
    if not os.path.isfile(tokenizer_file):
        raise checkpoint.CheckpointError(f"{tokenizer_file}: missing")
    from bluelm_jax.tokenizer import BlueLMTokenizer

    tokenizer = BlueLMTokenizer(tokenizer_file)
    quantization = P.as_quantization(quantize, config)
    compute = jnp.dtype(compute_dtype) if compute_dtype is not None else default_compute_dtype()
    converted = checkpoint.is_converted_dir(path)
    stored = checkpoint.stored_quantization(path) if converted else None
    if mesh is not None:
        from bluelm_jax import sharding

        # a float directory is read in float shardings and each projection quantized into its own
        shardings = sharding.param_shardings(config, mesh, stored if converted else quantization)
    layout = P.check_layout(layout) if layout is not None else inference_layout(
        _param_dtype(path, dtype, converted), compute)
    if converted:
        params = checkpoint.restore_params(path, config, dtype, shardings, layout, quantization)
    else:
        from bluelm_jax.hf.quantized import read_quantization

        packed = read_quantization(path)
        if packed is None:
            params = _load_hf(path, config, dtype, shardings, layout, quantization)
        else:
            params = _load_packed(path, packed, config, dtype, mesh, shardings, layout, quantization, dequantize)
    return BlueLM(config, tokenizer, params, compute, path, mesh)


def _param_dtype(path: str, dtype: Any, converted: bool) -> jnp.dtype:
    """The dtype the parameters will have: `dtype`, else as converted, else as the HF dir stores them."""
    if dtype is not None:
        return jnp.dtype(checkpoint.dtype_name(dtype))
    if converted:
        return jnp.dtype(checkpoint.read_metadata(path)["param_dtype"])
    from bluelm_jax.hf.reader import HFCheckpoint
    from bluelm_jax.hf.to_orbax import resolve_dtype

    return jnp.dtype(resolve_dtype(None, HFCheckpoint(path)))


def _load_packed(path: str, packed: Any, config: BlueLMConfig, dtype: Any, mesh: Any, shardings: checkpoint.Shardings,
                 layout: str, quantization: Optional[P.Quantization], dequantize: bool) -> dict:
    """A GPTQ/AWQ checkpoint (hf/quantized.py; `packed` its packed_int4.QuantizationConfig), leaf by leaf
    onto the devices: its int4 tree, or with `dequantize` float projections (then quantized by
    `quantization` as they are read, if given)."""
    from bluelm_jax.hf.quantized import int4_quantization, int4_tree_leaves, read_quantized_leaves
    from bluelm_jax.hf.reader import HFCheckpoint

    ckpt = HFCheckpoint(path)
    name = None if dtype is None else checkpoint.dtype_name(dtype)
    if dequantize:
        leaves, tree = read_quantized_leaves(ckpt, config, dequantize=True, dtype=name, layout=layout), None
    else:
        tree = int4_quantization(ckpt, packed)
        if quantization not in (None, tree):
            raise checkpoint.CheckpointError(f"{path}: a GPTQ/AWQ checkpoint loads as its own int4 "
                                             f"({tree.describe()}); load it with dequantize=True to quantize it "
                                             f"as {quantization.kind}")
        leaves = int4_tree_leaves(ckpt, config, tree, name, layout)
    if mesh is not None:
        from bluelm_jax import sharding

        shardings = sharding.param_shardings(config, mesh, tree)
    params: dict = {}
    for leaf_path, value in leaves:
        _place(params, leaf_path, value, shardings)
        if dequantize and quantization is not None:
            quantize_leaf(params, leaf_path, quantization)
    return params


def _load_hf(path: str, config: BlueLMConfig, dtype: Any, shardings: checkpoint.Shardings, layout: str,
             quantization: Optional[P.Quantization] = None) -> dict:
    """Reads a Hugging Face dir into host memory, its projections in `layout`, then places leaf
    by leaf, freeing each host copy (a WEIGHT-layout projection where its kernel would go, with
    the mesh axes swapped).

    On a CPU device the aligned host arrays become the device buffers (no copy).
    """
    from bluelm_jax.hf.to_orbax import load_hf_params

    host = load_hf_params(path, config, None if dtype is None else checkpoint.dtype_name(dtype), layout, quantization)
    params: dict = {}
    for leaf_path in [path for path, _ in flatten(host)]:  # paths only: each host leaf is freed once placed
        _place(params, leaf_path, get_path(host, leaf_path[:-1]).pop(leaf_path[-1]), shardings)
    return params


def _place(params: dict, leaf_path: tuple, value: np.ndarray, shardings: checkpoint.Shardings) -> None:
    """Puts the host array `value` at `leaf_path` of `params`, on the devices `shardings` (a KERNEL-layout
    tree, or one Sharding, or None) give the leaf: a WEIGHT-layout projection where its kernel would
    go, with the mesh axes swapped."""
    kernel_path = P.path_in(leaf_path, P.KERNEL)
    target = checkpoint.leaf_sharding(shardings, kernel_path)
    where = target if kernel_path == leaf_path else transposed_sharding(target)
    set_path(params, leaf_path, jax.device_put(value, where))
