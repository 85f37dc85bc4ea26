"""The default model: a small BlueLM-architecture model shipped in Hugging Face layout.

A few million parameters, a bilingual Chinese/English SentencePiece tokenizer with the
BlueLM special pieces, trained by bluelm_jax.train on corpus.py until it reproduces every
trained answer under greedy decoding. Rebuild with `python -m bluelm_jax.default_model.build`.
tokenizer_config.json (written by hand, not by the build) lets transformers' AutoTokenizer load
tokenizer.model as the slow SentencePiece tokenizer that bluelm_jax.tokenizer reproduces, e.g. for
lm-evaluation-harness's `local-completions` model against `python -m bluelm_jax serve`.
"""

from __future__ import annotations

import os

PATH = os.path.dirname(os.path.abspath(__file__))
FILES = ("config.json", "model.safetensors", "tokenizer.model")


def path() -> str:
    """The directory holding config.json, model.safetensors and tokenizer.model."""
    missing = [f for f in FILES if not os.path.isfile(os.path.join(PATH, f))]
    if missing:
        raise FileNotFoundError(f"{PATH}: the default model is missing {', '.join(missing)} "
                                f"(rebuild it with: python -m bluelm_jax.default_model.build)")
    return PATH
