"""Rotary position embedding: inverse frequencies (plain, ntkmixed, linear) and rotation.

BlueLM rotates halves (GPT-NeoX convention): `rope(x) = x * cos + rotate_half(x) * sin`
with `rotate_half([x1, x2]) = [-x2, x1]`, so Hugging Face q/k weights need no permutation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from bluelm_jax.config import BlueLMConfig


def inv_freq(config: BlueLMConfig) -> np.ndarray:
    """Inverse frequencies [head_dim // 2], float32 (computed in float64, rounded once).

    plain:    1 / theta^(2i/d)
    ntkmixed: 1 / theta^(2i/d) / exp(a * (i+1)^power),  a = ln(factor) / (d/2)^power
    linear:   plain / factor (the same as dividing positions by factor)
    """
    d = config.head_dim
    i = np.arange(d // 2, dtype=np.float64)
    freq = 1.0 / config.rope_theta ** (2.0 * i / d)
    scaling = config.rope_scaling
    if scaling is not None and scaling.kind == "ntkmixed":
        a = np.log(scaling.factor) / (d / 2) ** scaling.power
        freq = freq / np.exp(a * (i + 1) ** scaling.power)
    elif scaling is not None and scaling.kind == "linear":
        freq = freq / scaling.factor
    return freq.astype(np.float32)


def sin_cos(positions: jax.Array, config: BlueLMConfig) -> tuple[jax.Array, jax.Array]:
    """sin, cos of the rotation angles, float32, each [batch, seq, head_dim // 2].

    positions: [batch, seq] int32
    """
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq(config))  # [batch, seq, head_dim // 2]
    return jnp.sin(angles), jnp.cos(angles)


def apply_rope(x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
    """Rotates x [batch, seq, heads, head_dim] by angles given as sin/cos [batch, seq, head_dim // 2]."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)  # each [batch, seq, heads, head_dim // 2]
    sin, cos = sin[:, :, None, :], cos[:, :, None, :]
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)
