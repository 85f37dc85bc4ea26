"""The generate and chat commands, run as a user runs them: a subprocess (chat through stdin)."""

import json
import os
import subprocess
import sys

import pytest

import bluelm_jax
from bluelm_jax import cli
from bluelm_jax import generate as G
from bluelm_jax.config import preset
from tests.hf_reference import write_hf_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = preset("tiny").replace(vocab_size=640)  # room for the test tokenizer's 600 pieces


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer_model):
    return write_hf_checkpoint(str(tmp_path_factory.mktemp("cli-hf")), CONFIG, tokenizer_model, seed=1)


@pytest.fixture(scope="module")
def model(checkpoint):
    return bluelm_jax.load(checkpoint)


def run(*args, stdin=None, timeout=120):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "bluelm_jax", *args], input=stdin, capture_output=True,
                          text=True, encoding="utf-8", cwd=ROOT, env=env, timeout=timeout)


# 8 simulated CPU devices (conftest); a mesh of 4 takes the first 4 devices, with a notice
@pytest.mark.parametrize("mesh", [[], ["--mesh", "data=2,tensor=4"], ["--mesh", "data=1,tensor=4"]])
def test_generate_json_matches_the_python_api(checkpoint, model, mesh):
    p = run("generate", "--model", checkpoint, "--prompt", "Hello, how are you", "--max-new-tokens", "12", "--json",
            *mesh)
    assert p.returncode == 0, p.stderr
    notice = "note: mesh data=1,tensor=4 uses the first 4 of the 8 devices\n" if "data=1,tensor=4" in mesh else ""
    assert p.stderr == notice
    out = json.loads(p.stdout)
    r = G.generate(model, "Hello, how are you", max_new_tokens=12)
    assert out == {"text": r.texts[0], "ids": r.ids[0], "finish_reason": "length", "prompt_ids": r.prompt_ids[0]}
    assert len(out["ids"]) == 12


def test_generate_chat_streams_the_answer(checkpoint, model):
    args = ["--temperature", "0.8", "--top-p", "0.8", "--top-k", "50", "--repetition-penalty", "1.1", "--seed", "3"]
    p = run("generate", "--model", checkpoint, "--prompt", "你好", "--chat", "--max-new-tokens", "16", *args)
    assert p.returncode == 0, p.stderr
    r = G.generate(model, "你好", chat=True, max_new_tokens=16, temperature=0.8, top_p=0.8, top_k=50,
                   repetition_penalty=1.1, seed=3)
    assert p.stdout == r.texts[0] + "\n"
    assert r.prompt_ids[0] == model.tokenizer.encode("[|Human|]:你好[|AI|]:")


def test_chat_through_stdin(checkpoint, model):
    p = run("chat", "--model", checkpoint, "--temperature", "0", "--max-new-tokens", "10",
            stdin="Hello\n你好\n\nclear\nHello\nquit\nnever read\n")
    assert p.returncode == 0, p.stderr

    def answer(messages):
        return G.generate(model, messages, chat=True, max_new_tokens=10, temperature=0.0,
                          repetition_penalty=1.1).texts[0]

    first = answer([{"role": "user", "content": "Hello"}])
    second = answer([{"role": "user", "content": "Hello"}, {"role": "assistant", "content": first},
                     {"role": "user", "content": "你好"}])
    alone = answer([{"role": "user", "content": "你好"}])
    assert second != alone  # the history changes the answer: the check below can fail
    U, B = cli.USER_PROMPT, cli.BOT_PROMPT
    expected = (f"{cli.BANNER}\n{U}{B}{first}\n{U}{B}{second}\n{U}{U}{cli.CLEARED}\n{U}{B}{first}\n{U}")
    assert p.stdout == expected


def test_bad_input_gives_one_line_and_nonzero_exit(checkpoint, tmp_path):
    cases = [
        ("generate", "--model", str(tmp_path / "missing"), "--prompt", "hi"),
        ("generate", "--model", checkpoint, "--prompt", "hi", "--temperature", "-1"),
        ("generate", "--model", checkpoint, "--prompt", "hi", "--max-new-tokens", "zero"),
        ("generate", "--model", checkpoint, "--prompt", "hi", "--top-p", "1.5"),
        ("generate", "--model", checkpoint),  # no prompt
        ("generate", "--model", checkpoint, "--prompt", "hi", "--system", "be brief"),
        ("generate", "--model", checkpoint, "--prompt", "hi", "--mesh", "data=16"),  # 8 devices
        ("generate", "--model", checkpoint, "--prompt", "hi", "--kv-cache-dtype", "fp8"),
        ("chat", "--model", checkpoint, "--kv-cache-dtype", "int4"),
        ("serve", "--kv-cache-dtype", "bf16"),
        ("chat", "--model", str(tmp_path)),
        ("perplexity", "--model", checkpoint, "--file", str(tmp_path / "missing.txt")),
        ("perplexity", "--model", checkpoint, "--file", str(tmp_path), "--window", "0"),
        ("frobnicate",),
        (),
    ]
    for args in cases:
        p = run(*args)
        assert p.returncode != 0, args
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and "error" in lines[0], (args, p.stderr)
        assert p.stdout == ""


