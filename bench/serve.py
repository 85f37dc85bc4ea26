"""Serving throughput and latency: `python -m bluelm_jax serve` under 1, 4 and 16 concurrent clients.

    python bench/serve.py [--shape medium] [--requests 16] [--clients 4 16] [--max-batch 16] [--startup]

A random-weight checkpoint of the shape (default medium: hidden 1024, 16 layers, vocabulary
100096, float32 on CPU) and the test tokenizer are written to a temporary directory, and the
server runs in a subprocess. The same set of requests (token-id prompts of mixed lengths,
mixed max_tokens, greedy) is sent by 4 and 16 client threads with the `openai` client,
streamed, to a server with --max-batch 16; and one at a time to a server with --max-batch 1,
as the release's demo serves them (the baseline of the "x alone" column).
Per row: aggregate output tokens/s (all completion tokens / wall time of the round), time to
first token (request sent -> first chunk) and time per output token ((last chunk - first
chunk) / (tokens - 1)) at p50 and p99. A warm-up round (one request per prompt length) first
compiles every prompt bucket.
`--startup` instead times a cold start against a warm one: from launching the server to the
answer of a first request (which compiles the engine's programs), with an empty JAX
persistent compilation cache, then again with the cache that run filled.
Timings are never asserted in tests.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import subprocess
import sys
import tempfile
import time
import urllib.request

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

PROMPT_LENGTHS = (12, 40, 90, 200)
MAX_TOKENS = (24, 32, 40, 48)
START_TIMEOUT_S = 900
MAX_LEN = 512  # KV cache positions per slot: the longest prompt plus max_tokens fit


def write_checkpoint(directory: str, shape: str) -> str:
    """A random-weight float32 Hugging Face directory of the shape, with the bundled default
    model's tokenizer (bluelm_jax/default_model)."""
    from bench.decode import SHAPES
    from bench.reference import write_hf_checkpoint

    tokenizer = os.path.join(ROOT, "bluelm_jax", "default_model", "tokenizer.model")
    return write_hf_checkpoint(os.path.join(directory, "model"), SHAPES[shape], tokenizer, num_shards=1)


def start_server(model_dir: str, port: int, max_batch: int, log, cache_dir: str | None = None) -> subprocess.Popen:
    """The serve subprocess, once /health answers; cache_dir: the compilation cache's base (None: off)."""
    cache = ["--no-compile-cache"] if cache_dir is None else []
    env = dict(os.environ, **({"XDG_CACHE_HOME": cache_dir} if cache_dir else {}))
    proc = subprocess.Popen([sys.executable, "-m", "bluelm_jax", "serve", "--model", model_dir, "--port", str(port),
                             "--max-batch", str(max_batch), "--max-queue", "256", "--served-model-name", "bench",
                             "--max-len", str(MAX_LEN),
                             *cache], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}; see {log.name}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5):
                return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"the server did not start in {START_TIMEOUT_S} s")


