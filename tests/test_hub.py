"""Hub repo ids as model paths, resolved offline from a Hugging Face cache laid out by the test
(models--org--name/blobs, snapshots/<revision>/ links, refs/main) with huggingface_hub itself."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest

import bluelm_jax
from bluelm_jax import hub
from bluelm_jax.hf.cli import convert_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO = "vivo-ai/BlueLM-tiny-test"
REVISION = "0123456789abcdef0123456789abcdef01234567"


def lay_out_hub_cache(cache: str, repo_id: str, source_dir: str) -> str:
    """Copies source_dir into the cache layout huggingface_hub documents; returns the snapshot dir."""
    repo = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
    blobs, snapshot = os.path.join(repo, "blobs"), os.path.join(repo, "snapshots", REVISION)
    os.makedirs(blobs)
    os.makedirs(snapshot)
    os.makedirs(os.path.join(repo, "refs"))
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write(REVISION)
    for name in sorted(os.listdir(source_dir)):
        with open(os.path.join(source_dir, name), "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        shutil.copyfile(os.path.join(source_dir, name), os.path.join(blobs, digest))
        os.symlink(os.path.join("..", "..", "blobs", digest), os.path.join(snapshot, name))
    return snapshot


@pytest.fixture(scope="module")
def source(hf_checkpoint):
    return hf_checkpoint("tiny")


@pytest.fixture
def offline_cache(tmp_path, source, monkeypatch):
    """HF_HUB_CACHE holding REPO, offline mode on (for this process and its subprocesses)."""
    from huggingface_hub import constants

    cache = str(tmp_path / "hub")
    snapshot = lay_out_hub_cache(cache, REPO, source)
    for name, value in (("HF_HUB_CACHE", cache), ("HF_HUB_OFFLINE", True)):
        monkeypatch.setattr(constants, name, value)
    monkeypatch.setenv("HF_HUB_CACHE", cache)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return snapshot


def test_repo_id_resolves_to_the_cached_snapshot(offline_cache, source):
    assert os.path.realpath(hub.resolve(REPO)) == os.path.realpath(offline_cache)
    ids = [[1, 5, 77, 300, 12, 9]]
    np.testing.assert_array_equal(np.asarray(bluelm_jax.load(REPO).logits(ids)),
                                  np.asarray(bluelm_jax.load(source).logits(ids)))


def test_local_paths_win_and_are_not_repo_ids(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    os.makedirs("vivo-ai/BlueLM-7B-Chat")
    assert not hub.is_repo_id("vivo-ai/BlueLM-7B-Chat")  # an existing local directory
    assert hub.resolve("vivo-ai/BlueLM-7B-Chat") == "vivo-ai/BlueLM-7B-Chat"
    for name in ("vivo-ai/BlueLM-7B-Base", "org/name.v2"):
        assert hub.is_repo_id(name)
    for name in ("model-dir", "/abs/org/name", "a/b/c", "../x", "./x", "org/"):
        assert not hub.is_repo_id(name)


def test_uncached_repo_id_is_one_line(offline_cache):
    with pytest.raises(hub.HubError) as e:
        bluelm_jax.load("vivo-ai/BlueLM-7B-Chat")
    assert str(e.value) == ("vivo-ai/BlueLM-7B-Chat: not a local directory, not in the Hugging Face cache, and "
                            "the Hub cannot be reached (HF_HUB_OFFLINE is set)")


def test_only_one_weight_format_is_fetched(monkeypatch):
    from huggingface_hub import HfApi, constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    listing = ["config.json", "tokenizer.model", "pytorch_model-00001-of-00002.bin", "model.safetensors", "README.md"]
    def model_info(self, repo_id, expand):
        assert repo_id == REPO and expand == ["siblings"]
        return types.SimpleNamespace(siblings=[types.SimpleNamespace(rfilename=f) for f in listing])

    monkeypatch.setattr(HfApi, "model_info", model_info)
    assert hub._weight_patterns(REPO) == hub.SAFETENSORS
    listing[3] = "pytorch_model-00002-of-00002.bin"
    assert hub._weight_patterns(REPO) == hub.PYTORCH


def test_converter_takes_a_repo_id(offline_cache, tmp_path, capsys):
    out = str(tmp_path / "orbax")
    assert convert_main(["--hf-dir", REPO, "--out", out, "--no-progress"]) == 0, capsys.readouterr().err
    assert sorted(os.listdir(out)) == ["bluelm_jax.json", "config.json", "params", "tokenizer.model"]
    assert convert_main(["--hf-dir", "vivo-ai/not-cached", "--out", str(tmp_path / "o2"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err == ("error: vivo-ai/not-cached: not a local directory, not in the Hugging Face cache, and the Hub "
                   "cannot be reached (HF_HUB_OFFLINE is set)\n")
    assert not os.path.exists(tmp_path / "o2")


def test_generate_command_takes_a_repo_id(offline_cache, source):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "",
           "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}

    def generate(model):
        return subprocess.run([sys.executable, "-m", "bluelm_jax", "generate", "--model", model, "--json",
                               "--prompt", "Hello", "--max-new-tokens", "4"],
                              capture_output=True, text=True, cwd=ROOT, env=env, timeout=180)

    by_id, by_dir = generate(REPO), generate(source)
    assert by_id.returncode == 0, by_id.stderr
    assert json.loads(by_id.stdout) == json.loads(by_dir.stdout)
    missing = generate("vivo-ai/not-cached")
    assert missing.returncode == 1 and missing.stderr.count("\n") == 1
    assert "vivo-ai/not-cached: not a local directory, not in the Hugging Face cache" in missing.stderr
