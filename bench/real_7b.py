"""Benchmark: BlueLM-7B's exact shape (random bf16 weights) on CPU, bluelm-jax against transformers.

    python bench/real_7b.py [--workdir /work/big/bluelm-7b] [--hf-dir DIR] [--orbax-dir DIR]
                            [--new-tokens 16] [--long-prompt 1000] [--sides jax,transformers] [--keep]

Writes the random checkpoint (`bench/convert_7b.py`) and converts it, unless --hf-dir and
--orbax-dir name existing ones. Then each side runs in its own subprocess (so that their
peaks do not add): it loads the model and generates --new-tokens greedily from a short
prompt and from a --long-prompt-token prompt, and reports
  * load seconds and peak RSS (VmHWM of the process, loading included);
  * time to the first token: the first call (compilation included, for transformers its
    first call) and a second call of the same prompt;
  * decode seconds per token: (time of N new tokens - time of 1) / (N - 1), both warm;
  * the logits of the short prompt's last position, compared across the sides (cosine,
    largest difference, top-1 and top-10 agreement): random weights make near-ties, so
    greedy tokens of two bfloat16 implementations may part while the logits agree.
transformers runs LlamaForCausalLM in bfloat16, loaded lazily from the same safetensors,
with BlueLM's embedding LayerNorm hooked onto the embedding module. Sides: `jax` (load()'s
default: the WEIGHT layout, projections [out, in]), `jax-kernel` (load(layout="kernel"), the
layout before it; for a before/after in one run) and `transformers`; each bluelm-jax side's
decode time is divided by transformers'.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

SHORT_PROMPT = "Hello, how are"
SIDES = ("jax", "jax-kernel", "transformers")


def peak_rss_gb() -> float:
    """This process's peak resident memory (VmHWM; not inherited from the parent like ru_maxrss)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024 / 1e9


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def measure_prompt(generate_n, prompt_ids: list[int], new_tokens: int) -> dict:
    """Times of generate_n(prompt_ids, n): first call of 1 token, warm 1 token, warm `new_tokens`."""
    _, first = timed(lambda: generate_n(prompt_ids, 1))
    _, warm1 = timed(lambda: generate_n(prompt_ids, 1))
    generate_n(prompt_ids, new_tokens)  # compiles the decode loop of this length
    ids, warm_n = timed(lambda: generate_n(prompt_ids, new_tokens))
    return {"prompt_tokens": len(prompt_ids), "ttft_first_s": first, "ttft_warm_s": warm1,
            "decode_s_per_token": (warm_n - warm1) / (new_tokens - 1), "tokens": ids}


def long_prompt_ids(n: int, vocab: int) -> list[int]:
    import numpy as np

    return [1] + np.random.default_rng(0).integers(4, min(vocab, 60000), n - 1).tolist()


# ------------------------------------------------------------------ the two sides (subprocesses)


def run_jax(args) -> dict:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import numpy as np

    import bluelm_jax
    from bluelm_jax import generate as G
    from bluelm_jax.planning import encode_prompts

    layout = "kernel" if args.worker == "jax-kernel" else None
    model, load_s = timed(lambda: bluelm_jax.load(args.orbax_dir, layout=layout))
    load_peak = peak_rss_gb()
    short = encode_prompts(model, [SHORT_PROMPT])[0]

    def generate_n(ids, n):
        return G.generate(model, ids, max_new_tokens=n).ids[0]

    if args.logits_out:
        np.save(args.logits_out, np.asarray(model.logits([short])[0, -1], np.float32))

    results = {"side": f"bluelm-jax ({model.layout} layout)", "load_s": load_s, "load_peak_gb": load_peak,
               "short": measure_prompt(generate_n, short, args.new_tokens)}
    if args.long_prompt:
        results["long"] = measure_prompt(generate_n, long_prompt_ids(args.long_prompt, model.config.vocab_size),
                                         args.new_tokens)
    results["peak_gb"] = peak_rss_gb()
    return results


