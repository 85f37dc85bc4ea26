"""The HF -> Orbax converter: round trips on tiny random checkpoints, and every bad input."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from bluelm_jax import checkpoint
from bluelm_jax.config import preset
from bluelm_jax.params import get_path, hf_tensors
from bluelm_jax.hf import tensors, to_orbax
from bluelm_jax.hf.cli import convert_main as main
from bluelm_jax.hf.to_orbax import convert_hf_to_flax, load_hf_params
from tests.hf_reference import random_hf_weights, write_hf_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = preset("tiny")  # vocab 640 >= the test tokenizer's 600 pieces


def assert_params_match(params: dict, weights: dict[str, np.ndarray], dtype) -> None:
    """Every leaf equals its Hugging Face tensor, transposed to [in, out] and cast."""
    for t in hf_tensors(CONFIG):
        leaf = np.asarray(get_path(params, t.path))
        expected = weights[t.hf_name].astype(dtype)
        expected = expected.T if t.transpose else expected
        assert leaf.dtype == np.dtype(dtype), t.hf_name
        assert leaf.shape == expected.shape, t.hf_name
        np.testing.assert_array_equal(leaf.view(np.uint8), np.ascontiguousarray(expected).view(np.uint8),
                                      err_msg=t.hf_name)


def leftovers(out: str) -> list[str]:
    """The output dir and any temporary dirs the converter made beside it."""
    parent, name = os.path.split(out)
    return [n for n in os.listdir(parent) if n == name or n.startswith(f".{name}.")]


def write_single_file_checkpoint(directory, weights: dict[str, np.ndarray], tokenizer_model, config=CONFIG,
                                 hf_config: dict | None = None) -> str:
    """A checkpoint with exactly `weights` in one model.safetensors (for the bad inputs)."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf_config if hf_config is not None else config.to_hf_dict(), f)
    shutil.copy(tokenizer_model, os.path.join(directory, "tokenizer.model"))
    save_file(weights, os.path.join(directory, "model.safetensors"))
    return str(directory)


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory, tokenizer_model) -> str:
    return write_hf_checkpoint(str(tmp_path_factory.mktemp("hf") / "sharded"), CONFIG, tokenizer_model)


# ------------------------------------------------------------------ round trips


@pytest.mark.parametrize("fmt,num_shards,stored,dtype,expected_dtype", [
    ("safetensors", 2, "float32", "auto", np.float32),
    ("safetensors", 1, "float32", "bfloat16", ml_dtypes.bfloat16),
    ("safetensors", 2, "bfloat16", "auto", ml_dtypes.bfloat16),
    ("safetensors", 1, "bfloat16", "float32", np.float32),
    ("bin", 2, "float32", "auto", np.float32),
    ("bin", 1, "bfloat16", "auto", ml_dtypes.bfloat16),
])
def test_round_trip(tmp_path, tokenizer_model, fmt, num_shards, stored, dtype, expected_dtype):
    hf = write_hf_checkpoint(str(tmp_path / "hf"), CONFIG, tokenizer_model, num_shards=num_shards, fmt=fmt,
                             dtype=stored)
    out = str(tmp_path / "out")
    summary = convert_hf_to_flax(hf, out, dtype=dtype, progress=False)

    weights = {n: w.astype(stored if stored == "float32" else ml_dtypes.bfloat16)
               for n, w in random_hf_weights(CONFIG).items()}
    assert_params_match(checkpoint.restore_params(out, CONFIG), weights, expected_dtype)
    assert_params_match(load_hf_params(hf, CONFIG, dtype), weights, expected_dtype)
    assert sorted(os.listdir(out)) == ["bluelm_jax.json", "config.json", "params", "tokenizer.model"]
    for name in ("config.json", "tokenizer.model"):
        with open(os.path.join(hf, name), "rb") as a, open(os.path.join(out, name), "rb") as b:
            assert a.read() == b.read()
    meta = checkpoint.read_metadata(out)
    assert meta["layout_version"] == checkpoint.LAYOUT_VERSION
    assert meta["param_dtype"] == np.dtype(expected_dtype).name
    assert summary.tensors == len(list(hf_tensors(CONFIG)))
    assert summary.parameters == CONFIG.num_parameters()
    assert leftovers(out) == ["out"]


