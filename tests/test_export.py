"""Export to Hugging Face: lossless round trip, sharding, bad input, and a fine-tuned export that the
transformers reference decodes exactly as we do."""

import json
import os
import subprocess
import sys

import pytest
from safetensors.numpy import load_file

from bluelm_jax.config import preset
from bluelm_jax.hf import cli as hf_cli
from bluelm_jax.hf.to_hf import ExportError, export_checkpoint, parse_size
from bluelm_jax.hf.to_orbax import convert_hf_to_flax
from tests.ft_helpers import greedy, qa_records, write_jsonl
from tests.hf_reference import reference_model, write_hf_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = preset("tiny").replace(vocab_size=640)


def hf_tensors_of(directory):
    out = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(directory, name)))
    return out


def torch_tensors_of(directory):
    from safetensors.torch import load_file as load_torch

    out = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            out.update(load_torch(os.path.join(directory, name)))
    return out


@pytest.mark.parametrize("preset_name, dtype", [("tiny", "float32"), ("tiny-gqa", "bfloat16")])
def test_round_trip_hf_orbax_hf_is_identical(tmp_path, tokenizer_model, preset_name, dtype):
    src = write_hf_checkpoint(str(tmp_path / "hf"), preset(preset_name), tokenizer_model, seed=4, num_shards=3,
                              dtype=dtype)
    convert_hf_to_flax(src, tmp_path / "orbax", progress=False)
    out = export_checkpoint(str(tmp_path / "orbax"), str(tmp_path / "back"), max_shard_bytes=parse_size("400KB"))
    names = sorted(os.listdir(out))
    assert "model.safetensors.index.json" in names and "tokenizer.model" in names and "config.json" in names
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    assert len(set(index["weight_map"].values())) > 1
    a, b = torch_tensors_of(src), torch_tensors_of(out)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert a[name].view(-1).numpy().tobytes() == b[name].view(-1).numpy().tobytes() if dtype == "float32" else \
            (a[name].float() == b[name].float()).all(), name
    assert open(os.path.join(src, "tokenizer.model"), "rb").read() == open(os.path.join(out, "tokenizer.model"), "rb").read()
    cfg_in, cfg_out = json.load(open(os.path.join(src, "config.json"))), json.load(open(os.path.join(out, "config.json")))
    assert cfg_in == cfg_out


def run_export(*args):
    return subprocess.run([sys.executable, "-m", "convert.flax_to_hf", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""})


def test_bad_input_is_one_line_and_leaves_nothing(tmp_path, hf_checkpoint):
    hf = hf_checkpoint("tiny")
    out = tmp_path / "out"
    for args, expected in [
        (["--ckpt", str(tmp_path / "none"), "--out", str(out)], "not a directory"),
        (["--ckpt", hf, "--out", str(out)], "not a converted bluelm-jax checkpoint"),
        (["--ckpt", hf, "--out", str(out), "--max-shard-size", "lots"], "cannot read size"),
    ]:
        p = run_export(*args)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 1 and len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0], p.stderr
        assert not out.exists() and not [n for n in os.listdir(tmp_path) if n.startswith(".out")]
    with pytest.raises(ExportError, match="already exists"):
        os.makedirs(out)
        convert_hf_to_flax(hf, tmp_path / "orbax", progress=False)
        export_checkpoint(str(tmp_path / "orbax"), str(out))


def test_exported_finetuned_model_decodes_like_the_reference(tmp_path, tokenizer_model):
    """LoRA fine-tune, merge, export: transformers' greedy tokens on the export equal ours."""
    import torch

    import bluelm_jax
    from bluelm_jax import lora as L
    from bluelm_jax import train as T

    src = write_hf_checkpoint(str(tmp_path / "hf"), CONFIG, tokenizer_model, seed=6, num_shards=1)
    convert_hf_to_flax(src, tmp_path / "orbax", progress=False)
    model = bluelm_jax.load(tmp_path / "orbax")
    data = write_jsonl(tmp_path / "d.jsonl", qa_records(2))
    tc = T.TrainConfig(seq_len=64, batch_size=4, learning_rate=3e-2, max_steps=8, warmup_steps=1, mesh="data=1",
                       lora=L.LoraConfig(rank=4, targets="all"))
    result = T.train(model, data, tc, out_dir=str(tmp_path / "run"), progress=False, log=lambda s: None)
    p = run_export("--ckpt", str(tmp_path / "orbax"), "--adapter", result.adapter_dir, "--out", str(tmp_path / "export"))
    assert p.returncode == 0, p.stderr

    exported = bluelm_jax.load(tmp_path / "export")
    prompt = model.tokenizer.encode(qa_records()[0]["prompt"])
    ours = greedy(exported.params, CONFIG, prompt, 12)
    ours_adapters = greedy(model.params, CONFIG, prompt, 12, adapters=L.as_adapters(result.params, tc.lora))
    base = greedy(model.params, CONFIG, prompt, 12)
    assert ours == ours_adapters and ours != base  # the fine-tuning changed what the model says

    weights = {k: v for k, v in hf_tensors_of(tmp_path / "export").items()}
    ref = reference_model(CONFIG, weights)
    with torch.no_grad():
        out = ref.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, min_new_tokens=12,
                           pad_token_id=CONFIG.pad_token_id)
    assert out[0, len(prompt):].tolist() == ours