def transformers_model(hf_dir: str):
    """LlamaForCausalLM in bfloat16 from the BlueLM safetensors (lazily), plus the embedding LayerNorm hook."""
    import torch
    from safetensors import safe_open
    from transformers import LlamaConfig, LlamaForCausalLM

    from bluelm_jax.config import BlueLMConfig

    c = BlueLMConfig.from_json_file(os.path.join(hf_dir, "config.json"))
    llama = LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, max_position_embeddings=c.context_length,
        rms_norm_eps=c.rms_norm_eps, rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
        tie_word_embeddings=False, bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id,
        pad_token_id=c.pad_token_id, attention_bias=False, mlp_bias=False)
    with tempfile.TemporaryDirectory() as view:  # the same weight files beside a LLaMA config.json
        llama.save_pretrained(view)
        for name in os.listdir(hf_dir):
            if name.endswith((".safetensors", ".safetensors.index.json")):
                os.symlink(os.path.join(hf_dir, name), os.path.join(view, name))
        model = LlamaForCausalLM.from_pretrained(view, dtype=torch.bfloat16).eval()
    if c.use_stable_embedding:
        index = json.load(open(os.path.join(hf_dir, "model.safetensors.index.json")))["weight_map"]
        ln = torch.nn.LayerNorm(c.hidden_size, eps=c.rms_norm_eps, dtype=torch.bfloat16)
        for part in ("weight", "bias"):
            name = f"model.embed_layer_norm.{part}"
            with safe_open(os.path.join(hf_dir, index[name]), "pt") as f:
                getattr(ln, part).data = f.get_tensor(name).to(torch.bfloat16)
        model.model.embed_tokens.register_forward_hook(lambda module, inputs, output: ln(output))
    return model, c


def run_transformers(args) -> dict:
    import numpy as np
    import torch

    (model, config), load_s = timed(lambda: transformers_model(args.hf_dir))
    load_peak = peak_rss_gb()
    from bluelm_jax.tokenizer import BlueLMTokenizer

    short = list(BlueLMTokenizer(os.path.join(args.hf_dir, "tokenizer.model")).encode(SHORT_PROMPT))
    if short[:1] != [config.bos_token_id]:  # the same ids as bluelm-jax's encode_prompts
        short = [config.bos_token_id] + short

    if args.logits_out:
        with torch.no_grad():
            np.save(args.logits_out, model(torch.tensor([short])).logits[0, -1].float().numpy())  # [vocab]

    def generate_n(ids, n):
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                 pad_token_id=config.pad_token_id, temperature=None, top_p=None, top_k=None)
        return out[0, len(ids):].tolist()

    results = {"side": "transformers bf16", "load_s": load_s, "load_peak_gb": load_peak,
               "short": measure_prompt(generate_n, short, args.new_tokens)}
    if args.long_prompt:
        results["long"] = measure_prompt(generate_n, long_prompt_ids(args.long_prompt, config.vocab_size),
                                         args.new_tokens)
    results["peak_gb"] = peak_rss_gb()
    return results


# ------------------------------------------------------------------ driver


def prepare(args) -> None:
    """Writes and converts the random checkpoint unless both directories are given."""
    from convert_7b import run_converter, write_random_checkpoint

    if args.hf_dir and args.orbax_dir:
        return
    args.hf_dir = args.hf_dir or os.path.join(args.workdir, "hf")
    args.orbax_dir = args.orbax_dir or os.path.join(args.workdir, "converted")
    if not os.path.isdir(args.hf_dir):
        print(f"writing a random BlueLM-7B checkpoint into {args.hf_dir}", flush=True)
        write_random_checkpoint(args.hf_dir, shards=8)
        # a real SentencePiece model, so that load() and the prompts work
        shutil.copy(os.path.join(ROOT, "bluelm_jax", "default_model", "tokenizer.model"),
                    os.path.join(args.hf_dir, "tokenizer.model"))
    if not os.path.isdir(args.orbax_dir):
        result = run_converter(args.hf_dir, args.orbax_dir)
        print(f"converted in {result['wall_s']:.0f} s, peak {result['peak_rss_gb']:.2f} GB", flush=True)