def test_blocks_split_embedding_and_head(tmp_path, sharded_dir, monkeypatch):
    """Embedding, head and projections are written in blocks of rows/columns, the last one partial."""
    monkeypatch.setattr(to_orbax, "BLOCK_BYTES", 3 * CONFIG.hidden_size * 4)  # 3 rows: 640 = 3 * 213 + 1
    specs = to_orbax.leaf_specs(CONFIG, "float32")
    assert specs[("model", "embed_tokens", "embedding")].write_shape == (3, CONFIG.hidden_size)
    assert specs[("lm_head", "kernel")].write_shape == (CONFIG.hidden_size, 3)
    assert specs[("model", "layers", 1, "mlp", "down_proj", "kernel")].write_shape == (CONFIG.intermediate_size, 1)  # source rows of 512
    out = str(tmp_path / "out")
    convert_hf_to_flax(sharded_dir, out, progress=False)
    assert_params_match(checkpoint.restore_params(out, CONFIG), random_hf_weights(CONFIG), np.float32)
    assert_params_match(load_hf_params(sharded_dir, CONFIG), random_hf_weights(CONFIG), np.float32)


def test_rotary_buffers_are_skipped(tmp_path, tokenizer_model):
    weights = random_hf_weights(CONFIG)
    weights["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(CONFIG.head_dim // 2, np.float32)
    hf = write_single_file_checkpoint(tmp_path / "hf", weights, tokenizer_model)
    convert_hf_to_flax(hf, str(tmp_path / "out"), progress=False)
    del weights["model.layers.0.self_attn.rotary_emb.inv_freq"]
    assert_params_match(checkpoint.restore_params(str(tmp_path / "out"), CONFIG), weights, np.float32)


def test_cli_subprocess(tmp_path, sharded_dir):
    out = str(tmp_path / "out")
    cmd = [sys.executable, "-m", "convert.hf_to_flax", "--hf-dir", sharded_dir, "--out", out]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    n = CONFIG.num_parameters()
    assert re.fullmatch(rf"converted 23 tensors, {n:,} parameters, [0-9.]+ GB float32 in [0-9.]+ s -> {out}\n",
                        done.stdout), done.stdout
    assert checkpoint.is_converted_dir(out)

    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert again.returncode == 1
    assert again.stderr == f"error: {out}: already exists (use --force to replace it)\n"

    forced = subprocess.run(cmd + ["--force", "--no-progress"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert forced.returncode == 0, forced.stderr
    assert forced.stderr == ""
    assert leftovers(out) == ["out"]

    helped = subprocess.run([sys.executable, "-m", "convert.hf_to_flax", "--help"], cwd=ROOT, env=env,
                            capture_output=True, text=True)
    assert helped.returncode == 0 and "--hf-dir" in helped.stdout and "--force" in helped.stdout


def test_force_replaces_and_failure_keeps_old_output(tmp_path, sharded_dir, tokenizer_model, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old-file").write_text("old")
    assert main(["--hf-dir", sharded_dir, "--out", str(out), "--no-progress"]) == 1
    assert (out / "old-file").exists()

    bad = write_single_file_checkpoint(tmp_path / "bad", {"x": np.zeros(3, np.float32)}, tokenizer_model)
    assert main(["--hf-dir", bad, "--out", str(out), "--force", "--no-progress"]) == 1
    assert (out / "old-file").exists(), "a failed conversion must leave the existing output alone"
    assert leftovers(str(out)) == ["out"]

    assert main(["--hf-dir", sharded_dir, "--out", str(out), "--force", "--no-progress"]) == 0
    assert not (out / "old-file").exists() and checkpoint.is_converted_dir(out)
    assert leftovers(str(out)) == ["out"]
    assert main(["--hf-dir", sharded_dir, "--out", sharded_dir, "--force", "--no-progress"]) == 1
    assert "must not be the Hugging Face directory" in capsys.readouterr().err


# ------------------------------------------------------------------ bad inputs


def _rewrite_config(hf: str, **changes) -> None:
    path = os.path.join(hf, "config.json")
    with open(path) as f:
        raw = json.load(f)
    raw.update(changes)
    with open(path, "w") as f:
        json.dump(raw, f)


def _weights_without(name):
    def make(hf, tokenizer_model):
        weights = random_hf_weights(CONFIG)
        del weights[name]
        return write_single_file_checkpoint(hf, weights, tokenizer_model)
    return make


def _weights_with(name, value):
    def make(hf, tokenizer_model):
        weights = random_hf_weights(CONFIG)
        weights[name] = value
        return write_single_file_checkpoint(hf, weights, tokenizer_model)
    return make


def _sharded(edit):
    def make(hf, tokenizer_model):
        write_hf_checkpoint(hf, CONFIG, tokenizer_model)
        edit(hf)
        return hf
    return make


def _truncate(hf):
    path = os.path.join(hf, "model-00002-of-00002.safetensors")
    os.truncate(path, os.path.getsize(path) - 100)


def _huge_header(hf):
    with open(os.path.join(hf, "model-00001-of-00002.safetensors"), "r+b") as f:
        f.write(struct.pack("<Q", 1 << 40))


def _garbage_header(hf):
    with open(os.path.join(hf, "model-00001-of-00002.safetensors"), "r+b") as f:
        f.seek(8)
        f.write(b"\xff{{not json")


def _bad_offsets(hf):
    path = os.path.join(hf, "model-00001-of-00002.safetensors")
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    name = next(k for k in header if k != "__metadata__")
    begin, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [begin, end + 4]  # shape says fewer bytes than the offsets
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + data)


def _remove(name):
    return lambda hf: os.remove(os.path.join(hf, name))


def _write(name, content: bytes):
    def edit(hf):
        with open(os.path.join(hf, name), "wb") as f:
            f.write(content)
    return edit


def _truncated_bin(hf, tokenizer_model):
    write_hf_checkpoint(hf, CONFIG, tokenizer_model, num_shards=1, fmt="bin")
    path = os.path.join(hf, "pytorch_model.bin")
    os.truncate(path, os.path.getsize(path) // 2)
    return hf


BAD_INPUTS = {
    "missing tensor": (_weights_without("model.layers.1.mlp.up_proj.weight"),
                       "1 tensor(s) missing: model.layers.1.mlp.up_proj.weight"),
    "unexpected tensor": (_weights_with("model.layers.0.self_attn.q_proj.bias", np.zeros(256, np.float32)),
                          "1 unexpected tensor(s): model.layers.0.self_attn.q_proj.bias"),
    "mis-shaped tensor": (_weights_with("model.layers.1.self_attn.o_proj.weight", np.zeros((256, 128), np.float32)),
                          "tensor model.layers.1.self_attn.o_proj.weight has shape [256, 128], expected [256, 256]"),
    "integer tensor": (_weights_with("model.norm.weight", np.zeros(256, np.int32)),
                       "tensor model.norm.weight has dtype int32, expected floating point"),
    "truncated safetensors": (_sharded(_truncate), "model-00002-of-00002.safetensors: truncated safetensors file"),
    "header beyond file": (_sharded(_huge_header),
                           "model-00001-of-00002.safetensors: corrupt or truncated safetensors file (header of"),
    "header not json": (_sharded(_garbage_header), "model-00001-of-00002.safetensors: corrupt safetensors header"),
    "offsets disagree with shape": (_sharded(_bad_offsets),
                                    "model-00001-of-00002.safetensors: corrupt safetensors header entry for"),
    "index names a missing shard": (_sharded(_remove("model-00002-of-00002.safetensors")),
                                    "model.safetensors.index.json: shard file(s) missing: model-00002-of-00002"),
    "malformed index": (_sharded(_write("model.safetensors.index.json", b"{\"weight_map\": 3}")),
                        "model.safetensors.index.json: malformed index"),
    "malformed config.json": (_sharded(_write("config.json", b"{\"hidden_size\": 256,")),
                              "config.json: not valid JSON"),
    "unknown architecture": (_sharded(lambda hf: _rewrite_config(hf, architectures=["GPT2LMHeadModel"])),
                             "unknown architecture ['GPT2LMHeadModel']"),
    "unknown rope type": (_sharded(lambda hf: _rewrite_config(hf, rope_scaling={"type": "yarn", "factor": 4.0})),
                          "unsupported rope_scaling type 'yarn'"),
    "missing tokenizer.model": (_sharded(_remove("tokenizer.model")), "tokenizer.model: missing"),
    "no weights": (_sharded(lambda hf: [os.remove(os.path.join(hf, n)) for n in os.listdir(hf)
                                        if n.startswith("model")]), "no weights found"),
    "corrupt pytorch_model.bin": (_sharded(lambda hf: [_remove(n)(hf) for n in os.listdir(hf) if n.startswith("model")]
                                           and _write("pytorch_model.bin", b"not a zip file")(hf)),
                                  "pytorch_model.bin: cannot read PyTorch checkpoint"),
    "truncated pytorch_model.bin": (lambda hf, tok: _truncated_bin(hf, tok),
                                    "pytorch_model.bin: cannot read PyTorch checkpoint: not a zip archive (corrupt, "
                                    "truncated"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input(tmp_path, tokenizer_model, capsys, case):
    make, message = BAD_INPUTS[case]
    hf = make(str(tmp_path / "hf"), tokenizer_model)
    out = str(tmp_path / "out")
    assert main(["--hf-dir", hf, "--out", out, "--no-progress"]) == 1
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1, captured.err
    assert message in captured.err, captured.err
    assert "Traceback" not in captured.err and captured.out == ""
    assert leftovers(out) == []


def test_bin_without_torch(tmp_path, tokenizer_model, capsys, monkeypatch):
    hf = write_hf_checkpoint(str(tmp_path / "hf"), CONFIG, tokenizer_model, fmt="bin")
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now raises ImportError
    assert main(["--hf-dir", hf, "--out", str(tmp_path / "out"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "reading pytorch_model*.bin needs torch" in err and 'pip install "bluelm-jax[torch]"' in err, err
    assert leftovers(str(tmp_path / "out")) == []


def test_error_while_writing_removes_temp_dir(tmp_path, sharded_dir, capsys, monkeypatch):
    """A failure half-way through the Orbax write leaves nothing behind."""
    calls = []
    to_layout = tensors.to_layout

    def failing(*args):
        calls.append(1)
        if len(calls) == 5:
            raise OSError(28, "No space left on device")
        return to_layout(*args)

    monkeypatch.setattr(to_orbax, "to_layout", failing)
    out = str(tmp_path / "out")
    assert main(["--hf-dir", sharded_dir, "--out", out, "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left on device" in err, err
    assert leftovers(out) == []


class _MakesDirectory:
    """Unpickled by a full pickle loader, this object would create `path` (as any code could)."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_bin_with_code_is_refused_in_our_words(tmp_path, tokenizer_model, capsys):
    """A pickle that asks for a function is not loaded, and the message does not pass on torch's
    advice to retry with weights_only=False."""
    import torch

    hf = write_hf_checkpoint(str(tmp_path / "hf"), CONFIG, tokenizer_model, num_shards=1, fmt="bin")
    marker = str(tmp_path / "payload-ran")
    state = torch.load(os.path.join(hf, "pytorch_model.bin"), weights_only=True)
    state["model.norm.weight"] = _MakesDirectory(marker)
    torch.save(state, os.path.join(hf, "pytorch_model.bin"))
    out = str(tmp_path / "out")
    assert main(["--hf-dir", hf, "--out", out, "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert "pytorch_model.bin: holds code or objects that are not tensors (posix.mkdir), so it will not be " \
           "loaded" in err and "convert it to safetensors" in err, err
    assert "weights_only" not in err and "Weights only" not in err, err
    assert not os.path.exists(marker) and leftovers(out) == []


# ------------------------------------------------------------------ --out against --hf-dir


def _symlink_to(target, link):
    os.symlink(target, link)
    return link


OVERLAPS = {  # where --out is, given the input x/model: (path, words of the message)
    "parent": (lambda tmp, hf: tmp / "x", "must not contain the Hugging Face directory"),
    "grandparent": (lambda tmp, hf: tmp, "must not contain the Hugging Face directory"),
    "symlink to the parent": (lambda tmp, hf: _symlink_to(tmp / "x", tmp / "link"),
                              "must not contain the Hugging Face directory"),
    "the input": (lambda tmp, hf: hf, "must not be the Hugging Face directory"),
    "inside": (lambda tmp, hf: hf / "orbax", "must not be inside the Hugging Face directory"),
}


@pytest.mark.parametrize("where", list(OVERLAPS))
def test_out_containing_or_inside_the_input_is_refused(tmp_path, sharded_dir, capsys, where):
    """Even with --force: nothing is written or deleted."""
    hf = tmp_path / "x" / "model"
    shutil.copytree(sharded_dir, hf)
    files = sorted(os.listdir(hf))
    out, words = OVERLAPS[where]
    out = out(tmp_path, hf)
    assert main(["--hf-dir", str(hf), "--out", str(out), "--force", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err, err
    assert sorted(os.listdir(hf)) == files
    assert not [n for n in os.listdir(tmp_path / "x") if n.startswith(".")]


def test_out_sharing_a_name_prefix_with_the_input_is_allowed(tmp_path, sharded_dir):
    """x/model-orbax is beside x/model, not inside or above it (and the other way round)."""
    hf = tmp_path / "x" / "model"
    shutil.copytree(sharded_dir, hf)
    assert main(["--hf-dir", str(hf), "--out", str(tmp_path / "x" / "model-orbax"), "--no-progress"]) == 0
    shutil.copytree(sharded_dir, tmp_path / "y" / "model-hf")
    assert main(["--hf-dir", str(tmp_path / "y" / "model-hf"), "--out", str(tmp_path / "y" / "model"),
                 "--no-progress"]) == 0
    assert checkpoint.is_converted_dir(tmp_path / "x" / "model-orbax")
    assert checkpoint.is_converted_dir(tmp_path / "y" / "model")
