"""Two real processes on localhost (4 CPU devices each, gloo collectives) generate, with the
library's generation, exactly the tokens of the single-process run."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from bluelm_jax import distributed
from tests.sharding_data import CONFIG, greedy_ids, model_of, prompt_logits, prompts, random_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_generate_the_single_process_tokens(tmp_path):
    coordinator = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(k, None)
    outs = [tmp_path / f"out{i}.json" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "-m", "tests.multihost_worker", coordinator, "2", str(i), str(outs[i])],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=240)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, p in enumerate(procs):
        assert p.returncode == 0, f"process {i} failed:\n{logs[i][-4000:]}"
    assert "multihost worker done" in logs[0] and "multihost worker done" not in logs[1]  # only process 0 prints

    single = model_of(jax.device_put(random_params(CONFIG, seed=0), jax.devices()[0]))
    ref_ids, ref_logits = greedy_ids(single, prompts(CONFIG)), prompt_logits(single, prompts(CONFIG))
    for out in outs:
        result = json.loads(out.read_text())
        assert (result["process_count"], result["devices"], result["local_devices"]) == (2, 8, 4)
        for mesh_spec, run in result["runs"].items():
            assert run["local_shards"] == 4  # each process holds only its own devices' shards
            assert run["ids"] == ref_ids, mesh_spec
            np.testing.assert_allclose(np.asarray(run["logits"]), ref_logits, atol=1e-4, err_msg=mesh_spec)
        assert result["runs"]["data=2,tensor=4"]["gate_proj_shard_shapes"] == [[256, 128]]
        assert result["runs"]["data=1,tensor=8"]["gate_proj_shard_shapes"] == [[256, 64]]


def test_settings_from_flags_and_environment():
    assert distributed.settings(environ={}) is None
    assert distributed.settings(environ={"SLURM_JOB_ID": "7"}) == {}
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    assert distributed.settings(environ=env) == {"coordinator_address": "10.0.0.1:1234", "num_processes": 4,
                                                 "process_id": 3}
    assert distributed.settings("h:1", 2, 0, environ=env)["coordinator_address"] == "h:1"
    for kwargs, why in [(dict(coordinator="h:1"), "needs --num-processes"),
                        (dict(num_processes=2, process_id=1), "need --coordinator"),
                        (dict(coordinator="h:1", num_processes=2, process_id=2), "not in 0..1")]:
        with pytest.raises(distributed.DistributedError, match=why):
            distributed.settings(environ={}, **kwargs)
    assert distributed.initialize() is False and distributed.is_main()
