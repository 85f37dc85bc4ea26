"""Command line: `python -m bluelm_jax generate ...` and `python -m bluelm_jax chat ...`.

generate: one prompt in, the continuation streamed to stdout (or, with --json, one JSON
object with the text, the ids and the finish reason).
chat: an interactive conversation read from stdin, with history, streamed answers, and
the commands `clear` (forget the history) and `quit` (or `exit`, or end of input).
serve: an OpenAI-compatible HTTP server (bluelm_jax/server/).
perplexity: a text file's tokens, negative log-likelihood per token and perplexity
(scoring.loglikelihood_rolling).

Bad input gives one line on stderr and a non-zero exit status. jax is imported only once
the arguments are valid, so mistakes are reported at once.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
from typing import Optional, Sequence

from bluelm_jax.command_line import EXIT_USAGE, run_reporting_errors

USER_PROMPT = "User: "
BOT_PROMPT = "BlueLM: "
BANNER = "BlueLM chat. Type 'clear' to forget the conversation, 'quit' to exit."
CLEARED = "(conversation cleared)"


PROG = "python -m bluelm_jax"  # the installed script calls itself bluelm-jax (`command`)

# command -> (module with a main(argv, prog) -> int, help line)
OTHER_COMMANDS = {
    "finetune": ("bluelm_jax.finetune_cli", "fine-tune a model (full or LoRA) on JSON/JSON-lines data"),
    "eval": ("bluelm_jax.eval_cli", "run lm-evaluation-harness tasks and print its table (the eval extra)"),
}


class UsageError(Exception):
    """Bad command-line input."""


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage dump) and a non-zero exit."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


# ------------------------------------------------------------------ argument types


def _int_at_least(minimum: int, what: str):
    """An argparse type: an integer >= minimum, else the message 'expected <what>, got ...'."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


_positive_int = _int_at_least(1, "a positive integer")
_non_negative_int = _int_at_least(0, "a non-negative integer")


def _float_in(low: float, high: float, low_open: bool, name: str):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        too_low = value <= low if low_open else value < low
        if not math.isfinite(value) or too_low or value > high:
            raise argparse.ArgumentTypeError(f"{name} {text!r} is outside {'(' if low_open else '['}{low}, {high}]")
        return value

    return parse


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer seed, got {text!r}") from None
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"seed must be in [0, 2**32), got {text!r}")
    return value


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, metavar="PATH",
                   help="a converted bluelm-jax (Orbax) directory, a Hugging Face BlueLM directory, or a Hub "
                        "repo id such as vivo-ai/BlueLM-7B-Chat (default: the small demonstration model "
                        "bundled with the package)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="parameter and compute dtype (default: float32 on CPU, bfloat16 compute on GPU/TPU)")
    p.add_argument("--mesh", default=None, metavar="SPEC",
                   help="shard the model over a device mesh, e.g. 'data=1,tensor=8' (default: one device)")
    p.add_argument("--quantize", default=None, choices=("int8", "int4"),
                   help="quantize the projections as they load (weight-only: int8 per output channel, int4 in "
                        "groups of 128, fewer where 128 does not divide the model's sizes); a checkpoint "
                        "converted with --quantize loads quantized without it")
    p.add_argument("--kv-cache-dtype", choices=("auto", "int8"), default="auto",
                   help="the KV cache's storage: auto = the compute dtype; int8 = int8 with a scale per token "
                        "and head, half the memory of bfloat16 (default auto)")


