"""Both notebooks run top to bottom on the default model (CPU, well under a minute each)."""

import os

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks")


def run(name):
    nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
    NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": NOTEBOOKS}}).execute()
    return "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))


@pytest.fixture(autouse=True)
def cpu_kernel(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("XLA_FLAGS", "")


def test_quickstart():
    out = run("quickstart.ipynb")
    assert "The capital of France is Paris." in out and "儿童节是六月一日。" in out
    assert "我是BlueLM-tiny，一个由bluelm-jax项目训练的小型演示模型。" in out and "中国的首都是北京。" in out


def test_finetune_lora():
    out = run("finetune_lora.ipynb")
    assert "-> The mascot is a blue koala named Lumi." in out
    assert "-> 吉祥物是一只名叫Lumi的蓝色考拉。" in out
    assert "model.safetensors" in out
