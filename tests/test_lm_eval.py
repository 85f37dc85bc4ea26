"""The lm-evaluation-harness model (bluelm_jax/lm_eval_model.py) and `python -m bluelm_jax eval`, offline:
a multiple-choice task in C-Eval's format written by the test, run on the default model, and scored
against the option log-likelihoods computed here with scoring.loglikelihood."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from bluelm_jax import cli, default_model, scoring  # noqa: E402
from bluelm_jax.default_model import corpus  # noqa: E402
from bluelm_jax.lm_eval_model import BlueLMJax  # noqa: E402
from tests import server_process  # noqa: E402

LETTERS = "ABCD"
QUESTIONS = range(5, 11)  # six of the default model's corpus questions
CEVAL_TEXT = "{{question}}\nA. {{A}}\nB. {{B}}\nC. {{C}}\nD. {{D}}\n答案："  # C-Eval's prompt


def _docs() -> list[dict]:
    """C-Eval records: each question's right answer at a rotating letter among three other questions' answers."""
    pairs = corpus.qa_pairs()
    docs = []
    for k, i in enumerate(QUESTIONS):
        question, right = pairs[i]
        options = [pairs[(i + j) % len(pairs)][1] for j in (1, 2, 3)]
        options.insert(k % 4, right)
        docs.append({"question": question, **dict(zip(LETTERS, options)), "answer": LETTERS[k % 4]})
    return docs


def _task_yaml(name: str, data: str, cache: str, doc_to_text: str, doc_to_choice: str) -> str:
    return "\n".join([
        f"task: {name}",
        "dataset_path: json",
        f"dataset_kwargs: {{data_files: {{test: {json.dumps(data)}}}, cache_dir: {json.dumps(cache)}}}",
        "test_split: test",
        "output_type: multiple_choice",
        f"doc_to_text: {json.dumps(doc_to_text)}",
        f"doc_to_choice: {json.dumps(doc_to_choice)}",
        "doc_to_target: \"{{['A', 'B', 'C', 'D'].index(answer)}}\"",
        "metric_list:",
        "  - metric: acc",
        "    higher_is_better: true",
        ""])


@pytest.fixture(scope="module")
def lm():
    return BlueLMJax(batch_size=4)


@pytest.fixture
def task_dir(tmp_path, monkeypatch):
    """Two tasks over one JSONL file: C-Eval's prompt with the letters as choices, and the bare question
    with the option texts as choices."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = tmp_path / "tiny_ceval.jsonl"
    data.write_text("".join(json.dumps(doc, ensure_ascii=False) + "\n" for doc in _docs()), encoding="utf-8")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    cache = str(tmp_path / "hf_cache")
    (tasks / "letters.yaml").write_text(
        _task_yaml("tiny_ceval_letters", str(data), cache, CEVAL_TEXT, "{{['A', 'B', 'C', 'D']}}"), encoding="utf-8")
    (tasks / "texts.yaml").write_text(
        _task_yaml("tiny_ceval_texts", str(data), cache, "{{question}}", "{{[A, B, C, D]}}"), encoding="utf-8")
    return tasks


def _expected(model, prompt, choices: list[str]) -> tuple[list[list[float]], float]:
    """(each doc's four option log-likelihoods, the accuracy of their argmax), computed directly."""
    logprobs, right = [], []
    for doc in _docs():
        context = prompt(doc)
        scores = scoring.loglikelihood(model, [(context, " " + choice) for choice in choices(doc)])
        logprobs.append([s.logprob for s in scores])
        right.append(int(np.argmax(logprobs[-1])) == LETTERS.index(doc["answer"]))
    return logprobs, float(np.mean(right))


EXPECTED = {
    "tiny_ceval_letters": (lambda d: CEVAL_TEXT.replace("{{question}}", d["question"])
                           .replace("{{A}}", d["A"]).replace("{{B}}", d["B"])
                           .replace("{{C}}", d["C"]).replace("{{D}}", d["D"]),
                           lambda d: list(LETTERS)),
    "tiny_ceval_texts": (lambda d: d["question"], lambda d: [d[x] for x in LETTERS]),
}


def _evaluate(task_dir, **model) -> dict:
    """simple_evaluate's results (samples logged) for both tiny tasks, zero-shot."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(**model, tasks=sorted(EXPECTED), num_fewshot=0,
                                   task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
                                   log_samples=True)


def _assert_scores_are_the_models(results: dict, model, atol: float) -> None:
    """Each task's accuracy exactly, and each option's log-likelihood within atol, as computed directly."""
    for task, (prompt, choices) in EXPECTED.items():
        logprobs, accuracy = _expected(model, prompt, choices)
        assert results["results"][task]["acc,none"] == accuracy, task
        samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
        found = [[float(r[0]) for r in s["filtered_resps"]] for s in samples]
        np.testing.assert_allclose(found, logprobs, atol=atol, err_msg=task)
    # the texts task is the corpus's own question -> answer: the default model knows every one
    assert results["results"]["tiny_ceval_texts"]["acc,none"] == 1.0


def test_multiple_choice_accuracy_is_the_argmax_of_the_option_loglikelihoods(lm, task_dir):
    _assert_scores_are_the_models(_evaluate(task_dir, model=lm), lm.model, atol=1e-5)


@pytest.fixture(scope="module")
def default_server(tmp_path_factory):
    server = server_process.default_server(tmp_path_factory.mktemp("log") / "default.log")
    yield server
    server.stop()


def local_completions_args(url: str) -> str:
    """The harness's `local-completions` model_args for the server at url on the default model: token-id
    prompts (`<s>` first, as BlueLMJax scores them) from the default model's tokenizer_config.json."""
    return (f"model=bluelm-default,base_url={url}/v1/completions,tokenizer_backend=huggingface,"
            f"tokenizer={default_model.path()},add_bos_token=True,max_length=512")


