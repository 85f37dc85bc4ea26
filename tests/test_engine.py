"""The continuous-batching engine: exactness against solo `generate`, slots, queue, compiles."""

import asyncio
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bluelm_jax import engine as E
from bluelm_jax import generate as G
from bluelm_jax import planning, sampling, sharding
from bluelm_jax.config import preset
from tests.test_generate import make_model

CONFIG = preset("tiny").replace(vocab_size=640)
EOS = CONFIG.eos_token_id


@pytest.fixture(scope="module")
def model():
    return make_model(CONFIG)


def prompt(n, seed):
    return tuple(int(i) for i in np.random.default_rng(seed).integers(4, 600, n))


def solo(model, req: E.EngineRequest, kv_cache_dtype=None) -> list[int]:
    """What `generate` gives for this request alone (it adds </s> to the stop ids itself)."""
    result = G.generate(model, [list(req.prompt_ids)], max_new_tokens=req.max_new_tokens,
                        temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                        repetition_penalty=req.repetition_penalty, seed=req.seed, stop=list(req.stop_ids),
                        kv_cache_dtype=kv_cache_dtype)
    return result.ids[0]


def stop_after(model, req: E.EngineRequest, n: int) -> tuple[int, ...]:
    """Stop ids that end `req` at its n-th token (from its solo run), plus </s>."""
    return (EOS, solo(model, req)[n - 1])


# ------------------------------------------------------------------ sampling


def test_traced_top_k_equals_static_top_k():
    """sample_rows' per-row top-k / top-p / greedy flags give the static path's distribution."""
    rng = np.random.default_rng(0)
    logits = jax.numpy.asarray(rng.normal(size=(4, 640)).astype(np.float32) * 3)
    seen = jax.numpy.asarray(rng.random((4, 640)) < 0.05)
    keys = sampling.row_keys([1, 2, 3, 4], 4)
    cases = [(0, 1.0, 1.0), (5, 1.0, 0.9), (40, 0.8, 1.3), (0, 0.7, 0.6), (1, 0.5, 2.0), (639, 0.95, 1.0)]
    for top_k, top_p, temperature in cases:
        params = sampling.make_params(4, temperature=temperature, top_p=top_p, repetition_penalty=1.2)
        static = sampling.SamplerSettings(do_sample=True, top_k=top_k, vocab_limit=600)
        want = sampling.process_logits(logits, seen, params, static)
        candidates = sampling._sorted_descending(sampling.apply_temperature(
            sampling.process_logits(logits, seen, params, sampling.SamplerSettings(vocab_limit=600)),
            params.temperature), 0)
        k = jax.numpy.full((4,), top_k, jax.numpy.int32)
        got = sampling.apply_top_p(
            sampling.apply_top_k_rows(sampling.apply_temperature(
                sampling.process_logits(logits, seen, params, sampling.SamplerSettings(vocab_limit=600)),
                params.temperature), k, candidates),
            params.top_p, sampling.top_k_candidates(candidates, k))
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=str((top_k, top_p)))
        rows = sampling.RowSettings(params, jax.numpy.ones((4,), bool), k)
        for step in (0, 7):
            np.testing.assert_array_equal(
                np.asarray(sampling.sample_rows(logits, seen, rows, keys, jax.numpy.full((4,), step), 600)),
                np.asarray(sampling.sample(logits, seen, params, keys, step, static)))


# ------------------------------------------------------------------ exactness under load


def mixed_requests(model):
    """12 requests: prompt lengths 3..150 (150 > the prefill chunk of 64), greedy and seeded
    sampled, different limits, stop ids that end some early."""
    reqs = []
    for i, n in enumerate([3, 9, 17, 30, 33, 40, 64, 70, 100, 150, 5, 12]):
        sampled = i % 3 == 1
        req = E.EngineRequest(prompt_ids=prompt(n, i), max_new_tokens=[6, 20, 13, 9][i % 4],
                              temperature=0.9 if sampled else 0.0, top_p=[1.0, 0.9][i % 2],
                              top_k=[0, 20, 5][i % 3] if sampled else 0,
                              repetition_penalty=[1.0, 1.2][i % 2], seed=100 + i, stop_ids=(EOS,))
        if i % 4 == 2:  # stopped at its 5th token by a stop id
            req = E.EngineRequest(**{**req.__dict__, "stop_ids": stop_after(model, req, 5)})
        reqs.append(req)
    return reqs