def _directory_modes(top) -> dict:
    """Permission bits of `top` and of every directory under it, by path relative to top's parent."""
    parent = os.path.dirname(os.path.abspath(top))
    return {os.path.relpath(root, parent): oct(os.stat(root).st_mode & 0o777) for root, _, _ in os.walk(top)}


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_output_directories_follow_the_umask(tmp_path, tokenizer_model, umask):
    """Converter, exporter, fine-tuning output (model/) and adapters: every directory is 0777 less the
    umask, as for any directory the user makes (a temporary directory renamed into place was 0700)."""
    import bluelm_jax
    from bluelm_jax import lora as L
    from bluelm_jax import train as T

    src = write_hf_checkpoint(str(tmp_path / "hf"), CONFIG, tokenizer_model, num_shards=1)
    data = write_jsonl(tmp_path / "d.jsonl", qa_records())
    tc = T.TrainConfig(seq_len=64, batch_size=4, max_steps=1, warmup_steps=0, mesh="data=1",
                       lora=L.LoraConfig(rank=2), merge_lora=True)
    old = os.umask(umask)  # process-wide: restored below
    try:
        convert_hf_to_flax(src, tmp_path / "orbax", progress=False)
        export_checkpoint(str(tmp_path / "orbax"), str(tmp_path / "export"))
        result = T.train(bluelm_jax.load(tmp_path / "orbax"), data, tc, out_dir=str(tmp_path / "run"),
                         progress=False, log=lambda s: None)
    finally:
        os.umask(old)
    assert result.adapter_dir and result.model_dir
    expected = oct(0o777 & ~umask)
    for top in (tmp_path / "orbax", tmp_path / "export", tmp_path / "run"):
        modes = _directory_modes(top)
        assert modes == dict.fromkeys(modes, expected), modes
    assert {"run/adapter", "run/model"} <= set(_directory_modes(tmp_path / "run"))


@pytest.fixture
def converted(tmp_path, hf_checkpoint):
    """A converted checkpoint x/orbax and an adapter-like directory a/adapter (paths are all that is checked)."""
    convert_hf_to_flax(hf_checkpoint("tiny"), tmp_path / "x" / "orbax", progress=False)
    (tmp_path / "a" / "adapter").mkdir(parents=True)
    (tmp_path / "a" / "adapter" / "adapter_config.json").write_text("{}")
    return tmp_path


@pytest.mark.parametrize("inputs, out, words", [
    ([], "x", "must not contain the checkpoint directory"),
    ([], "x/orbax", "must not be the checkpoint directory"),
    ([], "x/orbax/hf", "must not be inside the checkpoint directory"),
    (["--adapter", "a/adapter"], "a", "must not contain the adapter directory"),
    (["--adapter", "a/adapter"], "a/adapter/hf", "must not be inside the adapter directory"),
])
def test_out_containing_or_inside_an_input_is_refused(converted, capsys, monkeypatch, inputs, out, words):
    """Even with --force: one line, exit 1, the inputs untouched."""
    monkeypatch.chdir(converted)
    before = sorted(os.listdir("x/orbax")), sorted(os.listdir("a/adapter"))
    assert hf_cli.export_main(["--ckpt", "x/orbax", *inputs, "--out", out, "--force"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and words in err, err
    assert (sorted(os.listdir("x/orbax")), sorted(os.listdir("a/adapter"))) == before
    assert not [n for n in os.listdir(converted) + os.listdir("x") + os.listdir("a") if n.startswith(".")]


def test_out_sharing_a_name_prefix_with_the_checkpoint_is_allowed(converted, monkeypatch):
    monkeypatch.chdir(converted)
    assert hf_cli.export_main(["--ckpt", "x/orbax", "--out", "x/orbax-hf"]) == 0
    assert hf_cli.export_main(["--ckpt", "x/orbax", "--out", "x/orb"]) == 0
    assert os.path.isfile("x/orbax-hf/model.safetensors") and os.path.isfile("x/orb/model.safetensors")