def _add_sampling_args(p: argparse.ArgumentParser, *, max_new: int, temperature: float, top_p: float,
                       penalty: float) -> None:
    p.add_argument("--max-new-tokens", type=_positive_int, default=max_new, metavar="N",
                   help=f"most tokens to generate (default {max_new})")
    p.add_argument("--temperature", type=_float_in(0.0, 100.0, False, "temperature"), default=temperature,
                   metavar="T", help=f"0 for greedy decoding (default {temperature})")
    p.add_argument("--top-p", type=_float_in(0.0, 1.0, True, "top-p"), default=top_p, metavar="P",
                   help=f"nucleus sampling mass, 1 = off (default {top_p})")
    p.add_argument("--top-k", type=_non_negative_int, default=0, metavar="K", help="0 = off (default 0)")
    p.add_argument("--repetition-penalty", type=_float_in(0.0, 100.0, True, "repetition penalty"),
                   default=penalty, metavar="R", help=f"Hugging Face semantics, 1 = off (default {penalty})")
    p.add_argument("--seed", type=_seed, default=None, metavar="S", help="sampling seed (default: random)")


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    parser = _Parser(prog=prog, description="BlueLM in JAX: generate text, chat, serve, fine-tune.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    g = commands.add_parser("generate", help="continue a prompt (or answer it with --chat)",
                            description="Generate a continuation of a prompt; the text streams to stdout.")
    _add_model_args(g)
    g.add_argument("--prompt", required=True, metavar="TEXT",
                   help="the prompt ('-' reads it from stdin, without the final newline)")
    g.add_argument("--chat", action="store_true",
                   help="wrap the prompt in the chat template ([|Human|]:...[|AI|]:) and stop at [|Human|]:")
    g.add_argument("--system", metavar="TEXT", help="a system message (with --chat)")
    g.add_argument("--stop", action="append", default=[], metavar="STR", help="a stop string (repeatable)")
    g.add_argument("--json", action="store_true",
                   help="print one JSON object: text, ids, finish_reason, prompt_ids")
    _add_sampling_args(g, max_new=256, temperature=0.0, top_p=1.0, penalty=1.0)
    from bluelm_jax import distributed  # no jax import

    distributed.add_arguments(g)
    g.set_defaults(run=run_generate)

    c = commands.add_parser("chat", help="interactive chat with history, streamed answers",
                            description="Interactive chat. Type 'clear' to forget the conversation and "
                                        "'quit' (or end of input) to leave.")
    _add_model_args(c)
    c.add_argument("--system", metavar="TEXT", help="a system message put before the conversation")
    _add_sampling_args(c, max_new=512, temperature=0.8, top_p=0.8, penalty=1.1)
    c.set_defaults(run=run_chat)

    p = commands.add_parser("perplexity", help="the log-likelihood and perplexity of a text file",
                            description="Score a UTF-8 text file (with <s> in front) in overlapping windows; "
                                        "print its tokens, negative log-likelihood per token and perplexity.")
    _add_model_args(p)
    p.add_argument("--file", required=True, metavar="PATH", help="the text to score")
    p.add_argument("--window", type=_positive_int, default=None, metavar="N",
                   help="tokens per window (default: the model's context)")
    p.add_argument("--stride", type=_positive_int, default=None, metavar="N",
                   help="tokens between window starts (default: half a window)")
    p.add_argument("--batch-size", type=_positive_int, default=8, metavar="N", help="windows per batch (default 8)")
    p.add_argument("--json", action="store_true", help="print one JSON object: tokens, nll_per_token, perplexity")
    p.set_defaults(run=run_perplexity)

    from bluelm_jax.server import serve  # no jax import

    s = commands.add_parser("serve", help="an OpenAI-compatible HTTP server (/v1/chat/completions, ...)",
                            description="Serve the model over HTTP with the OpenAI API, many requests at once.")
    _add_model_args(s)
    serve.add_arguments(s, _positive_int)
    s.set_defaults(run=lambda args: serve.run(args, _load))
    for name, (_, help_text) in OTHER_COMMANDS.items():  # listed in --help; dispatched by main()
        commands.add_parser(name, help=help_text, add_help=False)
    return parser


# ------------------------------------------------------------------ commands


def _load(args):
    """(model, mesh or None)."""
    import bluelm_jax
    from bluelm_jax import sharding

    kwargs = {}
    if args.dtype is not None:
        kwargs = {"dtype": args.dtype, "compute_dtype": args.dtype}
    mesh = sharding.make_mesh(args.mesh) if args.mesh else None
    if mesh is not None:
        kwargs["mesh"] = mesh
    if args.quantize is not None:
        kwargs["quantize"] = args.quantize
    if args.model is None:
        from bluelm_jax import default_model

        args.model = default_model.path()
    return bluelm_jax.load(args.model, **kwargs), mesh


def _sampling_kwargs(args) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                top_k=args.top_k, repetition_penalty=args.repetition_penalty, seed=args.seed,
                kv_cache_dtype=args.kv_cache_dtype)


def run_generate(args) -> None:
    from bluelm_jax import distributed

    distributed.initialize_from_args(args)  # before anything starts the JAX backend
    from bluelm_jax import generate as gen
    from bluelm_jax import sharding

    prompt = sys.stdin.read().rstrip("\n") if args.prompt == "-" else args.prompt
    if not prompt:
        raise UsageError("the prompt is empty")
    if args.system is not None and not args.chat:
        raise UsageError("--system needs --chat")
    model, mesh = _load(args)
    show = distributed.is_main()  # several processes run the same program; process 0 prints
    with sharding.use(mesh):
        _generate(gen, model, prompt, args, show)


