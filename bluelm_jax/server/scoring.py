"""Log-probabilities of a token sequence from the model's forward, for /v1/completions `logprobs`.

`score` runs `model.logits` (float32) once over the ids, right-padded to a prompt bucket so
that few lengths compile (attention is causal: padding after a token does not change it),
and takes the float32 log-softmax over the whole vocabulary: for each position after the
first, the log-probability of the token there and the top-k alternatives among the
tokenizer's pieces (the embedding may have more rows than the tokenizer has pieces; those
ids are never sampled and have no text). `token_texts` gives each token's text as it reads
in context, so that the texts of a sequence join into its decoded text.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bluelm_jax.planning import bucket_length

CONTEXT_IDS = 4  # ids decoded in front of a token to get its leading space right


@dataclasses.dataclass
class Scores:
    """token_logprobs[i]: log p(ids[i+1] | ids[:i+1]); top_ids/top_logprobs[i]: the k best ids there."""

    token_logprobs: np.ndarray  # [n - 1] float32
    top_ids: np.ndarray  # [n - 1, k] int32
    top_logprobs: np.ndarray  # [n - 1, k] float32


@jax.jit
def _log_softmax(logits: jax.Array) -> jax.Array:
    return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)


def score(model, ids: Sequence[int], k: int) -> Scores:
    """Log-probabilities of ids[1:] under the model, and the k most likely pieces at each position."""
    n = len(ids)
    width = bucket_length(n)
    tokens = np.full((1, width), model.config.pad_token_id, np.int32)  # [1, width]
    tokens[0, :n] = ids
    logprobs = _log_softmax(model.logits(tokens)[0, : n - 1])  # [n - 1, vocab]
    targets = jnp.asarray(np.asarray(ids[1:], np.int32))
    chosen = jnp.take_along_axis(logprobs, targets[:, None], axis=-1)[:, 0]  # [n - 1]
    pieces = min(model.config.vocab_size, model.tokenizer.vocab_size)
    top_lp, top_ids = jax.lax.top_k(logprobs[:, :pieces], max(k, 1))  # [n - 1, k]
    return Scores(np.asarray(chosen), np.asarray(top_ids)[:, :k], np.asarray(top_lp)[:, :k])


def _text_after(tokenizer, context: list[int], token: int) -> str:
    """The text `token` adds after `context` ("" for bos/eos/pad/unk, as in decoded text)."""
    before = tokenizer.decode(context)
    after = tokenizer.decode(context + [token])
    return after[len(before):] if after.startswith(before) else tokenizer.decode([token])


def token_text(tokenizer, ids: Sequence[int], i: int, token: int) -> str:
    """The text of `token` read at position i of ids (after the few ids before it)."""
    return _text_after(tokenizer, list(ids[max(0, i - CONTEXT_IDS): i]), int(token))


def token_texts(tokenizer, ids: Sequence[int]) -> list[str]:
    """The text of each id of a sequence, in context."""
    return [token_text(tokenizer, ids, i, t) for i, t in enumerate(ids)]
