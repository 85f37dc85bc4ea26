"""bluelm-jax: BlueLM (vivo's 7B bilingual LLM) in JAX.

    import bluelm_jax
    from bluelm_jax.generate import generate, stream

    model = bluelm_jax.load(path)                    # Orbax dir or Hugging Face dir
    result = generate(model, "你好", chat=True, max_new_tokens=64)
    for piece in stream(model, "Hello", max_new_tokens=64): ...

JAX is imported on first use of `load`, so `python -m bluelm_jax --help` stays fast.
"""

from bluelm_jax.config import BlueLMConfig, ConfigError, RopeScaling, preset

__all__ = ["BlueLMConfig", "ConfigError", "RopeScaling", "preset", "load"]


def load(path, **kwargs):
    """Loads an Orbax checkpoint from the converter or a Hugging Face directory; see loading.load."""
    from bluelm_jax.loading import load as _load

    return _load(path, **kwargs)
