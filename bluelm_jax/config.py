"""The one configuration dataclass, built from a BlueLM `config.json`.

Defaults are those of BlueLM-7B. In a config file, the fields that fix the parameter
shapes (REQUIRED_FIELDS) must be present; the others (eps, RoPE base, special token ids,
...) take their documented defaults when absent, and unknown keys are tolerated.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Optional

from bluelm_jax.jsonfile import read_json

SUPPORTED_ARCHITECTURES = ("BlueLMForCausalLM", "LlamaForCausalLM")
SUPPORTED_MODEL_TYPES = ("BlueLM", "bluelm", "llama")
ROPE_TYPES = ("ntkmixed", "linear")
# Fields that fix the parameter shapes: a config.json without one of them is refused, since a
# silent 7B default would only show up later as "missing or mis-shaped tensors".
REQUIRED_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")


class ConfigError(ValueError):
    """A config.json that cannot describe a BlueLM model."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """`rope_scaling` of config.json. `kind` is "ntkmixed" or "linear"."""

    kind: str
    factor: float
    power: float = 0.3  # ntkmixed only

    def __post_init__(self):
        if self.kind not in ROPE_TYPES:
            raise ConfigError(
                f"unsupported rope_scaling type {self.kind!r} (supported: null, {', '.join(ROPE_TYPES)})"
            )
        if not self.factor > 0:
            raise ConfigError(f"rope_scaling factor must be positive, got {self.factor!r}")


@dataclasses.dataclass(frozen=True)
class BlueLMConfig:
    vocab_size: int = 100096
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Optional[RopeScaling] = None
    use_stable_embedding: bool = True
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 3

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim {self.head_dim} must be even for the rotary embedding")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def context_length(self) -> int:
        """Longest sequence the model is meant for: 2,048, or factor x that with scaling."""
        if self.rope_scaling is None:
            return self.max_position_embeddings
        return int(self.max_position_embeddings * self.rope_scaling.factor)

    def num_parameters(self) -> int:
        h, i, v, L = self.hidden_size, self.intermediate_size, self.vocab_size, self.num_hidden_layers
        kv = self.num_key_value_heads * self.head_dim
        per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
        return 2 * v * h + L * per_layer + h + (2 * h if self.use_stable_embedding else 0)

    # ----------------------------------------------------------------- config.json

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any], where: str = "config.json") -> "BlueLMConfig":
        """Builds a config from the dict of a Hugging Face config.json; raises ConfigError."""
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: expected a JSON object, got {type(raw).__name__}")
        archs = raw.get("architectures") or ["BlueLMForCausalLM"]
        if not any(a in SUPPORTED_ARCHITECTURES for a in archs):
            raise ConfigError(f"{where}: unknown architecture {archs} (expected BlueLMForCausalLM)")
        model_type = raw.get("model_type", "BlueLM")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(f"{where}: unknown model_type {model_type!r} (expected 'BlueLM')")
        if raw.get("tie_word_embeddings", False):
            raise ConfigError(f"{where}: tie_word_embeddings true is not a BlueLM layout")
        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"{where}: hidden_act {act!r} is not supported (BlueLM uses 'silu')")

        missing = [name for name in REQUIRED_FIELDS if raw.get(name) is None]
        if missing:
            raise ConfigError(f"{where}: required field(s) missing: {', '.join(missing)}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for name, field in fields.items():
            if name == "rope_scaling" or name not in raw or raw[name] is None:
                continue
            value = raw[name]
            try:
                kwargs[name] = type(field.default)(value)
                if isinstance(field.default, int) and not isinstance(field.default, bool):
                    if isinstance(value, bool) or float(value) != kwargs[name]:
                        raise ValueError
            except (TypeError, ValueError):
                raise ConfigError(f"{where}: {name} must be a {type(field.default).__name__}, got {value!r}") from None
        if "num_key_value_heads" not in kwargs and "num_attention_heads" in kwargs:
            kwargs["num_key_value_heads"] = kwargs["num_attention_heads"]
        kwargs["rope_scaling"] = _rope_scaling_from_dict(raw.get("rope_scaling"), where)
        try:
            return cls(**kwargs)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "BlueLMConfig":
        path = os.fspath(path)
        return cls.from_hf_dict(read_json(path, ConfigError), where=path)

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json of the Hugging Face release for this config."""
        out: dict[str, Any] = {
            "architectures": ["BlueLMForCausalLM"],
            "model_type": "BlueLM",
            "hidden_act": "silu",
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
        }
        for f in dataclasses.fields(self):
            out[f.name] = getattr(self, f.name)
        s = self.rope_scaling
        out["rope_scaling"] = None if s is None else (
            {"type": s.kind, "factor": s.factor, "power": s.power} if s.kind == "ntkmixed"
            else {"type": s.kind, "factor": s.factor})
        return out

    def to_hf_json(self, torch_dtype: str, base: Optional[dict] = None) -> bytes:
        """The bytes of a config.json for weights stored in `torch_dtype`: the keys of `base` (a
        release's config.json, whose extra keys survive) updated by `to_hf_dict()`."""
        raw = {**(base or {}), **self.to_hf_dict(), "torch_dtype": torch_dtype}
        return (json.dumps(raw, indent=2, ensure_ascii=False) + "\n").encode("utf-8")

    def replace(self, **changes) -> "BlueLMConfig":
        return dataclasses.replace(self, **changes)


def _rope_scaling_from_dict(raw: Any, where: str) -> Optional[RopeScaling]:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: rope_scaling must be null or an object, got {raw!r}")
    kind = raw.get("type", raw.get("rope_type"))
    if kind in (None, "default"):
        return None
    if kind not in ROPE_TYPES:
        raise ConfigError(f"{where}: unsupported rope_scaling type {kind!r} (supported: null, {', '.join(ROPE_TYPES)})")
    try:
        factor = float(raw["factor"])
        power = float(raw.get("power", 0.3))
    except (KeyError, TypeError, ValueError):
        raise ConfigError(f"{where}: rope_scaling {raw!r} needs a numeric 'factor'") from None
    if not math.isfinite(factor) or factor <= 0:
        raise ConfigError(f"{where}: rope_scaling factor must be positive, got {factor!r}")
    return RopeScaling(kind=kind, factor=factor, power=power)


NTKMIXED_32K = RopeScaling(kind="ntkmixed", factor=16.0, power=0.3)

# The four releases, and tiny shapes for tests (head_dim 128 like the real model for the
# RoPE-sensitive ones; see DESIGN.md).
PRESETS: dict[str, BlueLMConfig] = {
    "bluelm-7b-base": BlueLMConfig(),
    "bluelm-7b-chat": BlueLMConfig(),
    "bluelm-7b-base-32k": BlueLMConfig(rope_scaling=NTKMIXED_32K),
    "bluelm-7b-chat-32k": BlueLMConfig(rope_scaling=NTKMIXED_32K),
    "tiny": BlueLMConfig(vocab_size=640, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2),
    "tiny-gqa": BlueLMConfig(vocab_size=640, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2),
    "tiny-32k": BlueLMConfig(vocab_size=640, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=2, rope_scaling=NTKMIXED_32K),
}


def preset(name: str) -> BlueLMConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})") from None
