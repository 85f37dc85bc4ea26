"""Scoring (bluelm_jax/scoring.py) against the transformers reference: continuation
log-likelihoods and greediness, rolling windows, compilations per bucket, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import bluelm_jax
from bluelm_jax import scoring, sharding
from bluelm_jax.config import preset
from tests.hf_reference import random_hf_weights, reference_model


def _reference_logprobs(reference, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """transformers' log p(ids[i+1] | ids[:i+1]) and argmax == ids[i+1], float32."""
    with torch.no_grad():
        logits = reference(torch.tensor([ids])).logits[0, :-1].float()
    logprobs = torch.log_softmax(logits, -1)
    targets = torch.tensor(ids[1:])
    return (logprobs[torch.arange(len(ids) - 1), targets].numpy(), (logits.argmax(-1) == targets).numpy())


def _greedy_continuation(reference, context: list[int], n: int) -> list[int]:
    ids = list(context)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(reference(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(context):]


@pytest.mark.parametrize("name", ["tiny", "tiny-32k"])
def test_loglikelihoods_equal_the_reference(hf_checkpoint, name):
    """Mixed lengths in one call (three buckets, batches of 2), random and greedy continuations:
    sums within 1e-4 of transformers', is_greedy equal."""
    config = preset(name)
    model = bluelm_jax.load(hf_checkpoint(name))
    reference = reference_model(config, random_hf_weights(config, seed=0))
    rng = np.random.default_rng(3)
    requests = []
    for context_len, continuation_len in ((5, 3), (40, 7), (90, 1), (20, 12), (150, 30)):
        context = [config.bos_token_id] + rng.integers(4, config.vocab_size, context_len - 1).tolist()
        requests.append((context, rng.integers(4, config.vocab_size, continuation_len).tolist()))
        requests.append((context, _greedy_continuation(reference, context, continuation_len)))
    scores = scoring.loglikelihood(model, requests, batch_size=2)
    for (context, continuation), score in zip(requests, scores):
        chosen, greedy = _reference_logprobs(reference, context + continuation)
        n = len(continuation)
        assert score.tokens == n
        assert abs(score.logprob - float(chosen[-n:].sum())) < 1e-4, (len(context), n)
        assert score.is_greedy == bool(greedy[-n:].all())
    assert [s.is_greedy for s in scores[1::2]] == [True] * 5 and not any(s.is_greedy for s in scores[0::2])


def test_scoring_on_a_mesh_equals_one_device(hf_checkpoint):
    """Parameters sharded over data=2,tensor=4 and the packed rows run under the mesh: the same scores."""
    rng = np.random.default_rng(4)
    requests = [([1] + rng.integers(4, 600, n).tolist(), rng.integers(4, 600, m).tolist())
                for n, m in ((30, 4), (100, 1), (100, 9), (60, 20), (7, 2))]
    expected = scoring.loglikelihood(bluelm_jax.load(hf_checkpoint("tiny")), requests, batch_size=2)
    mesh = sharding.make_mesh("data=2,tensor=4")
    sharded = bluelm_jax.load(hf_checkpoint("tiny"), mesh=mesh)
    with sharding.use(mesh):
        found = scoring.loglikelihood(sharded, requests, batch_size=2)
    assert [s.is_greedy for s in found] == [s.is_greedy for s in expected]
    np.testing.assert_allclose([s.logprob for s in found], [s.logprob for s in expected], atol=1e-4)


def test_texts_are_split_at_the_context_and_scored_like_their_ids(hf_checkpoint):
    model = bluelm_jax.load(hf_checkpoint("tiny"))
    context_ids, continuation_ids = scoring.encode_pair(model, "The capital of France is", " Paris.")
    assert context_ids == model.tokenizer.encode("The capital of France is")
    assert context_ids + continuation_ids == model.tokenizer.encode("The capital of France is Paris.")
    by_text, by_ids = scoring.loglikelihood(model, [("The capital of France is", " Paris."),
                                                    (context_ids, continuation_ids)])
    assert by_text == by_ids


def test_rolling_windows_score_every_token_once_with_overlapping_context(hf_checkpoint):
    """A document that fits one window scores as its whole sequence does; a longer one is the sum
    over windows that overlap by window - stride tokens, each computed here by the reference."""
    config = preset("tiny")
    model = bluelm_jax.load(hf_checkpoint("tiny"))
    reference = reference_model(config, random_hf_weights(config, seed=0))
    ids = [config.bos_token_id] + np.random.default_rng(5).integers(4, config.vocab_size, 99).tolist()
    whole = scoring.loglikelihood_rolling(model, ids)
    assert whole.tokens == 99
    assert abs(whole.logprob - float(_reference_logprobs(reference, ids)[0].sum())) < 1e-4
    assert abs(whole.perplexity - np.exp(-whole.logprob / 99)) < 1e-9
    windows = scoring.rolling_windows(len(ids), 32, 12)
    assert windows[:2] == [(0, 32, 1), (12, 44, 32)] and windows[-1][1] == len(ids)
    expected = 0.0
    for start, end, first in windows:
        chosen, _ = _reference_logprobs(reference, ids[start:end])
        expected += float(chosen[first - start - 1:].sum())
    rolled = scoring.loglikelihood_rolling(model, ids, window=32, stride=12)
    assert rolled.tokens == 99 and abs(rolled.logprob - expected) < 1e-4
    assert abs(rolled.logprob - whole.logprob) > 1e-3  # less context per token: a different number


def test_documents_roll_together_and_long_rows_score_in_chunks(hf_checkpoint):
    """Two documents in one call: a 1,100-token one (a row of its own, its 1,099 scored positions
    through the head SCORED_CHUNK at a time) and a 60-token one, each equal to the reference's."""
    config = preset("tiny")
    model = bluelm_jax.load(hf_checkpoint("tiny"))
    reference = reference_model(config, random_hf_weights(config, seed=0))
    rng = np.random.default_rng(8)
    documents = [[config.bos_token_id] + rng.integers(4, config.vocab_size, n - 1).tolist() for n in (1100, 60)]
    scores = scoring.rolling_loglikelihoods(model, documents, batch_size=2)
    for ids, score in zip(documents, scores):
        assert score.tokens == len(ids) - 1
        assert abs(score.logprob - float(_reference_logprobs(reference, ids)[0].sum())) < 1e-3 * len(ids) / 100


def test_rows_whose_input_begins_another_share_it():
    """Each row needs ids[:-1] as input; [1, 5, 6, 8], [1, 5, 6, 7] and [1, 5, 9] are read from
    [1, 5, 6, 7, 2]'s input, [3, 4] runs alone. (The reference test above has one-token
    continuations after one context: they share an input there.)"""
    rows = [[1, 5, 6, 7], [1, 5, 6, 8], [1, 5, 9], [1, 5, 6, 7, 2], [3, 4]]
    inputs, readers = scoring.shared_inputs(rows)
    assert inputs == [[3], [1, 5, 6, 7]] and readers == [[4], [3, 1, 0, 2]]
    assert scoring.shared_inputs([[1, 5], [1, 5, 6]]) == ([[1, 5]], [[1, 0]])  # [1, 5] is read at [1, 5, 6]'s first position


def test_packing_puts_short_rows_together_best_fit_longest_first():
    runs = scoring.pack_rows([100, 200, 30, 1500, 60, 250, 90])
    assert runs == [(256, [5]), (256, [1, 2]), (256, [0, 6, 4]), (2048, [3])]  # 60 goes where 66 is free, not 56
    assert scoring.pack_rows([700, 20]) == [(704, [0]), (704, [1])]
    assert [scoring.scored_width(n) for n in (1, 8, 9, 300, 512, 513, 1100)] == [8, 8, 16, 512, 512, 1024, 1536]


def test_one_compilation_per_shape(hf_checkpoint):
    """Batches of the same shape (width, scored width, rows) reuse one program, whatever the lengths
    packed in them; a new width compiles once."""
    model = bluelm_jax.load(hf_checkpoint("tiny"))
    rng = np.random.default_rng(0)
    pairs = lambda *lengths: [(rng.integers(4, 600, n).tolist(), [5, 6, 7]) for n in lengths]  # noqa: E731
    scoring.loglikelihood(model, pairs(140, 90, 200, 37), batch_size=2)  # inputs [202, 39], [142, 92]: one batch
    before = scoring.TRACE_COUNTS["scoring"]
    scoring.loglikelihood(model, pairs(150, 160, 170, 180, 20, 60), batch_size=2)  # four packed rows: two batches
    assert scoring.TRACE_COUNTS["scoring"] == before
    scoring.loglikelihood(model, pairs(300, 310), batch_size=2)  # width 320
    assert scoring.TRACE_COUNTS["scoring"] == before + 1


def test_bad_requests_are_refused(hf_checkpoint):
    model = bluelm_jax.load(hf_checkpoint("tiny"))
    with pytest.raises(ValueError, match="the continuation has no tokens"):
        scoring.loglikelihood(model, [([1, 5], [])])
    with pytest.raises(ValueError, match="both be texts or both be token ids"):
        scoring.loglikelihood(model, [("text", [5])])
    with pytest.raises(ValueError, match="row 0 has 1 tokens"):
        scoring.token_logprobs(model, [[1]])
    with pytest.raises(ValueError, match="stride must be in"):
        scoring.loglikelihood_rolling(model, [1, 5, 6, 7], window=4, stride=4)