def run_side(side: str, args, logits_dir: str) -> dict:
    logits_out = os.path.join(logits_dir, f"{side}.npy")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", side, "--hf-dir", args.hf_dir,
           "--orbax-dir", args.orbax_dir, "--new-tokens", str(args.new_tokens),
           "--long-prompt", str(args.long_prompt), "--logits-out", logits_out]
    print("  $ " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    if proc.returncode != 0:
        sys.exit(f"{side} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "logits_file": logits_out}


def logits_agreement(ours: str, reference: str) -> str:
    """How the last-position logits of two sides agree (files of [vocab] float32)."""
    import numpy as np

    a, b = np.load(ours).astype(np.float64), np.load(reference).astype(np.float64)
    cosine = float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
    top10 = len(set(np.argsort(-a)[:10]) & set(np.argsort(-b)[:10]))
    return (f"cosine {cosine:.5f}, largest difference {np.abs(a - b).max():.3f} (logits up to "
            f"{np.abs(b).max():.2f}), top-1 equal: {bool(a.argmax() == b.argmax())}, top-10 shared: {top10}/10")


def table(results: list[dict]) -> str:
    rows = ["| side | load s | load peak GB | run peak GB | prompt | TTFT first s | TTFT warm s | decode s/token |",
            "|---|---|---|---|---|---|---|---|"]
    for r in results:
        for key in ("short", "long"):
            if key in r:
                p = r[key]
                rows.append(f"| {r['side']} | {r['load_s']:.1f} | {r['load_peak_gb']:.2f} | {r['peak_gb']:.2f} | "
                            f"{p['prompt_tokens']} | {p['ttft_first_s']:.2f} | {p['ttft_warm_s']:.2f} | "
                            f"{p['decode_s_per_token']:.3f} |")
    reference = [r for r in results if r["side"].startswith("transformers")]
    rows.append("")
    for r in results:
        for key in ("short", "long"):
            if reference and r is not reference[0] and key in r and key in reference[0]:
                ratio = r[key]["decode_s_per_token"] / reference[0][key]["decode_s_per_token"]
                same = r[key]["tokens"] == reference[0][key]["tokens"]
                rows.append(f"{r['side']} / transformers, {key} prompt: decode time x{ratio:.2f}, "
                            f"greedy tokens equal: {same}")
        if reference and r is not reference[0]:
            rows.append(f"{r['side']} vs transformers, logits after the short prompt: "
                        f"{logits_agreement(r['logits_file'], reference[0]['logits_file'])}")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="/work/big/bluelm-7b")
    parser.add_argument("--hf-dir", help="an existing Hugging Face dir of the 7B shape (with tokenizer.model)")
    parser.add_argument("--orbax-dir", help="an existing converted dir of it")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--long-prompt", type=int, default=1000, help="tokens of the long prompt (0: skip it)")
    parser.add_argument("--sides", default="jax,transformers")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints it wrote")
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--logits-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2")
    if not set(args.sides.split(",")) <= set(SIDES):
        parser.error(f"--sides: each one of {', '.join(SIDES)}")
    if args.worker:
        print(json.dumps((run_transformers if args.worker == "transformers" else run_jax)(args)))
        return
    wrote = not (args.hf_dir and args.orbax_dir)
    try:
        prepare(args)
        with tempfile.TemporaryDirectory() as logits_dir:
            results = [run_side(side, args, logits_dir) for side in args.sides.split(",")]
            for r in results:
                print(json.dumps({k: v for k, v in r.items()}), flush=True)
            print(table(results))
    finally:
        if wrote and not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
