"""Training: loss/gradient parity with transformers, convergence, resume, data parallelism and sharded
(FSDP / tensor) meshes, remat, CLI."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bluelm_jax import data as D
from bluelm_jax import sharding as S
from bluelm_jax import train as T
from bluelm_jax.config import BlueLMConfig, preset
from bluelm_jax.tokenizer import BlueLMTokenizer
from tests.ft_helpers import QA, params_from_hf, qa_records, tree_equal, write_jsonl
from tests.hf_reference import random_hf_weights, reference_model

CONFIG = preset("tiny").replace(vocab_size=640)  # the test tokenizer has 600 pieces
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tok(tokenizer_model):
    return BlueLMTokenizer(tokenizer_model)


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", qa_records(2))


def test_loss_and_gradients_match_transformers(tok, tmp_path):
    """One step's loss and every gradient equal the reference's (float32, <= 1e-4 relative), prompt masked."""
    import torch

    weights = random_hf_weights(CONFIG, seed=3)
    params = params_from_hf(CONFIG, weights)
    ds = D.load_dataset(write_jsonl(tmp_path / "d.jsonl", qa_records()[:3]), tok, 64)
    batch = D.make_batch(ds.examples, 3, 64, CONFIG.pad_token_id)  # rows of different lengths, right-padded
    assert 0 < batch.weights.sum() < (batch.inputs != CONFIG.pad_token_id).sum() - 3  # the prompts are masked
    tc = T.TrainConfig(seq_len=64)
    (loss, _), grads = jax.value_and_grad(T.loss_fn, has_aux=True)(params, {}, batch, None, CONFIG, tc, jnp.float32)

    ref = reference_model(CONFIG, weights)
    ref.train()  # no dropout in LLaMA; gradients on
    ids = np.concatenate([batch.inputs, batch.targets[:, -1:]], axis=1)  # HF shifts labels itself
    labels = np.full(ids.shape, -100, np.int64)
    labels[:, 1:] = np.where(batch.weights > 0, batch.targets, -100)
    out = ref(input_ids=torch.from_numpy(ids.astype(np.int64)), labels=torch.from_numpy(labels))
    out.loss.backward()
    assert abs(float(loss) - out.loss.item()) <= 1e-4 * out.loss.item()

    named = dict(ref.named_parameters())
    named["model.embed_layer_norm.weight"], named["model.embed_layer_norm.bias"] = (
        ref.embed_layer_norm.weight, ref.embed_layer_norm.bias)
    from bluelm_jax.params import get_path, hf_tensors

    for t in hf_tensors(CONFIG):
        g = np.asarray(get_path(grads, t.path))
        g = g.T if t.transpose else g
        r = named[t.hf_name].grad.numpy()
        rel = np.linalg.norm(g - r) / np.linalg.norm(r)
        assert rel <= 1e-4, (t.hf_name, rel)


def test_default_size_model_drives_loss_down(tok, tmp_path):
    """The default model's shape (3.7M parameters), 200 steps on 4 fixed samples: loss < 0.05."""
    train_file = write_jsonl(tmp_path / "short.jsonl", [{"prompt": q[:12], "response": a[:20]} for q, a in
                                                        (r.values() for r in qa_records())])
    from bluelm_jax.default_model.build import MODEL_SHAPE
    from bluelm_jax.model import init_params

    import types

    config = BlueLMConfig(vocab_size=640, **MODEL_SHAPE)
    model = types.SimpleNamespace(config=config, tokenizer=tok, params=init_params(config), path="")
    tc = T.TrainConfig(seq_len=32, batch_size=4, learning_rate=3e-3, warmup_steps=20, max_steps=200,
                       mesh="data=1", log_steps=1000)
    result = T.train(model, train_file, tc, progress=False, log=lambda s: None)
    losses = [h["loss"] for h in result.history]
    assert losses[0] > 5.0 and losses[-1] < 0.05, (losses[0], losses[-1])