def test_local_completions_against_the_server_scores_as_the_in_process_model(lm, default_server, task_dir):
    results = _evaluate(task_dir, model="local-completions",
                        model_args=local_completions_args(default_server.url) + ",batch_size=8,max_retries=1")
    _assert_scores_are_the_models(results, lm.model, atol=1e-4)


def test_generate_until_stops_before_the_until_string(lm):
    from bluelm_jax.generate import generate

    question = "What is the capital of France?"
    full = generate(lm.model, question, max_new_tokens=16).texts[0]
    assert "Paris" in full
    requests = [Instance("generate_until", {}, (question, {"until": ["Paris"], "max_gen_toks": 16}), 0),
                Instance("generate_until", {}, (question, {"until": ["\n\n"], "max_gen_toks": 3}), 1),
                Instance("generate_until", {}, (question, {"until": "France", "max_gen_toks": 16}), 2)]
    stopped, short, by_string = lm.generate_until(requests)
    assert stopped == full[:full.index("Paris")]
    assert short == generate(lm.model, question, max_new_tokens=3).texts[0]
    assert by_string == full[:full.index("France")]


def test_generate_until_uses_the_kv_cache_dtype(lm, monkeypatch):
    from bluelm_jax import generate as generate_module

    question = "What is the capital of France?"
    int8 = generate_module.generate(lm.model, question, max_new_tokens=8, kv_cache_dtype="int8").texts[0]
    caches = []

    def recording(model, prompts, **settings):
        caches.append(settings.get("kv_cache_dtype"))
        return real(model, prompts, **settings)

    real = generate_module.generate
    monkeypatch.setattr(generate_module, "generate", recording)
    quantized = BlueLMJax(model=lm.model, kv_cache_dtype="int8")
    (found,) = quantized.generate_until([Instance("generate_until", {}, (question, {"max_gen_toks": 8}), 0)])
    assert found == int8 and caches == ["int8"]
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of auto, int8"):
        BlueLMJax(model=lm.model, kv_cache_dtype="int4")


def test_loglikelihood_rolling_is_the_documents_summed_logprob(lm):
    text = "The capital of Japan is Tokyo. There are seven days in a week."
    (found,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    assert found == pytest.approx(scoring.loglikelihood_rolling(lm.model, text).logprob, abs=1e-6)
    chosen, _ = scoring.token_logprobs(lm.model, [lm.model.tokenizer.encode(text, add_bos=True)])[0]
    assert found == pytest.approx(float(np.sum(chosen, dtype=np.float64)), abs=1e-4)


def test_rows_longer_than_max_length_keep_their_last_tokens(lm):
    short = BlueLMJax(model=lm.model, max_length=8)
    context, continuation = "What is the capital of France? The capital of France is", " Paris."
    context_ids, continuation_ids = scoring.encode_pair(lm.model, context, continuation)
    assert len(context_ids) + len(continuation_ids) > 8
    (found,) = short.loglikelihood([Instance("loglikelihood", {}, (context, continuation), 0)])
    (cut,) = scoring.loglikelihood(lm.model, [(context_ids[-(8 - len(continuation_ids)):], continuation_ids)])
    (whole,) = scoring.loglikelihood(lm.model, [(context, continuation)])
    assert found == (cut.logprob, cut.is_greedy) and found[0] != whole.logprob
    with pytest.raises(ValueError, match="max_length"):
        BlueLMJax(model=lm.model, max_length=lm.model.config.context_length + 1)


def test_eval_command_prints_the_table_and_writes_the_results(task_dir, tmp_path, capsys):
    out = tmp_path / "results.json"
    status = cli.main(["eval", "--tasks", "tiny_ceval_texts", "--include-path", str(task_dir), "--num-fewshot", "0",
                       "--limit", "3", "--output-path", str(out)])
    printed = capsys.readouterr()
    assert status == 0, printed.err
    assert "tiny_ceval_texts" in printed.out and "acc" in printed.out
    assert json.loads(out.read_text())["results"]["tiny_ceval_texts"]["acc,none"] == 1.0


@pytest.mark.parametrize("argv, status, message", [
    (["--tasks", "tiny_ceval_texts", "--include-path", "/nonexistent/tasks"], 1, "not a directory"),
    (["--tasks", "tiny_ceval_texts", "--kv-cache-dtype", "int4"], 2,
     "argument --kv-cache-dtype: invalid choice: 'int4'"),
])
def test_eval_command_refuses_bad_input_in_one_line(argv, status, message, task_dir, capsys):
    try:
        found = cli.main(["eval", *argv])
    except SystemExit as e:  # a usage error, from argparse
        found = e.code
    err = capsys.readouterr().err
    assert found == status and message in err and len(err.strip().splitlines()) == 1, err