def _generate(gen, model, prompt, args, show: bool) -> None:
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system is not None else [])
        prompt = messages + [{"role": "user", "content": prompt}]
    kwargs = dict(_sampling_kwargs(args), stop=args.stop or None, chat=args.chat)
    if args.json:
        r = gen.generate(model, [prompt], **kwargs)
        out = {"text": r.texts[0], "ids": r.ids[0], "finish_reason": r.finish_reasons[0],
               "prompt_ids": r.prompt_ids[0]}
        if show:
            print(json.dumps(out, ensure_ascii=False))
        return
    s = gen.stream(model, prompt, **kwargs)
    for piece in s:
        if show:
            sys.stdout.write(piece)
            sys.stdout.flush()
    if show:
        sys.stdout.write("\n")
        used, context = len(s.prompt_ids) + len(s.ids), model.config.context_length
        if s.finish_reason == "length" and used >= context:
            print(f"(stopped: the context of {context} tokens is full: {len(s.prompt_ids)} prompt + "
                  f"{len(s.ids)} generated)", file=sys.stderr)


def _fit_history(model, system: Optional[str], history: list, user: str, max_new_tokens: int) -> tuple[list, list]:
    """(messages, history) with the oldest exchanges dropped until the prompt plus
    max_new_tokens fits the context (or only the new turn is left)."""
    while True:
        messages = ([{"role": "system", "content": system}] if system else []) + history + [
            {"role": "user", "content": user}]
        n = len(model.tokenizer.encode_chat(messages))
        if n + max_new_tokens <= model.config.context_length or not history:
            return messages, history
        history = history[2:]


def run_chat(args) -> None:
    from bluelm_jax import sharding

    model, mesh = _load(args)
    with sharding.use(mesh):
        _chat(model, args)


def _chat(model, args) -> None:
    from bluelm_jax import generate as gen

    print(BANNER, flush=True)
    history: list[dict] = []
    turn = 0
    while True:
        try:
            line = input(USER_PROMPT)
        except EOFError:
            print()
            return
        user = line.strip()
        if not user:
            continue
        if user.lower() in ("quit", "exit"):
            return
        if user.lower() == "clear":
            history = []
            print(CLEARED, flush=True)
            continue
        messages, history = _fit_history(model, args.system, history, user, args.max_new_tokens)
        kwargs = _sampling_kwargs(args)
        if kwargs["seed"] is not None:
            kwargs["seed"] = (kwargs["seed"] + turn) % 2**32
        try:
            s = gen.stream(model, messages, chat=True, **kwargs)
        except gen.ContextOverflowError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            continue
        sys.stdout.write(BOT_PROMPT)
        for piece in s:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
        history = history + [{"role": "user", "content": user}, {"role": "assistant", "content": s.text}]
        turn += 1


def run_perplexity(args) -> None:
    with open(args.file, encoding="utf-8") as f:
        text = f.read()
    if not text.strip():
        raise UsageError(f"{args.file}: empty")
    from bluelm_jax import scoring, sharding

    model, mesh = _load(args)
    with sharding.use(mesh):
        score = scoring.loglikelihood_rolling(model, text, args.window, args.stride, args.batch_size,
                                              progress=not args.json)
    if args.json:
        print(json.dumps({"tokens": score.tokens, "nll_per_token": score.nll_per_token,
                          "perplexity": score.perplexity}))
    else:
        print(f"tokens {score.tokens}, negative log-likelihood per token {score.nll_per_token:.4f}, "
              f"perplexity {score.perplexity:.3f}")


def main(argv: Optional[Sequence[str]] = None, prog: str = PROG) -> int:
    from bluelm_jax import interrupts

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in OTHER_COMMANDS:  # commands that live in their own modules
        module = importlib.import_module(OTHER_COMMANDS[argv[0]][0])
        return module.main(argv[1:], prog=f"{prog} {argv[0]}")
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    prog = f"{parser.prog} {args.command}"
    interrupts.set_prefix(prog)
    # bad input (ValueError: config, checkpoint, mesh, prompt...; OSError: files) is one line;
    # anything else is reported as an internal error
    return run_reporting_errors(lambda: args.run(args), (ValueError, OSError), prog=prog, usage=(UsageError,))


def command(prog: str = "bluelm-jax") -> int:
    """The `bluelm-jax` script (and `python -m bluelm_jax`): Ctrl-C and SIGTERM taken over
    before jax is imported (interrupts.py), then `main` on sys.argv."""
    from bluelm_jax import interrupts

    interrupts.install(prog)
    return main(prog=prog)
