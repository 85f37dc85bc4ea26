"""bluelm-jax: BlueLM (vivo's 7B bilingual LLM) in JAX."""

from bluelm_jax.config import BlueLMConfig, ConfigError, RopeScaling, preset

__all__ = ["BlueLMConfig", "ConfigError", "RopeScaling", "preset", "load"]


def load(path, **kwargs):
    """Loads an Orbax checkpoint from the converter or a Hugging Face directory; see loading.load."""
    from bluelm_jax.loading import load as _load

    return _load(path, **kwargs)