def requests_of(n: int, vocab: int, seed: int = 0) -> list[dict]:
    """n completion requests: token-id prompts of mixed lengths, mixed max_tokens, greedy."""
    rng = np.random.default_rng(seed)
    return [{"prompt": rng.integers(4, vocab, PROMPT_LENGTHS[i % len(PROMPT_LENGTHS)]).tolist(),
             "max_tokens": MAX_TOKENS[(i // len(PROMPT_LENGTHS)) % len(MAX_TOKENS)]} for i in range(n)]


def timed_request(client, request: dict) -> tuple[float, float, int]:
    """(time to first token, time per output token, completion tokens) of one streamed request."""
    sent = time.perf_counter()
    first = last = None
    tokens = 0
    for chunk in client.completions.create(model="bench", temperature=0, stream=True,
                                           stream_options={"include_usage": True}, **request):
        now = time.perf_counter()
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        elif chunk.choices and chunk.choices[0].text:
            first = first if first is not None else now
            last = now
    first = first if first is not None else time.perf_counter()
    tpot = (last - first) / (tokens - 1) if last is not None and tokens > 1 else float("nan")
    return first - sent, tpot, tokens


def run_round(client, requests: list[dict], clients: int) -> dict:
    """Sends the requests from `clients` threads (each takes the next request when free)."""
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda r: timed_request(client, r), requests))
    wall = time.perf_counter() - start
    ttft, tpot, tokens = (np.array(x, np.float64) for x in zip(*results))
    tpot = tpot[np.isfinite(tpot)]
    return {"clients": clients, "tokens": int(tokens.sum()), "wall": wall, "tok_s": tokens.sum() / wall,
            "ttft50": np.percentile(ttft, 50), "ttft99": np.percentile(ttft, 99),
            "tpot50": np.percentile(tpot, 50) if tpot.size else float("nan"),
            "tpot99": np.percentile(tpot, 99) if tpot.size else float("nan")}


def startup_seconds(model_dir: str, port: int, max_batch: int, log, cache_dir: str) -> float:
    """Seconds from launching the server to the answer of its first request."""
    import openai

    t0 = time.perf_counter()
    proc = start_server(model_dir, port, max_batch, log, cache_dir)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=3600)
        client.completions.create(model="bench", prompt=requests_of(1, vocab=600)[0]["prompt"], max_tokens=8,
                                  temperature=0)
        return time.perf_counter() - t0
    finally:
        proc.terminate()
        proc.wait(30)


def served_rounds(model_dir: str, port: int, max_batch: int, client_counts: list[int], requests: list[dict],
                  log) -> list[dict]:
    """A server with `max_batch` slots: a warm-up round (every bucket compiled), then one round per client count."""
    import openai

    proc = start_server(model_dir, port, max_batch, log)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=3600)
        t0 = time.perf_counter()
        run_round(client, requests[:len(PROMPT_LENGTHS)], min(max_batch, len(PROMPT_LENGTHS)))
        print(f"max batch {max_batch}: warm-up {time.perf_counter() - t0:.1f} s", flush=True)
        return [dict(run_round(client, requests, clients), max_batch=max_batch) for clients in client_counts]
    finally:
        proc.terminate()
        proc.wait(30)


def print_row(label: str, r: dict, base: float) -> None:
    print(f"{label:<22} | {r['tokens']:>6} {r['wall']:>7.1f} {r['tok_s']:>7.2f} {r['tok_s'] / base:>9.2f}x | "
          f"{r['ttft50']:>7.2f}s {r['ttft99']:>6.2f}s | {r['tpot50'] * 1e3:>6.0f}ms {r['tpot99'] * 1e3:>6.0f}ms",
          flush=True)


def main(argv=None) -> None:
    from bench.decode import SHAPES

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=list(SHAPES), default="medium")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--clients", type=int, nargs="+", default=[4, 16], help="besides the one-at-a-time row")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--startup", action="store_true", help="time a cold start against a warm one")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_checkpoint(tmp, args.shape)
        with open(os.path.join(tmp, "server.log"), "w") as log:
            if args.startup:
                cache = os.path.join(tmp, "cache")
                cold = startup_seconds(model_dir, args.port, args.max_batch, log, cache)
                warm = startup_seconds(model_dir, args.port, args.max_batch, log, cache)
                print(f"shape {args.shape}: launch to first answer {cold:.1f} s cold (empty compilation cache), "
                      f"{warm:.1f} s warm")
                return
            requests = requests_of(args.requests, vocab=600)  # ids the test tokenizer can decode
            print(f"shape {args.shape} ({SHAPES[args.shape].num_parameters() / 1e6:.0f}M parameters), float32 on "
                  f"{os.cpu_count()} CPUs; {len(requests)} requests, prompts {'/'.join(map(str, PROMPT_LENGTHS))} "
                  f"tokens, max_tokens {'/'.join(map(str, MAX_TOKENS))}, greedy", flush=True)
            alone = served_rounds(model_dir, args.port, 1, [1], requests, log)[0]  # as the release's demo serves
            rows = served_rounds(model_dir, args.port, args.max_batch, args.clients, requests, log)
            print(f"{'':<22} | {'tokens':>6} {'wall s':>7} {'tok/s':>7} {'x alone':>10} | "
                  f"{'TTFT p50':>8} {'p99':>7} | {'TPOT p50':>8} {'p99':>7}")
            print_row("one at a time, batch 1", alone, alone["tok_s"])
            for r in rows:
                print_row(f"{r['clients']} clients, batch {r['max_batch']}", r, alone["tok_s"])


if __name__ == "__main__":
    main()