def test_generate_with_int8_weights_and_an_int8_kv_cache(checkpoint):
    p = run("generate", "--model", checkpoint, "--prompt", "Hello, how are you", "--max-new-tokens", "12", "--json",
            "--kv-cache-dtype", "int8", "--quantize", "int8")
    assert p.returncode == 0, p.stderr
    quantized = bluelm_jax.load(checkpoint, quantize="int8")
    r = G.generate(quantized, "Hello, how are you", max_new_tokens=12, kv_cache_dtype="int8")
    assert json.loads(p.stdout)["ids"] == r.ids[0]


def test_the_kv_cache_dtype_reaches_generate_chat_and_the_engine(monkeypatch):
    parser = cli.build_parser()
    for command in (["generate", "--prompt", "hi"], ["chat"]):
        assert cli._sampling_kwargs(parser.parse_args(command))["kv_cache_dtype"] == "auto"
        args = parser.parse_args(command + ["--kv-cache-dtype", "int8"])
        assert cli._sampling_kwargs(args)["kv_cache_dtype"] == "int8"  # the GenerationSettings of both
    assert parser.parse_args(["serve"]).kv_cache_dtype == "auto"
    args = parser.parse_args(["serve", "--kv-cache-dtype", "int8"])

    from bluelm_jax import engine
    from bluelm_jax.server import serve

    class Started(Exception):
        pass

    def engine_of(model, **kwargs):
        raise Started(kwargs)

    monkeypatch.setattr(engine, "Engine", engine_of)
    with pytest.raises(Started) as started:
        serve._serve(args, lambda args: (object(), None), "name", sock=None)
    assert started.value.args[0]["kv_cache_dtype"] == "int8"


def test_help():
    for args in [("--help",), ("generate", "--help"), ("chat", "--help")]:
        p = run(*args)
        assert p.returncode == 0 and "usage" in p.stdout
    p = run("generate", "--help")
    for flag in ("--model", "--prompt", "--chat", "--max-new-tokens", "--temperature", "--top-p", "--top-k",
                 "--repetition-penalty", "--seed", "--json"):
        assert flag in p.stdout


def test_generate_says_when_the_context_is_full(tmp_path, tokenizer_model):
    """Plain (non-JSON) generate reports on stderr that the output stopped at the end of the context."""
    small = write_hf_checkpoint(str(tmp_path / "hf"), CONFIG.replace(max_position_embeddings=48), tokenizer_model,
                                seed=1)
    p = run("generate", "--model", small, "--prompt", "Hello, how are you", "--max-new-tokens", "1000000")
    assert p.returncode == 0, p.stderr
    n_prompt = len(bluelm_jax.load(small).tokenizer.encode("Hello, how are you"))
    assert p.stderr == f"(stopped: the context of 48 tokens is full: {n_prompt} prompt + {48 - n_prompt} generated)\n"
    short = run("generate", "--model", small, "--prompt", "Hello, how are you", "--max-new-tokens", "3")
    assert short.returncode == 0 and short.stderr == ""


@pytest.mark.parametrize("error, status, line", [
    (ValueError("config.json: required field(s) missing: vocab_size"), 1,
     "config.json: required field(s) missing: vocab_size"),
    (FileNotFoundError(2, "No such file or directory", "/nowhere/tokenizer.model"), 1,
     "/nowhere/tokenizer.model: No such file or directory"),
    (cli.UsageError("the prompt is empty"), 2, "the prompt is empty"),
    (TypeError("unsupported operand"), 1, "internal error (TypeError: unsupported operand)"),
])
def test_errors_are_one_line_and_bugs_are_not_passed_off_as_bad_input(monkeypatch, capsys, error, status, line):
    def fail(args):
        raise error

    monkeypatch.setattr(cli, "_load", fail)
    assert cli.main(["generate", "--prompt", "hi"]) == status
    captured = capsys.readouterr()
    assert captured.err == f"python -m bluelm_jax generate: error: {line}\n" and captured.out == ""


def test_perplexity_of_a_file(checkpoint, model, tmp_path):
    text = "The quick brown fox jumps over the lazy dog. 熊猫主要吃竹子。" * 3
    (tmp_path / "doc.txt").write_text(text, encoding="utf-8")
    p = run("perplexity", "--model", checkpoint, "--file", str(tmp_path / "doc.txt"), "--window", "32",
            "--stride", "16", "--json")
    assert p.returncode == 0, p.stderr
    from bluelm_jax import scoring

    expected = scoring.loglikelihood_rolling(model, text, window=32, stride=16)
    got = json.loads(p.stdout)
    assert got["tokens"] == expected.tokens and abs(got["perplexity"] - expected.perplexity) < 1e-3 * expected.perplexity
