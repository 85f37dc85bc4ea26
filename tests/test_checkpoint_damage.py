"""A damaged converted checkpoint or fine-tuning checkpoint: one line naming it, never Orbax's noise.

Orbax closed its event loop while reads of a failed `asyncio.gather` were still running, so
TensorStore called back into a closed loop ("Event loop is closed", "Task exception was
never retrieved"); checkpoint.finishing_orbax_tasks() makes the loops finish those reads.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys

import pytest

from bluelm_jax import checkpoint
from bluelm_jax.hf.to_orbax import convert_hf_to_flax
from tests.ft_helpers import qa_records, write_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def assert_one_clean_line(p: subprocess.CompletedProcess, *needles: str) -> None:
    assert p.returncode == 1, p.stderr
    assert "Traceback" not in p.stderr and "Event loop is closed" not in p.stderr, p.stderr
    assert "never retrieved" not in p.stderr and "TensorStore(" not in p.stderr, p.stderr
    lines = p.stderr.splitlines()
    assert len(lines) == 1, p.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def largest_file(directory) -> str:
    files = [os.path.join(r, n) for r, _, names in os.walk(directory) for n in names]
    return max(files, key=os.path.getsize)


def flip_head(path: str) -> None:
    with open(path, "r+b") as f:
        head = bytearray(f.read(64))
        f.seek(0)
        f.write(bytes(b ^ 0x5A for b in head))


DAMAGES = {
    "ocdbt.process_0 deleted": lambda params: shutil.rmtree(os.path.join(params, "ocdbt.process_0")),
    "data file flipped": lambda params: flip_head(largest_file(os.path.join(params, "ocdbt.process_0"))),
    "manifest flipped": lambda params: flip_head(os.path.join(params, "manifest.ocdbt")),
}


@pytest.fixture(scope="module")
def converted(hf_checkpoint, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("converted") / "model")
    convert_hf_to_flax(hf_checkpoint("tiny"), out, progress=False)
    return out


@pytest.mark.parametrize("damage", DAMAGES)
def test_damaged_checkpoint_is_one_line_for_generate_and_export(converted, tmp_path, damage):
    model = str(tmp_path / "model")
    shutil.copytree(converted, model)
    DAMAGES[damage](os.path.join(model, checkpoint.PARAMS_DIR))
    p = run("-m", "bluelm_jax", "generate", "--model", model, "--prompt", "Hello", "--max-new-tokens", "2")
    assert_one_clean_line(p, model, "damaged", "convert")
    out = tmp_path / "hf"
    p = run("-m", "convert.flax_to_hf", "--ckpt", model, "--out", str(out))
    assert_one_clean_line(p, model, "damaged", "convert")
    assert not out.exists()


def test_damaged_finetuning_checkpoint_is_one_line(hf_checkpoint, tmp_path):
    out = tmp_path / "run"
    train = write_jsonl(tmp_path / "train.jsonl", qa_records(2))
    args = ["-m", "bluelm_jax", "finetune", "--model", hf_checkpoint("tiny"), "--train-file", train, "--out", str(out),
            "--seq-len", "64", "--batch-size", "1", "--save-steps", "1", "--no-progress"]
    p = run(*args, "--max-steps", "1")
    assert p.returncode == 0, p.stderr
    flip_head(largest_file(out / "checkpoints" / "1" / "state" / "ocdbt.process_0"))
    p = run(*args, "--max-steps", "2")
    assert_one_clean_line(p, str(out / "checkpoints" / "1"), "damaged", "--no-resume")


def test_orbax_loops_finish_the_tasks_left_running():
    """As Orbax does: a fresh loop, a coroutine that leaves a task running, then close()."""
    async def leave_a_task_running():
        asyncio.get_running_loop().create_task(asyncio.sleep(0.5))

    with checkpoint.finishing_orbax_tasks():
        loop = asyncio.new_event_loop()
        loop.run_until_complete(leave_a_task_running())
        tasks = asyncio.all_tasks(loop)
        loop.close()
    assert tasks and all(t.done() for t in tasks)
    assert not isinstance(asyncio.get_event_loop_policy(), type(checkpoint._TaskFinishingPolicy()))