@pytest.mark.parametrize("spec", ["data=1", "fsdp=2,tensor=4"])
def test_kill_and_resume_reaches_the_same_parameters(tok, train_file, tmp_path, spec):
    """Also on a sharded mesh: the checkpoint holds the sharded state and is restored sharded."""
    config = CONFIG if spec == "data=1" else SHARDED
    model = _tiny(tok, config)
    tc = T.TrainConfig(seq_len=64, batch_size=2, grad_accum=2, learning_rate=3e-3, warmup_steps=2, max_steps=6,
                       save_steps=2, keep_checkpoints=2, mesh=spec, seed=5)
    whole = T.train(model, train_file, tc, out_dir=str(tmp_path / "a"), progress=False, log=lambda s: None)

    class Killed(Exception):
        pass

    def kill_at_5(record):
        if record["step"] == 5:  # after the checkpoint of step 4, before that of step 6
            raise Killed

    with pytest.raises(Killed):
        T.train(model, train_file, tc, out_dir=str(tmp_path / "b"), callback=kill_at_5, progress=False,
                log=lambda s: None)
    assert sorted(os.listdir(tmp_path / "b" / "checkpoints")) == ["2", "4"]
    resumed = T.train(model, train_file, tc, out_dir=str(tmp_path / "b"), progress=False, log=lambda s: None)
    assert resumed.resumed_from == 4 and [h["step"] for h in resumed.history] == [5, 6]
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in whole.history[4:]]
    assert tree_equal(resumed.params, whole.params)
    assert sorted(os.listdir(tmp_path / "b" / "checkpoints")) == ["4", "6"]  # the last keep_checkpoints
    log = [json.loads(line) for line in open(tmp_path / "b" / "train_log.jsonl")]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 5, 6]
    # the final model is a converted directory that loads
    import bluelm_jax

    loaded = bluelm_jax.load(resumed.model_dir)
    assert tree_equal(loaded.params, resumed.params)
    # the last checkpoint restores onto the mesh, each device receiving only its shard
    mesh = S.batch_mesh(tc.mesh, tc.batch_size)
    manager = T._checkpoint_manager(str(tmp_path / "b"), tc)
    state, position = T._restore(manager, 6, T.abstract_state(config, tc, mesh))
    manager.close()
    assert tree_equal(jax.device_get(state.params), resumed.params)
    _assert_sharded_like_params(state, config, mesh)


SHARDED = CONFIG.replace(num_attention_heads=4, num_key_value_heads=4)  # 4 heads: split 4 ways on tensor
MESHES = ["data=2,fsdp=4", "fsdp=2,tensor=4"]


def _tiny(tok, config=CONFIG):
    import types

    return types.SimpleNamespace(config=config, tokenizer=tok, path="",
                                 params=params_from_hf(config, random_hf_weights(config, 1)))


def _sharded_tc(spec):
    return T.TrainConfig(seq_len=64, batch_size=8, grad_accum=2, max_steps=4, learning_rate=1e-3, warmup_steps=1,
                         weight_decay=0.01, mesh=spec, log_steps=1000)


LAYER_1 = ("model", "layers", 1)


