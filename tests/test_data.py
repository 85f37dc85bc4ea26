"""Fine-tuning data: the BlueLM recipe (prompt masked), chat lists, bucketing, resumable order, bad data."""

import json
import os
import threading

import numpy as np
import pytest

from bluelm_jax import data as D
from bluelm_jax.tokenizer import BlueLMTokenizer


@pytest.fixture(scope="module")
def tok(tokenizer_model):
    return BlueLMTokenizer(tokenizer_model)


def write_lines(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in records),
                    encoding="utf-8")
    return str(path)


def test_prompt_response_recipe_masks_prompt(tok):
    ex = D.encode_record({"prompt": "What is the capital of France?", "response": "Paris."}, tok)
    prompt, response = tok.encode("What is the capital of France?", False), tok.encode("Paris.", False)
    assert ex.tokens.tolist() == [tok.bos_id] + prompt + response + [tok.eos_id]
    assert ex.is_target.tolist() == [False] * (1 + len(prompt)) + [True] * (len(response) + 1)


def test_template_and_field_names(tok):
    fmt = D.DataFormat(prompt_field="q", response_field="a", prompt_template="[|Human|]:{prompt}[|AI|]:")
    ex = D.encode_record({"q": "你好", "a": "你好！"}, tok, fmt)
    assert ex.tokens.tolist() == tok.encode("[|Human|]:你好[|AI|]:你好！</s>")
    n_answer = len(tok.encode("你好！", False)) + 1
    assert ex.is_target.sum() == n_answer and ex.is_target[-n_answer:].all()


def test_chat_messages_follow_template_and_train_every_answer(tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": "Hi!"}, {"role": "user", "content": "法国的首都是哪里？"},
            {"role": "assistant", "content": "巴黎。"}]
    ex = D.encode_record({"messages": msgs}, tok)
    assert ex.tokens.tolist() == tok.encode_chat(msgs)
    targets = ex.tokens[ex.is_target].tolist()
    assert targets == tok.encode("Hi!", False) + [tok.eos_id] + tok.encode("巴黎。", False) + [tok.eos_id]


def test_load_jsonl_and_json_array(tok, tmp_path):
    recs = [{"prompt": f"q{i}", "response": f"answer {i}"} for i in range(5)]
    ds = D.load_dataset(write_lines(tmp_path / "a.jsonl", recs), tok, 64)
    (tmp_path / "b.json").write_text(json.dumps(recs, indent=2))
    ds2 = D.load_dataset(str(tmp_path / "b.json"), tok, 64)
    assert len(ds.examples) == len(ds2.examples) == 5
    assert all((a.tokens == b.tokens).all() for a, b in zip(ds.examples, ds2.examples))
    assert ds.examples[2].source.endswith("a.jsonl:3") and ds2.examples[2].source.endswith("b.json:10")  # "[", then 4 lines per item


@pytest.mark.parametrize("lines, message", [
    ([{"prompt": "a", "response": "b"}, {"prompt": "only a prompt"}], r"x\.jsonl:2: missing field 'response'"),
    ([{"prompt": "a", "response": "b"}, "{not json"], r"x\.jsonl:2: not valid JSON"),
    ([{"prompt": "a", "response": "b"}, "", {"prompt": "a", "response": "b " * 200}],
     r"x\.jsonl:3: sample has \d+ tokens, longer than seq_len 32"),
    ([{"prompt": 3, "response": "b"}], r"x\.jsonl:1: field 'prompt' must be a string"),
    ([{"messages": [{"role": "user", "content": "hi"}]}], r"x\.jsonl:1: 'messages' must end with an assistant"),
    ([["a list"]], r"x\.jsonl:1: expected a JSON object"),
])
def test_bad_data_names_file_and_line(tok, tmp_path, lines, message):
    with pytest.raises(D.DataError, match=message):
        D.load_dataset(write_lines(tmp_path / "x.jsonl", lines), tok, 32)