def run_concurrently(engine, reqs):
    results = [None] * len(reqs)

    def client(i):
        handle = engine.submit(reqs[i])
        results[i] = (list(handle.tokens(timeout=120)), handle)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(reqs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_concurrent_requests_equal_solo_generate(model):
    reqs = mixed_requests(model)
    want = [solo(model, r) for r in reqs]
    assert any(len(w) == 5 for w in want)  # stop ids did end some requests early
    with E.Engine(model, max_batch=4, max_queue=32, max_len=256, prefill_chunk=64, steps_per_sync=4) as engine:
        results = run_concurrently(engine, reqs)
        assert engine.shifts >= 3  # rows were moved right (admissions) and left (the cache's end)
        assert engine.moves >= 1  # rows that ended early were filled by the last running rows
        assert set(engine.blocks) == {1, 2, 4}  # the decode blocks ran the first 1, 2 or 4 rows as needed
        for (ids, handle), w, r in zip(results, want, reqs):
            assert ids == w, r
            assert handle.completion_tokens == len(w) and handle.prompt_tokens == len(r.prompt_ids)
            assert handle.finish_reason == ("stop" if w[-1] in r.stop_ids else "length")
            assert handle.submitted_at <= handle.first_token_at <= handle.finished_at
        stats = engine.stats()
        assert stats.active_slots == 0 and stats.queue_depth == 0
        assert stats.tokens_generated == sum(len(w) for w in want)
        assert sum(stats.finished.values()) == len(reqs)


def test_async_tokens_and_result(model):
    req = E.EngineRequest(prompt_ids=prompt(20, 5), max_new_tokens=12, stop_ids=(EOS,))

    async def read(handle):
        return [t async for t in handle.atokens()]

    with E.Engine(model, max_batch=2, max_len=256, steps_per_sync=2) as engine:
        handle = engine.submit(req)
        assert asyncio.run(read(handle)) == solo(model, req) == handle.result(timeout=60)


# ------------------------------------------------------------------ slots, queue, errors


def test_cancel_frees_the_slot_and_others_are_unaffected(model):
    other = E.EngineRequest(prompt_ids=prompt(10, 1), max_new_tokens=40, stop_ids=(EOS,))
    long = E.EngineRequest(prompt_ids=prompt(12, 2), max_new_tokens=200, stop_ids=(EOS,))
    with E.Engine(model, max_batch=2, max_len=256, steps_per_sync=2) as engine:
        a, b = engine.submit(long), engine.submit(other)
        stream = a.tokens(timeout=60)
        first = [next(stream) for _ in range(3)]
        assert engine.stats().active_slots == 2
        a.cancel()
        a.cancel()  # idempotent
        assert b.result(timeout=60) == solo(model, other)
        assert a.result(timeout=60)[:3] == first and a.finish_reason == "cancelled"
        assert len(a.ids) < 200
        deadline = time.time() + 30
        while engine.stats().active_slots and time.time() < deadline:
            time.sleep(0.01)
        stats = engine.stats()
        assert stats.active_slots == 0 and stats.finished == {"cancelled": 1, "length": 1}
        b.cancel()  # harmless after the end
        assert b.finish_reason == "length"


def test_long_prompt_prefill_is_interleaved_with_running_streams(model):
    """A 150-token prompt in chunks of 32 (bucket 256, chunks from slot 96: 5 of them) lets the
    running stream decode a block of steps between its chunks, and both stay exact."""
    running = E.EngineRequest(prompt_ids=prompt(10, 1), max_new_tokens=90, stop_ids=(EOS,))
    long = E.EngineRequest(prompt_ids=prompt(150, 2), max_new_tokens=5, stop_ids=(EOS,))
    with E.Engine(model, max_batch=2, max_len=256, prefill_chunk=32, steps_per_sync=2) as engine:
        a = engine.submit(running)
        next(a.tokens(timeout=60))
        before = len(a.ids)
        b = engine.submit(long)
        next(b.tokens(timeout=60))
        assert len(a.ids) - before >= 4 * 2  # a block of 2 steps after each of the first 4 chunks
        assert b.result(timeout=60) == solo(model, long)
        assert a.result(timeout=60) == solo(model, running)


def test_stop_ends_with_reason_stop(model):
    with E.Engine(model, max_batch=1, max_len=256) as engine:
        h = engine.submit(E.EngineRequest(prompt_ids=prompt(8, 3), max_new_tokens=200))
        next(h.tokens(timeout=60))
        h.stop()
        h.result(timeout=60)
        assert h.finish_reason == "stop" and engine.stats().finished == {"stop": 1}


def test_queue_full_raises(model):
    with E.Engine(model, max_batch=1, max_queue=2, max_len=256) as engine:
        running = engine.submit(E.EngineRequest(prompt_ids=prompt(8, 3), max_new_tokens=200))
        next(running.tokens(timeout=60))  # admitted: the queue is empty again
        waiting = [engine.submit(E.EngineRequest(prompt_ids=prompt(8, i), max_new_tokens=4)) for i in range(2)]
        with pytest.raises(E.QueueFullError):
            engine.submit(E.EngineRequest(prompt_ids=prompt(8, 9), max_new_tokens=4))
        assert engine.stats().queue_depth == 2
        running.cancel()
        for h in waiting:
            assert len(h.result(timeout=60)) >= 1


def test_context_overflow_names_both_numbers(model):
    with E.Engine(model, max_batch=1, max_len=256) as engine:
        with pytest.raises(planning.ContextOverflowError, match=r"200 tokens.*max_new_tokens is 57.*256"):
            engine.submit(E.EngineRequest(prompt_ids=prompt(200, 0), max_new_tokens=57))
        assert len(engine.submit(E.EngineRequest(prompt_ids=prompt(200, 0), max_new_tokens=56)).result(timeout=60)) == 56


@pytest.mark.parametrize("bad", [dict(prompt_ids=()), dict(max_new_tokens=0), dict(temperature=-1),
                                 dict(top_p=0.0), dict(top_k=-1), dict(repetition_penalty=0),
                                 dict(seed=-1), dict(stop_ids=("a",))])
def test_bad_request_values_raise(bad):
    with pytest.raises(ValueError):
        E.EngineRequest(**{"prompt_ids": (1, 2), **bad})


def test_no_recompiles_after_warm_up(model):
    def batch(seed):
        return [E.EngineRequest(prompt_ids=prompt(n, seed + n), max_new_tokens=m, temperature=t, top_k=k,
                                top_p=p, seed=seed, stop_ids=(EOS,))
                for n, m, t, k, p in [(5, 7, 0.0, 0, 1.0), (20, 3, 0.7, 3, 0.9), (40, 9, 1.1, 0, 0.8)]]

    with E.Engine(model, max_batch=2, max_len=256, steps_per_sync=4) as engine:
        engine.warm_up([5, 20, 40])
        warm = engine.stats().compiles
        assert warm > 0 and engine.stats().finished == {} and engine.stats().tokens_generated == 0
        reqs = batch(0) + batch(1) + batch(2)
        results = run_concurrently(engine, reqs)
        assert engine.stats().compiles == warm
    assert [ids for ids, _ in results] == [solo(model, r) for r in reqs]


def test_engine_under_a_mesh(model):
    mesh = sharding.make_mesh("data=2,tensor=2", devices=jax.devices()[:4])
    with sharding.use(mesh):
        params = sharding.shard_params(model.params, CONFIG, mesh)
    sharded = type(model)(**{**model.__dict__, "params": params, "mesh": mesh})
    reqs = [E.EngineRequest(prompt_ids=prompt(n, n), max_new_tokens=6, stop_ids=(EOS,)) for n in (4, 19, 37)]
    with E.Engine(sharded, max_batch=2, max_len=256) as engine:
        results = run_concurrently(engine, reqs)
    assert [ids for ids, _ in results] == [solo(model, r) for r in reqs]


def test_32k_model_long_prompt_with_a_long_cache():
    """An ntkmixed (32K-family) model: a 1,100-token prompt prefilled in chunks of 512 into a cache
    of 2,048 slots per row (decode attention then reads the filled blocks only, `chunked_attention`)
    while a short request decodes; both equal their solo `generate`."""
    config = preset("tiny-32k")
    model = make_model(config)
    reqs = [E.EngineRequest(prompt_ids=prompt(1100, 7), max_new_tokens=8, stop_ids=(EOS,)),
            E.EngineRequest(prompt_ids=prompt(20, 8), max_new_tokens=24, stop_ids=(EOS,), temperature=0.8, seed=3)]
    with E.Engine(model, max_batch=2, max_len=2048, prefill_chunk=512, steps_per_sync=4) as engine:
        short = engine.submit(reqs[1])
        next(short.tokens(timeout=120))
        long = engine.submit(reqs[0])
        assert long.result(timeout=300) == solo(model, reqs[0])
        assert short.result(timeout=300) == solo(model, reqs[1])


# ------------------------------------------------------------------ int8 KV cache


def test_generate_with_an_int8_cache_gives_the_float_cache_greedy_tokens(model):
    prompts = [list(prompt(n, 40 + n)) for n in (5, 23, 47)]
    float_cache = G.generate(model, prompts, max_new_tokens=24)
    int8_cache = G.generate(model, prompts, max_new_tokens=24, kv_cache_dtype="int8")
    assert int8_cache.ids == float_cache.ids


def test_engine_with_an_int8_cache_equals_solo_generate_with_one():
    """Rows admitted (one while another runs), moved into a free row before them, and shifted right
    and left along the cache: the int8 buffers and their scales travel together."""
    model = make_model(CONFIG, seed=3)
    short = E.EngineRequest(prompt_ids=prompt(20, 61), max_new_tokens=12, stop_ids=(EOS,))  # row 0, ends first
    long = E.EngineRequest(prompt_ids=prompt(9, 62), max_new_tokens=40, stop_ids=(EOS,), temperature=0.9, seed=5)
    queued = E.EngineRequest(prompt_ids=prompt(5, 63), max_new_tokens=6, stop_ids=(EOS,))  # row 0 after `short`
    reqs = [short, long, queued]
    with E.Engine(model, max_batch=2, max_len=64, prefill_chunk=32, steps_per_sync=4,
                  kv_cache_dtype="int8") as engine:
        assert engine._state.cache.quantized
        handles = [engine.submit(short)]
        next(handles[0].tokens(timeout=120))  # `short` runs in row 0: `long` goes to row 1
        handles += [engine.submit(r) for r in reqs[1:]]
        results = [h.result(timeout=120) for h in handles]
        assert engine.shifts >= 2 and engine.moves >= 1, (engine.shifts, engine.moves)
    assert results == [solo(model, r, kv_cache_dtype="int8") for r in reqs]
    assert len(results[1]) == 40  # `long` ran to the end of the cache


def test_shifts_and_row_moves_carry_an_int8_caches_scales_with_its_values(model):
    """Engine._shift (roll along the slots) and move_row on an int8 cache: every slot's dequantized keys
    and values go where the float values would go (a scale left behind would pair a key with the
    scale of another slot)."""
    from bluelm_jax.attention import dequantize_kv, quantize_kv

    def dequantized(cache):  # [layers, 2 (k, v), batch, kv_heads, slots, head_dim] float32
        return np.stack([np.stack([dequantize_kv(k, ks, jnp.float32), dequantize_kv(v, vs, jnp.float32)])
                         for k, v, ks, vs in zip(cache.k, cache.v, cache.k_scale, cache.v_scale)])

    with E.Engine(model, max_batch=2, max_len=16, kv_cache_dtype="int8") as engine:
        rng = np.random.default_rng(0)

        def fill_shift_and_move():
            cache = engine._state.cache
            shape = cache.k[0].shape
            quantized = [[quantize_kv(jnp.asarray(rng.normal(size=shape) * rng.uniform(0.1, 5, shape[:3] + (1,)),
                                                  jnp.float32)) for _ in range(2)] for _ in cache.k]
            engine._state = engine._state._replace(cache=cache._replace(
                k=tuple(k[0] for k, _ in quantized), v=tuple(v[0] for _, v in quantized),
                k_scale=tuple(k[1] for k, _ in quantized), v_scale=tuple(v[1] for _, v in quantized)))
            before = dequantized(engine._state.cache)
            engine._shift(5)
            after_shift = dequantized(engine._state.cache)
            engine._state = E.move_row(engine._state, np.int32(1), np.int32(0))
            return before, after_shift, dequantized(engine._state.cache)

        out = {}
        engine._on_loop(lambda: out.update(zip(("before", "shifted", "moved"), fill_shift_and_move())))
    np.testing.assert_array_equal(out["shifted"], np.roll(out["before"], 5, axis=-2))
    np.testing.assert_array_equal(out["moved"][:, :, 0], out["shifted"][:, :, 1])


@pytest.mark.parametrize("value", ["fp8", "int4", 8, "INT8"])
def test_a_bad_kv_cache_dtype_is_one_clear_error(model, value):
    for make in (lambda: planning.GenerationSettings(kv_cache_dtype=value),
                 lambda: E.Engine(model, kv_cache_dtype=value)):
        with pytest.raises(ValueError, match="kv_cache_dtype must be one of auto, int8"):
            make()
