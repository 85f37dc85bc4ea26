"""Quality of quantized weights against the float model: next-token top-1 agreement, mean KL
divergence, and greedy continuations, side by side for int8 and int4.

    python -m bench.quantized_quality [--positions 512] [--new-tokens 64]

Two models, float32 on CPU:
  * random: a random-weight checkpoint whose q/k weights are large (bench/reference.py QK_STD),
    so that attention is sharp, BlueLM's 7B widths cut to 4 layers of hidden 1024;
  * default: the small trained model shipped with the package, on its own corpus, greedy
    answers to seven of its questions (over 64 tokens together; each answer ends at its stop).
For each, the float model's and the quantized model's next-token distributions are compared
at every position of `--positions` tokens (top-1 agreement; KL(float || quantized), the mean
over positions), and `--new-tokens` greedy tokens from a prompt are compared token by token
(how many leading tokens are equal). tests/test_quantized_model.py runs the same functions on
small sizes and holds int8 to its targets.
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bluelm_jax import params as P  # noqa: E402
from bluelm_jax import quantize as Q  # noqa: E402
from bluelm_jax.config import BlueLMConfig  # noqa: E402
from bluelm_jax.generate import generate  # noqa: E402
from bluelm_jax.loading import BlueLM  # noqa: E402

RANDOM = BlueLMConfig(vocab_size=8000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=8)
KINDS = ("int8", "int4")
DEFAULT_PROMPTS = ["What is the capital of France?", "Who are you?", "中国的首都是哪里？", "熊猫吃什么？",
                   "What is BlueLM?", "Tell me a short joke.", "给我讲一个笑话。"]  # answers: over 64 tokens


def agreement(reference: jax.Array, logits: jax.Array) -> tuple[float, float]:
    """(top-1 agreement, mean KL(reference || logits)) over every position of [..., vocab] logits."""
    p_log = jax.nn.log_softmax(jnp.asarray(reference, jnp.float32), axis=-1)
    q_log = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
    kl = jnp.sum(jnp.exp(p_log) * (p_log - q_log), axis=-1)
    top1 = jnp.mean(jnp.argmax(reference, -1) == jnp.argmax(logits, -1))
    return float(top1), float(jnp.mean(kl))


def equal_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens two continuations share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def quantized(model: BlueLM, kind: str) -> BlueLM:
    """A copy of `model` (float) with its projections quantized as load(..., quantize=kind) would."""
    params = Q.quantize_params(jax.tree.map(lambda x: x, model.params), P.as_quantization(kind, model.config))
    return BlueLM(model.config, model.tokenizer, params, model.compute_dtype, model.path)


def compare(model: BlueLM, tokens: np.ndarray, prompts: list, new_tokens: int, chat: bool = False) -> dict:
    """{kind: (top-1, mean KL, equal greedy tokens, greedy tokens)} of each quantization against
    `model`: next-token agreement at every position of `tokens` [1, positions], and the greedy
    continuations of `prompts` (the leading tokens each quantized continuation shares with the
    float one, summed over the prompts)."""
    reference = model.logits(tokens)
    greedy = generate(model, prompts, max_new_tokens=new_tokens, chat=chat).ids
    rows = {}
    for kind in KINDS:
        q = quantized(model, kind)
        top1, kl = agreement(reference, q.logits(tokens))
        ids = generate(q, prompts, max_new_tokens=new_tokens, chat=chat).ids
        rows[kind] = (top1, kl, sum(equal_prefix(a, b) for a, b in zip(greedy, ids)), sum(map(len, greedy)))
    return rows


def random_model(config: BlueLMConfig = RANDOM, seed: int = 0) -> BlueLM:
    from bench.reference import params_from_hf, random_hf_weights

    return BlueLM(config, None, params_from_hf(config, random_hf_weights(config, seed)), jnp.float32)


def random_tokens(config: BlueLMConfig, positions: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, config.vocab_size, (1, positions)).astype(np.int32)


def default_tokens(model: BlueLM, positions: int) -> np.ndarray:
    """`positions` tokens of the default model's own corpus (its questions and answers, in turn)."""
    from bluelm_jax.default_model import corpus

    ids: list[int] = []
    for question, answer in corpus.qa_pairs():
        ids += model.tokenizer.encode(f"{question} {answer}")
        if len(ids) >= positions:
            break
    return np.asarray([ids[:positions]], np.int32)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--positions", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args(argv)
    import bluelm_jax
    from bluelm_jax import default_model

    model = random_model()
    tables = {"random (sharp attention)": compare(model, random_tokens(model.config, args.positions),
                                                  [random_tokens(model.config, 16, seed=2)[0].tolist()],
                                                  args.new_tokens)}
    default = bluelm_jax.load(default_model.path())
    tables["default model"] = compare(default, default_tokens(default, args.positions), DEFAULT_PROMPTS,
                                      args.new_tokens, chat=True)
    print(f"{'model':<26} {'weights':<8} {'top-1':>7} {'mean KL':>10} {'greedy equal':>13}")
    for name, rows in tables.items():
        for kind, (top1, kl, equal, total) in rows.items():
            print(f"{name:<26} {kind:<8} {top1:>7.4f} {kl:>10.2e} {equal:>6} / {total:<5}")


if __name__ == "__main__":
    main()
