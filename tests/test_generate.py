"""Generation: KV-cache consistency, batching, compilation counts, stopping, streaming,
and greedy parity with the transformers reference."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bluelm_jax import decode, planning
from bluelm_jax import generate as G
from bluelm_jax.detokenizer import Detokenizer, safe_length
from bluelm_jax.config import preset
from bluelm_jax.model import forward
from bluelm_jax.tokenizer import BlueLMTokenizer
from tests.hf_reference import params_from_hf, random_hf_weights

# the test tokenizer has 600 pieces: an embedding of 640 rows leaves ids 600..639 unusable
CONFIG = preset("tiny").replace(vocab_size=640)
assert CONFIG.vocab_size > 600




def make_model(config, tokenizer_model=None, seed=0):
    tok = BlueLMTokenizer(tokenizer_model) if tokenizer_model else None
    return types.SimpleNamespace(config=config, params=params_from_hf(config, random_hf_weights(config, seed)),
                                 tokenizer=tok, compute_dtype=jnp.float32)


@pytest.fixture(scope="module")
def model(tokenizer_model):
    return make_model(CONFIG, tokenizer_model)


PROMPTS = ["Hello, how are you today?", "你好", "The quick brown fox jumps over the lazy dog. Once upon a time"]


# ------------------------------------------------------------------ cache consistency


def test_prefill_then_decode_equals_full_forward(model):
    """Left-padded prefill + N single-token steps give the logits of one full forward pass."""
    rng = np.random.default_rng(0)
    prompt, extra = rng.integers(4, 600, 11), rng.integers(4, 600, 6)
    bucket, pad = 16, 16 - 11
    tokens = np.full((1, bucket), CONFIG.pad_token_id, np.int32)
    tokens[0, pad:] = prompt
    start = jnp.asarray([pad], jnp.int32)
    ours = []
    prefill = jax.jit(decode.prefill_logits, static_argnums=(3, 4))
    step = jax.jit(decode.decode_logits, static_argnums=(3,))
    logits, cache = prefill(model.params, jnp.asarray(tokens), start, 32, CONFIG)
    ours.append(logits)
    for t in extra:
        logits, cache = step(model.params, jnp.asarray([t], jnp.int32), cache, CONFIG)
        ours.append(logits)
    ours = np.stack([np.asarray(l[0]) for l in ours])  # [1 + N, vocab]

    full = np.concatenate([prompt, extra])[None]
    ref, _ = jax.jit(forward, static_argnums=(3,))(model.params, jnp.asarray(full, jnp.int32),
                                                    jnp.arange(full.shape[1])[None], CONFIG)
    ref = np.asarray(ref[0, len(prompt) - 1:])
    assert np.abs(ours - ref).max() <= 1e-4, np.abs(ours - ref).max()


# ------------------------------------------------------------------ batching


@pytest.mark.parametrize("sample", [False, True])
def test_batch_rows_equal_each_prompt_alone(model, sample):
    kw = dict(max_new_tokens=12, temperature=0.9 if sample else 0.0, top_p=0.9, repetition_penalty=1.1)
    seeds = [5, 6, 7]
    batch = G.generate(model, PROMPTS, seed=seeds, **kw)
    for i, p in enumerate(PROMPTS):
        alone = G.generate(model, p, seed=seeds[i], **kw)
        assert batch.ids[i] == alone.ids[0]
        assert batch.texts[i] == alone.texts[0]
        assert batch.finish_reasons[i] == alone.finish_reasons[0]
    assert len({tuple(r) for r in batch.ids}) == len(PROMPTS)  # the rows really differ


def test_greedy_is_deterministic_and_sampling_depends_on_seed(model):
    a = G.generate(model, PROMPTS[0], max_new_tokens=10)
    assert a.ids == G.generate(model, PROMPTS[0], max_new_tokens=10).ids
    s1 = G.generate(model, PROMPTS[0], max_new_tokens=10, temperature=1.0, seed=1)
    s1b = G.generate(model, PROMPTS[0], max_new_tokens=10, temperature=1.0, seed=1)
    s2 = G.generate(model, PROMPTS[0], max_new_tokens=10, temperature=1.0, seed=2)
    assert s1.ids == s1b.ids and s1.ids != s2.ids


def test_ids_past_the_tokenizer_are_never_generated(tokenizer_model):
    m = make_model(CONFIG, tokenizer_model, seed=3)
    lm_head = np.asarray(m.params["lm_head"]["kernel"]).copy()
    lm_head[:, 600:] = lm_head[:, 600:] * 50  # make the unusable rows dominate often
    m.params = dict(m.params, lm_head={"kernel": jnp.asarray(lm_head)})
    r = G.generate(m, PROMPTS, max_new_tokens=16, temperature=2.0, seed=0)
    assert max(max(row) for row in r.ids) < 600
    # the unmasked model does produce them (so the check above can fail)
    raw = types.SimpleNamespace(config=m.config, params=m.params, tokenizer=None)
    out = G.generate(raw, [m.tokenizer.encode(p) for p in PROMPTS], max_new_tokens=16, temperature=2.0, seed=0)
    assert max(max(row) for row in out.ids) >= 600


# ------------------------------------------------------------------ compilation counts


def test_compilations_constant_within_bucket_and_across_sampling_values(model):
    def counts():
        return dict(decode.TRACE_COUNTS)

    G.generate(model, "Hello", max_new_tokens=8, temperature=0.7, top_p=0.9, repetition_penalty=1.1, seed=0)
    before = counts()
    for prompt, n, t, p, r, seed in [
        ("Hello, how are you today?", 8, 0.7, 0.9, 1.1, 1),
        ("你好，今天过得怎么样？", 20, 1.3, 0.5, 1.0, 2),
        ("The weather is sunny", 30, 0.2, 1.0, 1.5, None),
    ]:
        assert planning.bucket_length(len(model.tokenizer.encode(prompt))) == 32
        G.generate(model, prompt, max_new_tokens=n, temperature=t, top_p=p, repetition_penalty=r, seed=seed)
    assert counts() == before
    # another top_k is another program (compiled once), and so is a longer bucket: counting works
    G.generate(model, "Hello", max_new_tokens=8, temperature=0.7, top_k=7)
    G.generate(model, "Hello", max_new_tokens=8, temperature=0.9, top_k=7)
    G.generate(model, "Hello world " * 30, max_new_tokens=8, temperature=0.7, top_k=7)
    after = counts()
    assert after["prefill"] == before["prefill"] + 2 and after["decode_loop"] == before["decode_loop"] + 2


# ------------------------------------------------------------------ stopping


def test_max_new_tokens_gives_length(model):
    r = G.generate(model, PROMPTS, max_new_tokens=7)
    assert all(len(ids) == 7 for ids in r.ids) and r.finish_reasons == ["length"] * 3


def test_stop_id(model):
    base = G.generate(model, PROMPTS[0], max_new_tokens=20).ids[0]
    k = next(i for i in range(3, 20) if base[i] not in base[:i])
    r = G.generate(model, PROMPTS[0], max_new_tokens=20, stop=[base[k]])
    assert r.ids[0] == base[: k + 1] and r.finish_reasons == ["stop"]
    assert r.texts[0] == model.tokenizer.decode(base[:k])


def test_eos_stops(tokenizer_model):
    """Make </s> the argmax wherever token X would be (a tie in lm_head: argmax takes the lower id)."""
    m = make_model(CONFIG, tokenizer_model)
    base = G.generate(m, PROMPTS[0], max_new_tokens=20).ids[0]
    k = next(i for i in range(3, 20) if base[i] not in base[:i])
    lm_head = np.asarray(m.params["lm_head"]["kernel"]).copy()
    lm_head[:, CONFIG.eos_token_id] = lm_head[:, base[k]]
    m.params = dict(m.params, lm_head={"kernel": jnp.asarray(lm_head)})
    r = G.generate(m, PROMPTS[0], max_new_tokens=20)
    assert r.ids[0] == base[:k] + [CONFIG.eos_token_id] and r.finish_reasons == ["stop"]
    assert r.texts[0] == m.tokenizer.decode(base[:k])


def test_chat_stop_piece(tokenizer_model):
    m = make_model(CONFIG, tokenizer_model)
    human = m.tokenizer.piece_to_id("[|Human|]:")
    assert human < 600
    chat = G.generate(m, "Hello", max_new_tokens=20, chat=True)
    base = chat.ids[0]
    k = next(i for i in range(3, 20) if base[i] not in base[:i] and base[i] > human)
    lm_head = np.asarray(m.params["lm_head"]["kernel"]).copy()
    lm_head[:, human] = lm_head[:, base[k]]  # ties go to the lower id: [|Human|]: replaces X
    m.params = dict(m.params, lm_head={"kernel": jnp.asarray(lm_head)})
    r = G.generate(m, "Hello", max_new_tokens=20, chat=True)
    assert r.ids[0] == base[:k] + [human] and r.finish_reasons == ["stop"]
    assert "[|Human|]:" not in r.texts[0] and r.texts[0] == m.tokenizer.decode(base[:k])
    # the same prompt ids outside chat mode go on past the piece
    plain = G.generate(m, chat.prompt_ids, max_new_tokens=20)
    assert plain.ids[0][k] == human and len(plain.ids[0]) == 20 and plain.finish_reasons == ["length"]


def _ascii_stop(text, ids, tok):
    """A 3-character stop string first occurring well inside text."""
    for m in range(4, len(text) - 3):
        s = text[m:m + 3]
        if s.isascii() and s.strip() == s and s.isprintable() and text.find(s) == m:
            return m, s
    pytest.skip("no usable stop string in the sample")


@pytest.mark.parametrize("n", [40, 12])  # 12: the row also reaches its length inside one chunk
def test_stop_string_in_batch(model, n):
    base = G.generate(model, PROMPTS, max_new_tokens=n)
    m, s = _ascii_stop(base.texts[2], base.ids[2], model.tokenizer)
    r = G.generate(model, PROMPTS, max_new_tokens=n, stop=s)
    assert r.texts[2] == base.texts[2][:m] and r.finish_reasons[2] == "stop"
    ids = r.ids[2]
    assert ids == base.ids[2][: len(ids)] and s in model.tokenizer.decode(ids)
    assert s not in model.tokenizer.decode(ids[:-1])
    for i in (0, 1):  # rows without the string are untouched
        if s not in base.texts[i]:
            assert r.ids[i] == base.ids[i] and r.finish_reasons[i] == "length"


def test_context_overflow(tokenizer_model):
    small = CONFIG.replace(max_position_embeddings=40)
    m = make_model(small, tokenizer_model)
    ids = list(np.random.default_rng(0).integers(4, 600, 35))
    r = G.generate(m, ids, max_new_tokens=20)
    assert len(r.ids[0]) == 5 and r.finish_reasons == ["length"]  # 35 + 5 = the whole context
    with pytest.raises(G.ContextOverflowError, match="context is 40 tokens"):
        G.generate(m, ids + [5] * 5, max_new_tokens=1)
    # within the context nothing changes: the first 5 tokens are those of a longer budget elsewhere
    big = types.SimpleNamespace(config=CONFIG, params=m.params, tokenizer=m.tokenizer)
    assert G.generate(big, ids, max_new_tokens=5).ids == r.ids


def test_buffers_are_capped_by_the_context(tokenizer_model):
    """A huge max_new_tokens costs no more memory than what the context can hold."""
    small = CONFIG.replace(max_position_embeddings=64)
    m = make_model(small, tokenizer_model)
    ids = list(np.random.default_rng(1).integers(4, 600, 20))
    plan = planning.make_plan(m, ids, G.GenerationSettings(max_new_tokens=10**9))
    assert plan.limit[0] == 64 - 20
    assert plan.width == 64 and plan.cache_len == 32 + 64  # 44 new tokens, rounded up to the quantum
    r = G.generate(m, ids, max_new_tokens=100_000)
    assert len(r.ids[0]) == 44 and r.finish_reasons == ["length"]
    assert r.ids == G.generate(m, ids, max_new_tokens=44).ids


def test_bad_arguments(model):
    for kw, match in [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(temperature=-1.0), "temperature"),
        (dict(top_p=0.0, temperature=1.0), "top_p"),
        (dict(top_k=-3), "top_k"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(stop=[""]), "stop string"),
    ]:
        with pytest.raises(ValueError, match=match):
            G.generate(model, "Hello", **kw)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        G.generate(model, [1, 5, 9999])
    with pytest.raises(ValueError, match="prompt"):
        G.generate(model, [])
    no_tokenizer = types.SimpleNamespace(config=model.config, params=model.params, tokenizer=None)
    with pytest.raises(ValueError, match="tokenizer"):
        G.generate(no_tokenizer, [1, 5, 9], stop="x")
    with pytest.raises(ValueError, match="tokenizer"):
        G.generate(no_tokenizer, "Hello")


# ------------------------------------------------------------------ streaming


@pytest.mark.parametrize("kw", [dict(), dict(temperature=0.8, top_p=0.9, seed=3), dict(chat=True)])
def test_stream_matches_generate(model, kw):
    s = G.stream(model, PROMPTS[1], max_new_tokens=24, **kw)
    pieces = list(s)
    r = G.generate(model, PROMPTS[1], max_new_tokens=24, **kw)
    assert "".join(pieces) == s.text == r.texts[0]
    assert s.ids == r.ids[0] and s.finish_reason == r.finish_reasons[0]
    assert len(pieces) > 3


def test_stream_never_splits_a_character(model):
    """Chinese characters are 3 UTF-8 bytes; byte-fallback tokens are held until complete."""
    tok = model.tokenizer
    text = "猫龍鳳 and 狗"  # 龍鳳 are not in the training text: each is three byte pieces
    ids = tok.encode(text, add_bos=False)
    assert sum(tok.id_to_piece(i).startswith("<0x") for i in ids) == 6
    detok = Detokenizer(tok)
    shown = [detok.push(i) for i in ids[:-1]] + [detok.push(ids[-1], final=True)]
    assert "".join(shown) == text == detok.text
    assert all("\ufffd" not in p for p in shown)
    assert shown.count("") >= 4  # held while a character was incomplete


def test_stream_holds_back_a_possible_stop_string(model):
    tok = model.tokenizer
    ids = tok.encode("Hello world, how are you", add_bos=False)
    detok = Detokenizer(tok, stop_strings=("ld, how",))
    shown = "".join(detok.push(i) for i in ids)
    assert detok.stopped and shown == detok.text == "Hello wor"
    assert tok.decode(detok.ids).startswith("Hello world, how")
    assert safe_length("abc[|Hu", ("[|Human|]:",)) == 3


def test_incremental_text_equals_the_whole_decode_in_linear_time(model):
    """Pushing ids one by one gives, at every step, the text of decoding them all at once
    (special pieces, byte pieces and stop ids included), while the work per push stays bounded."""
    tok = model.tokenizer
    rng = np.random.default_rng(0)
    specials = [tok.bos_id, tok.eos_id, *tok.chat_stop_ids]
    text_ids = tok.encode("猫龍鳳 and 狗. Hello world, how are you? 你好，世界！" * 3, add_bos=False)
    ids = [int(rng.choice(specials)) if rng.random() < 0.05 else int(rng.integers(0, 600)) for _ in range(1500)]
    ids = text_ids + ids + text_ids
    decoded = []
    counting = types.SimpleNamespace(decode=lambda xs, **kw: decoded.append(len(xs)) or tok.decode(xs, **kw))
    stop_ids = (tok.eos_id,)
    detok = Detokenizer(counting, stop_ids=stop_ids)
    shown = ""
    for n, i in enumerate(ids, 1):
        shown += detok.push(i, final=n == len(ids))
        if n % 97 == 0 or n == len(ids):
            assert detok.text == tok.decode([j for j in ids[:n] if j not in stop_ids]), n
    assert shown == detok.text
    assert sum(decoded) < 40 * len(ids)  # re-decoding everything each time would be ~len(ids)**2 / 2


def test_stream_stop_string(model):
    base = G.generate(model, PROMPTS[2], max_new_tokens=40)
    m, s = _ascii_stop(base.texts[0], base.ids[0], model.tokenizer)
    st = G.stream(model, PROMPTS[2], max_new_tokens=40, stop=s)
    assert "".join(st) == base.texts[0][:m] and st.finish_reason == "stop"


# ------------------------------------------------------------------ parity with transformers


@pytest.mark.parametrize("name", ["tiny", "tiny-32k"])
def test_greedy_matches_transformers_generate(hf_checkpoint, name):
    import torch

    import bluelm_jax
    from tests.hf_reference import assert_reference_rope_intact, reference_model

    config = preset(name)
    model = bluelm_jax.load(hf_checkpoint(name))
    prompt = np.random.default_rng(7).integers(4, config.vocab_size, 300).tolist()
    prompt = [config.bos_token_id] + prompt
    ours = G.generate(model, prompt, max_new_tokens=64).ids[0]

    ref = reference_model(config, random_hf_weights(config, seed=0))
    # ids past the tokenizer's pieces are never produced: the reference gets the same restriction
    unusable = list(range(model.tokenizer.vocab_size, config.vocab_size))
    with torch.no_grad():
        out = ref.generate(torch.tensor([prompt]), max_new_tokens=64, do_sample=False, eos_token_id=config.eos_token_id,
                           pad_token_id=config.pad_token_id, temperature=None, top_p=None, top_k=None,
                           suppress_tokens=unusable or None)
    assert_reference_rope_intact(ref)
    theirs = out[0, len(prompt):].tolist()
    if config.eos_token_id in theirs:
        theirs = theirs[: theirs.index(config.eos_token_id) + 1]
    assert ours == theirs
    assert len(set(ours)) > 5  # not a degenerate repetition
