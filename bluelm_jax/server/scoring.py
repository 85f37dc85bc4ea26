"""Log-probabilities of a token sequence for /v1/completions `logprobs`, and each token's text.

`score` is the library's scoring.top_logprobs (one causal forward pass, float32 log-softmax
over the whole vocabulary, the top-k alternatives among the tokenizer's pieces).
`token_texts` gives each token's text as it reads in context, so that the texts of a
sequence join into its decoded text.
"""

from __future__ import annotations

from typing import Sequence

from bluelm_jax.scoring import TokenScores, top_logprobs

__all__ = ["TokenScores", "score", "token_text", "token_texts"]

CONTEXT_IDS = 4  # ids decoded in front of a token to get its leading space right


def score(model, ids: Sequence[int], k: int) -> TokenScores:
    """Log-probabilities of ids[1:] under the model, and the k most likely pieces at each position
    (the library's scoring.top_logprobs: the same compiled scorer as loglikelihood)."""
    return top_logprobs(model, ids, k)


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
