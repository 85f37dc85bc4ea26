"""Rebuilds bluelm_jax/default_model/: tokenizer, config, trained weights (Hugging Face layout).

    python -m bluelm_jax.default_model.build [--steps 400] [--out bluelm_jax/default_model]

1. Learns a bilingual BPE SentencePiece tokenizer (byte fallback, BlueLM's special pieces
   <unk> <s> </s> <pad> and the chat markers) from the corpus, in memory (byte-reproducible).
2. Initialises a small BlueLM-architecture model (4 layers, hidden 256) at random.
3. Trains it from scratch with bluelm_jax.train on the corpus records
   (bluelm_jax/default_model/corpus.py), float32 on CPU.
4. Checks that greedy decoding gives back every trained answer exactly (chat and plain
   prompts, every assistant turn of the multi-turn and tool-calling chats, few-shot lines);
   exits 1 if one does not.
5. Writes config.json, model.safetensors (float32), tokenizer.model and build_info.json.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tempfile
import time
import types

HERE = os.path.dirname(os.path.abspath(__file__))

CHAT_PIECES = ("[|Human|]:", "[|AI|]:", "[|SYSTEM|]:", "[|Function|]:")
TOKENIZER_VOCAB = 1024
MODEL_SHAPE = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=4, max_position_embeddings=2048)
SEQ_LEN = 256  # the longest record, a tool round trip with its system text, is 236 tokens


def train_tokenizer(sentences: list[str], vocab_size: int = TOKENIZER_VOCAB) -> bytes:
    import sentencepiece as spm

    spm.set_random_generator_seed(1234)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, model_type="bpe", vocab_size=vocab_size,
        hard_vocab_limit=False, character_coverage=1.0, byte_fallback=True, split_digits=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3, unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
        pad_piece="<pad>", user_defined_symbols=list(CHAT_PIECES), num_threads=1, minloglevel=2)
    return model.getvalue()


def greedy(params, config, prompt_ids: list[int], max_new: int, stop_ids) -> list[int]:
    """Greedy continuation by full forward passes over a fixed width (one compilation per width:
    the smallest power of two, at least 128, that holds the prompt and max_new tokens)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from bluelm_jax.model import forward

    global _FWD
    if "_FWD" not in globals():
        _FWD = jax.jit(lambda p, t: forward(p, t, jnp.arange(t.shape[1])[None], config)[0][0])
    ids = list(prompt_ids)
    width = max(128, 1 << (len(ids) + max_new - 1).bit_length())
    out = []
    for _ in range(max_new):
        if len(ids) >= width:
            break
        tokens = np.full((1, width), config.pad_token_id, np.int32)
        tokens[0, :len(ids)] = ids
        nxt = int(np.argmax(np.asarray(_FWD(params, jnp.asarray(tokens))[len(ids) - 1])))
        out.append(nxt)
        ids.append(nxt)
        if nxt in stop_ids:
            break
    return out


def recall_cases():
    """(kind, prompt, expected text): every trained answer. A "chat" prompt is the message list
    before the answer (chat template), a "plain" prompt a text."""
    from bluelm_jax.default_model import corpus

    cases = []
    for q, a in corpus.qa_pairs():
        cases.append(("chat", [{"role": "user", "content": q}], a))
        cases.append(("plain", q, a))
    for chat in corpus.CHATS + corpus.tool_chats():
        cases += [("chat", chat[:i], m["content"]) for i, m in enumerate(chat) if m["role"] == "assistant"]
    for p, r in corpus.FEW_SHOT:
        cases.append(("plain", p, r))
    return cases


def check_recall(params, config, tok) -> list[str]:
    """Failures (empty when every answer is reproduced exactly)."""
    failures = []
    stops = {tok.eos_id, tok.piece_to_id("[|Human|]:")}
    for kind, prompt, answer in recall_cases():
        ids = tok.encode_chat(prompt) if kind == "chat" else tok.encode(prompt)
        out = greedy(params, config, ids, 64, stops)
        text = tok.decode([i for i in out if i not in stops])
        if out[-1:] != [tok.eos_id] or text.strip() != answer.strip():
            shown = prompt[-1]["content"] if kind == "chat" else prompt
            failures.append(f"{kind} {shown!r}: got {text!r}, expected {answer!r}")
    return failures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--out", default=HERE)
    args = parser.parse_args(argv)

    import jax

    jax.config.update("jax_platforms", "cpu")
    from bluelm_jax.config import BlueLMConfig
    from bluelm_jax.default_model import corpus
    from bluelm_jax.model import init_params
    from bluelm_jax.tokenizer import BlueLMTokenizer
    from bluelm_jax.train import TrainConfig, train
    from bluelm_jax.hf.to_hf import export_params

    tok_bytes = train_tokenizer(corpus.tokenizer_sentences())
    tok = BlueLMTokenizer(model_proto=tok_bytes)
    vocab = -(-tok.vocab_size // 64) * 64  # embedding rows: a multiple of 64, >= the pieces (as in BlueLM)
    config = BlueLMConfig(vocab_size=vocab, **MODEL_SHAPE)
    print(f"tokenizer: {tok.vocab_size} pieces; model: {config.num_parameters():,} parameters")

    tc = TrainConfig(seq_len=SEQ_LEN, batch_size=16, learning_rate=3e-3, warmup_steps=30, min_lr_ratio=0.05,
                     max_steps=args.steps, log_steps=50, seed=0, mesh="data=1", compute_dtype="float32")
    model = types.SimpleNamespace(config=config, tokenizer=tok, params=init_params(config), path="")
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "corpus.jsonl")
        with open(data, "w", encoding="utf-8") as f:
            for r in corpus.records():
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        start = time.perf_counter()
        result = train(model, data, tc, progress=False)
        seconds = time.perf_counter() - start
        final_loss = result.history[-1]["loss"]
        print(f"trained {args.steps} steps in {seconds:.0f} s, final loss {final_loss:.4f}")

        failures = check_recall(result.params, config, tok)
        for f in failures:
            print("recall failure:", f)
        if failures:
            return 1
        print(f"recall: all {len(recall_cases())} trained answers reproduced exactly")

        export_dir = export_params(os.path.join(tmp, "hf"), result.params, config, tok_bytes, "float32")
        os.makedirs(args.out, exist_ok=True)
        for name in ("config.json", "model.safetensors", "tokenizer.model"):
            shutil.copyfile(os.path.join(export_dir, name), os.path.join(args.out, name))
    info = {"parameters": config.num_parameters(), "tokenizer_pieces": tok.vocab_size, "steps": args.steps,
            "train_seconds": round(seconds, 1), "final_loss": round(final_loss, 5),
            "records": len(corpus.records()), "recall_cases": len(recall_cases()),
            "train_config": {k: v for k, v in vars(tc).items() if isinstance(v, (int, float, str))}}
    with open(os.path.join(args.out, "build_info.json"), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2)
        f.write("\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