def test_empty_and_missing_files(tok, tmp_path):
    (tmp_path / "e.jsonl").write_text("\n  \n")
    with pytest.raises(D.DataError, match=r"e\.jsonl: empty file"):
        D.load_dataset(str(tmp_path / "e.jsonl"), tok, 32)
    with pytest.raises(D.DataError, match=r"nope\.jsonl: no such file"):
        D.load_dataset(str(tmp_path / "nope.jsonl"), tok, 32)
    (tmp_path / "bad.json").write_text('[{"prompt": "a", "response": "b"},\n {"prompt": ]')
    with pytest.raises(D.DataError, match=r"bad\.json:2: not valid JSON"):
        D.load_dataset(str(tmp_path / "bad.json"), tok, 32)


def test_files_that_cannot_hold_records(tok, tmp_path):
    """A device such as /dev/null exists but is no data file; a directory neither; a pipe is read."""
    with pytest.raises(D.DataError, match=r"^/dev/null: not a regular file but a device, so it holds no training"):
        D.load_dataset("/dev/null", tok, 32)
    with pytest.raises(D.DataError, match=r"is a directory, expected a JSON or JSON-lines file"):
        D.load_dataset(str(tmp_path), tok, 32)
    (tmp_path / "zero.jsonl").write_bytes(b"")
    with pytest.raises(D.DataError, match=r"zero\.jsonl: empty file"):
        D.check_data_file(str(tmp_path / "zero.jsonl"))
    pipe = tmp_path / "pipe.jsonl"
    os.mkfifo(pipe)
    writer = threading.Thread(target=lambda: pipe.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n"))
    writer.start()
    assert len(D.load_dataset(str(pipe), tok, 32).examples) == 1
    writer.join()


def test_skip_bad_counts_and_keeps_good(tok, tmp_path):
    lines = [{"prompt": "a", "response": "b"}, "oops", {"prompt": "x"}, {"prompt": "c", "response": "d " * 100},
             {"prompt": "e", "response": "f"}]
    ds = D.load_dataset(write_lines(tmp_path / "s.jsonl", lines), tok, 32, skip_bad=True)
    assert len(ds.examples) == 2 and len(ds.skipped) == 3
    assert [s.split(": ")[0].rsplit(":", 1)[1] for s in ds.skipped] == ["2", "3", "4"]
    with pytest.raises(D.DataError, match=r"no usable records \(1 skipped\)"):
        D.load_dataset(write_lines(tmp_path / "t.jsonl", ["nope"]), tok, 32, skip_bad=True)


def test_batches_bucket_pad_and_shift(tok, tmp_path):
    recs = [{"prompt": "p" * (i % 7), "response": "r " * (1 + i % 13)} for i in range(40)]
    ds = D.load_dataset(write_lines(tmp_path / "d.jsonl", recs), tok, 64)
    seen = 0
    for _, b in D.batches(ds, 8, 64, 3, seed=1, epochs=1):
        width = b.inputs.shape[1]
        assert b.inputs.shape == b.targets.shape == b.weights.shape == (8, width) and width in (16, 32, 64)
        lengths = (b.inputs != 3).sum(1)
        assert width == D.bucket_width(int(lengths.max()), 64)  # the smallest bucket that holds the batch
        assert (b.inputs[:, 1:][b.inputs[:, 1:] != 3] == b.targets[:, :-1][b.inputs[:, 1:] != 3]).all()
        assert (b.weights[b.inputs == 3] == 0).all()
        seen += int((lengths > 0).sum())
    assert seen == 40  # one epoch covers every example once
    total = sum(float(b.weights.sum()) for _, b in D.batches(ds, 8, 64, 3, seed=1, epochs=1))
    assert total == ds.num_target_tokens


def test_order_is_deterministic_and_resumable(tok, tmp_path):
    recs = [{"prompt": str(i), "response": "x " * (i % 5 + 1)} for i in range(30)]
    ds = D.load_dataset(write_lines(tmp_path / "o.jsonl", recs), tok, 64)
    full = list(zip(range(9), D.batches(ds, 4, 64, 3, seed=7)))
    pos_after_4 = full[3][1][0]
    resumed = list(zip(range(5), D.batches(ds, 4, 64, 3, seed=7, start=pos_after_4)))
    for (_, (pa, a)), (_, (pb, b)) in zip(full[4:], resumed):
        assert pa == pb and (a.inputs == b.inputs).all() and (a.weights == b.weights).all()
    other = next(D.batches(ds, 4, 64, 3, seed=8))[1]
    assert not np.array_equal(other.inputs, full[0][1][1].inputs) or other.inputs.shape != full[0][1][1].inputs.shape
