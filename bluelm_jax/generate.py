"""Text generation: `generate` for a batch of prompts, `stream` for text as it is produced.

The work is split over three modules, one job each:

    planning.py     prompts + GenerationSettings -> padded arrays of one compiled call
    decode.py       the device side: bucketed prefill, the compiled decode loop, one step
    detokenizer.py  ids -> text increments, stop strings

Stopping: a row stops at `</s>`, at any stop id (in chat mode also the `[|Human|]:` piece),
or when a stop string appears in its text (checked on the host between chunks of steps);
the finish reason is "stop". A row that reaches `max_new_tokens`, or the end of the
model's context (2,048 or 32,768 positions), finishes with "length". A prompt that does
not fit the context at all raises `ContextOverflowError`. Nothing is truncated silently.

Returned ids include the token that stopped a row (as Hugging Face `generate` does);
returned texts exclude the stop token or stop string.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Optional

import jax
import numpy as np

from bluelm_jax import decode, sharding
from bluelm_jax.decode import FINISH_REASONS
from bluelm_jax.detokenizer import Detokenizer, text_of
from bluelm_jax.planning import ContextOverflowError, GenerationSettings, Plan, as_prompt_list, make_plan, tokenizer_of

__all__ = ["generate", "stream", "GenerationSettings", "GenerationResult", "TextStream", "ContextOverflowError"]

STOP_STRING_CHUNK = 16  # decode steps between host checks for stop strings


@dataclasses.dataclass
class GenerationResult:
    """One entry per prompt. ids include the stop token; texts exclude stop tokens/strings."""

    texts: Optional[list[str]]  # None when the model has no tokenizer
    ids: list[list[int]]
    finish_reasons: list[str]  # "stop" or "length"
    prompt_ids: list[list[int]]


def _to_host(tree):
    """numpy values of device arrays (gathered from every process when sharded across hosts)."""
    return jax.tree.map(sharding.to_host, tree)


def _settings(settings: Optional[GenerationSettings], changes: dict) -> GenerationSettings:
    return (settings or GenerationSettings()).replace(**changes)


def prefill(model, plan: Plan) -> decode.DecodeState:
    """The compiled prefill of a plan: the cache filled and the first token sampled."""
    return decode.prefill(model.params, plan.tokens, plan.start, plan.request, plan.keys,
                          static=plan.static, cache_len=plan.cache_len, width=plan.width)


def generate(model, prompts, settings: Optional[GenerationSettings] = None, **changes) -> GenerationResult:
    """Generates a continuation of each prompt.

    model: an object with `.config`, `.params`, `.tokenizer` (may be None: then prompts must
      be ids and texts are None) and optionally `.compute_dtype` (e.g. from `bluelm_jax.load`).
    prompts: a string, a list of token ids, or a list of either (a batch); with `chat=True`,
      a string is one user turn, and a list of {"role", "content"} dicts a conversation.
    settings: a GenerationSettings; keyword arguments change its fields
      (`generate(model, p, max_new_tokens=64, temperature=0.8)`).
    Returns a GenerationResult (lists, one entry per prompt).
    """
    plan = make_plan(model, prompts, _settings(settings, changes))
    tok = tokenizer_of(model)
    batch = len(plan.prompt_ids)
    state = prefill(model, plan)
    if not plan.stop_strings or tok is None:
        state = decode.decode_loop(model.params, state, plan.request, np.int32(plan.width), static=plan.static)
        detoks = None
    else:  # stop strings: chunks of steps, the host reads the new tokens in between
        detoks = [Detokenizer(tok, plan.stop_ids, plan.stop_strings) for _ in range(batch)]
        while True:
            tokens, count = _to_host((state.tokens, state.count))
            newly = []
            for b, detok in enumerate(detoks):  # rows that ended in this chunk too: the string may come first
                if detok.stopped:
                    continue
                for token in tokens[b, len(detok.ids): count[b]]:
                    detok.push(int(token))
                    if detok.stopped:
                        newly.append(b)
                        break
            if newly:
                stopped = np.zeros(state.done.shape, bool)
                stopped[newly] = True
                state = decode.mark_stopped(state, stopped)
            if _to_host(state.done).all() or int(_to_host(state.step)) >= plan.width:
                break
            until = np.int32(min(int(_to_host(state.step)) + STOP_STRING_CHUNK, plan.width))
            state = decode.decode_loop(model.params, state, plan.request, until, static=plan.static)
    tokens, count, reason = _to_host((state.tokens, state.count, state.reason))

    ids, texts, reasons = [], [], []
    for b in range(batch):
        row = tokens[b, : count[b]].tolist()
        if detoks is not None and detoks[b].stopped:
            row, text, why = detoks[b].ids, detoks[b].text, "stop"
        else:
            text = text_of(tok, row, plan.stop_ids) if tok is not None else None
            why = FINISH_REASONS[int(reason[b])]
        ids.append(row)
        texts.append(text)
        reasons.append(why)
    return GenerationResult(texts=texts if tok is not None else None, ids=ids, finish_reasons=reasons,
                            prompt_ids=plan.prompt_ids)


class TextStream:
    """Iterates over text increments of one generation; afterwards `.text`, `.ids`,
    `.finish_reason` and `.prompt_ids` hold the result. Increments never split a UTF-8
    character, and text that may be the start of a stop string is held back until known."""

    def __init__(self, model, plan: Plan):
        if tokenizer_of(model) is None:
            raise ValueError("streaming text needs a model with a tokenizer")
        self._model, self._plan = model, plan
        self.prompt_ids = plan.prompt_ids[0]
        self._detok = Detokenizer(model.tokenizer, plan.stop_ids, plan.stop_strings)
        self.finish_reason: Optional[str] = None
        self._started = False

    @property
    def ids(self) -> list[int]:
        return self._detok.ids

    @property
    def text(self) -> str:
        return self._detok.text

    def __iter__(self) -> Iterator[str]:
        if self._started:
            raise RuntimeError("a TextStream can be iterated only once")
        self._started = True
        return self._run()

    def _run(self) -> Iterator[str]:
        model, plan, detok = self._model, self._plan, self._detok
        state = prefill(model, plan)
        out = _to_host((state.token, state.done, state.reason))  # before the state is donated
        while True:
            # dispatch the next step before reading this one: the device works while we decode text
            state, upcoming = decode.stream_step(model.params, state, plan.request, static=plan.static)
            token, done, reason = _to_host(out)
            piece = detok.push(int(token[0]), final=bool(done[0]))
            if detok.stopped:
                self.finish_reason = "stop"
            elif done[0]:
                self.finish_reason = FINISH_REASONS[int(reason[0])]
            if piece:
                yield piece
            if self.finish_reason is not None:
                return
            out = upcoming


def stream(model, prompt, settings: Optional[GenerationSettings] = None, **changes) -> TextStream:
    """Like `generate` for one prompt, but returns a TextStream yielding text as it is produced."""
    if len(as_prompt_list(prompt)) != 1:
        raise ValueError("stream takes one prompt")
    return TextStream(model, make_plan(model, prompt, _settings(settings, changes)))