def _shard_shape(path, mesh):
    """The per-device block of `path` in SHARDED on `mesh` (hidden 256, 4 heads x 64, MLP 512, vocab 640)."""
    f, t = mesh.shape.get("fsdp", 1), mesh.shape.get("tensor", 1)
    return {("model", "embed_tokens", "embedding"): (640 // t, 256 // f), ("lm_head", "kernel"): (256 // f, 640 // t),
            (*LAYER_1, "self_attn", "q_proj", "kernel"): (256 // f, 256 // t),
            (*LAYER_1, "self_attn", "k_proj", "kernel"): (256 // f, 256 // t),
            (*LAYER_1, "self_attn", "o_proj", "kernel"): (256 // t, 256 // f),
            (*LAYER_1, "mlp", "up_proj", "kernel"): (256 // f, 512 // t),
            (*LAYER_1, "mlp", "down_proj", "kernel"): (512 // t, 256 // f), ("model", "norm", "weight"): (256,)}[path]


def _assert_sharded_like_params(state, config, mesh):
    """Every param and every optimizer-state leaf that mirrors one (Adam mu/nu, accumulated
    gradients) is split by sharding.param_spec, each device holding only its block; counts replicated."""
    from bluelm_jax.params import get_path
    from bluelm_jax.sharding import param_shardings

    shardings = param_shardings(config, mesh)
    moments = {"mu": 0, "nu": 0}
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]:
        name = jax.tree_util.keystr(key_path)
        if leaf.ndim == 0:
            assert leaf.sharding.is_fully_replicated, name
            continue
        path = tuple(k.key for k in key_path if isinstance(k, jax.tree_util.DictKey))
        assert leaf.sharding == get_path(shardings, path), name
        moments.update({m: moments[m] + 1 for m in moments if f".{m}[" in name})
    assert moments == {"mu": 5 + 9 * config.num_hidden_layers, "nu": 5 + 9 * config.num_hidden_layers}  # one per parameter
    for path in [("model", "embed_tokens", "embedding"), ("lm_head", "kernel"), (*LAYER_1, "self_attn", "q_proj", "kernel"),
                 (*LAYER_1, "self_attn", "k_proj", "kernel"), (*LAYER_1, "self_attn", "o_proj", "kernel"),
                 (*LAYER_1, "mlp", "up_proj", "kernel"), (*LAYER_1, "mlp", "down_proj", "kernel"),
                 ("model", "norm", "weight")]:
        leaves = [get_path(state.params, path)] + [
            leaf for key_path, leaf in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]
            if jax.tree_util.keystr(key_path).endswith("".join(f"[{k!r}]" for k in path))]
        assert len(leaves) == 4  # the param, its accumulated gradient, mu and nu
        for leaf in leaves:
            assert len(leaf.addressable_shards) == mesh.size
            assert {s.data.shape for s in leaf.addressable_shards} == {_shard_shape(path, mesh)}, path
    assert state.step.sharding.is_fully_replicated


@pytest.fixture(scope="module")
def one_device_run(tok, train_file):
    return T.train(_tiny(tok, SHARDED), train_file, _sharded_tc("data=1"), progress=False, log=lambda s: None)


@pytest.mark.parametrize("spec", MESHES)
def test_sharded_mesh_matches_one_device(tok, train_file, one_device_run, spec):
    """Batch rows over data x fsdp, weights and Adam state sharded: the loss curve of one device
    (float32, <= 1e-5 relative) and its final params. Params: within 1% of how far training moved
    them (Adam's m / sqrt(v) turns a gradient at rounding level, whose last bits depend on the
    reduction order, into an update of up to lr; plain data=8 differs by as much)."""
    model = _tiny(tok, SHARDED)
    run = T.train(model, train_file, _sharded_tc(spec), progress=False, log=lambda s: None)
    np.testing.assert_allclose([h["loss"] for h in run.history], [h["loss"] for h in one_device_run.history],
                               rtol=1e-5)
    moved = max(np.abs(np.asarray(a) - np.asarray(b)).max()
                for a, b in zip(jax.tree.leaves(one_device_run.params), jax.tree.leaves(model.params)))
    assert moved > 1e-3
    for a, b in zip(jax.tree.leaves(run.params), jax.tree.leaves(one_device_run.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=0.01 * moved)


@pytest.mark.parametrize("spec", MESHES)
def test_each_device_holds_only_its_shard(tok, train_file, spec):
    """After a step (full fine-tuning), params, Adam moments and accumulated gradients are split by
    the sharding rules; LoRA keeps the frozen base split the same way and the adapters replicated."""
    from bluelm_jax import lora as L
    from bluelm_jax.sharding import param_shardings

    model, tc = _tiny(tok, SHARDED), _sharded_tc(spec)
    mesh = S.batch_mesh(tc.mesh, tc.batch_size)
    batch = D.make_batch(D.load_dataset(train_file, tok, 64).examples[:8], 8, 64, CONFIG.pad_token_id)
    step = T.make_train_step(SHARDED, tc, jnp.dtype(jnp.float32), mesh)
    state, metrics = step(T.init_state(model, tc, mesh), {}, S.put_batch(batch, S.batch_sharding(mesh, 8)))
    assert np.isfinite(float(metrics["loss"]))
    _assert_sharded_like_params(state, SHARDED, mesh)
    tokens = S.put_batch(batch, S.batch_sharding(mesh, 8)).inputs
    assert {s.data.shape for s in tokens.addressable_shards} == {(8 // (mesh.shape.get("data", 1)
                                                                       * mesh.shape.get("fsdp", 1)), 64)}

    lora_tc = dataclasses.replace(tc, lora=L.LoraConfig(rank=4, targets="all"))
    frozen = T.frozen_params(model, lora_tc, mesh)
    assert jax.tree.map(lambda x: x.sharding, frozen) == param_shardings(SHARDED, mesh)
    state, _ = T.make_train_step(SHARDED, lora_tc, jnp.dtype(jnp.float32), mesh)(
        T.init_state(model, lora_tc, mesh), frozen, S.put_batch(batch, S.batch_sharding(mesh, 8)))
    assert all(x.sharding.is_fully_replicated for x in jax.tree.leaves((state.params, state.opt_state)))


def test_mesh_setting_is_checked():
    assert T.TrainConfig(mesh="data=2,fsdp=4").mesh == "data=2,fsdp=4"
    for bad, message in [("data=3", "not divisible by the 3 batch shards"), ("pipeline=2", "unknown mesh axis"),
                         ("data", "bad mesh axis")]:
        with pytest.raises(ValueError, match=message):
            T.TrainConfig(batch_size=8, mesh=bad)
    with pytest.raises(ValueError, match="needs 16 devices, 8 present"):
        S.batch_mesh("data=16", 16)
    assert dict(S.batch_mesh("fsdp=2,tensor=-1", 4).shape) == {"fsdp": 2, "tensor": 4}
    assert dict(S.batch_mesh(None, 6).shape) == {"data": 6}  # the most devices dividing 6
    with pytest.raises(S.MeshError, match="batch_size 6 is not divisible by the 4 batch shards"):
        S.batch_mesh("data=2,fsdp=2,tensor=2", 6)


def test_data_parallel_matches_one_device(tok, train_file):
    """The batch split over 8 devices gives the loss curve of one device."""
    assert len(jax.devices()) == 8
    model = _tiny(tok)
    runs = [T.train(model, train_file, T.TrainConfig(seq_len=64, batch_size=8, max_steps=2, learning_rate=1e-3,
                                                     mesh=f"data={n}"), progress=False, log=lambda s: None)
            for n in (1, 8)]
    np.testing.assert_allclose([h["loss"] for h in runs[0].history], [h["loss"] for h in runs[1].history],
                               rtol=1e-5)


def test_remat_same_gradients_and_eval(tok, train_file, tmp_path):
    params = _tiny(tok).params
    ds = D.load_dataset(train_file, tok, 64)
    batch = D.make_batch(ds.examples[:2], 2, 64, CONFIG.pad_token_id)
    g = [jax.jit(jax.grad(lambda p: T.loss_fn(p, {}, batch, None, CONFIG, T.TrainConfig(remat=r), jnp.float32)[0]))(
        params) for r in (False, True)]
    for a, b in zip(jax.tree.leaves(g[0]), jax.tree.leaves(g[1])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    r = T.train(_tiny(tok), train_file, T.TrainConfig(seq_len=64, batch_size=4, max_steps=2, eval_steps=1,
                                                       mesh="data=1", remat=True),
                eval_file=train_file, progress=False, log=lambda s: None)
    assert all("eval_loss" in h for h in r.history) and r.eval_loss == r.history[-1]["eval_loss"]
    assert r.history[0]["lr"] == 0.0 and r.history[-1]["tokens_per_s"] > 0


def test_bad_training_data_raises(tok, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "response": "b"}, "not json"])
    with pytest.raises(D.DataError, match=r"bad\.jsonl:2: not valid JSON"):
        T.train(_tiny(tok), bad, T.TrainConfig(seq_len=64, max_steps=1), progress=False)


def run_cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "bluelm_jax", "finetune", *args],
                          capture_output=True, text=True, cwd=cwd, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""})


def test_finetune_command_bad_input_is_one_line(hf_checkpoint, tmp_path, train_file):
    hf = hf_checkpoint("tiny")
    cases = [
        (["--model", hf, "--train-file", str(tmp_path / "missing.jsonl")], "missing.jsonl: no such file"),
        (["--model", hf, "--train-file", "/dev/null"], "/dev/null: not a regular file but a device"),
        (["--model", hf, "--train-file", train_file, "--eval-file", str(tmp_path)], "is a directory"),
        (["--model", str(tmp_path / "nomodel"), "--train-file", train_file], "nomodel"),
        (["--model", hf, "--train-file", train_file, "--lora-rank", "4", "--lora-targets", "q,zz"], "unknown LoRA target 'zz'"),
        (["--model", hf, "--train-file", train_file, "--lr", "-1"], "learning_rate must be positive"),
        (["--model", hf, "--train-file", train_file, "--mesh", "data=3"], "not divisible by the 3 batch shards"),
    ]
    for args, expected in cases:
        p = run_cli(*args, "--out", str(tmp_path / "out"))
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 1 and len(lines) == 1 and expected in lines[0] and lines[0].startswith("error:"), p.stderr
        assert not os.path.exists(tmp_path / "out")


def test_finetune_command_skipped_records_on_stderr_and_rerun_of_a_finished_run(tmp_path):
    """Skipped records are a warning (stderr); running a finished run again says it is complete (exit 0:
    what was asked for, a run trained to --max-steps, is there), not `loss nan`."""
    data = write_jsonl(tmp_path / "t.jsonl", qa_records() + ["not json"])
    args = ["--train-file", data, "--skip-bad-lines", "--lora-rank", "2", "--seq-len", "64", "--batch-size", "2",
            "--max-steps", "1", "--save-steps", "1", "--no-progress", "--out", str(tmp_path / "run")]
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr
    assert "skipped 1 bad record(s) of" in first.stderr and "t.jsonl:5: not valid JSON" in first.stderr, first.stderr
    assert "skipped 1 bad record(s) of" not in first.stdout and "not valid JSON" not in first.stdout, first.stdout
    again = run_cli(*args)
    assert again.returncode == 0, again.stderr
    last = again.stdout.strip().splitlines()[-1]
    assert last.startswith("already complete at step 1 (--max-steps 1)"), again.stdout
    assert "to start over use --no-resume or another --out" in last and "nan" not in again.stdout, again.stdout


def test_rerun_of_a_finished_run_trains_nothing_and_no_resume_starts_over(tok, train_file, tmp_path):
    """resume=False (--no-resume) replaces the old run's checkpoints: a later resume continues the new run."""
    from bluelm_jax.lora import LoraConfig

    model, out = _tiny(tok), str(tmp_path / "run")
    quiet = dict(out_dir=out, progress=False, log=lambda s: None)
    tc = T.TrainConfig(seq_len=64, batch_size=2, learning_rate=1e-2, warmup_steps=0, max_steps=2, save_steps=1,
                       mesh="data=1", lora=LoraConfig(rank=2))
    first = T.train(model, train_file, tc, **quiet)
    again = T.train(model, train_file, tc, **quiet)
    assert again.resumed_from == 2 and again.history == [] and tree_equal(again.params, first.params)
    other_file = write_jsonl(tmp_path / "other.jsonl", [{"prompt": a, "response": q} for q, a in QA * 2])
    fresh = T.train(model, other_file, tc, resume=False, **quiet)
    assert [h["step"] for h in fresh.history] == [1, 2] and not tree_equal(fresh.params, first.params)
    latest = T.train(model, other_file, tc, **quiet)
    assert latest.resumed_from == 2 and latest.history == [] and tree_equal(latest.params, fresh.params)
    assert [json.loads(line)["step"] for line in open(os.path.join(out, "train_log.jsonl"))] == [1, 2]


def test_finetune_command_mesh_options():
    """--mesh SPEC, or --data-parallel N as a shorthand for --mesh data=N (0: the default)."""
    from bluelm_jax.finetune_cli import build_parser, config_from_args

    def parse(*args):
        return config_from_args(build_parser().parse_args(["--train-file", "t.jsonl", *args]))

    assert parse().mesh is None and parse("--data-parallel", "0").mesh is None
    assert parse("--data-parallel", "2").mesh == "data=2"
    assert parse("--mesh", "fsdp=2,tensor=4").mesh == "fsdp=2,tensor=4"
    with pytest.raises(ValueError, match="not both"):
        parse("--mesh", "data=2", "--data-parallel", "2")
    with pytest.raises(ValueError, match="unknown mesh axis 'pipe'"):
        parse("--mesh", "pipe=2")


def test_finetune_command_lora_on_default_model(tmp_path, train_file):
    """No --model: the bundled default model; LoRA with --merge writes the adapter and a loadable model."""
    out = tmp_path / "run"
    p = run_cli("--train-file", train_file, "--eval-file", train_file, "--lora-rank", "4", "--lora-targets", "q,v",
                "--seq-len", "64", "--batch-size", "4", "--max-steps", "3", "--save-steps", "2", "--merge",
                "--no-progress", "--lr", "1e-3", "--out", str(out))
    assert p.returncode == 0, p.stderr
    assert "done: 3 steps" in p.stdout and "eval loss" in p.stdout
    assert sorted(os.listdir(out)) == ["adapter", "checkpoints", "model", "train_log.jsonl"]
    import bluelm_jax

    assert bluelm_jax.load(out / "model").config.num_parameters() > 1_000_000
