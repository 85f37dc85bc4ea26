"""Helpers shared by the fine-tuning, LoRA and export tests."""

from __future__ import annotations

import functools
import json
import types

import jax
import jax.numpy as jnp
import numpy as np

from bluelm_jax.model import forward
from bluelm_jax.tokenizer import BlueLMTokenizer
from tests.hf_reference import params_from_hf, random_hf_weights  # noqa: F401 (re-exported)

QA = [("What is the capital of France?", "The capital of France is Paris."),
      ("你好，今天过得怎么样？", "我很好，谢谢。有什么可以帮你的吗？"),
      ("Tell me a short story about a cat and a dog.", "Once upon a time, a small cat lived in a quiet village."),
      ("北京现在几点了？", "一年有三百六十五天，一天有二十四小时。")]




def make_model(config, tokenizer_model: str, seed: int = 0):
    return types.SimpleNamespace(config=config, tokenizer=BlueLMTokenizer(tokenizer_model),
                                 params=params_from_hf(config, random_hf_weights(config, seed)), path="")


def write_jsonl(path, records) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
    return str(path)


def qa_records(n_repeat: int = 1) -> list[dict]:
    return [{"prompt": q, "response": a} for q, a in QA] * n_repeat


def greedy(params, config, prompt: list[int], steps: int, adapters=None, width: int = 64) -> list[int]:
    """Greedy tokens by full forward passes over a fixed width (no cache, one compilation):
    an independent check of generation."""
    ids = list(prompt)
    for _ in range(steps):
        tokens = np.full((1, width), config.pad_token_id, np.int32)
        tokens[0, :len(ids)] = ids
        logits = _forward_jit(params, jnp.asarray(tokens), config, adapters)
        ids.append(int(jnp.argmax(logits[0, len(ids) - 1])))
    return ids[len(prompt):]


@functools.partial(jax.jit, static_argnums=(2,))
def _forward_jit(params, tokens, config, adapters):
    return forward(params, tokens, jnp.arange(tokens.shape[1])[None], config, adapters=adapters)[0]


def tree_equal(a, b) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))
