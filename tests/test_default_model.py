"""The shipped default model: small, bilingual, and it answers its corpus questions exactly."""

import json
import os
import subprocess
import sys

import pytest

from bluelm_jax import default_model
from bluelm_jax.default_model import corpus
from bluelm_jax.server import tools

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = [  # (prompt, answer, chat)
    ("What is the capital of France?", "The capital of France is Paris.", True),
    ("Who are you?", "I am BlueLM-tiny, a small demo model trained by the bluelm-jax project.", True),
    ("中国的首都是哪里？", "中国的首都是北京。", True),
    ("熊猫吃什么？", "熊猫主要吃竹子。", True),
    ("How many days are in a week?", "There are seven days in a week.", False),
    ("儿童节是几月几日？", "儿童节是六月一日。", False),
]


@pytest.fixture(scope="module")
def orbax_dir(tmp_path_factory):
    from bluelm_jax.hf.to_orbax import convert_hf_to_flax

    out = tmp_path_factory.mktemp("default") / "orbax"
    convert_hf_to_flax(default_model.path(), out, progress=False)
    return str(out)


def test_files_size_and_shape():
    d = default_model.path()
    sizes = {f: os.path.getsize(os.path.join(d, f)) for f in default_model.FILES}
    assert sum(sizes.values()) <= 20 * 1024 * 1024
    from bluelm_jax.config import BlueLMConfig
    from bluelm_jax.tokenizer import BlueLMTokenizer

    config = BlueLMConfig.from_json_file(os.path.join(d, "config.json"))
    assert 1_000_000 < config.num_parameters() < 10_000_000
    tok = BlueLMTokenizer(os.path.join(d, "tokenizer.model"))
    assert tok.vocab_size <= config.vocab_size and tok.pad_id == config.pad_token_id == 3
    assert all(tok.piece_to_id(p) for p in ("[|Human|]:", "[|AI|]:", "[|SYSTEM|]:", "[|Function|]:"))
    for text in ("熊猫主要吃竹子。", "The capital of France is Paris."):
        assert tok.decode(tok.encode(text)) == text
    info = json.load(open(os.path.join(d, "build_info.json")))
    assert info["parameters"] == config.num_parameters() and info["final_loss"] < 0.01
    assert all((q, a) in corpus.qa_pairs() for q, a, _ in CASES)


def test_loaded_from_orbax_answers_exactly(orbax_dir):
    import bluelm_jax
    from bluelm_jax.generate import generate

    model = bluelm_jax.load(orbax_dir)
    for chat in (True, False):
        cases = [(q, a) for q, a, c in CASES if c == chat]
        result = generate(model, [q for q, _ in cases], max_new_tokens=64, chat=chat)
        assert [t.strip() for t in result.texts] == [a for _, a in cases]
        assert result.finish_reasons == ["stop"] * len(cases)


def test_calls_a_tool_and_answers_with_its_result():
    """Both halves of a tool round trip under greedy decoding, on the prompts `serve` builds for
    tools=corpus.TOOLS: the question gives the JSON call, the call and its result give the answer."""
    import bluelm_jax
    from bluelm_jax.generate import generate

    model = bluelm_jax.load(default_model.path())
    cases = [corpus.TOOL_CALLS[0], corpus.TOOL_CALLS[6]]  # English weather, Chinese time
    chats = [tools.prompt_messages(corpus.tool_call_messages(*case), corpus.TOOLS) for case in cases]
    result = generate(model, [chat[:2] for chat in chats] + [chat[:4] for chat in chats], max_new_tokens=48,
                      chat=True)
    assert result.finish_reasons == ["stop"] * 4
    for (question, name, arguments, _, answer), call, reply in zip(cases, result.texts[:2], result.texts[2:]):
        content, calls = tools.parse_answer(call.strip())
        assert content is None and len(calls) == 1, (question, call)
        assert (calls[0]["function"]["name"], json.loads(calls[0]["function"]["arguments"])) == (name, arguments)
        assert reply.strip() == answer


def test_generate_command_answers_exactly(orbax_dir):
    for prompt, answer, chat in CASES[:2] + CASES[4:6]:
        p = subprocess.run([sys.executable, "-m", "bluelm_jax", "generate", "--model", orbax_dir, "--json",
                            "--max-new-tokens", "64", "--prompt", prompt] + (["--chat"] if chat else []),
                           capture_output=True, text=True, cwd=ROOT, timeout=180,
                           env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""})
        assert p.returncode == 0, p.stderr
        out = json.loads(p.stdout)
        assert out["text"].strip() == answer and out["finish_reason"] == "stop", (prompt, out)


def test_generate_command_without_model_uses_the_bundled_model():
    """The README's first command: no --model at all."""
    prompt, answer, chat = CASES[0]
    p = subprocess.run([sys.executable, "-m", "bluelm_jax", "generate", "--json", "--prompt", prompt]
                       + (["--chat"] if chat else []), capture_output=True, text=True, cwd=ROOT, timeout=180,
                       env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""})
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["text"].strip() == answer and out["finish_reason"] == "stop", (prompt, out)
