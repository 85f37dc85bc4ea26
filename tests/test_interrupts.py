"""Ctrl-C (SIGINT), SIGTERM and SIGKILL, sent to the commands as a user's shell sends them.

Each test starts the command, waits for a marker of the phase it wants to interrupt (jax
being imported, a "Compiling" line of JAX_LOG_COMPILES, a checkpoint or a temporary
directory on disk), then sends the signal. The command must end with exit 130 (SIGINT) or
143 (SIGTERM) and one line on stderr, leaving no temporary directory behind.
"""

from __future__ import annotations

import glob
import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from bluelm_jax import atomic_dir
from bluelm_jax.config import preset
from bluelm_jax.params import hf_tensors
from bluelm_jax.hf.cli import convert_main
from tests.ft_helpers import qa_records, write_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WAIT_S = 240  # the longest wait for a phase on a slow, shared machine
JAX_LOG = re.compile(r"^(WARNING|INFO):jax")  # JAX_LOG_COMPILES lines, used as markers


class Command:
    """A running command whose stdout and stderr are collected line by line."""

    def __init__(self, args: list[str], env: dict | None = None, stdin: str | None = None):
        full_env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {}))
        self.proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=full_env, text=True, encoding="utf-8",
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.out: list[str] = []
        self.err: list[str] = []
        self._readers = [threading.Thread(target=self._read, args=(s, lines), daemon=True)
                         for s, lines in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for r in self._readers:
            r.start()
        if stdin is not None:
            self.proc.stdin.write(stdin)
            self.proc.stdin.flush()

    @staticmethod
    def _read(stream, lines: list[str]) -> None:
        for line in stream:
            lines.append(line)

    def wait_for(self, ready, what: str) -> None:
        """Polls `ready()` until true; fails if the command ends or WAIT_S passes first."""
        deadline = time.monotonic() + WAIT_S
        while not ready():
            if self.proc.poll() is not None:
                pytest.fail(f"the command ended (rc {self.proc.returncode}) before {what}: {''.join(self.err)[-2000:]}")
            if time.monotonic() > deadline:
                self.proc.kill()
                pytest.fail(f"no {what} within {WAIT_S} s")
            time.sleep(0.02)

    def signal(self, signum: int) -> tuple[int, list[str]]:
        """Sends `signum`, waits for the end: (exit status, stderr lines but the JAX log markers)."""
        self.proc.send_signal(signum)
        try:
            rc = self.proc.wait(timeout=WAIT_S)
        finally:
            self.proc.kill()
        for r in self._readers:
            r.join(timeout=10)
        self.proc.stdin.close()
        return rc, [line for line in self.err if not JAX_LOG.match(line)]

    def compiling(self) -> bool:
        return any("Compiling" in line for line in self.err)

    def importing_jax(self) -> bool:
        try:
            with open(f"/proc/{self.proc.pid}/maps") as f:
                return "jaxlib" in f.read()
        except OSError:
            return False


def assert_one_line(rc: int, err: list[str], status: int) -> str:
    text = "".join(err)
    assert rc == status, text
    assert "Traceback" not in text and "Segmentation" not in text and "Exception ignored" not in text, text
    assert len(err) == 1 and err[0].strip(), text
    return err[0].strip()


# ------------------------------------------------------------------ generate, chat


def test_sigint_during_imports_is_one_line():
    cmd = Command(["-m", "bluelm_jax", "generate", "--prompt", "Hello", "--max-new-tokens", "4"])
    cmd.wait_for(cmd.importing_jax, "jax import")
    line = assert_one_line(*cmd.signal(signal.SIGINT), 130)
    assert line == "python -m bluelm_jax generate: interrupted"


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_sigint_while_xla_compiles_is_one_line_not_a_crash(command):
    args = ["--prompt", "Hello"] if command == "generate" else []
    cmd = Command(["-m", "bluelm_jax", command, *args, "--max-new-tokens", "64"], env={"JAX_LOG_COMPILES": "1"},
                  stdin="Hello\n" if command == "chat" else None)
    cmd.wait_for(cmd.compiling, "XLA compilation")
    line = assert_one_line(*cmd.signal(signal.SIGINT), 130)
    assert line == f"python -m bluelm_jax {command}: interrupted"


# ------------------------------------------------------------------ finetune


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", qa_records(4))


def finetune(model: str, train_file: str, out: str) -> Command:
    return Command(["-m", "bluelm_jax", "finetune", "--model", model, "--train-file", train_file, "--out", out,
                    "--seq-len", "64", "--batch-size", "1", "--max-steps", "100000", "--save-steps", "1",
                    "--log-steps", "1000", "--no-progress"], env={"JAX_LOG_COMPILES": "1"})


def test_finetune_interrupted_while_compiling_restarts_from_step_0(hf_checkpoint, train_file, tmp_path):
    cmd = finetune(hf_checkpoint("tiny"), train_file, str(tmp_path / "run"))
    cmd.wait_for(cmd.compiling, "XLA compilation")
    rc, err = cmd.signal(signal.SIGINT)
    if os.path.isdir(tmp_path / "run" / "checkpoints" / "1"):  # the whole first step ran before the signal
        pytest.skip("the first checkpoint was written before the signal arrived")
    line = assert_one_line(rc, err, 130)
    assert line.startswith("python -m bluelm_jax finetune: interrupted") and "step 0" in line, line


def test_finetune_interrupted_names_the_step_it_resumes_from(hf_checkpoint, train_file, tmp_path):
    out = tmp_path / "run"
    cmd = finetune(hf_checkpoint("tiny"), train_file, str(out))
    cmd.wait_for(lambda: os.path.isdir(out / "checkpoints" / "2"), "second checkpoint")
    line = assert_one_line(*cmd.signal(signal.SIGINT), 130)
    latest = max(int(n) for n in os.listdir(out / "checkpoints") if n.isdigit())
    assert f"resume from step {latest} " in line, line
    assert not glob.glob(str(out / "checkpoints" / "*tmp*"))


# ------------------------------------------------------------------ conversion: SIGTERM, SIGKILL


@pytest.fixture(scope="module")
def large_hf_dir(tmp_path_factory, tokenizer_model) -> str:
    """A 200 MB checkpoint: converting it takes long enough to be interrupted in the middle."""
    from tests.test_convert import write_single_file_checkpoint

    config = preset("tiny").replace(hidden_size=512, intermediate_size=1408, num_hidden_layers=16,
                                    num_attention_heads=8, num_key_value_heads=8)
    rng = np.random.default_rng(0)
    weights = {t.hf_name: rng.standard_normal(t.hf_shape, dtype=np.float32) for t in hf_tensors(config)}
    directory = str(tmp_path_factory.mktemp("large") / "hf")
    write_single_file_checkpoint(directory, weights, tokenizer_model, config)
    return directory


def temporaries(out) -> list[str]:
    parent, name = os.path.split(str(out))
    return [n for n in os.listdir(parent) if n.startswith(f".{name}.")]


def convert(hf_dir: str, out) -> Command:
    return Command(["-m", "convert.hf_to_flax", "--hf-dir", hf_dir, "--out", str(out), "--no-progress"])


@pytest.mark.parametrize("signum,status,word", [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")])
def test_signal_mid_conversion_leaves_nothing(large_hf_dir, tmp_path, signum, status, word):
    out = tmp_path / "out"
    cmd = convert(large_hf_dir, out)
    cmd.wait_for(lambda: temporaries(out), "temporary output directory")
    line = assert_one_line(*cmd.signal(signum), status)
    assert line == f"error: {word}"
    assert os.listdir(tmp_path) == []


def test_sigkilled_conversion_is_cleaned_up_by_the_next_run(large_hf_dir, hf_checkpoint, tmp_path):
    out = tmp_path / "out"
    cmd = convert(large_hf_dir, out)
    cmd.wait_for(lambda: temporaries(out), "temporary output directory")
    cmd.signal(signal.SIGKILL)
    [left] = temporaries(out)
    assert atomic_dir.writer_pid(str(tmp_path / left)) == cmd.proc.pid
    p = subprocess.run([sys.executable, "-m", "convert.hf_to_flax", "--hf-dir", hf_checkpoint("tiny"), "--out", str(out),
                        "--no-progress"], cwd=ROOT, capture_output=True, text=True, timeout=WAIT_S)
    assert p.returncode == 0, p.stderr
    assert p.stderr.splitlines() == [f"removed the unfinished temporary directory {tmp_path / left} "
                                     f"(left by process {cmd.proc.pid}, no longer running)"]
    assert os.listdir(tmp_path) == ["out"]


def fake_temporary(out, pid: int) -> str:
    tmp = str(out.parent / f".{out.name}.tmp-test")
    os.makedirs(os.path.join(tmp, "params"))
    with open(os.path.join(tmp, atomic_dir.WRITER_FILE), "w") as f:
        f.write(f"{pid}\n")
    return tmp


def test_temporary_of_an_ended_writer_is_removed(hf_checkpoint, tmp_path, capsys):
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    out = tmp_path / "out"
    tmp = fake_temporary(out, ended.pid)
    assert convert_main(["--hf-dir", hf_checkpoint("tiny"), "--out", str(out), "--no-progress"]) == 0
    assert not os.path.exists(tmp)
    assert capsys.readouterr().err.splitlines() == [
        f"removed the unfinished temporary directory {tmp} (left by process {ended.pid}, no longer running)"]


def test_temporary_of_a_running_writer_is_kept(hf_checkpoint, tmp_path, capsys):
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        out = tmp_path / "out"
        tmp = fake_temporary(out, running.pid)
        assert convert_main(["--hf-dir", hf_checkpoint("tiny"), "--out", str(out), "--no-progress"]) == 0
        assert os.path.isdir(os.path.join(tmp, "params"))
        assert capsys.readouterr().err == ""
        assert not os.path.exists(os.path.join(out, atomic_dir.WRITER_FILE))  # the marker is not part of the output
    finally:
        running.kill()
        running.wait()
