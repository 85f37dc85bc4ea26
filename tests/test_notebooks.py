"""The notebooks run top to bottom on CPU (the default model, or a tiny random one on 8 simulated
devices), print what their committed outputs show, and leave nothing behind in the temporary
directory. Refresh the committed outputs with `python -m tests.notebook_outputs --write`."""

import copy
import importlib.util
import os
import re
import subprocess
import sys

import nbformat
import pytest

from tests.notebook_outputs import (NOTEBOOKS, REPO_ROOT, compared_text, execute, execute_notebook, normalise,
                                    notebook_path, stale_cells, without_outputs)


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """executed(name) -> (the notebook run from scratch, what it left in its TMPDIR); one run per notebook."""
    runs: dict = {}

    def run(name):
        if name not in runs:
            tmpdir = tmp_path_factory.mktemp(f"{name}-tmpdir")
            nb = execute(name, str(tmpdir))
            runs[name] = (nb, sorted(os.listdir(tmpdir)))
        return runs[name]

    return run


def printed(nb) -> str:
    """Everything the code cells printed or displayed, as text."""
    return "".join(compared_text(cell) for cell in nb.cells if cell.cell_type == "code")


def committed(name):
    return nbformat.read(notebook_path(name), as_version=4)


def test_quickstart(executed):
    nb = executed("quickstart")[0]
    out = printed(nb)
    assert "model.layers[0].self_attn.q_proj.kernel (256, 256) float32" in out
    html = [o.data["text/html"] for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if o.output_type == "display_data" and "text/html" in o.data]
    assert any("treescope" in h for h in html)  # the module tree, drawn by treescope
    assert "The capital of France is Paris." in out and "儿童节是六月一日。" in out
    assert "我是BlueLM-tiny，一个由bluelm-jax项目训练的小型演示模型。" in out and "中国的首都是北京。" in out
    assert "removed: True" in out


def test_finetune_lora(executed):
    out = printed(executed("finetune_lora")[0])
    assert "-> The mascot is a blue koala named Lumi." in out
    assert "-> 吉祥物是一只名叫Lumi的蓝色考拉。" in out
    assert "model.safetensors" in out and "removed: True" in out


def test_sharded_generation(executed):
    out = printed(executed("sharded_generation")[0])
    assert "cpu 8 devices" in out and "data=1,tensor=8" in out
    assert "sharded == single device: True" in out
    assert "model/layers/1/self_attn/q_proj/kernel" in out and "shard (256, 32)" in out


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_outputs_are_current(executed, name):
    assert stale_cells(committed(name), executed(name)[0]) == [], \
        f"run `python -m tests.notebook_outputs --write {name}`"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_leaves_nothing_in_tmpdir(executed, name):
    assert executed(name)[1] == []


def repository_url() -> str:
    """[project.urls] Repository of pyproject.toml."""
    with open(os.path.join(REPO_ROOT, "pyproject.toml"), encoding="utf-8") as f:
        return re.search(r'^Repository = "(.+)"$', f.read(), re.M).group(1)


@pytest.mark.parametrize("installed", [True, False])
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_first_cell_pip_installs_from_the_repository_only_when_missing(monkeypatch, name, installed):
    """As in Colab (bluelm_jax missing): one pip install from the project's repository; as in a checkout
    or the tests (importable): nothing. No notebook edits sys.path instead."""
    real_find_spec, pip_runs = importlib.util.find_spec, []
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda module, *a: None if module == "bluelm_jax" and not installed else real_find_spec(module, *a))
    monkeypatch.setattr(subprocess, "run", lambda args, **kwargs: pip_runs.append((args, kwargs)))
    cells = [c for c in committed(name).cells if c.cell_type == "code"]
    exec(cells[0].source, {})
    pip = [sys.executable, "-m", "pip", "install", "-q", f"bluelm-jax @ git+{repository_url()}"]
    assert pip_runs == ([] if installed else [(pip, {"check": True})])
    assert "sys.path" not in "".join(c.source for c in cells)


def test_kernel_imports_this_checkout_and_uses_the_given_tmpdir(tmp_path):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
        "import os, tempfile, bluelm_jax\n"
        "print(os.path.dirname(os.path.dirname(bluelm_jax.__file__)))\n"
        "print(tempfile.gettempdir())\n"
        "print(os.environ['JAX_PLATFORMS'], 'XLA_FLAGS' in os.environ)")])
    lines = execute_notebook(nb, str(tmp_path)).cells[0].outputs[0].text.splitlines()
    assert lines == [REPO_ROOT, str(tmp_path), "cpu False"]


# ------------------------------------------------------------------ the comparison itself


def test_normalise_ignores_timings_rates_addresses_and_directories():
    a = "converted 41 tensors in 0.4 s -> /tmp/tmpab12/w-x1/bluelm-orbax; 3045 tokens/s; <obj at 0x7f3a>"
    b = "converted 41 tensors in 12.0 s -> /var/folders/zz/w-q9/bluelm-orbax; 12 tokens/s; <obj at 0x1b2c>"
    assert normalise(a) == normalise(b)
    assert normalise("41 tensors") != normalise("42 tensors")
    assert normalise("-> /tmp/a/bluelm-orbax") != normalise("-> /tmp/a/bluelm-hf")
    assert normalise("8 devices, 60 steps, it/s") == "8 devices, 60 steps, it/s"


def test_a_changed_output_is_detected():
    nb = committed("quickstart")
    fresh = copy.deepcopy(nb)
    cell = next(c for c in fresh.cells if c.cell_type == "code" and "Paris" in compared_text(c))
    cell.outputs[0].text = cell.outputs[0].text.replace("Paris", "Lyon")
    problems = stale_cells(nb, fresh)
    assert len(problems) == 1 and "Lyon" in problems[0] and "Paris" in problems[0]


def test_a_changed_timing_or_temporary_path_is_not_a_difference():
    nb = committed("quickstart")
    fresh = copy.deepcopy(nb)
    cell = next(c for c in fresh.cells if c.cell_type == "code" and "converted" in compared_text(c))
    old_dir = os.path.dirname(os.path.dirname(cell.outputs[0].text.split("-> ")[1]))
    cell.outputs[0].text = cell.outputs[0].text.replace(" s ->", "9 s ->").replace(old_dir, "/var/tmp/other")
    assert cell.outputs[0].text != next(c for c in nb.cells if c.get("id") == cell.id).outputs[0].text
    assert stale_cells(nb, fresh) == []


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_a_notebook_without_outputs_is_rejected(name):
    nb = committed(name)
    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code_cells)  # the committed file has them
    problems = stale_cells(without_outputs(nb), nb)
    assert len(problems) == len(code_cells) and all("not executed" in p for p in problems)


def test_outputs_cleared_but_counts_kept_are_rejected():
    nb = committed("finetune_lora")
    stripped = copy.deepcopy(nb)
    for cell in stripped.cells:
        if cell.cell_type == "code":
            cell.outputs = []
    printing = [c for c in nb.cells if c.cell_type == "code" and compared_text(c)]
    assert len(stale_cells(stripped, nb)) == len(printing) > 0
