"""An lm-evaluation-harness model backed by bluelm-jax, registered as "bluelm-jax" on import.

    python -m bluelm_jax eval --model DIR --tasks ...       (bluelm_jax/eval_cli.py)

    import lm_eval, bluelm_jax.lm_eval_model                # registers "bluelm-jax"
    lm_eval.simple_evaluate(model="bluelm-jax", model_args="pretrained=DIR,batch_size=8", tasks=[...])

The harness's own `lm_eval --model bluelm-jax` cannot find it: lm_eval 0.4.13 discovers models
only through its built-in table (lm_eval/models/__init__.py) and modules imported in the same
process, with no entry-point or plugin hook. Importing this module first imports lm_eval.models,
whose table the registry otherwise fills only while it is empty: registering "bluelm-jax" into an
empty registry would hide every built-in model ("hf", "local-completions", ...) from
simple_evaluate in this process.

model_args: pretrained (a model path or Hub id; default the bundled default model), batch_size
(rows per compiled batch; "auto" means the default 8), mesh (a spec such as "data=1,tensor=8"),
quantize ("int8" / "int4"), dtype ("float32" / "bfloat16"), max_length (tokens the model may
read, at most its context), kv_cache_dtype ("auto" / "int8": generate_until's KV cache, as
generate.generate takes it). The harness's own `device` and `max_batch_size` are accepted and
unused: the mesh says where the model runs.

loglikelihood and loglikelihood_rolling are scoring.loglikelihood and
scoring.rolling_loglikelihoods over all the requests of a call (packed and batched; tokenized by
scoring.encode_pair, `<s>` first; rows longer than max_length keep their last max_length tokens).
generate_until runs generate.generate on batches of requests with the same generation arguments:
greedy unless a request sets do_sample, at most `max_gen_toks` new tokens (default 256) after the
prompt's last max_length - max_gen_toks tokens, the text ending before the first of the `until`
strings.

This module and eval_cli.py are the ones that import lm_eval (the `eval` extra).
"""

from __future__ import annotations

import argparse
from typing import Optional

import lm_eval.models  # noqa: F401 - the harness's own models, registered before ours (module docstring)
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_GEN_TOKS = 256


def _batch_size(value) -> int:
    """A positive int from the harness's batch_size ("auto", "auto:N", an int or its text)."""
    if value is None or str(value).startswith("auto"):
        return DEFAULT_BATCH_SIZE
    try:
        size = int(value)
    except ValueError:
        size = 0
    if size < 1:
        raise ValueError(f"batch_size must be a positive integer or 'auto', got {value!r}")
    return size


@register_model("bluelm-jax")
class BlueLMJax(LM):
    """lm_eval's LM over a model loaded with bluelm_jax.load (or an already loaded `model`)."""

    def __init__(self, pretrained: Optional[str] = None, batch_size=DEFAULT_BATCH_SIZE, mesh: Optional[str] = None,
                 quantize: Optional[str] = None, dtype: Optional[str] = None, max_length=None, model=None,
                 kv_cache_dtype: Optional[str] = None, device=None, max_batch_size=None):
        super().__init__()
        from bluelm_jax.decode import kv_cache_dtype_name

        self.kv_cache_dtype = kv_cache_dtype_name(kv_cache_dtype)  # checked before a model loads
        if model is None:
            from bluelm_jax.cli import _load

            model, _ = _load(argparse.Namespace(model=pretrained, dtype=dtype, mesh=mesh, quantize=quantize))
        self.model = model
        self.batch_size = _batch_size(batch_size)
        context = model.config.context_length
        self.max_length = context if max_length is None else int(max_length)
        if not 2 <= self.max_length <= context:
            raise ValueError(f"max_length must be in [2, {context}] (the model's context), got {max_length!r}")

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        from bluelm_jax import scoring

        scores = scoring.loglikelihood(self.model, [req.args for req in requests], self.batch_size, self.max_length)
        results = [(s.logprob, s.is_greedy) for s in scores]
        for req, result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", req.args, result)
        return results

    def loglikelihood_rolling(self, requests) -> list[float]:
        from bluelm_jax import scoring

        scores = scoring.rolling_loglikelihoods(self.model, [req.args[0] for req in requests], window=self.max_length,
                                                batch_size=self.batch_size)
        for req, score in zip(requests, scores):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, score.logprob)
        return [score.logprob for score in scores]

    def generate_until(self, requests) -> list[str]:
        results: list[Optional[str]] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):  # requests with the same settings share batches
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        for members in groups.values():
            settings = self._settings(requests[members[0]].args[1])
            for at in range(0, len(members), self.batch_size):
                batch = members[at:at + self.batch_size]
                texts = self._generate([requests[i].args[0] for i in batch], settings)
                for i, text in zip(batch, texts):
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return results

    def _settings(self, gen_kwargs: dict) -> dict:
        """generate()'s keyword arguments for a request's gen_kwargs."""
        until = gen_kwargs.get("until") or []
        settings = {"stop": [until] if isinstance(until, str) else list(until),
                    "max_new_tokens": int(gen_kwargs.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS)), "temperature": 0.0,
                    "kv_cache_dtype": self.kv_cache_dtype}
        if gen_kwargs.get("do_sample"):
            settings.update(temperature=float(gen_kwargs.get("temperature", 1.0)),
                            top_p=float(gen_kwargs.get("top_p", 1.0)), top_k=int(gen_kwargs.get("top_k", 0)))
        if settings["max_new_tokens"] >= self.max_length:
            raise ValueError(f"max_gen_toks {settings['max_new_tokens']} leaves no prompt within max_length "
                             f"{self.max_length}")
        return settings

    def _generate(self, contexts: list[str], settings: dict) -> list[str]:
        """The continuations of the contexts, each prompt its last max_length - max_new_tokens tokens."""
        from bluelm_jax.generate import generate

        keep = self.max_length - settings["max_new_tokens"]
        prompts = [self.model.tokenizer.encode(context, add_bos=True)[-keep:] for context in contexts]
        return generate(self.model, prompts, **settings).texts  # each text ends before its stop string
