"""Peak host memory of `load()`: a checkpoint costs about its own bytes, never twice.

A scaled-down bfloat16 checkpoint (~330 MB, random weights, Hugging Face layout, converted
with the project's converter) is loaded in a fresh subprocess per case, and the increase of
its peak resident memory over its resident memory just before `load()` must stay within the
parameter bytes plus MARGIN_FRACTION of them: a loader that restores all leaves at once, or
keeps a second copy of them, goes over the margin.

Measured on the development machine (peak increase / parameter bytes, 327 MB of parameters),
when layers were still stored stacked on a leading axis and per-layer buffers were a load
option (layout version 1; since version 2 every layer and weight is its own leaf):

    layout           before (Orbax restore of the whole tree,   after (leaf by leaf into aligned
                     then unstack; HF arrays copied per leaf)   buffers the CPU device adopts)
    orbax stacked    1.37                                       1.14
    orbax per-layer  2.24                                       1.07
    hf stacked       1.05                                       1.03
    hf per-layer     1.79                                       1.02
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bluelm_jax.config import BlueLMConfig
from bluelm_jax.hf.to_orbax import convert_hf_to_flax
from tests.hf_reference import write_hf_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARGIN_FRACTION = 0.25
CONFIG = BlueLMConfig(vocab_size=8000, hidden_size=768, intermediate_size=3072, num_hidden_layers=16,
                      num_attention_heads=6, num_key_value_heads=6)

# Runs in a fresh interpreter: prints the parameter bytes and the peak RSS increase of load().
MEASURE = """
import json, sys
import jax, bluelm_jax
import bluelm_jax.tokenizer, bluelm_jax.hf.to_orbax  # what load() imports, outside the measure
def status_kb(field):  # VmRSS now, VmHWM peak; unlike ru_maxrss, not inherited from the parent
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))
before = status_kb("VmRSS")
model = bluelm_jax.load(sys.argv[1])
param_bytes = sum(x.nbytes for x in jax.tree.leaves(model.params))
print(json.dumps({"param_bytes": param_bytes, "increase": (status_kb("VmHWM") - before) * 1024}))
"""


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tokenizer_model) -> dict[str, str]:
    """The scaled-down checkpoint as a Hugging Face dir and as a converted Orbax dir."""
    root = tmp_path_factory.mktemp("load-memory")
    hf = write_hf_checkpoint(str(root / "hf"), CONFIG, tokenizer_model, num_shards=2, dtype="bfloat16")
    convert_hf_to_flax(hf, str(root / "orbax"), progress=False)
    return {"hf": hf, "orbax": str(root / "orbax")}


def measure_load(path: str) -> dict:
    """Parameter bytes and peak RSS increase of load(path) in a fresh single-device CPU process."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run([sys.executable, "-c", MEASURE, path], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("source", ["orbax", "hf"])
def test_load_peak_memory_is_about_the_parameters(checkpoints, source):
    result = measure_load(checkpoints[source])
    param_bytes, increase = result["param_bytes"], result["increase"]
    assert param_bytes > 300e6  # the checkpoint is as large as stated
    limit = param_bytes * (1 + MARGIN_FRACTION)
    assert increase <= limit, (f"{source}: load() raised peak RSS by {increase / 1e6:.0f} MB for "
                               f"{param_bytes / 1e6:.0f} MB of parameters (limit {limit / 1e6:.0f} MB)")


@pytest.mark.parametrize("layout", ["kernel", "weight"])
def test_accelerator_path_sends_shards_in_blocks(tmp_path, tokenizer_model, monkeypatch, layout):
    """Devices that do not adopt host buffers get each shard in row blocks, joined on the device
    (in the weight layout, blocks of stored rows transposed into columns of the shard)."""
    import jax
    import numpy as np

    from bluelm_jax import checkpoint
    from bluelm_jax.config import preset
    from bluelm_jax.params import flatten, get_path, path_in
    from bluelm_jax.sharding import make_mesh, param_shardings, transposed_sharding

    config = preset("tiny")
    orbax = str(tmp_path / "orbax")
    convert_hf_to_flax(write_hf_checkpoint(str(tmp_path / "hf"), config, tokenizer_model), orbax, progress=False)
    expected = checkpoint.restore_params(orbax, config)
    shardings = param_shardings(config, make_mesh("data=2,tensor=4"))
    block_bytes = 4096
    monkeypatch.setattr(checkpoint, "adopts_host_buffers", lambda device: False)
    monkeypatch.setattr(checkpoint, "READ_BLOCK_BYTES", block_bytes)
    sent: list[np.ndarray] = []
    device_put = jax.device_put
    monkeypatch.setattr(checkpoint.jax, "device_put", lambda x, *a, **k: sent.append(x) or device_put(x, *a, **k))
    got = checkpoint.restore_params(orbax, config, shardings=shardings, layout=layout)
    host_blocks = [x for x in sent if isinstance(x, np.ndarray)]
    assert len(host_blocks) > len(list(flatten(got))) * 2  # shards went in several blocks
    assert all(x.nbytes <= block_bytes or min(x.shape) == 1 for x in host_blocks)
    moved = 0
    for path, leaf in flatten(expected):
        value, sharding = np.asarray(leaf), get_path(shardings, path)
        if path_in(path, layout) != path:
            value, sharding, moved = value.T, transposed_sharding(sharding), moved + 1
        restored = get_path(got, path_in(path, layout))
        np.testing.assert_array_equal(np.asarray(restored), value, err_msg=str(path))
        assert restored.sharding == sharding
    assert moved == (0 if layout == "kernel" else 7 * config.num_hidden_layers + 1)
