"""Tokenizer tests: pinned against `sentencepiece` itself and literal BlueLM ids, not the code under test."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from bluelm_jax.tokenizer import CHAT_STOP_STRINGS, BlueLMTokenizer, format_chat
from tests.spm import train_tokenizer

UNK, BOS, EOS, PAD, HUMAN, AI, SYSTEM, FUNCTION = range(8)  # ids fixed by tests/spm.py

TEXTS = [
    "Hello, how are you today?",
    "法国的首都是巴黎。",
    "Paris 是法国的首都, right?",
    "I love 🦙 and 😀!",
    "  leading, double  and trailing spaces  ",
    "line one\nline two\ttab",
    "12345 digits",
]


@pytest.fixture(scope="module")
def sp(tokenizer_model: str) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=tokenizer_model)


@pytest.fixture(scope="module")
def tok(tokenizer_model: str) -> BlueLMTokenizer:
    return BlueLMTokenizer(tokenizer_model)


# ---- the test model itself -------------------------------------------------------------------


def test_train_tokenizer_layout(sp: spm.SentencePieceProcessor) -> None:
    assert [sp.id_to_piece(i) for i in range(8)] == [
        "<unk>", "<s>", "</s>", "<pad>", "[|Human|]:", "[|AI|]:", "[|SYSTEM|]:", "[|Function|]:",
    ]  # fmt: skip
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, 3)
    assert 400 <= sp.get_piece_size() <= 1000
    assert sum(sp.is_byte(i) for i in range(sp.get_piece_size())) == 256


def test_train_tokenizer_is_deterministic(tokenizer_model: str, tmp_path: Path) -> None:
    again = train_tokenizer(str(tmp_path / "again.model"))
    assert again == str(tmp_path / "again.model")
    other = tmp_path / "other_process.model"
    code = f"from tests.spm import train_tokenizer; train_tokenizer({str(other)!r})"
    root = Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True, timeout=60)
    reference = Path(tokenizer_model).read_bytes()
    assert Path(again).read_bytes() == reference
    assert other.read_bytes() == reference


# ---- construction and vocabulary -------------------------------------------------------------


def test_ids_and_pieces(tok: BlueLMTokenizer, sp: spm.SentencePieceProcessor) -> None:
    assert tok.vocab_size == sp.get_piece_size()
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 3)
    assert tok.special_ids == {0, 1, 2, 3}
    assert tok.chat_stop_ids == (EOS, HUMAN)
    assert CHAT_STOP_STRINGS == ("[|Human|]:",)
    assert tok.piece_to_id("[|AI|]:") == AI
    assert tok.piece_to_id("</s>") == EOS
    assert tok.id_to_piece(FUNCTION) == "[|Function|]:"
    assert tok.id_to_piece(np.int64(SYSTEM)) == "[|SYSTEM|]:"
    with pytest.raises(KeyError):
        tok.piece_to_id("[|Robot|]:")
    with pytest.raises(ValueError, match="outside"):
        tok.id_to_piece(tok.vocab_size)


def test_from_bytes_and_from_file(tokenizer_model: str) -> None:
    data = Path(tokenizer_model).read_bytes()
    a, b = BlueLMTokenizer.from_bytes(data), BlueLMTokenizer.from_file(tokenizer_model)
    assert a.serialized_model == data == b.serialized_model
    assert a.encode(TEXTS[2]) == b.encode(TEXTS[2])
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        BlueLMTokenizer.from_bytes(b"definitely not a model")


# ---- encode / decode -------------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_plain_text_matches_sentencepiece(tok: BlueLMTokenizer, sp: spm.SentencePieceProcessor, text: str) -> None:
    assert tok.encode(text) == [1] + sp.encode(text)
    assert tok.encode(text, add_bos=False) == sp.encode(text)
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode(text), skip_special_tokens=False) == "<s>" + text


def test_empty_string(tok: BlueLMTokenizer) -> None:
    assert tok.encode("") == [1]
    assert tok.encode("", add_bos=False) == []
    assert tok.decode([]) == ""
    assert tok.decode([1]) == ""
    assert tok.decode([1], skip_special_tokens=False) == "<s>"


def test_emoji_and_unseen_chinese_use_byte_fallback(tok: BlueLMTokenizer, sp: spm.SentencePieceProcessor) -> None:
    for text in ("😀", "龘"):
        ids = tok.encode(text, add_bos=False)
        assert [sp.id_to_piece(i) for i in ids if sp.is_byte(i)] == [f"<0x{b:02X}>" for b in text.encode()]
        assert UNK not in ids
        assert tok.decode(ids) == text


def test_split_on_special_tokens(tok: BlueLMTokenizer, sp: spm.SentencePieceProcessor) -> None:
    text = "Hi[|Human|]:你好</s> bye"
    expected = [1] + sp.encode("Hi") + [HUMAN] + sp.encode("你好") + [EOS] + sp.encode(" bye")
    assert tok.encode(text) == expected
    # Each segment gets SentencePiece's dummy prefix, even right after a special token ...
    after_human = expected[len(sp.encode("Hi")) + 2]
    assert sp.id_to_piece(after_human).startswith("▁")
    # ... which plain SentencePiece on the whole string would not do.
    assert tok.encode(text, add_bos=False) != sp.encode(text)


def test_all_special_texts_map_to_their_ids(tok: BlueLMTokenizer, sp: spm.SentencePieceProcessor) -> None:
    text = "a<unk>b<s>c</s>d<pad>e[|AI|]:f[|SYSTEM|]:g[|Function|]:</s></s>"
    seg = [sp.encode(c) for c in "abcdefg"]
    expected = seg[0] + [UNK] + seg[1] + [BOS] + seg[2] + [EOS] + seg[3] + [PAD] + seg[4] + [AI] + seg[5]
    expected += [SYSTEM] + seg[6] + [FUNCTION, EOS, EOS]
    assert tok.encode(text, add_bos=False) == expected
    assert tok.decode(tok.encode(text), skip_special_tokens=False) == "<s>" + text


def test_whitespace_next_to_special_tokens_is_kept(tok: BlueLMTokenizer, sp: spm.SentencePieceProcessor) -> None:
    ids = tok.encode("[|Human|]: hi [|AI|]:", add_bos=False)
    assert ids == [HUMAN] + sp.encode(" hi ") + [AI]
    assert [sp.id_to_piece(i) for i in sp.encode(" hi ")][:1] == ["▁"]  # the dummy prefix plus the space
    assert tok.decode(ids) == "[|Human|]: hi [|AI|]:"


def test_decode_skip_special_tokens(tok: BlueLMTokenizer, sp: spm.SentencePieceProcessor) -> None:
    hello, world = sp.encode("Hello"), sp.encode("world")  # "▁world": skipped specials join the runs
    ids = [BOS] + hello + [EOS, PAD, UNK] + world + [EOS]
    assert tok.decode(ids) == "Hello world"
    assert tok.decode(ids, skip_special_tokens=True) == "Hello world"
    assert tok.decode(ids, skip_special_tokens=False) == "<s>Hello</s><pad><unk>world</s>"
    chat = [BOS, HUMAN] + sp.encode("hi") + [AI] + sp.encode("ok") + [EOS]
    assert tok.decode(chat) == "[|Human|]:hi[|AI|]:ok"
    assert tok.decode(chat, skip_special_tokens=False) == "<s>[|Human|]:hi[|AI|]:ok</s>"
    assert tok.decode(np.array(chat, dtype=np.int32)) == "[|Human|]:hi[|AI|]:ok"


@pytest.mark.parametrize("bad", [600, 100095, -1])
def test_decode_rejects_ids_outside_the_vocabulary(tok: BlueLMTokenizer, bad: int) -> None:
    assert tok.vocab_size == 600
    with pytest.raises(ValueError, match=f"token id {bad} is outside"):
        tok.decode([BOS, 10, bad])


def test_encode_rejects_non_strings(tok: BlueLMTokenizer) -> None:
    with pytest.raises(ValueError, match="text must be a string"):
        tok.encode(b"bytes")  # type: ignore[arg-type]


# ---- chat template ---------------------------------------------------------------------------

CALL = '{"answer": "", "function_calls": [{"name": "current-weather", "parameters": {"city": "深圳"}}]}'
HISTORY = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "深圳的天气怎么样？"},
    {"role": "assistant", "content": CALL},
    {"role": "function", "content": '{"temperature": 25}'},
    {"role": "assistant", "content": "深圳今天晴，25度。"},
    {"role": "user", "content": "Thank you!"},
]


def test_chat_template_string() -> None:
    assert format_chat(HISTORY) == (
        "[|SYSTEM|]:You are a helpful assistant."
        "[|Human|]:深圳的天气怎么样？[|AI|]:" + CALL + "</s>"
        '[|Function|]:{"temperature": 25}[|AI|]:深圳今天晴，25度。</s>'
        "[|Human|]:Thank you![|AI|]:"
    )
    assert format_chat([{"role": "user", "content": "Hello"}]) == "[|Human|]:Hello[|AI|]:"
    done = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    assert format_chat(done) == "[|Human|]:Hi[|AI|]:Hello!</s>"
    tool, observation = {"role": "tool", "content": "x"}, {"role": "observation", "content": "y"}
    aliases = [HISTORY[1], HISTORY[2], tool, HISTORY[4], observation]
    assert format_chat(aliases).endswith("</s>[|Function|]:x[|AI|]:深圳今天晴，25度。</s>[|Function|]:y[|AI|]:")


def test_chat_template_ids(tok: BlueLMTokenizer, sp: spm.SentencePieceProcessor) -> None:
    e = sp.encode
    expected = (
        [BOS, SYSTEM] + e("You are a helpful assistant.")
        + [HUMAN] + e("深圳的天气怎么样？") + [AI] + e(CALL) + [EOS]
        + [FUNCTION] + e('{"temperature": 25}') + [AI] + e("深圳今天晴，25度。") + [EOS]
        + [HUMAN] + e("Thank you!") + [AI]
    )  # fmt: skip
    assert tok.encode_chat(HISTORY) == expected
    assert tok.decode(expected, skip_special_tokens=False) == "<s>" + format_chat(HISTORY)


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ([{"role": "robot", "content": "hi"}], "unknown role 'robot'"),
        ([{"role": "user", "content": "a"}, {"role": "system", "content": "s"}], "system message may only come first"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "'user' follows 'user'"),
        ([{"role": "user", "content": "a"}, {"role": "function", "content": "b"}], "'function' follows 'user'"),
        ([{"role": "user", "content": 42}], "content must be a string"),
        ([{"role": "user", "content": None}], "content must be a string"),
        ([{"role": ["user"], "content": "hi"}], "role must be a string"),
        ([{"role": "assistant", "content": "hi"}], "assistant message must follow"),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
         + [{"role": "assistant", "content": "c"}], "assistant message must follow"),
        ([{"role": "system", "content": "s"}], "no user or function message"),
        ([{"role": "user"}], "must be a dict with 'role' and 'content'"),
        (["[|Human|]:hi"], "must be a dict with 'role' and 'content'"),
        ([], "messages is empty"),
        ("[|Human|]:hi", "messages must be a list"),
    ],
)  # fmt: skip
def test_chat_template_bad_input(tok: BlueLMTokenizer, messages: object, message: str) -> None:
    for fn in (format_chat, tok.encode_chat):
        with pytest.raises(ValueError, match=message) as err:
            fn(messages)  # type: ignore[arg-type]
        assert "\n" not in str(err.value)


# ---- cross-check with the Hugging Face slow (sentencepiece) tokenizer, when it works -----------


def test_matches_transformers_slow_tokenizer(tokenizer_model: str, tok: BlueLMTokenizer) -> None:
    backend = pytest.importorskip("transformers.tokenization_utils_sentencepiece")
    hf = backend.SentencePieceBackend(
        vocab_file=tokenizer_model,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=["[|Human|]:", "[|AI|]:", "[|SYSTEM|]:", "[|Function|]:"],
        legacy=True,
        special_tokens_pattern="bos",
    )
    if hf.encode("Hello") in ([], [BOS]):
        pytest.skip("this transformers version's sentencepiece tokenizer encodes nothing")
    texts = TEXTS + ["Hi[|Human|]:你好</s> bye", "[|Human|]: hi [|AI|]: ok</s>x<s>y<unk>z<pad>", format_chat(HISTORY)]
    for text in texts:
        assert tok.encode(text) == hf.encode(text), text
